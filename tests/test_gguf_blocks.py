"""K-quant, Q5_0 and Q6_K tensors on the GGUF block kernels: the file's exact weights, fp32 sub-block scales, every
level."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from tests.conftest import random_k_quant, write_tiny_gguf
from tokenmill import LLM, SamplingParams
from tokenmill.attention.fused_cpu import FusedCPUBackend
from tokenmill.bench.qwen_pair import CACHE, DRAFT, TARGET
from tokenmill.kernels import cpu_kernels, isa
from tokenmill.model.gguf_blocks import gguf_q4_codes, gguf_q6k_codes, gguf_q8_codes, q4_requantize, q8_requantize
from tokenmill.model.gguf_file import GGUFFile
from tokenmill.model.linear import GgufQ4Linear, GgufQ8Linear, Int8Linear, StackedLinear, int8_blocks
from tokenmill.model.loader import load_model, unpermute_rope_rows

LEVELS = isa.supported_levels(isa.cpu_flags())


def dequantized_by_gguf(raw: np.ndarray, kind: str, shape: tuple[int, int]) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind]).reshape(shape))


def q4_k_layer(rows: int = 40, cols: int = 512, seed: int = 3) -> tuple[GgufQ4Linear, torch.Tensor]:
    """A Q4_K layer of random blocks and the gguf package's dequantization of the same bytes."""
    raw = random_k_quant("Q4_K", (rows, cols), np.random.default_rng(seed))
    codes, scales, minimums = gguf_q4_codes(raw, "Q4_K", (rows, cols))
    return GgufQ4Linear(codes, scales, minimums), dequantized_by_gguf(raw, "Q4_K", (rows, cols))


def block_matmul(kernels: object, layer: GgufQ4Linear | GgufQ8Linear, x: torch.Tensor,
                 int8_activations: bool) -> torch.Tensor:
    """The layer's block kernel from one build (`kernels`), fp32 outputs."""
    layer.int8_activations = int8_activations
    return layer._kernel(kernels, x, True)


def assert_matches_float64(level: str, layer: GgufQ4Linear | GgufQ8Linear, weight: torch.Tensor, rows: int,
                           seed: int) -> None:
    """Both activation modes of one level against x · Wᵀ in float64 (for int8, of the rounded x), within 1e-5 of the
    largest output; the int8 mode batch invariant."""
    kernels = cpu_kernels(level).module
    assert kernels is not None
    x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    got = block_matmul(kernels, layer, x, False)
    want = x.double() @ weight.double().T
    assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-5
    codes, scales = int8_blocks(x)
    rounded = (codes.double() * scales.double()).reshape(x.shape)
    got = block_matmul(kernels, layer, x, True)
    want = rounded @ weight.double().T
    assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-5
    alone = torch.cat([block_matmul(kernels, layer, x[i:i + 1], True) for i in range(len(x))])
    assert torch.equal(alone, got)  # batch invariant


def assert_int8_bitwise_equal_on_every_level(layer: GgufQ4Linear | GgufQ8Linear, rows: int, seed: int) -> None:
    x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    results = [block_matmul(cpu_kernels(level).module, layer, x, True) for level in LEVELS]
    assert all(torch.equal(results[0], other) for other in results[1:])


def q6_k_layer(rows: int = 40, cols: int = 512, seed: int = 5) -> tuple[GgufQ8Linear, torch.Tensor]:
    """A Q6_K layer of random blocks and the gguf package's dequantization of the same bytes."""
    raw = random_k_quant("Q6_K", (rows, cols), np.random.default_rng(seed))
    codes, d, sc = gguf_q6k_codes(raw, "Q6_K", (rows, cols))
    return GgufQ8Linear(codes, d, sub_scales=sc), dequantized_by_gguf(raw, "Q6_K", (rows, cols))


def test_q6_k_codes_d_and_sc_reproduce_the_gguf_packages_dequantization_exactly() -> None:
    rows, cols = 24, 512
    raw = random_k_quant("Q6_K", (rows, cols), np.random.default_rng(6))
    codes, d, sc = gguf_q6k_codes(raw, "Q6_K", (rows, cols))
    assert codes.dtype == torch.int8 and int(codes.min()) == -32 and int(codes.max()) == 31
    assert d.dtype == torch.float16 and d.shape == (rows, 2) and sc.dtype == torch.int8 and sc.shape == (rows, 32)
    per16 = d.float().repeat_interleave(16, dim=1) * sc.float()
    assert not torch.equal(per16.half().float(), per16)  # d · sc: exact in fp32, not in f16
    rebuilt = codes.reshape(rows, -1, 16).float() * per16[..., None]
    assert torch.equal(rebuilt.reshape(rows, cols), dequantized_by_gguf(raw, "Q6_K", (rows, cols)))
    layer, want = q6_k_layer()
    # Per tile of 16 rows and super-block of 256 weights: 16 f16 d, then 16 sub-blocks × 16 rows of int8 sc.
    assert layer.scales.dtype == torch.uint8 and layer.scales.shape == (3, 2, 2 * 16 + 16 * 16)
    assert torch.equal(layer.dequantized(), want)
    assert torch.equal(layer.dequantized(torch.tensor([39, 2])), want[[39, 2]])


