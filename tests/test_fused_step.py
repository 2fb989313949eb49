"""The fused C++ model step (tokenmill/kernels) against the eager `LlamaModel`, and its paged attention against a
float64 reference."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import plans
from tests.conftest import RAW_PROMPTS, write_tiny_gguf
from tests.plans import make_plan
from tokenmill import LLM, SamplingParams
from tokenmill.attention.eager import EagerBackend
from tokenmill.attention.fused_cpu import FusedCPUBackend, rows_attention
from tokenmill.config import EngineConfig
from tokenmill.kernels import KernelBuild, cpu_kernels, isa
from tokenmill.kv.cache import KVCache
from tokenmill.model.gguf_file import GGUFFile
from tokenmill.model.linear import GgufQ4Linear, GgufQ8Linear, int8_blocks
from tokenmill.model.loader import load_model
from tokenmill.scheduler.plan import StepPlan

BLOCK = 16
CPU = torch.device("cpu")


# Every ISA level this CPU can run (TOKENMILL_CPU_ISA forces one for the engine; here each gets its own build).
LEVELS = isa.supported_levels(isa.cpu_flags())
GGUF_TILES = {"avx512bf16": "avx512bf16", "avx512vnni": "avx2", "avx512": "avx2", "avx2": "avx2", "scalar": "scalar",
              isa.GENERIC: None}
GGUF_INT8_TILES = {"avx512bf16": "avx512vnni", "avx512vnni": "avx512vnni", "avx512": "avx2", "avx2": "avx2",
                   "scalar": "scalar", isa.GENERIC: None}


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
    (torch.bfloat16, "gguf+int8", 0.04),  # both paths call the same int8-activation kernel
]


@pytest.mark.parametrize(("dtype", "weight_format", "tolerance"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
@torch.inference_mode()
def test_fused_step_matches_the_eager_forward_on_a_mixed_batch(kernels, model_path, dtype, weight_format,
                                                               tolerance) -> None:
    if kernels is not cpu_kernels(LEVELS[0]).module and (dtype, weight_format) != (torch.float32, "float"):
        # Lower levels run the layer loop's fp32 case; each bf16 format once, on the best level (CI time).
        pytest.skip("bf16 formats are checked on the CPU's best ISA level")
    fmt, _, activations = weight_format.partition("+")
    model = load_model(GGUFFile(model_path), dtype, CPU, fmt, int8_activations=activations == "int8")
    eager_cache, plan = mixed_batch(model)
    fused_cache = copy_of(eager_cache)
    slots = torch.tensor(plan.slot_mapping)
    want = run_backend(EagerBackend(model, eager_cache), plan)
    # The tiled chunk kernel sums a chunk's rows in the eager chunk path's order; "rows" (bf16's default) rounds them
    # as decodes do, no further from fp32 (the next test) but further from the eager path than these tolerances.
    fused = FusedCPUBackend(kernels, model, fused_cache, chunk_attention="tiled")
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


def mixed_batch(model) -> tuple[KVCache, StepPlan]:
    """Three cached sequences of 20, 3 and 33 tokens at scattered blocks (the first ends just before a block
    boundary) decode one token each; a fourth prefills 21 new tokens after its 12 cached ones, a fifth its first 18
    tokens (rows 3 to 41 of the plan)."""
    prompts = [[1, 504, 3458, 314] * 4, [9906, 28, 905], list(range(200, 233)), list(range(700, 712))]
    tables = [[3, 7], [0], [1, 4, 9], [10, 2, 12]]
    cache = filled_cache(model, prompts, tables, num_blocks=16)
    tables.append([14, 5])
    new = [[42], [1000], [7], list(range(3000, 3021)), list(range(5000, 5018))]
    return cache, make_plan([20, 3, 33, 12, 0], new, tables, BLOCK)


@pytest.mark.parametrize("weight_format", ["float", "gguf"])
@torch.inference_mode()
def test_rows_chunk_attention_is_as_close_to_fp32_as_the_eager_path(model_path, weight_format) -> None:
    """bf16's chunk rows attended as decodes (chunk_attention="rows") against the fp32 model (float weights): their
    mean absolute error is at most 10% above the eager path's (each a different rounding of the same sums). The float
    weights are prepacked for tokenmill's bf16 kernel, as the engine runs them: unpacked, oneDNN picks its matmul per
    CPU (AMX tiles or AVX-512 BF16), and those roundings alone move the two errors apart by more than 10%."""
    kernels = cpu_kernels().module
    if kernels is None:
        pytest.skip("CPU kernels unavailable")
    reference = load_model(GGUFFile(model_path), torch.float32, CPU, "float")
    cache, plan = mixed_batch(reference)
    want = run_backend(FusedCPUBackend(kernels, reference, cache), plan).double()
    model = load_model(GGUFFile(model_path), torch.bfloat16, CPU, weight_format)
    model.prepack_weights("tokenmill")
    cache, plan = mixed_batch(model)
    eager = run_backend(EagerBackend(model, copy_of(cache)), plan).double()
    rows = run_backend(FusedCPUBackend(kernels, model, cache, chunk_attention="rows"), plan).double()
    chunk = slice(3, 42)
    eager_error = float((eager[chunk] - want[chunk]).abs().mean())
    assert float((rows[chunk] - want[chunk]).abs().mean()) <= 1.1 * eager_error


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
    q, k, v, k_cache, v_cache, starts, tables = scattered_attention_batch(generator, dtype, num_heads, kv_heads,
                                                                           head_dim, sequences)
    width = max(len(t) for t in tables)
    context_lens = [ctx for ctx, _ in sequences]
    got = kernels.paged_attention(q, k, v, k_cache, v_cache, torch.tensor(starts),
                                  torch.tensor([t + [0] * (width - len(t)) for t in tables]),
                                  torch.tensor(context_lens), BLOCK)
    want = reference_attention(q, k_cache, v_cache, starts, tables, context_lens)
    assert got.dtype == dtype
    assert float((got.double() - want).abs().max() / want.abs().max()) <= tolerance


def random_gguf_layers(gen: torch.Generator) -> tuple[GgufQ4Linear, GgufQ8Linear]:
    """A Q4 and a Q8_0 layer of 40 × 96 with random codes and f16 scales (and minimums)."""
    out_features, in_features, blocks = 40, 96, (40, 3)
    q4 = GgufQ4Linear(torch.randint(0, 16, (out_features, in_features), generator=gen),
                      (torch.rand(blocks, generator=gen) * 0.01).half().float(),
                      (-torch.rand(blocks, generator=gen) * 0.08).half().float())
    q8 = GgufQ8Linear(torch.randint(-128, 128, (out_features, in_features), generator=gen),
                      (torch.rand(blocks, generator=gen) * 0.01).half())
    return q4, q8


def test_gguf_block_matmuls_match_a_float64_reference_on_every_level(kernels) -> None:
    level = next(level for level in LEVELS if cpu_kernels(level).module is kernels)
    if GGUF_TILES[level] is not None:
        assert kernels.gguf_isa() == GGUF_TILES[level]
    gen = torch.Generator().manual_seed(5)
    q4, q8 = random_gguf_layers(gen)
    out_features = q4.out_features
    x = torch.randn(8, q4.in_features, generator=gen).to(torch.bfloat16)
    for got, layer in ((kernels.q4_matmul(x, q4.packed, q4.scales, q4.minimums, out_features, True), q4),
                       (kernels.q8_matmul(x, q8.packed, q8.scales, out_features, True), q8)):
        want = x.double() @ layer.dequantized().double().T
        # fp32 sums of exact products: within fp32 rounding of the float64 result.
        assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-5
        alone = torch.cat([kernels.q8_matmul(x[i:i + 1], q8.packed, q8.scales, out_features, True) if layer is q8
                           else kernels.q4_matmul(x[i:i + 1], q4.packed, q4.scales, q4.minimums, out_features, True)
                           for i in range(8)])
        assert torch.equal(alone, got)  # batch invariant on every path


def int8_case() -> tuple[GgufQ4Linear, GgufQ8Linear, torch.Tensor]:
    """Q4 and Q8_0 layers and activations with a zero block and a block of one large value among small ones."""
    gen = torch.Generator().manual_seed(11)
    q4, q8 = random_gguf_layers(gen)
    q4.int8_activations = q8.int8_activations = True
    x = torch.randn(7, q4.in_features, generator=gen)
    x[1, 32:64] = 0.0
    x[2, 0] = 40.0
    return q4, q8, x.to(torch.bfloat16)


def int8_matmuls(kernels, q4: GgufQ4Linear, q8: GgufQ8Linear, x: torch.Tensor) -> list[torch.Tensor]:
    return [kernels.q4_matmul(x, q4.packed, q4.scales, q4.minimums, q4.out_features, True, True),
            kernels.q8_matmul(x, q8.packed, q8.scales, q8.out_features, True, True)]


def test_gguf_int8_activation_matmuls_match_a_float64_reference_on_every_level(kernels) -> None:
    level = next(level for level in LEVELS if cpu_kernels(level).module is kernels)
    if GGUF_INT8_TILES[level] is not None:
        assert kernels.gguf_int8_isa() == GGUF_INT8_TILES[level]
    q4, q8, x = int8_case()
    codes, scales = int8_blocks(x)
    assert codes.abs().max() == 127 and torch.equal(codes[1, 1], torch.zeros(32))
    rounded = (codes.double() * scales.double()).reshape(x.shape)
    for got, layer in zip(int8_matmuls(kernels, q4, q8, x), (q4, q8), strict=True):
        want = rounded @ layer.dequantized().double().T
        # Exact integer sums scaled in fp32: within fp32 rounding of the float64 product of the rounded activations.
        assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-5
        alone = torch.cat([int8_matmuls(kernels, q4, q8, x[i:i + 1])[layer is q8] for i in range(len(x))])
        assert torch.equal(alone, got)  # batch invariant
        # Rounding the activations is what the mode changes: close to the bf16-activation product, not equal.
        exact = x.double() @ layer.dequantized().double().T
        assert 0 < float((got.double() - exact).abs().max() / exact.abs().max()) < 0.02


def test_int8_blocks_rounds_like_the_kernel_where_a_value_is_half_way(kernels) -> None:
    # For x = amax / 2, x · 127 / amax is 63.5: the kernel's x · fl(127 / amax) lands just below (63), while
    # x · fl(127 · fl(1 / amax)), torch's `127.0 / amax`, did not (64).
    x = torch.zeros(1, 32)
    x[0, :3] = torch.tensor([1.7578125, 0.87890625, -0.87890625])
    x = x.to(torch.bfloat16)
    identity = GgufQ8Linear(torch.eye(32, dtype=torch.int64), torch.ones(32, 1).half())
    got = kernels.q8_matmul(x, identity.packed, identity.scales, 32, True, True)[0]
    codes, scales = int8_blocks(x)
    assert codes[0, 0, :3].tolist() == [127.0, 63.0, -63.0]
    assert torch.equal(got, (codes * scales).flatten())


def test_gguf_int8_activation_matmuls_are_bitwise_equal_on_every_level_and_in_the_fallback(monkeypatch) -> None:
    q4, q8, x = int8_case()
    results = [int8_matmuls(cpu_kernels(level).module, q4, q8, x) for level in LEVELS]
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))
    # Without the kernels the layers multiply the same rounded activations in fp32 (not bit for bit).
    monkeypatch.setattr("tokenmill.model.linear._gguf_kernels", lambda: None)
    for got, layer in zip(results[0], (q4, q8), strict=True):
        assert float((layer.logits(x) - got).abs().max() / got.abs().max()) < 1e-5


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


@pytest.fixture(scope="module")
def eager_tokens(eager_and_fused) -> list[list[int]]:
    """The eager engine's greedy tokens for RAW_PROMPTS (32 each): the reference of the tests below."""
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    return [o.token_ids for o in eager_and_fused[0].generate(RAW_PROMPTS, params, use_tqdm=False)]


