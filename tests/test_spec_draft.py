"""Draft-model speculation on a tiny random pair (a 2-layer target, a 1-layer draft of the same vocabulary): greedy
output identical to plain decoding, sampling that keeps the target distribution, the draft's own KV blocks rolled
back and freed exactly, and a draft that is the target itself accepted every time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_llm, two_token_distribution, write_draft_pair, write_tiny_gguf

from tokenmill import LLM, SamplingParams
from tokenmill.attention.fused_cpu import FusedCPUBackend
from tokenmill.config import EngineConfig
from tokenmill.model.config import ModelConfig
from tokenmill.model.gguf_file import GGUFFile
from tokenmill.model.linear import GgufQ4Linear, Linear
from tokenmill.spec.adaptive import StepCostModel, choose_draft_lengths
from tokenmill.spec.draft_model import DraftModelProposer, affordable_blocks
from tokenmill.spec.proposer import DraftRequest
from tokenmill.spec.self_draft import (
    Calibration,
    Candidate,
    cached_calibration,
    calibrate,
    candidates,
    promised_speedup,
    subset_model,
)

VOCAB = 300
META = {"tokenizer.ggml.merges": [], "tokenizer.ggml.eos_token_id": 0}


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    return write_draft_pair(tmp_path_factory.mktemp("draft"), VOCAB)


def make_llm(model: Path, draft: Path | None, **options: object) -> LLM:
    spec: dict[str, object] = {} if draft is None else {
        "speculative": "draft", "speculative_model": str(draft), "num_speculative_tokens": 4,
        "speculative_adaptive": False}
    return tiny_llm(model, **(spec | options))


def prompts() -> list[list[int]]:
    return [[(31 * j + 11 * i) % (VOCAB - 1) + 1 for j in range(20 + 13 * i)] for i in range(6)]


GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def plain(pair) -> LLM:
    return make_llm(pair[0], None)


@pytest.fixture(scope="module")
def reference(plain) -> list[list[int]]:
    return [r.token_ids for r in plain.generate(prompts(), GREEDY, use_tqdm=False)]


def assert_no_leak(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    assert not llm.engine.has_unfinished_requests()
    proposer = llm.engine.speculator.proposer
    assert proposer.pool.num_free_blocks == proposer.pool.num_blocks and not proposer._seqs


@pytest.mark.parametrize("options", [
    {},
    {"max_num_batched_tokens": 24},  # the draft's catch-up and the target's prefill both chunked
    {"num_kv_blocks": 14},  # target preemption: the draft state of a preempted request is kept or recomputed
    {"enforce_eager": True},
    # A lossy draft format changes which drafts are accepted, never the output.
    {"speculative_weight_format": "q4", "gguf_activations": "int8"},
], ids=["batched", "chunked", "preempted", "eager", "q4-draft"])
def test_greedy_output_is_identical(pair, reference, options) -> None:
    llm = make_llm(*pair, **options)
    if not options.get("enforce_eager"):
        assert isinstance(llm.engine.runner.backend, FusedCPUBackend) or pytest.skip("fused CPU step not built here")
    assert [r.token_ids for r in llm.generate(prompts(), GREEDY, use_tqdm=False)] == reference
    stats = llm.engine.stats()
    if options.get("num_kv_blocks"):
        assert stats.num_preemptions > 0
    assert 0 < stats.spec_decode.num_accepted_tokens < stats.spec_decode.num_draft_tokens
    assert_no_leak(llm)
    if options.get("speculative_weight_format") == "q4":
        draft_model = llm.engine.speculator.proposer.runner.backend.model
        draft_layers = [m for m in draft_model.modules() if isinstance(m, Linear)]
        assert draft_layers and all(isinstance(m, GgufQ4Linear) and m.int8_activations for m in draft_layers)


def test_one_at_a_time_and_stops_inside_a_draft(pair, plain, reference) -> None:
    llm = make_llm(*pair)
    for prompt, ref in zip(prompts(), reference, strict=True):
        assert llm.generate(prompt, GREEDY, use_tqdm=False)[0].token_ids == ref
        for max_tokens in (1, 3):
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
            assert llm.generate(prompt, params, use_tqdm=False)[0].token_ids == ref[:max_tokens]
        stop = SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[ref[9]])
        want = plain.generate(prompt, stop, use_tqdm=False)[0].outputs[0]
        got = llm.generate(prompt, stop, use_tqdm=False)[0].outputs[0]
        assert (got.token_ids, got.finish_reason) == (want.token_ids, want.finish_reason)
    assert_no_leak(llm)


@pytest.mark.parametrize("eager", [False, True], ids=["fused", "eager"])
def test_the_target_as_its_own_draft_is_always_accepted(pair, reference, eager) -> None:
    """Any error in the draft's KV (a wrong slot, a stale entry after rollback, rows in an order a backend does
    not expect) would make it disagree."""
    llm = make_llm(pair[0], pair[0], enforce_eager=eager)
    assert [r.token_ids for r in llm.generate(prompts(), GREEDY, use_tqdm=False)] == reference
    stats = llm.engine.stats().spec_decode
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens == stats.num_draft_tokens
    assert_no_leak(llm)


def test_sampling_keeps_the_target_distribution(pair, plain) -> None:
    """The first two sampled tokens (top-k 2: four outcomes) against their probabilities from the plain engine's
    logprobs; the second is verified against the draft's guess."""
    prompt = prompts()[1]
    target = two_token_distribution(plain, prompt)
    llm = make_llm(*pair)
    trials = 600
    params = [SamplingParams(temperature=1.0, top_k=2, max_tokens=3, ignore_eos=True, seed=i) for i in range(trials)]
    counts = dict.fromkeys(target, 0)
    for result in llm.generate([prompt] * trials, params, use_tqdm=False):
        counts[tuple(result.token_ids[:2])] += 1
    stats = llm.engine.stats().spec_decode
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens  # both branches of the rejection rule ran
    stat = sum((counts[c] - trials * p) ** 2 / (trials * p) for c, p in target.items())
    assert stat < 16.27, (counts, target)  # chi-square, 3 degrees of freedom: P(stat > 16.27) = 0.001
    assert_no_leak(llm)