# Each K-quant layer with its activation rows and seeds: the float64 check, and the int8 bits across levels.
K_QUANTS = {"q4_k": (q4_k_layer, (7, 2), (5, 4)), "q6_k": (q6_k_layer, (8, 9), (5, 10))}


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("quant", K_QUANTS)
def test_k_quant_matmuls_match_a_float64_reference_on_every_level(quant, level) -> None:
    make, (rows, seed), _ = K_QUANTS[quant]
    layer, weight = make()
    assert_matches_float64(level, layer, weight, rows=rows, seed=seed)


@pytest.mark.parametrize("quant", K_QUANTS)
def test_k_quant_int8_matmuls_are_bitwise_equal_on_every_level(quant) -> None:
    make, _, (rows, seed) = K_QUANTS[quant]
    assert_int8_bitwise_equal_on_every_level(make()[0], rows=rows, seed=seed)


def test_the_q8_kernel_checks_its_scale_layouts() -> None:
    layer, _ = q6_k_layer()
    x = torch.zeros(1, layer.in_features, dtype=torch.bfloat16)
    module = cpu_kernels().module
    with pytest.raises(RuntimeError, match="Q6_K scales must be"):
        module.q8_matmul(x, layer.packed, layer.scales[:, :1].contiguous(), layer.out_features, True)
    with pytest.raises(RuntimeError, match="Q8 scales must be contiguous float16"):
        module.q8_matmul(x, layer.packed, torch.ones(3, 16, 16), layer.out_features, True)
    with pytest.raises(ValueError, match="do not fit"):
        GgufQ8Linear(torch.zeros(16, 512, dtype=torch.int8), torch.ones(16, 2).half(),
                     sub_scales=torch.ones(16, 16, dtype=torch.int8))


def test_q4_k_and_q5_0_codes_reproduce_the_gguf_packages_dequantization_exactly() -> None:
    rows, cols = 24, 512
    raw = random_k_quant("Q4_K", (rows, cols), np.random.default_rng(0))
    codes, scales, minimums = gguf_q4_codes(raw, "Q4_K", (rows, cols))
    assert int(codes.min()) == 0 and int(codes.max()) == 15
    rebuilt = codes.reshape(rows, -1, 32).float() * scales[..., None] + minimums[..., None]
    assert torch.equal(rebuilt.reshape(rows, cols), dequantized_by_gguf(raw, "Q4_K", (rows, cols)))

    data = np.random.default_rng(1).standard_normal((rows, cols)).astype(np.float32)
    raw = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q5_0)
    codes, d = gguf_q8_codes(raw, "Q5_0", (rows, cols))
    assert codes.dtype == torch.int8 and int(codes.min()) == -16 and int(codes.max()) == 15
    rebuilt = codes.reshape(rows, -1, 32).float() * d.float()[..., None]
    assert torch.equal(rebuilt.reshape(rows, cols), dequantized_by_gguf(raw, "Q5_0", (rows, cols)))


def test_q4_k_layers_keep_fp32_scales_and_the_files_exact_weights() -> None:
    layer, want = q4_k_layer()
    assert layer.scales.dtype == torch.float32 and layer.minimums.dtype == torch.float32  # not exact in f16
    assert torch.equal(layer.dequantized(), want)


def test_the_kernel_rejects_mismatched_scale_dtypes() -> None:
    layer, _ = q4_k_layer()
    with pytest.raises(RuntimeError, match="one dtype"):
        cpu_kernels().module.q4_matmul(torch.zeros(1, layer.in_features, dtype=torch.bfloat16), layer.packed,
                                       layer.scales, layer.minimums.half(), layer.out_features)