def test_fused_engine_greedy_output_is_identical_to_the_eager_engine(eager_and_fused, eager_tokens) -> None:
    eager, fused = eager_and_fused
    assert isinstance(eager.engine.runner.backend, EagerBackend)
    assert isinstance(fused.engine.runner.backend, FusedCPUBackend)
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    # One batch of mixed lengths: prefill steps, then decode-only steps of many sequences with their own block tables.
    got = [o.token_ids for o in fused.generate(RAW_PROMPTS, params, use_tqdm=False)]
    assert got == eager_tokens


def test_fused_engine_with_chunked_prefill_matches_the_eager_engine(model_path, eager_tokens) -> None:
    # A 24-token budget: prompts split into chunks that start after cached keys, mixed with other requests' decodes.
    chunked = LLM(str(model_path), dtype="float32", device="cpu", num_kv_blocks=256, max_num_batched_tokens=24)
    assert isinstance(chunked.engine.runner.backend, FusedCPUBackend)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    got = [o.token_ids for o in chunked.generate(RAW_PROMPTS, params, use_tqdm=False)]
    assert got == [t[:16] for t in eager_tokens]  # greedy: the first 16 of 32 are the 16-token answer


def test_engine_runs_eager_steps_with_a_warning_when_the_kernels_cannot_build(model_path, monkeypatch,
                                                                               caplog) -> None:
    monkeypatch.setattr("tokenmill.attention.select.cpu_kernels", lambda: KernelBuild(None, 0.0, "no C++ compiler"))
    with caplog.at_level(logging.WARNING, logger="tokenmill.attention.select"):
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


