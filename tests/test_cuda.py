"""The engine on a CUDA device (the eager paged path): the same tokens as on the CPU, and the lossless features —
batching, prefix caching, chunked prefill, preemption, prompt-lookup speculation, seeded sampling — as lossless
there as here. A small random model of the real architecture. Skipped where torch sees no GPU (CI has none); run
on a GPU machine with `pytest tests/test_cuda.py`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import lookup_prompts, tiny_llm, write_head64_gguf

from tokenmill import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

VOCAB = 300
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_head64_gguf(tmp_path_factory.mktemp("cuda") / "tiny.gguf", VOCAB)


def make_llm(path: Path, device: str, **options: object) -> LLM:
    return tiny_llm(path, device=device, **options)


def prompts() -> list[list[int]]:
    return lookup_prompts(VOCAB)


def batched(llm: LLM, params: SamplingParams = GREEDY) -> list[list[int]]:
    return [r.token_ids for r in llm.generate(prompts(), params, use_tqdm=False)]


def assert_no_leak(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks and not llm.engine.has_unfinished_requests()


@pytest.fixture(scope="module")
def cuda_plain(tiny_model) -> LLM:
    llm = make_llm(tiny_model, "cuda", enable_prefix_caching=False)
    assert llm.engine.device.type == "cuda"
    return llm


@pytest.fixture(scope="module")
def reference(cuda_plain) -> list[list[int]]:
    """Each prompt alone on the GPU: the plain path the other runs are compared with."""
    return [cuda_plain.generate(p, GREEDY, use_tqdm=False)[0].token_ids for p in prompts()]


def test_prompt_logprobs_on_cuda_match_the_cpu(tiny_model, cuda_plain) -> None:
    """fp32 on both sides (TF32 is off by default in torch): different kernels, so a tolerance, not bits."""
    cpu = make_llm(tiny_model, "cpu", enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    for ours, theirs in zip(cuda_plain.generate(prompts(), params, use_tqdm=False),
                            cpu.generate(prompts(), params, use_tqdm=False), strict=True):
        assert ours.prompt_logprobs is not None and theirs.prompt_logprobs is not None
        for a, b in zip(ours.prompt_logprobs[1:], theirs.prompt_logprobs[1:], strict=True):
            assert a is not None and b is not None and a.token_id == b.token_id
            assert a.logprob == pytest.approx(b.logprob, abs=2e-4)


def test_greedy_tokens_on_cuda_are_the_cpu_tokens(tiny_model, reference) -> None:
    """The random model's top-two logit gaps are far above fp32 rounding: a different token is a bug, not noise."""
    cpu = make_llm(tiny_model, "cpu", enable_prefix_caching=False)
    assert batched(cpu) == reference


@pytest.mark.parametrize("options", [
    {},  # the whole batch at once
    {"enable_prefix_caching": True},
    {"max_num_batched_tokens": 24},  # prompts computed in chunks beside decodes
    {"num_kv_blocks": 12, "max_num_batched_tokens": 64},  # preemption: too few blocks for the batch
    {"speculative": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "speculative_adaptive": False},
], ids=["batched", "prefix-cache", "chunked", "preempted", "ngram"])
def test_lossless_features_on_cuda_give_the_plain_tokens(tiny_model, reference, options) -> None:
    llm = make_llm(tiny_model, "cuda", **options)
    assert batched(llm) == reference
    if options.get("enable_prefix_caching"):  # a second pass hits the cache
        assert batched(llm) == reference
    if "speculative" in options:
        stats = llm.engine.stats().spec_decode
        assert stats is not None and 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert_no_leak(llm)


def test_seeded_sampling_on_cuda_does_not_depend_on_the_batch(cuda_plain) -> None:
    seeded = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=16, seed=7, ignore_eos=True)
    alone = cuda_plain.generate(prompts()[3], seeded, use_tqdm=False)[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    mixed = cuda_plain.generate(prompts()[:6], [others, others, others, seeded, others, others], use_tqdm=False)
    assert mixed[3].token_ids == alone


def test_bf16_on_cuda_is_the_auto_dtype_and_close_to_fp32(tiny_model, cuda_plain) -> None:
    llm = tiny_llm(tiny_model, device="cuda", dtype="auto")
    assert llm.engine.dtype == torch.bfloat16
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    for ours, theirs in zip(llm.generate(prompts(), params, use_tqdm=False),
                            cuda_plain.generate(prompts(), params, use_tqdm=False), strict=True):
        for a, b in zip(ours.prompt_logprobs[1:], theirs.prompt_logprobs[1:], strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=0.1)
