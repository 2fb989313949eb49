"""The fused C++ model step (tokenmill/kernels) against the eager `LlamaModel`, and its paged attention against a
float64 reference."""

from __future__ import annotations

import logging

import pytest
import torch

from tests import plans
from tests.conftest import RAW_PROMPTS
from tests.plans import make_plan
from tokenmill import LLM, SamplingParams
from tokenmill.attention.eager import EagerBackend
from tokenmill.attention.fused_cpu import FusedCPUBackend
from tokenmill.kernels import KernelBuild, cpu_kernels, isa
from tokenmill.kv.cache import KVCache
from tokenmill.model.gguf_file import GGUFFile
from tokenmill.model.linear import GgufQ4Linear, GgufQ8Linear
from tokenmill.model.loader import load_model

BLOCK = 16
CPU = torch.device("cpu")


# Every ISA level this CPU can run (TOKENMILL_CPU_ISA forces one for the engine; here each gets its own build).
LEVELS = isa.supported_levels(isa.cpu_flags())
GGUF_TILES = {"avx512bf16": "avx512bf16", "avx512": "avx2", "avx2": "avx2", "scalar": "scalar", isa.GENERIC: None}


@pytest.fixture(scope="module", params=LEVELS)
def kernels(request):
    build = cpu_kernels(request.param)
    assert build.module is not None, f"the CPU kernels did not build for {request.param}: {build.error}"
    assert build.isa == request.param
    return build.module


def slots_of(table: list[int], start: int, end: int) -> list[int]:
    return plans.slots_of(table, start, end, BLOCK)


def run_backend(backend, plan) -> torch.Tensor:
    return backend.forward(torch.tensor(plan.token_ids), torch.tensor(plan.positions), backend.build_metadata(plan))


def filled_cache(model, prompts: list[list[int]], tables: list[list[int]], num_blocks: int) -> KVCache:
    """A cache holding each prompt's keys and values at its (scattered) blocks, from the eager forward."""
    cache = KVCache(model.cfg, num_blocks, BLOCK, model.dtype, CPU)
    for ids, table in zip(prompts, tables, strict=True):
        run_backend(EagerBackend(model, cache), make_plan([0], [ids], [table], BLOCK))
    return cache


def copy_of(cache: KVCache) -> KVCache:
    twin = KVCache.__new__(KVCache)
    twin.k, twin.v, twin.num_blocks, twin.block_size = cache.k.clone(), cache.v.clone(), cache.num_blocks, BLOCK
    return twin


