"""Lookahead drafting (spec/lookahead.py): the proposer's Jacobi guesses and n-gram pool with exact tokens, the
verifier's per-row choices it learns from, and the engine's greedy identity and sampling distribution with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import (
    CHI_SQUARE_3_DOF_P001,
    lookup_prompts,
    loop_prompt,
    tiny_llm,
    two_token_chi_square,
    write_head64_gguf,
)

from tokenmill import LLM, SamplingParams
from tokenmill.sampler.sampler import Sampler, SamplingRow
from tokenmill.spec.lookahead import LookaheadProposer
from tokenmill.spec.verifier import verify

VOCAB = 300
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)

# ---- the proposer ----


def test_first_guess_is_the_sequence_tail_and_then_the_jacobi_update() -> None:
    p = LookaheadProposer(ngram_size=3)
    prompt = [10, 11, 12, 13]
    assert p.propose("r", prompt, [], 3) == [11, 12, 13]
    # Rows: after 13 the target says 20 (draft 11 rejected); after 13 11 it says 21, after 13 11 12 it says 22, ...
    p.observe("r", [11, 12, 13], [20, 21, 22, 23], num_accepted=0)
    # The guess for the positions after the emitted 20: the choices past row 0.
    assert p.propose("r", prompt, [20], 3) == [21, 22, 23]


def test_accepted_drafts_shift_the_guess_and_a_stale_guess_is_dropped() -> None:
    p = LookaheadProposer(ngram_size=3)
    prompt = [1, 2, 3]
    assert p.propose("r", prompt, [], 3) == [1, 2, 3]
    p.observe("r", [1, 2, 3], [1, 2, 7, 8], num_accepted=2)  # 1 and 2 accepted, then 7 emitted
    assert p._states["r"].guess == [8] and p._states["r"].guess_at == 6
    assert p.propose("r", prompt, [1, 2, 7], 2) == [8]  # nothing in the pool follows 7
    # The sequence moved on without this guess (a step without drafts): it is stale, the tail is guessed again.
    assert p.propose("r", prompt, [1, 2, 7, 5], 2) == [7, 5]


def test_pool_collects_guess_then_choice_ngrams_and_its_hit_is_drafted_first() -> None:
    p = LookaheadProposer(ngram_size=3, pool_size=2)
    prompt = [5, 6]
    assert p.propose("r", prompt, [], 2) == [5, 6]
    p.observe("r", [5, 6], [40, 41, 42], num_accepted=0)
    # rows: 6 (last), 5, 6 → 3-grams "rows[i-1], rows[i], choice i": (6, 5, 41) and (5, 6, 42)
    assert p._states["r"].pool == {6: [(5, 41)], 5: [(6, 42)]}
    # The output now ends in 5: the pool's continuation of 5 wins over the Jacobi guess, and is extended through
    # the pool from its own last token (42 has none, so it stops there).
    assert p.propose("r", prompt, [40, 5], 4) == [6, 42]


def test_pool_keeps_the_latest_continuations_per_token() -> None:
    p = LookaheadProposer(ngram_size=2, pool_size=2)
    p.propose("r", [1], [], 1)
    for step, choice in enumerate([7, 8, 9, 8]):
        p._states["r"].drafted_at, p._states["r"].last_token = 1 + step, 1
        p.observe("r", [1], [choice, 3], num_accepted=0)
    # 2-grams (1, choice) and (1, 3) each step: 1's continuations, the latest two, the most recent last
    assert p._states["r"].pool[1] == [(8,), (3,)]
    p.drop("r")
    assert "r" not in p._states


def test_observe_ignores_what_does_not_fit() -> None:
    p = LookaheadProposer()
    p.observe("unknown", [1], [1, 2], 1)  # no state: nothing to learn into
    p.propose("r", [1, 2], [], 2)
    p.observe("r", [1, 2], [1], 0)  # choices must be one per row
    assert p._states["r"].pool == {} and p._states["r"].guess == []
    with pytest.raises(ValueError):
        LookaheadProposer(ngram_size=1)


def test_cli_and_config_take_lookahead() -> None:
    import argparse

    from tokenmill.config import EngineConfig
    from tokenmill.entrypoints.args import add_engine_args, engine_config

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    config = engine_config(parser.parse_args(["--speculative", "lookahead", "--lookahead-ngram-size", "3"]))
    assert (config.speculative, config.lookahead_ngram_size) == ("lookahead", 3)
    with pytest.raises(ValueError, match="lookahead_ngram_size"):
        EngineConfig(speculative="lookahead", lookahead_ngram_size=1)


# ---- the verifier's choices ----


def test_verifier_reports_the_target_choice_at_every_row() -> None:
    logits = torch.full((4, 10), -5.0)
    for r, t in enumerate([3, 4, 9, 1]):
        logits[r, t] = 5.0
    greedy = SamplingRow(SamplingParams(temperature=0.0), (), (), None)  # type: ignore[arg-type]
    [v] = verify(Sampler(), logits, [greedy] * 4, [[3, 5, 2]])
    assert v.token_ids == [3, 4] and v.choices == [3, 4, 9, 1]  # rows past the rejection included
    sampled = SamplingRow(SamplingParams(temperature=0.7, seed=1), (), (), torch.Generator().manual_seed(1))
    [v] = verify(Sampler(), logits, [sampled] * 4, [[3, 5, 2]])
    assert v.choices == [3, 4, 9, 1]  # sampling: the likeliest token of each row


# ---- through the engine ----


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_head64_gguf(tmp_path_factory.mktemp("lookahead") / "tiny64.gguf", VOCAB)


SPEC = {"speculative": "lookahead", "num_speculative_tokens": 4, "speculative_adaptive": False}


def make_llm(path: Path, spec: bool, **options: object) -> LLM:
    return tiny_llm(path, **((SPEC if spec else {}) | options))


@pytest.fixture(scope="module")
def plain(tiny_model) -> LLM:
    return make_llm(tiny_model, spec=False)


@pytest.mark.parametrize("options", [
    {},  # the whole batch at once
    {"max_num_batched_tokens": 24},  # chunked prefill beside verify steps, drafts trimmed by the budget
    {"num_kv_blocks": 12},  # preemption: drafts dropped first, then recompute
    {"dtype": "bfloat16"},
], ids=["batched", "chunked", "preempted", "bf16"])
def test_greedy_output_is_identical_with_lookahead(tiny_model, options) -> None:
    reference = make_llm(tiny_model, spec=False, **{k: v for k, v in options.items() if k == "dtype"})
    want = [reference.generate(p, GREEDY, use_tqdm=False)[0].token_ids for p in lookup_prompts(VOCAB)]
    llm = make_llm(tiny_model, spec=True, **options)
    assert [r.token_ids for r in llm.generate(lookup_prompts(VOCAB), GREEDY, use_tqdm=False)] == want
    stats = llm.engine.stats()
    assert 0 < stats.spec_decode.num_accepted_tokens < stats.spec_decode.num_draft_tokens
    assert stats.num_free_blocks == stats.num_total_blocks and not llm.engine.has_unfinished_requests()


def test_sampling_with_lookahead_keeps_the_target_distribution(tiny_model, plain) -> None:
    """The first two sampled tokens (top-k 2: four outcomes) against their exact probabilities; the second goes
    through verification of the lookahead's first guess."""
    llm = make_llm(tiny_model, spec=True)
    stat = two_token_chi_square(llm, plain, loop_prompt(plain, VOCAB))
    assert llm.engine.stats().spec_decode.num_draft_tokens > 0
    assert stat < CHI_SQUARE_3_DOF_P001
