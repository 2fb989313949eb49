"""A draft model that checks a prompt-lookup guess first (`speculative_lookup`): the same guesses as its own chain,
in fewer draft steps where the lookup agrees with it; the rejected part of a lookup leaves its cache; greedy output
identical to plain decoding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import lookup_prompts, tiny_llm, write_draft_pair

from tokenmill import SamplingParams
from tokenmill.config import EngineConfig
from tokenmill.model.gguf_file import GGUFFile
from tokenmill.spec.draft_model import STEPS_WEIGHT, DraftModelProposer
from tokenmill.spec.ngram import NgramProposer
from tokenmill.spec.proposer import DraftRequest

VOCAB = 300
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    return write_draft_pair(tmp_path_factory.mktemp("draft_lookup"), VOCAB)


class FixedLookup(NgramProposer):
    """A lookup that guesses `tokens` (at most as many as asked) for every request."""

    def __init__(self, tokens: list[int]) -> None:
        super().__init__()
        self.tokens = tokens

    def propose(self, request_id, prompt_token_ids, output_token_ids, max_tokens):  # noqa: ANN001, ANN201
        return self.tokens[:max_tokens]


def proposer(path: Path, lookup: NgramProposer | None, max_step_tokens: int = 64) -> DraftModelProposer:
    return DraftModelProposer.load(path, GGUFFile(path), torch.float32, torch.device("cpu"), weight_format="float",
                                   int4_group_size=32, prepack=None, enforce_eager=False, num_blocks=32,
                                   block_size=4, max_step_tokens=max_step_tokens, max_positions=1024,
                                   measure_cost=False, lookup=lookup)


def counted(p: DraftModelProposer) -> list[int]:
    """Rows of every draft step `p` runs from now on."""
    execute, rows = p.runner.execute, []

    def run(plan):  # noqa: ANN001, ANN202 - the runner's own signature
        rows.append(plan.num_tokens)
        return execute(plan)

    p.runner.execute = run  # type: ignore[method-assign]
    return rows


def test_the_guesses_are_the_drafts_own_in_fewer_steps(pair) -> None:
    prompt = [(13 * j) % (VOCAB - 1) + 1 for j in range(30)]
    own = proposer(pair[1], None)
    chain = own.propose_batch([DraftRequest("a", prompt, [], 5)])[0]
    assert len(chain) == 5
    # The prompt and the lookup in one step (30 + up to 4 rows), then a step for each guess the lookup did not give.
    for lookup, steps in ((chain[:4], [34]),  # all of it agreed: the 5th guess the draft's own after it
                          (chain[:2] + [(chain[2] + 1) % VOCAB, 7], [34, 1, 1]),  # agreed for 2: 2 steps more
                          ([(chain[0] + 1) % VOCAB], [31, 1, 1, 1, 1])):  # rejected at once: a step per guess
        checked = proposer(pair[1], FixedLookup(lookup))
        rows = counted(checked)
        assert checked.propose_batch([DraftRequest("a", prompt, [], 5)])[0] == chain
        assert rows == steps
        # the adaptive lengths price a depth at the steps it took: 1, 3 and 5 steps for 5 guesses
        assert checked.steps_per_depth == pytest.approx(1 + STEPS_WEIGHT * (len(steps) / 5 - 1))
        # the cache holds what it fed and the draft agreed with: the prompt and every guess but the last
        assert checked._seqs["a"].tokens == prompt + chain[:-1]
        # and goes on from there as the plain draft does, the lookup's rejected entries overwritten
        output = [chain[0], (chain[1] + 1) % VOCAB]
        again = own.propose_batch([DraftRequest("a", prompt, output, 3)])[0]
        assert checked.propose_batch([DraftRequest("a", prompt, output, 3)])[0] == again
    own.drop("a")


def test_a_lookup_rides_with_the_catch_up_only_when_it_fits_its_step(pair) -> None:
    """Steps of at most 16 rows: a 14-token prompt and a 2-token lookup fit in one, a 15-token prompt does not, and
    then the lookup is left out rather than split from the row that checks it."""
    for length, steps in ((14, [16]), (15, [15, 1, 1])):
        prompt = list(range(1, length + 1))
        chain = proposer(pair[1], None, 16).propose_batch([DraftRequest("a", prompt, [], 3)])[0]
        checked = proposer(pair[1], FixedLookup(chain[:2]), 16)
        rows = counted(checked)
        assert checked.propose_batch([DraftRequest("a", prompt, [], 3)])[0] == chain
        assert rows == steps


@pytest.mark.parametrize("options", [
    {"speculative": "draft"},
    {"speculative": "self", "speculative_layers": (0,)},
    {"speculative": "draft", "max_num_batched_tokens": 24, "num_kv_blocks": 14},  # chunked, preempted
], ids=["draft", "self", "chunked-preempted"])
def test_greedy_output_is_identical_with_lookups_checked(pair, options) -> None:
    prompts = lookup_prompts(VOCAB)
    reference = [r.token_ids for r in tiny_llm(pair[0]).generate(prompts, GREEDY, use_tqdm=False)]
    draft = {"speculative_model": str(pair[1])} if options["speculative"] == "draft" else {}
    llm = tiny_llm(pair[0], **(options | draft), num_speculative_tokens=4, speculative_adaptive=False)
    proposer = llm.engine.speculator.proposer
    assert proposer.lookup is not None
    rows = counted(proposer)
    assert [r.token_ids for r in llm.generate(prompts, GREEDY, use_tqdm=False)] == reference
    spec = llm.engine.stats().spec_decode
    assert 0 < spec.num_accepted_tokens <= spec.num_draft_tokens
    assert any(r > 1 for r in rows)
    assert proposer.pool.num_free_blocks == proposer.pool.num_blocks and not proposer._seqs
    assert not proposer.lookup._indexes  # its per-request index went with each request


def test_lookup_checks_can_be_turned_off(pair) -> None:
    llm = tiny_llm(pair[0], speculative="draft", speculative_model=str(pair[1]), speculative_lookup=False)
    assert llm.engine.speculator.proposer.lookup is None


def test_lookup_checks_need_a_drafting_model_and_chains() -> None:
    for options in ({"speculative": "ngram"}, {"speculative": "self", "speculative_tree_width": 2},
                    {"speculative": "self", "speculative_draft_vocab": 100}):
        with pytest.raises(ValueError, match="speculative_lookup"):
            EngineConfig(speculative_lookup=True, **options)
    # by default wherever it applies
    assert EngineConfig(speculative="self").drafts_check_lookups and EngineConfig().speculative_lookup is None
    assert not EngineConfig(speculative="self", speculative_tree_width=2).drafts_check_lookups