def scattered_attention_batch(generator, dtype, num_heads, kv_heads, head_dim, sequences):
    """q, k/v (each new token's own K/V, also stored at its slot), caches and tables for `sequences` of (context,
    new tokens), each at blocks scattered over the cache."""
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
    # [tokens, kv_heads, D] with the layout the fused step passes (a fresh tensor: contiguous heads even for 1 head).
    k = torch.empty(starts[-1], kv_heads, head_dim, dtype=dtype).copy_(k_cache[:, new_slots].transpose(0, 1))
    v = torch.empty(starts[-1], kv_heads, head_dim, dtype=dtype).copy_(v_cache[:, new_slots].transpose(0, 1))
    return q, k, v, k_cache, v_cache, starts, tables


def assert_rows_are_one_row_decodes(kernels, batch, sequences, got, q_lens: range | None = None) -> None:
    """Row j of each sequence (whose new-token count is in `q_lens`, when given) equals, bit for bit, that row
    attended alone as a decode at its position (the earlier rows' keys are in the cache already)."""
    q, k, v, k_cache, v_cache, starts, padded = batch
    for s, (ctx, q_len) in enumerate(sequences):
        if q_lens is not None and q_len not in q_lens:
            continue
        for j in range(q_len):
            row = starts[s] + j
            alone = kernels.paged_attention(q[row:row + 1], k[row:row + 1], v[row:row + 1], k_cache, v_cache,
                                            torch.tensor([0, 1]), padded[s:s + 1],
                                            torch.tensor([ctx - q_len + j + 1]), BLOCK)
            assert torch.equal(got[row], alone[0]), f"sequence {s} ({ctx} keys, {q_len} new), row {j}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