def test_a_failing_draft_step_costs_only_its_drafts(pair, reference, monkeypatch) -> None:
    llm = make_llm(*pair)
    runner = llm.engine.speculator.proposer.runner
    execute, calls = runner.execute, []

    def flaky(plan):  # noqa: ANN001, ANN202 - the runner's own signature
        calls.append(1)
        if len(calls) in (3, 4):
            raise RuntimeError("draft step failed")
        return execute(plan)

    monkeypatch.setattr(runner, "execute", flaky)
    assert [r.token_ids for r in llm.generate(prompts(), GREEDY, use_tqdm=False)] == reference
    assert len(calls) > 4 and llm.engine.stats().spec_decode.num_accepted_tokens > 0
    assert_no_leak(llm)


def test_the_draft_cache_stays_within_the_memory_budget() -> None:
    shape = ModelConfig(architecture="llama", num_layers=2, hidden_size=256, intermediate_size=256, num_heads=4,
                        num_kv_heads=2, head_dim=64, vocab_size=VOCAB, max_position=1024, rope_theta=1e4,
                        rms_norm_eps=1e-5, attention_bias=False, tie_word_embeddings=True)
    block_bytes = 2 * 2 * 2 * 64 * 16 * 4  # K and V, layers, KV heads, head size, block size, fp32
    assert affordable_blocks(shape, torch.float32, 100, 16, None) == 100
    assert affordable_blocks(shape, torch.float32, 100, 16, 10 * block_bytes + 5) == 10
    assert affordable_blocks(shape, torch.float32, 100, 16, 1) == 1


def test_adaptive_lengths_with_the_draft_cost_stay_identical(pair, reference) -> None:
    llm = make_llm(*pair, speculative_adaptive=True)
    assert llm.engine.speculator.proposer.cost is not None
    assert [r.token_ids for r in llm.generate(prompts(), GREEDY, use_tqdm=False)] == reference
    assert_no_leak(llm)


def test_a_draft_step_that_costs_more_than_it_saves_is_not_taken() -> None:
    def target(rows: int) -> float:
        return 0.1 + 0.001 * rows

    free = choose_draft_lengths([0.8], [5], 1, target)
    cheap = choose_draft_lengths([0.8], [5], 1, target, lambda n, depth: 0.03 * depth)
    dear = choose_draft_lengths([0.8], [5], 1, target, lambda n, depth: 0.2 * depth)
    assert free[0] > cheap[0] > 0 and dear == [0]
    # one draft step serves the whole batch at a depth: a second request rides along for the target row alone
    assert choose_draft_lengths([0.9, 0.9], [1, 1], 2, target, lambda n, depth: 0.05 * depth) == [1, 1]
    # ...unless its drafter must first catch up on it: the likelier request is skipped, the other still drafts
    assert choose_draft_lengths([0.9, 0.8], [1, 1], 2, target, lambda n, depth: 0.01 * depth) == [1, 1]
    assert choose_draft_lengths([0.9, 0.8], [1, 1], 2, target, lambda n, depth: 0.01 * depth,
                                [0.2, 0.0]) == [0, 1]
    assert choose_draft_lengths([0.9], [5], 1, target, lambda n, depth: 0.03 * depth, [1.0]) == [0]


