"""Speculative decoding through the whole engine on a tiny random model: greedy output identical to plain decoding
under every scheduling feature, sampling that keeps the target distribution, stops and limits inside a draft, no
leaked blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import (
    CHI_SQUARE_3_DOF_P001,
    lookup_prompts,
    loop_prompt,
    tiny_llm,
    two_token_chi_square,
    write_head64_gguf,
)

from tokenmill import LLM, SamplingParams
from tokenmill.attention.fused_cpu import FusedCPUBackend

VOCAB = 300


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_head64_gguf(tmp_path_factory.mktemp("spec") / "tiny64.gguf", VOCAB)


SPEC = {"speculative": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "speculative_adaptive": False}


def make_llm(path: Path, spec: bool, **options: object) -> LLM:
    return tiny_llm(path, **((SPEC if spec else {}) | options))


def prompts() -> list[list[int]]:
    return lookup_prompts(VOCAB)


GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def plain(tiny_model) -> LLM:
    return make_llm(tiny_model, spec=False)


@pytest.fixture(scope="module")
def reference(plain) -> list[list[int]]:
    return [plain.generate(p, GREEDY, use_tqdm=False)[0].token_ids for p in prompts()]


def assert_no_leak(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    assert not llm.engine.has_unfinished_requests()


def token_ids(llm: LLM, params: SamplingParams = GREEDY) -> list[list[int]]:
    return [r.token_ids for r in llm.generate(prompts(), params, use_tqdm=False)]


def test_greedy_output_is_identical_one_at_a_time(tiny_model, reference) -> None:
    llm = make_llm(tiny_model, spec=True)
    assert isinstance(llm.engine.runner.backend, FusedCPUBackend) or pytest.skip("fused CPU step not built here")
    got = [llm.generate(p, GREEDY, use_tqdm=False)[0].token_ids for p in prompts()]
    assert got == reference
    stats = llm.engine.stats().spec_decode
    assert stats is not None and stats.num_drafts > 0
    # both outcomes happened: some drafts accepted, some rejected
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert_no_leak(llm)


@pytest.mark.parametrize("options", [
    {},  # the whole batch at once
    {"max_num_batched_tokens": 24},  # chunked prefill beside verify steps, drafts trimmed by the budget
    {"num_kv_blocks": 12},  # preemption: drafts dropped first, then recompute
    {"enable_prefix_caching": False},
], ids=["batched", "chunked", "preempted", "no-prefix-cache"])
def test_greedy_output_is_identical_batched(tiny_model, reference, options) -> None:
    llm = make_llm(tiny_model, spec=True, **options)
    assert token_ids(llm) == reference
    if options.get("num_kv_blocks"):
        assert llm.engine.stats().num_preemptions > 0
    assert llm.engine.stats().spec_decode.num_accepted_tokens > 0
    assert_no_leak(llm)


@pytest.mark.parametrize("options", [{}, {"batch_invariant": True, "max_num_batched_tokens": 24}],
                         ids=["batched", "batch-invariant-chunked"])
def test_greedy_output_is_identical_in_bf16(tiny_model, options) -> None:
    """In bf16 a step's outputs are rounded to 8 bits, so a last-bit difference between a verify step and the decode
    steps it replaces would soon change a token: the packed bf16 kernel gives every row its bits alone, and verify
    rows attend as decodes do. With batch_invariant the chunks of prefill (which differ between the runs) do not
    matter either."""
    bf16 = {"dtype": "bfloat16", **options}
    plain = make_llm(tiny_model, spec=False, **{k: v for k, v in bf16.items() if k != "max_num_batched_tokens"})
    assert isinstance(plain.engine.runner.backend, FusedCPUBackend) or pytest.skip("fused CPU step not built here")
    want = [plain.generate(p, GREEDY, use_tqdm=False)[0].token_ids for p in prompts()]
    llm = make_llm(tiny_model, spec=True, **bf16)
    assert token_ids(llm) == want
    assert llm.engine.stats().spec_decode.num_accepted_tokens > 0
    assert_no_leak(llm)


def test_prefix_cache_hits_and_forks_keep_identity(tiny_model, plain) -> None:
    llm = make_llm(tiny_model, spec=True)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, n=3)
    for prompt in prompts()[:4]:
        want = plain.generate(prompt, params, use_tqdm=False)[0].outputs
        for _ in range(2):  # the second time from the prefix cache
            got = llm.generate(prompt, params, use_tqdm=False)[0].outputs
            assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert llm.engine.stats().prefix_cache.hits > 0
    assert_no_leak(llm)


def test_stops_and_max_tokens_inside_a_draft(tiny_model, plain, reference) -> None:
    llm = make_llm(tiny_model, spec=True)
    for prompt, ref in zip(prompts(), reference, strict=True):
        # max_tokens ends generation in the middle of what a draft could have covered
        for max_tokens in (1, 3, 6):
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
            assert llm.generate(prompt, params, use_tqdm=False)[0].token_ids == ref[:max_tokens]
        # a stop token that plain decoding emits at output position 9
        stop = SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[ref[9]])
        want = plain.generate(prompt, stop, use_tqdm=False)[0].outputs[0]
        got = llm.generate(prompt, stop, use_tqdm=False)[0].outputs[0]
        assert (got.token_ids, got.finish_reason, got.stop_reason) == (want.token_ids, "stop", ref[9])
        # min_tokens blocks the stop token in verified rows as it does in plain ones
        held = SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[ref[2]], min_tokens=12)
        assert llm.generate(prompt, held, use_tqdm=False)[0].token_ids == \
            plain.generate(prompt, held, use_tqdm=False)[0].token_ids
    assert_no_leak(llm)


def test_penalties_logprobs_and_seeds(tiny_model, plain) -> None:
    llm = make_llm(tiny_model, spec=True)
    penalised = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, repetition_penalty=1.3,
                               frequency_penalty=0.5, logprobs=2, logit_bias={5: 2.0, 7: -3.0})
    for prompt in prompts()[:6]:
        want = plain.generate(prompt, penalised, use_tqdm=False)[0].outputs[0]
        got = llm.generate(prompt, penalised, use_tqdm=False)[0].outputs[0]
        assert got.token_ids == want.token_ids
        assert [(lp.token_id, [t for t, _ in lp.top]) for lp in got.logprobs] == \
            [(lp.token_id, [t for t, _ in lp.top]) for lp in want.logprobs]
        for a, b in zip(got.logprobs, want.logprobs, strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
    # a seeded request samples the same tokens whatever it is batched with
    seeded = SamplingParams(temperature=0.8, max_tokens=30, ignore_eos=True, seed=5)
    alone = llm.generate(prompts()[0], seeded, use_tqdm=False)[0].token_ids
    batch = llm.generate(prompts()[:5], [seeded] + [SamplingParams(temperature=1.0, max_tokens=30)] * 4,
                         use_tqdm=False)
    assert batch[0].token_ids == alone
    assert_no_leak(llm)


def test_seeded_sampling_gives_the_tokens_of_decoding_without_drafts(tiny_model, plain) -> None:
    """Verification draws each emitted token as decoding without drafts draws it (one uniform from the
    request's generator) and accepts the draft it equals, so a seeded request's tokens depend neither on its drafts
    nor on their lengths nor on the batch."""
    # top-k 2 keeps this random model's continuations likely enough for drafts to be accepted at all.
    params = [SamplingParams(temperature=0.8, top_k=2, max_tokens=30, ignore_eos=True, seed=i,
                             repetition_penalty=1.2 if i % 2 else 1.0, logit_bias={5: 1.5} if i % 3 else None)
              for i in range(len(prompts()))]
    want = [r.token_ids for r in plain.generate(prompts(), params, use_tqdm=False)]
    for batched, k in ((True, 4), (False, 2)):
        llm = make_llm(tiny_model, spec=True, num_speculative_tokens=k)
        if batched:
            got = [r.token_ids for r in llm.generate(prompts(), params, use_tqdm=False)]
        else:
            got = [llm.generate(p, sp, use_tqdm=False)[0].token_ids for p, sp in zip(prompts(), params, strict=True)]
        assert got == want
        stats = llm.engine.stats().spec_decode
        assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
        assert_no_leak(llm)


def test_abort_during_verification_frees_everything(tiny_model) -> None:
    llm = make_llm(tiny_model, spec=True)
    engine = llm.engine
    ids = [engine.add_request(p, GREEDY) for p in prompts()[:6]]
    for _ in range(4):
        engine.step()
    assert engine.abort(ids[2]) is not None
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.stats().spec_decode.num_drafts > 0
    assert_no_leak(llm)


def test_adaptive_lengths_run_and_stay_identical(tiny_model, reference) -> None:
    llm = make_llm(tiny_model, spec=True, speculative_adaptive=True)
    assert llm.engine.speculator.cost is not None and llm.engine.speculator.guard is not None
    assert token_ids(llm) == reference
    assert_no_leak(llm)
    unguarded = make_llm(tiny_model, spec=True, speculative_adaptive=True, speculative_guard=False)
    assert unguarded.engine.speculator.guard is None
    assert token_ids(unguarded) == reference


def test_sampling_with_drafts_keeps_the_target_distribution(tiny_model, plain) -> None:
    """End to end: the first two sampled tokens (top-k 2, so four outcomes) against their exact probabilities from
    the plain engine's logprobs; the second goes through verification whenever a draft was proposed."""
    llm = make_llm(tiny_model, spec=True)
    stat = two_token_chi_square(llm, plain, loop_prompt(plain, VOCAB))
    stats = llm.engine.stats().spec_decode
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens  # both branches of the rejection rule ran
    assert stat < CHI_SQUARE_3_DOF_P001


def test_metrics_and_cli_expose_speculation(tiny_model) -> None:
    import argparse

    from tokenmill.entrypoints.args import add_engine_args, engine_config
    from tokenmill.server.metrics import _EngineStatsCollector

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    config = engine_config(parser.parse_args(["--speculative", "ngram", "--num-speculative-tokens", "3",
                                              "--prompt-lookup-min", "1", "--no-speculative-adaptive"]))
    assert (config.speculative, config.num_speculative_tokens, config.prompt_lookup_min,
            config.speculative_adaptive) == ("ngram", 3, 1, False)
    config = engine_config(parser.parse_args(["--speculative", "self", "--no-speculative-lookup",
                                              "--no-speculative-copy-kv"]))
    assert (config.speculative_lookup, config.speculative_copy_kv) == (False, False)
    assert engine_config(parser.parse_args(["--speculative", "self"])).speculative_lookup is None
    assert engine_config(parser.parse_args(["--speculative", "self"])).speculative_guard
    assert not engine_config(parser.parse_args(["--speculative", "self", "--no-speculative-guard"])).speculative_guard
    llm = make_llm(tiny_model, spec=True)
    llm.generate(prompts()[:2], GREEDY, use_tqdm=False)

    class Engine:
        def stats(self):  # noqa: ANN202 - the AsyncEngine surface the collector reads
            return llm.engine.stats()

    metrics = {m.name: m for m in _EngineStatsCollector(Engine(), "tiny").collect()}
    spec = llm.engine.stats().spec_decode
    assert metrics["tokenmill:spec_decode_num_drafts"].samples[0].value == spec.num_drafts > 0
    assert metrics["tokenmill:spec_decode_num_accepted_tokens"].samples[0].value == spec.num_accepted_tokens
    per_position = metrics["tokenmill:spec_decode_num_accepted_tokens_per_pos"].samples
    assert [s.value for s in per_position] == spec.accepted_per_position
    assert metrics["tokenmill:spec_decode_num_held_steps"].samples[0].value == spec.num_held_steps
    assert spec.mean_accepted_length == 1 + spec.num_accepted_tokens / spec.num_drafts