# A tiny llama whose stacks mix types the way Q4_K_M files do: qkv of Q4_K and Q6_K (Qwen2.5-Coder-1.5B's: two tile
# families, one layer each) and of Q5_0 and Q8_0, gate_up of Q4_K and Q4_1 and of F16 and Q4_K (no tile for F16: the
# fallback), Q4_K o, Q4_K and Q6_K down.
MIXED = {"blk.0.attn_q.weight": "Q4_K", "blk.0.attn_k.weight": "Q4_K", "blk.0.attn_v.weight": "Q6_K",
         "blk.1.attn_q.weight": "Q5_0", "blk.1.attn_k.weight": "Q5_0", "blk.1.attn_v.weight": "Q8_0",
         "blk.0.ffn_gate.weight": "Q4_K", "blk.0.ffn_up.weight": "Q4_1", "blk.1.ffn_gate.weight": "F16",
         "blk.1.ffn_up.weight": "Q4_K", "blk.0.attn_output.weight": "Q4_K", "blk.1.attn_output.weight": "Q4_K",
         "blk.0.ffn_down.weight": "Q4_K", "blk.1.ffn_down.weight": "Q6_K"}


@pytest.fixture(scope="module")
def mixed_model_path(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("kquant") / "mixed.gguf", hidden=256, heads=4, kv_heads=2,
                           ff=512, tensor_type="Q8_0", tensor_types=MIXED)


def _file_qkv(gguf_file: GGUFFile, layer: int) -> torch.Tensor:
    """The file's q, k and v weights of `layer` stacked, q/k rows in the loader's rotary order."""
    return torch.cat([unpermute_rope_rows(gguf_file.tensor(f"blk.{layer}.attn_q.weight"), 4),
                      unpermute_rope_rows(gguf_file.tensor(f"blk.{layer}.attn_k.weight"), 2),
                      gguf_file.tensor(f"blk.{layer}.attn_v.weight")])


@pytest.mark.parametrize("int8_activations", [False, True])
def test_mixed_k_quant_stacks_load_as_the_files_exact_blocks(mixed_model_path, int8_activations) -> None:
    gguf_file = GGUFFile(mixed_model_path)
    model = load_model(gguf_file, torch.bfloat16, torch.device("cpu"), weight_format="gguf",
                       int8_activations=int8_activations)
    layers = model.layers
    assert [type(layer.qkv) for layer in layers] == [StackedLinear, GgufQ8Linear]
    assert [type(layer.down) for layer in layers] == [GgufQ4Linear, GgufQ8Linear]
    # Q4_K q and k on the 4-bit tiles, the Q6_K v on the 8-bit ones: every weight the file's.
    q_k, v = layers[0].qkv.parts
    assert type(q_k) is GgufQ4Linear and type(v) is GgufQ8Linear and v.scales.dtype == torch.uint8
    assert (q_k.out_features, v.out_features, layers[0].qkv.out_features) == (256 + 128, 128, 512)
    assert q_k.int8_activations == v.int8_activations == int8_activations
    assert torch.equal(torch.cat([q_k.dequantized(), v.dequantized()]), _file_qkv(gguf_file, 0))
    assert layers[0].gate_up.scales.dtype == torch.float32  # Q4_K rows beside Q4_1 ones: fp32 for all
    assert layers[1].qkv.scales.dtype == torch.float16 and layers[1].down.scales.dtype == torch.uint8  # Q6_K's d, sc
    gate_up = torch.cat([gguf_file.tensor(f"blk.0.ffn_{n}.weight") for n in ("gate", "up")])
    assert torch.equal(layers[0].gate_up.dequantized(), gate_up)
    assert torch.equal(layers[0].o.dequantized(), gguf_file.tensor("blk.0.attn_output.weight"))
    assert torch.equal(layers[1].down.dequantized(), gguf_file.tensor("blk.1.ffn_down.weight"))
    gate_up = torch.cat([gguf_file.tensor(f"blk.1.ffn_{n}.weight") for n in ("gate", "up")])
    if not int8_activations:  # an F16 tensor has no tile: the stack goes to PyTorch's int8 kernel with bf16
        assert type(layers[1].gate_up) is Int8Linear
        return
    # With int8 activations it is requantized into 8-bit blocks of 32 for the 8-bit tiles, each weight within half
    # its block's step
    requantized = layers[1].gate_up
    assert type(requantized) is GgufQ8Linear and requantized.int8_activations
    step = requantized.scales.float().permute(0, 2, 1).reshape(-1, gate_up.shape[1] // 32)[: gate_up.shape[0]]
    error = (requantized.dequantized() - gate_up).abs().reshape(gate_up.shape[0], -1, 32).amax(-1)
    assert bool((error <= step * 0.5 + 1e-6).all()) and float(error.max()) > 0


def test_stacked_layer_is_its_parts_side_by_side(mixed_model_path) -> None:
    qkv = load_model(GGUFFile(mixed_model_path), torch.bfloat16, torch.device("cpu"),
                     weight_format="gguf").layers[0].qkv
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(4)).bfloat16()
    bias = torch.randn(qkv.out_features).bfloat16()
    stacked = StackedLinear(list(qkv.parts), bias)
    assert torch.equal(stacked(x), torch.cat([p(x) for p in qkv.parts], dim=1) + bias)
    assert torch.equal(stacked.logits(x), torch.cat([p.logits(x) for p in qkv.parts], dim=1) + bias)
    assert stacked.weight_bytes() == sum(p.weight_bytes() for p in qkv.parts) + bias.numel() * 2
    with pytest.raises(ValueError, match="two or more parts"):
        StackedLinear([qkv.parts[0]])