def load_proposer(path: Path, num_blocks: int) -> DraftModelProposer:
    return DraftModelProposer.load(path, GGUFFile(path), torch.float32, torch.device("cpu"), weight_format="float",
                                   int4_group_size=32, prepack=None, enforce_eager=True, num_blocks=num_blocks,
                                   block_size=4, max_step_tokens=8, max_positions=1024, measure_cost=False)


def test_draft_blocks_roll_back_evict_and_free_exactly(pair) -> None:
    proposer = load_proposer(pair[1], num_blocks=10)
    prompt = list(range(1, 11))  # 10 tokens: with 3 guesses, entries 0..11 (the last guess is not fed): 3 blocks
    first = proposer.propose_batch([DraftRequest("a", prompt, [], 3)])[0]
    seq = proposer._seqs["a"]
    assert len(first) == 3 and seq.tokens == prompt + first[:2] and len(seq.blocks) == 3
    assert proposer.pool.num_free_blocks == 7
    # the target took the first guess and then its own token: the second guess's entry is rolled back
    output = [first[0], (first[1] + 1) % VOCAB]
    again = proposer.propose_batch([DraftRequest("a", prompt, output, 2)])[0]
    assert seq.tokens == prompt + output + again[:1] and len(seq.blocks) == 4
    # the same tokens give the same guesses, from a fresh state too
    fresh = load_proposer(pair[1], num_blocks=10)
    assert fresh.propose_batch([DraftRequest("x", prompt, output, 2)])[0] == again
    # a request it was not asked about is let go of when the pool runs short; one that still does not fit gets none
    big = list(range(1, 25))  # 24 tokens + 2 guesses: 7 blocks, 6 free
    assert len(proposer.propose_batch([DraftRequest("b", big, [], 2)])[0]) == 2
    assert "a" not in proposer._seqs and proposer.pool.num_free_blocks == 3
    got = proposer.propose_batch([DraftRequest("c", big, [], 2), DraftRequest("b", big, [], 2)])
    assert got[0] == [] and len(got[1]) == 2  # both asked: "b" is not let go of for "c"
    proposer.drop("b")
    proposer.drop("c")
    assert proposer.pool.num_free_blocks == 10 and not proposer._seqs


def test_the_catch_up_is_priced_by_the_tokens_the_draft_cache_lacks(pair) -> None:
    proposer = load_proposer(pair[1], num_blocks=10)
    proposer.cost = StepCostModel([1, 8], [0.010, 0.017])  # 1 ms a row past the first
    prompt = list(range(1, 11))
    assert proposer.catch_up_seconds("a", len(prompt)) == pytest.approx(0.009)  # never seen: 9 rows more than 1
    assert len(proposer.propose_batch([DraftRequest("a", prompt, [], 3)])[0]) == 3  # holds the prompt, 2 guesses
    proposer.cost = StepCostModel([1, 8], [0.010, 0.017])  # as it was before those draft steps moved it
    assert proposer.catch_up_seconds("a", len(prompt) + 1) == 0.0  # a step's one row feeds what it lacks
    assert proposer.catch_up_seconds("a", len(prompt) + 2 + 6) == pytest.approx(0.005)  # 6 tokens behind its guesses
    proposer.drop("a")
    assert proposer.catch_up_seconds("a", len(prompt) + 1) == pytest.approx(0.010)


def test_a_draft_with_another_vocabulary_or_no_file_is_refused(pair, tmp_path) -> None:
    other = write_tiny_gguf(tmp_path / "other.gguf", layers=1, hidden=256, heads=4, kv_heads=2, ff=256,
                            vocab=VOCAB + 4, context=1024, metadata=META)
    with pytest.raises(ValueError, match="vocabulary"):
        make_llm(pair[0], other)
    with pytest.raises(ValueError, match="speculative_model"):
        EngineConfig(speculative="draft")
    with pytest.raises(ValueError, match="speculative_model"):
        EngineConfig(speculative="ngram", speculative_model=str(pair[1]))