# Groups 1, 3, 4 and 5 (5: the decode kernel for any group size); 16 splits 9 rows into passes of 3.
@pytest.mark.parametrize(("num_heads", "kv_heads"), [(4, 4), (9, 3), (8, 2), (10, 2), (16, 1)])
def test_multi_row_attention_rows_are_bitwise_one_row_decodes(kernels, dtype, head_dim, num_heads, kv_heads) -> None:
    generator = torch.Generator().manual_seed(num_heads * head_dim)
    # (keys, new tokens): verify steps of 2 to 9 rows and the longest (16) after odd and even cached counts, a prompt
    # of 3 tokens from scratch, mixed with a decode and a 17-token chunk that keep their own kernels.
    sequences = [(21, 2), (40, 3), (19, 4), (66, 5), (33, 6), (17, 7), (52, 8), (9, 9), (3, 3), (100, 16), (7, 1),
                 (41, 17)]
    q, k, v, k_cache, v_cache, starts, tables = scattered_attention_batch(generator, dtype, num_heads, kv_heads,
                                                                           head_dim, sequences)
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    got = kernels.paged_attention(q, k, v, k_cache, v_cache, torch.tensor(starts), padded,
                                  torch.tensor([ctx for ctx, _ in sequences]), BLOCK)
    assert_rows_are_one_row_decodes(kernels, (q, k, v, k_cache, v_cache, starts, padded), sequences, got,
                                    q_lens=range(2, 17))
    want = reference_attention(q, k_cache, v_cache, starts, tables, [ctx for ctx, _ in sequences])
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # as test_paged_attention_matches_a_float64_reference
    assert float((got.double() - want).abs().max() / want.abs().max()) <= tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("num_heads", "kv_heads"), [(9, 3), (8, 2)])