def test_q8_requantize_rounds_each_block_to_its_own_f16_step() -> None:
    weight = torch.randn(3, 96, generator=torch.Generator().manual_seed(2)) * torch.tensor([1.0, 1e-3, 50.0])[:, None]
    weight[1, 32:64] = 0.0
    codes, d = q8_requantize(weight)
    assert codes.dtype == torch.int8 and d.dtype == torch.float16 and d.shape == (3, 3)
    assert int(codes.abs().max()) <= 127 and torch.equal(codes[1, 32:64], torch.zeros(32, dtype=torch.int8))
    assert torch.equal(d.float(), (weight.reshape(3, 3, 32).abs().amax(-1) / 127).half().float())
    back = (codes.float().reshape(3, 3, 32) * d.float()[..., None]).reshape(3, 96)
    assert bool(((back - weight).abs().reshape(3, 3, 32) <= d.float()[..., None] * 0.5 + 1e-9).all())


def test_q4_requantize_rounds_each_block_to_its_f16_minimum_and_step() -> None:
    weight = torch.randn(3, 96, generator=torch.Generator().manual_seed(3)) * torch.tensor([1.0, 1e-3, 50.0])[:, None]
    weight[1, 32:64] = 0.25  # a constant block: step 0, every code 0
    codes, d, m = q4_requantize(weight)
    assert codes.dtype == torch.uint8 and codes.shape == (3, 96) and d.shape == m.shape == (3, 3)
    assert int(codes.max()) <= 15 and torch.equal(codes[1, 32:64], torch.zeros(32, dtype=torch.uint8))
    blocks = weight.reshape(3, 3, 32)
    assert torch.equal(m, blocks.amin(-1).half().float()) and torch.equal(d.half().float(), d)
    assert torch.equal(d, ((blocks.amax(-1) - m) / 15).half().float())
    back = codes.float().reshape(3, 3, 32) * d[..., None] + m[..., None]
    # Half a step, plus what rounding m and d to f16 moved the grid (2^-11 relative each; 15 steps of d).
    bound = 0.5 * d + 2.0**-11 * (m.abs() + 15 * d)
    assert bool(((back - blocks).abs() <= bound[..., None] + 1e-12).all())
    assert torch.equal(back[1, 1], torch.full((32,), 0.25))
    layer = GgufQ4Linear(codes, d, m)  # f16-exact d and m: the layer keeps them in f16, as a Q4_1 file's
    assert layer.scales.dtype == torch.float16 and torch.equal(layer.dequantized(), back.reshape(3, 96))


@pytest.mark.parametrize("activations", ["bf16", "int8"])
def test_mixed_k_quant_model_decodes_the_same_fused_and_eager(mixed_model_path, activations) -> None:
    """bf16 steps agree up to the last bit (attention and norms sum in other orders), so greedy outputs agree token for
    token until a near tie, where both engines' top two are the same pair within bf16 rounding."""
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    prompts = [[5, 9, 33, 2, 71], [100, 4, 4, 8, 250, 17, 3]]
    outputs = []
    for eager in (True, False):
        llm = LLM(str(mixed_model_path), dtype="bfloat16", weight_format="gguf", device="cpu", num_kv_blocks=64,
                  enforce_eager=eager, gguf_activations=activations)
        assert isinstance(llm.engine.runner.backend, FusedCPUBackend) != eager
        outputs.append([o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)])
    for eager, fused in zip(*outputs, strict=True):
        i = next((i for i, (a, b) in enumerate(zip(eager.token_ids, fused.token_ids, strict=True)) if a != b), None)
        if i is None:
            continue
        for out in (eager, fused):
            (a, first), (b, second) = out.logprobs[i].top[:2]
            assert {a, b} == {eager.token_ids[i], fused.token_ids[i]} and first - second < 0.02