# ---- self-speculation: the target's own layers draft ----------------------------------------------------------


def test_self_draft_with_a_layer_subset_is_identical(pair, reference) -> None:
    llm = make_llm(pair[0], None, speculative="self", speculative_layers=(0,), num_speculative_tokens=4,
                   speculative_adaptive=False)
    draft = llm.engine.speculator.proposer.runner.backend.model
    assert draft.cfg.num_layers == 1 and draft.layers[0] is llm.engine.model.layers[0]  # shared, not copied
    assert [r.token_ids for r in llm.generate(prompts(), GREEDY, use_tqdm=False)] == reference
    assert llm.engine.stats().spec_decode.num_accepted_tokens > 0
    assert_no_leak(llm)


def test_self_draft_in_a_format_of_its_own_is_identical(pair, reference, monkeypatch) -> None:
    """`speculative_weight_format` with "self": the model's own file loaded once more in that format drafts (every
    layer a candidate, calibrated against the target), and the output stays the target's."""
    asked = []

    def calibration(model, key, encode, max_k, target):  # noqa: ANN001, ANN202 - cached_calibration's signature
        asked.append((model, key, target))
        return Calibration((0, 1), (Candidate((0, 1), 0.9, 0.3, 2.0, 4),))

    monkeypatch.setattr("tokenmill.engine.cached_calibration", calibration)
    llm = make_llm(pair[0], None, speculative="self", speculative_weight_format="q4", gguf_activations="int8",
                   num_speculative_tokens=4, speculative_adaptive=False)
    (source, key, target), = asked
    assert target is llm.engine.model and source is not target
    assert key.endswith("|float|draft q4-int8-activations")
    draft = llm.engine.speculator.proposer.runner.backend.model
    assert draft.cfg.num_layers == 2 and draft.layers[0] is source.layers[0]
    assert all(isinstance(m, GgufQ4Linear) and m.int8_activations
               for m in draft.modules() if isinstance(m, Linear) and m is not draft.output)
    assert [r.token_ids for r in llm.generate(prompts(), GREEDY, use_tqdm=False)] == reference
    stats = llm.engine.stats().spec_decode
    assert stats.num_accepted_tokens > stats.num_draft_tokens // 2  # the same weights, rounded harder
    assert_no_leak(llm)
    with pytest.raises(ValueError, match="speculative_weight_format is the format of a draft"):
        EngineConfig(speculative="ngram", speculative_weight_format="q4")


def test_calibration_against_the_target_scores_every_layer_in_another_format(pair) -> None:
    target = make_llm(pair[0], None).engine.model
    rounded = make_llm(pair[0], None, weight_format="q4", gguf_activations="int8", dtype="bfloat16").engine.model
    assert candidates(2) == [(0,)] and candidates(2, whole=True) == [(0, 1), (0,)]
    tokens = [(7 * i) % (VOCAB - 1) + 1 for i in range(64)]
    rows = {c.layers: c for c in calibrate(rounded, tokens, 4, target=target).table}
    assert set(rows) == {(0, 1), (0,)}
    assert 0.5 < rows[(0, 1)].agreement <= 1.0 and rows[(0, 1)].cost < 0.5  # 4-bit codes against fp32 weights
    assert calibrate(target, tokens, 4, [(0, 1)]).table[0].agreement == 1.0


def test_candidates_and_promised_speedup() -> None:
    assert candidates(12) == [(0, 1, 2), (0, 1, 2, 3), tuple(range(6)), tuple(range(8)), tuple(range(9)),
                              (0, 1, 2, 4, 6, 8, 10, 11), (0, 1, 2, 5, 8, 10, 11)]
    assert promised_speedup(0.0, 0.1, 5) == (1.0, 0)
    # α = 0.5, c = 0.1: k = 1 gives 1.5 / 1.1 = 1.36, k = 2 1.75 / 1.2 = 1.46, k = 3 1.875 / 1.3 = 1.44
    value, k = promised_speedup(0.5, 0.1, 5)
    assert k == 2 and value == pytest.approx(1.75 / 1.2)
    with pytest.raises(ValueError, match="increasing"):
        EngineConfig(speculative="self", speculative_layers=(1, 0))
    with pytest.raises(ValueError, match="increasing"):
        EngineConfig(speculative="ngram", speculative_layers=(0,))


