"""The fused C++ decode step (tokenmill/kernels) against the eager `LlamaModel.decode` + `KVCache.write`."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.conftest import RAW_PROMPTS
from tokenmill import LLM, SamplingParams
from tokenmill.kernels import KernelBuild, cpu_decode_kernels
from tokenmill.model.attention import AttentionMetadata, build_group
from tokenmill.model.fused_decode import FusedDecodeStep
from tokenmill.model.gguf_file import GGUFFile
from tokenmill.model.llama import KVCache
from tokenmill.model.loader import load_model

BLOCK = 16
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def kernels():
    build = cpu_decode_kernels()
    assert build.module is not None, f"the fused decode kernels did not build: {build.error}"
    return build.module


def filled_cache(model, prompts: list[list[int]], tables: list[list[int]], num_blocks: int) -> KVCache:
    """A cache holding each prompt's keys and values at its (scattered) blocks, from the general forward."""
    cache = KVCache(model.cfg, num_blocks, BLOCK, model.dtype, CPU)
    for ids, table in zip(prompts, tables, strict=True):
        n = len(ids)
        slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)])
        model(torch.tensor(ids), torch.arange(n), AttentionMetadata(slots, [build_group(0, [n], [n], [table], BLOCK,
                                                                                      CPU)]), cache)
    return cache


def copy_of(cache: KVCache) -> KVCache:
    twin = KVCache.__new__(KVCache)
    twin.k, twin.v, twin.num_blocks, twin.block_size = cache.k.clone(), cache.v.clone(), cache.num_blocks, BLOCK
    return twin


def max_error_over_scale(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


# (dtype, weight format, tolerance on hidden states and on the cache, relative to their largest magnitude).
# fp32: the same operators up to summation order (measured 4e-7). bf16: a different summation order can move a value
# by one bf16 step (2^-8 relative) and that difference travels through 30 layers (measured: 0 for float weights,
# 1.4e-3 int8, 6.6e-3 int4/gguf).
CASES = [
    (torch.float32, "float", 1e-5),
    (torch.bfloat16, "float", 0.02),
    (torch.bfloat16, "int8", 0.02),
    (torch.bfloat16, "int4", 0.02),
    (torch.bfloat16, "gguf", 0.02),
]


@pytest.mark.parametrize(("dtype", "weight_format", "tolerance"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
@torch.inference_mode()
def test_fused_step_matches_the_eager_step(kernels, model_path, dtype, weight_format, tolerance) -> None:
    model = load_model(GGUFFile(model_path), dtype, CPU, weight_format)
    # Three sequences of 20, 3 and 33 tokens at scattered blocks; the first ends exactly before a block boundary.
    prompts = [[1, 504, 3458, 314] * 4, [9906, 28, 905], list(range(200, 233))]
    tables = [[3, 7], [0], [1, 4, 9]]
    eager_cache = filled_cache(model, prompts, tables, num_blocks=12)
    fused_cache = copy_of(eager_cache)

    positions = [len(p) for p in prompts]
    slots = torch.tensor([t[p // BLOCK] * BLOCK + p % BLOCK for t, p in zip(tables, positions, strict=True)])
    group = build_group(0, [1, 1, 1], [p + 1 for p in positions], tables, BLOCK, CPU)
    ids = torch.tensor([42, 1000, 7])
    want, keys, values = model.decode(ids, torch.tensor(positions), group.block_tables, group.mask, eager_cache)
    eager_cache.write(slots, keys, values)

    got = FusedDecodeStep(kernels, model)(ids, torch.tensor(positions), slots, group.block_tables,
                                           group.context_lens, fused_cache)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert max_error_over_scale(got, want) <= tolerance
    # The new keys and values landed at their slots, and nothing else in the cache moved.
    assert max_error_over_scale(fused_cache.k, eager_cache.k) <= tolerance
    assert max_error_over_scale(fused_cache.v, eager_cache.v) <= tolerance
    untouched = torch.ones(fused_cache.k.shape[2], dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(fused_cache.k[:, :, untouched], eager_cache.k[:, :, untouched])


@pytest.fixture(scope="module")
def eager_and_fused(model_path):
    return [LLM(str(model_path), dtype="float32", device="cpu", num_kv_blocks=256, enforce_eager=eager)
            for eager in (True, False)]


def test_fused_engine_greedy_output_is_identical_to_the_eager_engine(eager_and_fused) -> None:
    eager, fused = eager_and_fused
    assert eager.engine.runner.fused_decode is None and fused.engine.runner.fused_decode is not None
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    # One batch of mixed lengths: decode-only steps of many sequences with their own block tables.
    want = [o.token_ids for o in eager.generate(RAW_PROMPTS, params, use_tqdm=False)]
    got = [o.token_ids for o in fused.generate(RAW_PROMPTS, params, use_tqdm=False)]
    assert got == want


def test_engine_runs_eager_steps_with_a_warning_when_the_kernels_cannot_build(model_path, monkeypatch,
                                                                               caplog) -> None:
    monkeypatch.setattr("tokenmill.engine.cpu_decode_kernels", lambda: KernelBuild(None, 0.0, "no C++ compiler"))
    with caplog.at_level(logging.WARNING, logger="tokenmill.engine"):
        llm = LLM(str(model_path), dtype="float32", device="cpu", num_kv_blocks=64)
    assert llm.engine.runner.fused_decode is None
    assert "no C++ compiler" in caplog.text
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    assert len(out[0].token_ids) == 4


def test_float16_runs_eager_steps(model_path) -> None:
    llm = LLM(str(model_path), dtype="float16", device="cpu", num_kv_blocks=64)
    assert llm.engine.runner.fused_decode is None