@pytest.mark.skipif(not (CACHE / TARGET.file_name).exists(), reason="the optional Qwen pair is not assembled")
def test_qwen_target_runs_every_linear_layer_from_its_own_blocks() -> None:
    model = load_model(GGUFFile(CACHE / TARGET.file_name), torch.bfloat16, torch.device("cpu"), weight_format="gguf")
    layers = [m for layer in model.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    stacked = [m for m in layers if isinstance(m, StackedLinear)]
    # The 14 qkv stacks with a Q6_K v beside Q4_K q and k: one 4-bit and one Q6_K part each.
    assert len(stacked) == 14 and all([type(p) for p in m.parts] == [GgufQ4Linear, GgufQ8Linear] for m in stacked)
    assert all(isinstance(m, GgufQ4Linear | GgufQ8Linear | StackedLinear) for m in [*layers, model.lm_head])
    assert not any(isinstance(m, Int8Linear) for m in model.modules())


@pytest.mark.skipif(not (CACHE / DRAFT.file_name).exists(), reason="the optional Qwen pair is not assembled")
def test_qwen_draft_runs_its_q5_0_q8_0_and_q4_k_tensors_on_the_block_tiles() -> None:
    model = load_model(GGUFFile(CACHE / DRAFT.file_name), torch.bfloat16, torch.device("cpu"), weight_format="gguf")
    tiled = [m for m in model.modules() if isinstance(m, GgufQ4Linear | GgufQ8Linear)]
    fallback = [m for m in model.modules() if isinstance(m, Int8Linear)]
    # 24 layers of qkv, o, gate_up and down, and the LM head: the 12 Q6_K ffn_down tensors too.
    assert len(tiled) == 24 * 4 + 1 and not fallback


@pytest.mark.parametrize("level", LEVELS)
def test_weight_prefetch_changes_no_bit_and_can_be_turned_off(level) -> None:
    """The tiles' weight prefetch (up to gguf_prefetch_rows activation rows) moves no result bit, in either mode,
    whether a call prefetches (4 rows) or not (20 rows, or prefetch off)."""
    kernels = cpu_kernels(level).module
    assert kernels.gguf_prefetch_rows() == 16
    layers = [q4_k_layer(rows=72, cols=1024)[0], q6_k_layer(rows=40, cols=1024)[0]]
    x = torch.randn(20, 1024, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    try:
        for layer in layers:
            for int8 in (False, True):
                kernels.gguf_prefetch_rows(16)
                on = [block_matmul(kernels, layer, x[:rows], int8) for rows in (4, 20)]
                kernels.gguf_prefetch_rows(0)
                off = [block_matmul(kernels, layer, x[:rows], int8) for rows in (4, 20)]
                assert all(torch.equal(a, b) for a, b in zip(on, off, strict=True))
                assert torch.equal(on[0], on[1][:4])
    finally:
        kernels.gguf_prefetch_rows(16)


def test_int8_rounding_of_many_rows_and_special_values_is_the_same_on_every_level() -> None:
    """The int8 mode's rounding of the activations (vectors per level, blocks split across threads for many rows)
    gives the lowest level's bits (on x86 the portable loop's) and int8_blocks' codes: ties to even, a NaN element
    coded 0, an inf element, a zero block; 40 rows of 512 features (640 blocks) take the threaded split."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(40, 512, generator=gen) * 4
    x[0, :32] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -126.5] + [0.0] * 24)  # inv = 1: ties
    x[1, 3] = float("nan")
    x[2, 40] = float("inf")
    x[3, 64:96] = 0.0
    x = x.to(torch.bfloat16)
    identity = GgufQ8Linear(torch.eye(512, dtype=torch.int64), torch.ones(512, 16).half())  # out = code · scale
    layers = [identity, q4_k_layer(rows=40, cols=512)[0], q6_k_layer(rows=40, cols=512)[0]]
    results = {level: [block_matmul(cpu_kernels(level).module, layer, x, True) for layer in layers] for level in LEVELS}
    lowest = LEVELS[-1]  # highest first: scalar on x86, neon on aarch64
    for level, got in results.items():
        for a, b in zip(results[lowest], got, strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True, msg=f"{level} differs from {lowest}")
    codes, scales = int8_blocks(x[:, :32])
    assert codes[0, 0, :8].tolist() == [127.0, 0.0, 2.0, 2.0, -0.0, -2.0, 126.0, -126.0]
    coded = results[lowest][0]
    assert coded[1, 3] == 0 and torch.isfinite(coded[1]).all()  # the NaN element alone is dropped
    assert coded[2].isnan().all()  # amax = inf: that block's scale is inf, and 0 · inf reaches every output
    finite = [i for i in range(40) if i not in (1, 2)]
    codes, scales = int8_blocks(x[finite])
    assert torch.equal(coded[finite], (codes * scales).reshape(len(finite), 512))