def test_exact_rows_make_every_row_a_one_row_decode(kernels, dtype, num_heads, kv_heads) -> None:
    """batch_invariant's attention: runs of any length (a 40-token chunk, a whole 35-token prompt, a verify step),
    row by row bitwise what the decode kernel gives that row alone."""
    generator = torch.Generator().manual_seed(num_heads + kv_heads)
    sequences = [(75, 40), (35, 35), (50, 5), (9, 1)]
    q, k, v, k_cache, v_cache, starts, tables = scattered_attention_batch(generator, dtype, num_heads, kv_heads, 64,
                                                                           sequences)
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    context = torch.tensor([ctx for ctx, _ in sequences])
    got = kernels.paged_attention(q, k, v, k_cache, v_cache, torch.tensor(starts), padded, context, BLOCK,
                                  exact_rows=True)
    assert_rows_are_one_row_decodes(kernels, (q, k, v, k_cache, v_cache, starts, padded), sequences, got)
    chunked = kernels.paged_attention(q, k, v, k_cache, v_cache, torch.tensor(starts), padded, context, BLOCK)
    assert not torch.equal(chunked, got) or dtype == torch.float32  # the chunk kernel rounds otherwise in bf16


@pytest.mark.parametrize(("tensor_type", "options"), [
    ("Q8_0", {"weight_format": "gguf", "batch_invariant": True}),
    ("F32", {}),  # bf16 defaults: rows attention for chunks, the packed row-exact bf16 matmul
])
def test_bf16_tokens_do_not_depend_on_cache_hits_or_chunks(tmp_path, tensor_type, options) -> None:
    """bf16 with row-invariant matmuls (the gguf tiles, or float weights on tokenmill's bf16 kernel) and every
    attention row computed as a decode computes it (batch_invariant, or chunk_attention's default in bf16): greedy
    tokens with the prompts served from the prefix cache, or prefilled in 24-token chunks, are those of whole
    prefills with the cache off."""
    path = write_tiny_gguf(tmp_path / "blocks.gguf", layers=2, hidden=256, heads=4, kv_heads=2, ff=256, vocab=300,
                           tensor_type=tensor_type)
    base = {"dtype": "bfloat16", "device": "cpu", "num_kv_blocks": 128, **options}
    gen = torch.Generator().manual_seed(3)
    shared = torch.randint(1, 300, (40,), generator=gen).tolist()
    prompts = [shared + torch.randint(1, 300, (n,), generator=gen).tolist() for n in (3, 17, 30, 1)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)

    def run(llm: LLM) -> list[tuple[list[int], list[float]]]:
        # The chosen tokens' logprobs too: equal floats mean equal logits, which a random model's wide margins
        # between tokens would not show.
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [(o.token_ids, [lp.logprob for lp in o.outputs[0].logprobs or []]) for o in outs]

    plain = LLM(str(path), **base, enable_prefix_caching=False)
    assert isinstance(plain.engine.runner.backend, FusedCPUBackend)
    want = run(plain)
    cached = LLM(str(path), **base)
    for _ in range(2):  # the second round finds every prompt cached but its last token
        assert run(cached) == want
    assert cached.engine.stats().prefix_cache.hits > 0
    assert run(LLM(str(path), **base, enable_prefix_caching=False, max_num_batched_tokens=24)) == want