def test_calibration_scores_subsets_and_is_cached(pair, tmp_path) -> None:
    model = make_llm(pair[0], None).engine.model
    tokens = [(7 * i) % (VOCAB - 1) + 1 for i in range(64)]
    result = calibrate(model, tokens, 4, [(0,), (1,), (0, 1)])
    rows = {c.layers: c for c in result.table}
    assert rows[(0, 1)].agreement == 1.0  # every layer: the target itself
    assert rows[(0,)].cost < rows[(0, 1)].cost == pytest.approx(1.0)
    assert result.layers == max(result.table, key=lambda c: c.speedup).layers
    with pytest.raises(ValueError, match="increasing"):
        subset_model(model, [0, 2])
    short = make_llm(pair[0], None, max_model_len=32).engine.model  # RoPE tables for 32 positions only
    assert {c.layers for c in calibrate(short, tokens, 4, [(0,)]).table} == {(0,)}
    calls = []

    def encode(text: str) -> list[int]:
        calls.append(text)
        return [(ord(ch) % (VOCAB - 1)) + 1 for ch in text[:200]]

    first = cached_calibration(model, "tiny|key", encode, 4, cache=tmp_path)
    again = cached_calibration(model, "tiny|key", encode, 4, cache=tmp_path)
    assert first == again and len(calls) == 1 and len(list(tmp_path.iterdir())) == 1
    assert "def calibrate" in calls[0]  # the calibration text is tokenmill's own source


def test_batched_guesses_equal_guesses_alone(pair) -> None:
    """A draft step mixing one-token feeds (after a rejection), two-token feeds (after full acceptance) and a new
    prompt guesses what each request would alone (the eager backend, which groups rows by their count)."""
    prompts_ = {"a": list(range(1, 11)), "b": list(range(20, 32)), "c": list(range(40, 49))}
    batched = load_proposer(pair[1], num_blocks=40)
    first = batched.propose_batch([DraftRequest(r, prompts_[r], [], 3) for r in ("a", "b")])
    outputs = {"a": [first[0][0], (first[0][1] + 1) % VOCAB],  # second guess rejected: one token to feed
               "b": [*first[1], 7],  # all accepted, then the bonus: two tokens to feed
               "c": []}  # a new request: its whole prompt
    asks = [DraftRequest(r, prompts_[r], outputs[r], 3) for r in ("b", "a", "c")]  # the one-token feed second
    together = batched.propose_batch(asks)
    alone = [load_proposer(pair[1], num_blocks=40).propose_batch([ask])[0] for ask in asks]
    assert together == alone and all(len(g) == 3 for g in together)


def test_the_engine_drafts_with_the_calibrated_layers(pair, monkeypatch) -> None:
    asked = []

    def calibration(model, key, encode, max_k, target):  # noqa: ANN001, ANN202 - cached_calibration's signature
        asked.append((key, max_k))
        assert target is model  # the draft's layers are the target's own
        return Calibration((0,), (Candidate((0,), 0.5, 0.4, 1.2, 2),))

    monkeypatch.setattr("tokenmill.engine.cached_calibration", calibration)
    llm = make_llm(pair[0], None, speculative="self", num_speculative_tokens=3, speculative_adaptive=False)
    assert llm.engine.speculator.proposer.runner.backend.model.cfg.num_layers == 1
    assert asked == [(f"target.gguf|{pair[0].stat().st_size}|torch.float32|float", 3)]


def test_self_speculation_is_off_when_no_calibrated_subset_pays(pair, reference, monkeypatch) -> None:
    """Adaptive lengths would draft nothing but probes, while the draft still prefilled every prompt through its
    layers: the engine runs without speculation instead. Forced lengths or layers still draft."""
    def calibration(model, key, encode, max_k, target):  # noqa: ANN001, ANN202 - cached_calibration's signature
        return Calibration((0,), (Candidate((0,), 0.05, 0.6, 1.0, 0),))

    monkeypatch.setattr("tokenmill.engine.cached_calibration", calibration)
    llm = make_llm(pair[0], None, speculative="self", num_speculative_tokens=3)
    assert llm.engine.speculator is None and llm.engine.stats().spec_decode is None
    assert [r.token_ids for r in llm.generate(prompts(), GREEDY, use_tqdm=False)] == reference
    assert make_llm(pair[0], None, speculative="self", num_speculative_tokens=3,
                    speculative_adaptive=False).engine.speculator is not None
    assert make_llm(pair[0], None, speculative="self", speculative_layers=(0,),
                    num_speculative_tokens=3).engine.speculator is not None