def max_error_over_scale(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


# (dtype, weight format, tolerance on hidden states and on the cache, relative to their largest magnitude).
# fp32: the same operators up to summation order. bf16: a different summation order can move a value by one bf16 step
# (2^-8 relative) and that difference travels through 30 layers (measured for float weights: 0.020 between the two
# paths, each 0.027 from the fp32 result; int8 0.010).
CASES = [
    (torch.float32, "float", 1e-5),
    (torch.bfloat16, "float", 0.04),
    (torch.bfloat16, "int8", 0.04),
    (torch.bfloat16, "int4", 0.04),
    (torch.bfloat16, "gguf", 0.04),
]


@pytest.mark.parametrize(("dtype", "weight_format", "tolerance"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
@torch.inference_mode()
def test_fused_step_matches_the_eager_forward_on_a_mixed_batch(kernels, model_path, dtype, weight_format,
                                                               tolerance) -> None:
    if kernels is not cpu_kernels(LEVELS[0]).module and (dtype, weight_format) != (torch.float32, "float"):
        # Lower levels run the layer loop's fp32 case; each bf16 format once, on the best level (CI time).
        pytest.skip("bf16 formats are checked on the CPU's best ISA level")
    model = load_model(GGUFFile(model_path), dtype, CPU, weight_format)
    # Three cached sequences of 20, 3 and 33 tokens at scattered blocks (the first ends just before a block boundary)
    # decode one token each; a fourth prefills 21 new tokens after its 12 cached ones, a fifth its first 18 tokens.
    prompts = [[1, 504, 3458, 314] * 4, [9906, 28, 905], list(range(200, 233)), list(range(700, 712))]
    tables = [[3, 7], [0], [1, 4, 9], [10, 2, 12]]
    eager_cache = filled_cache(model, prompts, tables, num_blocks=16)
    fused_cache = copy_of(eager_cache)
    tables.append([14, 5])
    cached = [20, 3, 33, 12, 0]
    new = [[42], [1000], [7], list(range(3000, 3021)), list(range(5000, 5018))]
    plan = make_plan(cached, new, tables, BLOCK)
    slots = torch.tensor(plan.slot_mapping)
    want = run_backend(EagerBackend(model, eager_cache), plan)
    fused = FusedCPUBackend(kernels, model, fused_cache)
    assert fused.build_metadata(plan).query_starts.tolist() == [0, 1, 2, 3, 24, 42]
    got = run_backend(fused, plan)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert max_error_over_scale(got, want) <= tolerance
    # The new keys and values landed at their slots, and nothing else in the cache moved.
    assert max_error_over_scale(fused_cache.k, eager_cache.k) <= tolerance
    assert max_error_over_scale(fused_cache.v, eager_cache.v) <= tolerance
    untouched = torch.ones(fused_cache.k.shape[2], dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(fused_cache.k[:, :, untouched], eager_cache.k[:, :, untouched])


def reference_attention(q, k_cache, v_cache, starts, tables, context_lens) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its keys, in float64."""
    num_heads, kv_heads, head_dim = q.shape[1], k_cache.shape[0], q.shape[2]
    out = torch.empty(q.shape, dtype=torch.float64)
    for s, (table, ctx) in enumerate(zip(tables, context_lens, strict=True)):
        rows = slice(starts[s], starts[s + 1])
        q_len = starts[s + 1] - starts[s]
        slots = torch.tensor(slots_of(table, 0, ctx))
        keys = k_cache[:, slots].double().repeat_interleave(num_heads // kv_heads, 0)  # [H, ctx, D]
        values = v_cache[:, slots].double().repeat_interleave(num_heads // kv_heads, 0)
        scores = q[rows].double().transpose(0, 1) @ keys.transpose(1, 2) / head_dim**0.5  # [H, q_len, ctx]
        future = torch.arange(ctx)[None, :] > torch.arange(ctx - q_len, ctx)[:, None]
        out[rows] = (scores.masked_fill(future, float("-inf")).softmax(-1) @ values).transpose(0, 1)
    return out


# fp32: float rounding only (measured 6e-7 of the largest output). bf16: the query, scores, probabilities and output
# are each rounded to bf16 as the eager path does (measured 3.2e-3).
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("head_dim", [64, 128])
# Query heads per KV head: 3 (the default model), 1, 4 and 8 take decode kernels compiled for their group size, 5 the
# kernel for any size.
@pytest.mark.parametrize(("num_heads", "kv_heads"), [(9, 3), (4, 4), (8, 2), (10, 2), (16, 2)])
def test_paged_attention_matches_a_float64_reference(kernels, dtype, tolerance, head_dim, num_heads,
                                                     kv_heads) -> None:
    generator = torch.Generator().manual_seed(0)
    # (keys, new tokens): decodes, whole prompts, chunks after cached keys, tiles of 16 queries with a remainder.
    sequences = [(1, 1), (37, 1), (100, 1), (40, 40), (33, 17), (300, 50), (17, 2), (64, 16)]
    num_blocks = sum(-(-ctx // BLOCK) for ctx, _ in sequences) + 3
    blocks = torch.randperm(num_blocks, generator=generator).tolist()
    tables = []
    for ctx, _ in sequences:
        tables.append(blocks[: -(-ctx // BLOCK)])
        blocks = blocks[-(-ctx // BLOCK):]
    k_cache = torch.randn(kv_heads, num_blocks * BLOCK, head_dim, generator=generator).to(dtype)
    v_cache = torch.randn(kv_heads, num_blocks * BLOCK, head_dim, generator=generator).to(dtype)
    starts = [0]
    for _, q_len in sequences:
        starts.append(starts[-1] + q_len)
    q = torch.randn(starts[-1], num_heads, head_dim, generator=generator).to(dtype)
    new_slots = torch.tensor([slot for (ctx, q_len), table in zip(sequences, tables, strict=True)
                              for slot in slots_of(table, ctx - q_len, ctx)])
    k, v = k_cache[:, new_slots].transpose(0, 1), v_cache[:, new_slots].transpose(0, 1)  # the tokens' own K/V
    width = max(len(t) for t in tables)
    context_lens = [ctx for ctx, _ in sequences]
    got = kernels.paged_attention(q, k.contiguous(), v.contiguous(), k_cache, v_cache, torch.tensor(starts),
                                  torch.tensor([t + [0] * (width - len(t)) for t in tables]),
                                  torch.tensor(context_lens), BLOCK)
    want = reference_attention(q, k_cache, v_cache, starts, tables, context_lens)
    assert got.dtype == dtype
    assert float((got.double() - want).abs().max() / want.abs().max()) <= tolerance


def test_gguf_block_matmuls_match_a_float64_reference_on_every_level(kernels) -> None:
    level = next(level for level in LEVELS if cpu_kernels(level).module is kernels)
    if GGUF_TILES[level] is not None:
        assert kernels.gguf_isa() == GGUF_TILES[level]
    gen = torch.Generator().manual_seed(5)
    out_features, in_features, blocks = 40, 96, (40, 3)
    q4 = GgufQ4Linear(torch.randint(0, 16, (out_features, in_features), generator=gen),
                      (torch.rand(blocks, generator=gen) * 0.01).half().float(),
                      (-torch.rand(blocks, generator=gen) * 0.08).half().float())
    q8 = GgufQ8Linear(torch.randint(-128, 128, (out_features, in_features), generator=gen),
                      (torch.rand(blocks, generator=gen) * 0.01).half())
    x = torch.randn(8, in_features, generator=gen).to(torch.bfloat16)
    for got, layer in ((kernels.q4_matmul(x, q4.packed, q4.scales, q4.minimums, out_features, True), q4),
                       (kernels.q8_matmul(x, q8.packed, q8.scales, out_features, True), q8)):
        want = x.double() @ layer.dequantized().double().T
        # fp32 sums of exact products: within fp32 rounding of the float64 result.
        assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-5
        alone = torch.cat([kernels.q8_matmul(x[i:i + 1], q8.packed, q8.scales, out_features, True) if layer is q8
                           else kernels.q4_matmul(x[i:i + 1], q4.packed, q4.scales, q4.minimums, out_features, True)
                           for i in range(8)])
        assert torch.equal(alone, got)  # batch invariant on every path


def test_paged_attention_rejects_inconsistent_sequences(kernels) -> None:
    q, k = torch.zeros(3, 9, 64), torch.zeros(3, 3, 64)
    cache = torch.zeros(3, 4 * BLOCK, 64)
    tables = torch.tensor([[0, 1], [2, 3]])
    with pytest.raises(RuntimeError, match="new tokens for"):  # 2 new tokens with 1 key
        kernels.paged_attention(q, k, k, cache, cache, torch.tensor([0, 1, 3]), tables, torch.tensor([5, 1]), BLOCK)
    with pytest.raises(RuntimeError, match="block table is too short"):
        kernels.paged_attention(q, k, k, cache, cache, torch.tensor([0, 1, 3]), tables, torch.tensor([5, 40]), BLOCK)


@pytest.fixture(scope="module")
def eager_and_fused(model_path):
    return [LLM(str(model_path), dtype="float32", device="cpu", num_kv_blocks=256, enforce_eager=eager)
            for eager in (True, False)]


def test_fused_engine_greedy_output_is_identical_to_the_eager_engine(eager_and_fused) -> None:
    eager, fused = eager_and_fused
    assert isinstance(eager.engine.runner.backend, EagerBackend)
    assert isinstance(fused.engine.runner.backend, FusedCPUBackend)
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    # One batch of mixed lengths: prefill steps, then decode-only steps of many sequences with their own block tables.
    want = [o.token_ids for o in eager.generate(RAW_PROMPTS, params, use_tqdm=False)]
    got = [o.token_ids for o in fused.generate(RAW_PROMPTS, params, use_tqdm=False)]
    assert got == want


def test_fused_engine_with_chunked_prefill_matches_the_eager_engine(model_path, eager_and_fused) -> None:
    eager, _ = eager_and_fused
    # A 24-token budget: prompts split into chunks that start after cached keys, mixed with other requests' decodes.
    chunked = LLM(str(model_path), dtype="float32", device="cpu", num_kv_blocks=256, max_num_batched_tokens=24)
    assert isinstance(chunked.engine.runner.backend, FusedCPUBackend)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    want = [o.token_ids for o in eager.generate(RAW_PROMPTS, params, use_tqdm=False)]
    got = [o.token_ids for o in chunked.generate(RAW_PROMPTS, params, use_tqdm=False)]
    assert got == want


def test_engine_runs_eager_steps_with_a_warning_when_the_kernels_cannot_build(model_path, monkeypatch,
                                                                               caplog) -> None:
    monkeypatch.setattr("tokenmill.engine.cpu_kernels", lambda: KernelBuild(None, 0.0, "no C++ compiler"))
    with caplog.at_level(logging.WARNING, logger="tokenmill.engine"):
        llm = LLM(str(model_path), dtype="float32", device="cpu", num_kv_blocks=64)
    assert isinstance(llm.engine.runner.backend, EagerBackend)
    assert "no C++ compiler" in caplog.text
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    assert len(out[0].token_ids) == 4


def test_float16_runs_eager_steps(model_path) -> None:
    llm = LLM(str(model_path), dtype="float16", device="cpu", num_kv_blocks=64)
    assert isinstance(llm.engine.runner.backend, EagerBackend)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("vocab", [49152, 49157, 7])
def test_greedy_kernel_picks_torch_max_index(kernels, dtype, vocab) -> None:
    logits = torch.randn(64, vocab, generator=torch.Generator().manual_seed(vocab)).to(dtype)
    logits[5] = logits[5].max()  # all equal: the first index
    logits[6, 3] = logits[6, vocab - 1] = logits[6].max() + 1  # a tie between a vector lane and the tail
    logits[7] = float("-inf")
    assert torch.equal(kernels.greedy(logits), logits.max(dim=-1).indices)


def test_engine_greedy_sampling_uses_the_kernel(eager_and_fused) -> None:
    eager, fused = eager_and_fused
    assert eager.engine.runner.sampler.greedy is None and fused.engine.runner.sampler.greedy is not None