def test_chunk_attention_is_checked_and_resolved() -> None:
    with pytest.raises(ValueError, match="batch_invariant"):
        EngineConfig(batch_invariant=True, enforce_eager=True)
    with pytest.raises(ValueError, match="batch_invariant"):
        EngineConfig(batch_invariant=True, chunk_attention="tiled")
    with pytest.raises(ValueError, match="chunk_attention"):
        EngineConfig(chunk_attention="fast")
    assert rows_attention("auto", torch.bfloat16, quantized=False)
    assert not rows_attention("auto", torch.float32, quantized=False)
    assert not rows_attention("auto", torch.bfloat16, quantized=True)
    assert rows_attention("rows", torch.float32, quantized=True)
    assert not rows_attention("tiled", torch.bfloat16, quantized=False)


# Odd shapes: K not a multiple of the vector width (4, 8 or 16 lanes), N not a multiple of the tiles or of the 24
# rows of W per task; and one of the model's (q/k/v of SmolLM2-135M).
@pytest.mark.parametrize(("out_features", "in_features"), [(37, 29), (79, 64), (5, 3), (960, 576)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_rows_is_row_exact_at_every_batch_size(kernels, out_features, in_features, with_bias) -> None:
    generator = torch.Generator().manual_seed(out_features * in_features)
    small = kernels.SMALL_ROWS
    weight = torch.randn(out_features, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator) if with_bias else None
    x = torch.randn(small + 3, in_features, generator=generator)
    alone = torch.cat([kernels.linear_rows(x[i:i + 1], weight, bias) for i in range(len(x))])
    for rows in range(1, small + 1):
        for first in sorted({0, 1, len(x) - rows}):
            got = kernels.linear_rows(x[first:first + rows], weight, bias)
            assert got.shape == (rows, out_features) and got.dtype == torch.float32
            assert torch.equal(got, alone[first:first + rows]), f"{rows} rows from row {first}"
    want = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    # Any order of summing K products and a bias in fp32 is within (K + 1) · 2^-24 of the sum of their magnitudes.
    magnitude = x.double().abs() @ weight.double().abs().T + (0 if bias is None else bias.double().abs())
    assert bool(((alone.double() - want).abs() <= (in_features + 1) * 2**-24 * magnitude).all())
    # Measured far inside that bound: a few units in the last place of the largest output.
    assert float((alone.double() - want).abs().max() / want.abs().max()) < 1e-6


def test_linear_rows_rejects_what_it_does_not_compute(kernels) -> None:
    weight = torch.randn(8, 16)
    with pytest.raises(RuntimeError, match="float32"):
        kernels.linear_rows(torch.randn(2, 16).to(torch.bfloat16), weight.to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="contiguous"):
        kernels.linear_rows(torch.randn(16, 2).T, weight)
    with pytest.raises(RuntimeError, match=r"\[rows, K\]"):
        kernels.linear_rows(torch.randn(2, 15), weight)
    assert kernels.linear_rows(torch.empty(0, 16), weight).shape == (0, 8)


# Odd K (padded to pairs), N not a multiple of the 16-output blocks or of a tile, and two of the model's shapes; row
# counts across the 64-row blocks of x.
@pytest.mark.parametrize(("out_features", "in_features"), [(37, 29), (79, 64), (5, 3), (960, 576), (576, 1536)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_packed_is_row_exact_at_every_batch_size(kernels, out_features, in_features, with_bias) -> None:
    generator = torch.Generator().manual_seed(out_features * in_features + 1)
    weight = torch.randn(out_features, in_features, generator=generator).to(torch.bfloat16)
    bias = torch.randn(out_features, generator=generator).to(torch.bfloat16) if with_bias else None
    packed = kernels.pack_bf16(weight)
    x = torch.randn(150, in_features, generator=generator).to(torch.bfloat16)
    alone = torch.cat([kernels.linear_packed(x[i:i + 1], packed, bias, out_features, fp32_out=True)
                       for i in range(len(x))])
    for rows in [*range(1, 18), 31, 64, 65, 100, 150]:
        for first in sorted({0, min(1, len(x) - rows), len(x) - rows}):
            got = kernels.linear_packed(x[first:first + rows], packed, bias, out_features, fp32_out=True)
            assert got.shape == (rows, out_features) and got.dtype == torch.float32
            assert torch.equal(got, alone[first:first + rows]), f"{rows} rows from row {first}"
    # The bf16 output is the fp32 sum rounded to nearest even, once.
    rounded = kernels.linear_packed(x, packed, bias, out_features)
    assert rounded.dtype == torch.bfloat16 and torch.equal(rounded, alone.to(torch.bfloat16))
    want = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    # bf16 products are exact in fp32; any order of adding K of them and a bias is within (K + 1) · 2^-24 of the sum
    # of their magnitudes (denormals, which the AVX512-BF16 instruction flushes, do not occur here).
    magnitude = x.double().abs() @ weight.double().abs().T + (0 if bias is None else bias.double().abs())
    assert bool(((alone.double() - want).abs() <= (in_features + 1) * 2**-24 * magnitude).all())


@pytest.mark.skipif(not {"avx512", "avx2"} <= set(LEVELS), reason="needs both the avx512 and the avx2 build")
def test_linear_packed_avx2_tiles_give_the_16_lane_bits() -> None:
    """The AVX2 build's 8-lane tiles take each output's multiply-adds in the order of the 16-lane code that the
    avx512 build runs (without AVX512-BF16): the same bits, at every row-group size and in both output types."""
    generator = torch.Generator().manual_seed(7)
    narrow, wide = cpu_kernels("avx2").module, cpu_kernels("avx512").module
    for out_features, in_features in [(37, 29), (960, 576), (576, 1536)]:
        weight = torch.randn(out_features, in_features, generator=generator).to(torch.bfloat16)
        bias = torch.randn(out_features, generator=generator).to(torch.bfloat16)
        packed = narrow.pack_bf16(weight)
        for rows in (1, 2, 3, 4, 5, 70):
            x = torch.randn(rows, in_features, generator=generator).to(torch.bfloat16)
            for fp32_out in (False, True):
                assert torch.equal(narrow.linear_packed(x, packed, bias, out_features, fp32_out),
                                   wide.linear_packed(x, packed, bias, out_features, fp32_out))


def test_linear_packed_row_group_switch_keeps_the_bits(tmp_path) -> None:
    """TOKENMILL_BF16_ROW_GROUP (the A/B switch of the row grouping, read once per process) changes which rows share
    a tile, never a row's bits: a process with groups of at most 1, 2 and 4 rows gives the default's outputs."""
    generator = torch.Generator().manual_seed(11)
    weight = torch.randn(300, 200, generator=generator).to(torch.bfloat16)
    x = torch.randn(19, 200, generator=generator).to(torch.bfloat16)
    torch.save({"weight": weight, "x": x}, tmp_path / "inputs.pt")
    script = (
        "import sys, torch\n"
        "from tokenmill.kernels import cpu_kernels\n"
        "k = cpu_kernels().module\n"
        f"d = torch.load({str(tmp_path / 'inputs.pt')!r})\n"
        "packed = k.pack_bf16(d['weight'])\n"
        "out = [k.linear_packed(d['x'][:n], packed, None, 300, True) for n in (1, 3, 6, 8, 12, 19)]\n"
        "torch.save(out, sys.argv[1])\n")
    outputs = []
    for group in (None, "1", "2", "4"):
        env = {k: v for k, v in os.environ.items() if k != "TOKENMILL_BF16_ROW_GROUP"}
        if group is not None:
            env["TOKENMILL_BF16_ROW_GROUP"] = group
        target = tmp_path / f"out_{group}.pt"
        subprocess.run([sys.executable, "-c", script, str(target)], env=env, check=True,
                       cwd=Path(__file__).resolve().parents[1])
        outputs.append(torch.load(target))
    for other in outputs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outputs[0], other, strict=True))


def test_linear_packed_rejects_what_it_does_not_compute(kernels) -> None:
    weight = torch.randn(8, 16).to(torch.bfloat16)
    packed = kernels.pack_bf16(weight)
    assert packed.shape == (1, 8, 16, 2)
    with pytest.raises(RuntimeError, match="bfloat16"):
        kernels.pack_bf16(weight.float())
    with pytest.raises(RuntimeError, match="bfloat16"):
        kernels.linear_packed(torch.randn(2, 16), packed, None, 8)
    with pytest.raises(RuntimeError, match="does not match"):
        kernels.linear_packed(torch.randn(2, 14).to(torch.bfloat16), packed, None, 8)
    with pytest.raises(RuntimeError, match="does not match"):
        kernels.linear_packed(torch.randn(2, 16).to(torch.bfloat16), packed, None, 17)
    with pytest.raises(RuntimeError, match="bias"):
        kernels.linear_packed(torch.randn(2, 16).to(torch.bfloat16), packed, torch.zeros(8), 8)
    assert kernels.linear_packed(torch.empty(0, 16, dtype=torch.bfloat16), packed, None, 8).shape == (0, 8)


def test_float_lm_head_logits_are_row_exact_and_fall_back_without_the_kernels(monkeypatch) -> None:
    import tokenmill.model.linear as linear

    generator = torch.Generator().manual_seed(11)
    head = linear.FloatLinear(torch.randn(300, 64, generator=generator), torch.randn(300, generator=generator))
    small = cpu_kernels().module.SMALL_ROWS
    x = torch.randn(small + 4, 64, generator=generator)
    alone = torch.cat([head.logits(x[i:i + 1]) for i in range(small)])
    assert torch.equal(head.logits(x[:small]), alone)
    assert torch.equal(head.logits(x[3:9]), alone[3:9])
    want = x.double() @ head.weight.double().T + head.bias.double()
    assert float((head.logits(x).double() - want).abs().max() / want.abs().max()) < 1e-6  # more rows: F.linear
    monkeypatch.setattr(linear, "_cpu_kernels", lambda: None)
    assert torch.equal(head.logits(x[:5]), torch.nn.functional.linear(x[:5], head.weight, head.bias))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v biases
@torch.inference_mode()
def test_fused_verify_step_rows_are_bitwise_the_decode_steps(kernels, tmp_path, arch) -> None:
    from tests.conftest import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "tiny.gguf", arch=arch, hidden=256, heads=4, kv_heads=2, ff=192,
                           metadata={"tokenizer.ggml.merges": [], "tokenizer.ggml.eos_token_id": 0})
    model = load_model(GGUFFile(path), torch.float32, CPU, "float")
    assert model.cfg.head_dim == 64
    # Two sequences with 20 and 13 cached tokens, then 1 + 4 and 1 + 2 tokens to verify (a last token and drafts).
    tables = [[5, 2, 7], [0, 3]]
    prompts = [list(range(10, 30)), list(range(100, 113))]
    verify = [[31, 250, 7, 18, 99], [4, 120, 9]]
    cache = KVCache(model.cfg, 8, BLOCK, model.dtype, CPU)
    fused = FusedCPUBackend(kernels, model, cache)
    run_backend(fused, make_plan([0, 0], prompts, tables, BLOCK))
    stepwise_cache = copy_of(cache)

    verified = run_backend(fused, make_plan([20, 13], verify, tables, BLOCK))
    # The same tokens one step at a time as decodes: both sequences while each has a token left, then the first.
    stepwise = FusedCPUBackend(kernels, model, stepwise_cache)
    rows: list[list[torch.Tensor]] = [[], []]
    for i in range(len(verify[0])):
        active = [s for s in (0, 1) if i < len(verify[s])]
        cached = [len(prompts[s]) + i for s in active]
        hidden = run_backend(stepwise, make_plan(cached, [[verify[s][i]] for s in active],
                                                 [tables[s] for s in active], BLOCK))
        for at, s in enumerate(active):
            rows[s].append(hidden[at])
    assert torch.equal(verified, torch.stack(rows[0] + rows[1]))
    assert torch.equal(cache.k, stepwise_cache.k) and torch.equal(cache.v, stepwise_cache.v)
    # And the LM head gives each row the logits of its decode step.
    logits = model.compute_logits(verified)
    assert torch.equal(logits, torch.cat([model.compute_logits(row[None]) for row in rows[0] + rows[1]]))
