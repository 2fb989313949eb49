"""Weight formats (float, int8, int4, gguf): each matmul against a float reference, the file's codes, the engine."""

from __future__ import annotations

import pytest
import torch
from conftest import write_tiny_gguf

import tokenmill.model.linear as linear_module
from tokenmill import LLM, SamplingParams
from tokenmill.config import EngineConfig
from tokenmill.model.gguf_blocks import gguf_q4_codes, gguf_q8_codes
from tokenmill.model.gguf_file import GGUFFile
from tokenmill.model.linear import (
    FloatLinear,
    GgufQ4Linear,
    GgufQ8Linear,
    Int4Linear,
    Int8Linear,
    check_weight_format,
)

BF16 = torch.bfloat16


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


def max_error_over_scale(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).abs().max() / want.abs().max())


@pytest.fixture(scope="module")
def weight_and_inputs():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(384, 576, generator=gen) * 0.05
    inputs = {m: torch.randn(m, 576, generator=gen).to(BF16) for m in (1, 5, 64)}
    return weight, inputs


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_int8_matmul_matches_its_dequantized_weights_and_the_float_weights(weight_and_inputs, rows) -> None:
    weight, inputs = weight_and_inputs
    x = inputs[rows]
    layer = Int8Linear.quantize(weight, BF16)
    dequantized = layer.qweight.float() * layer.scales.float()[:, None]
    # Against its own dequantized weights only the bf16 output rounding (2^-8 relative) remains.
    assert max_error_over_scale(layer(x), x.float() @ dequantized.T) < 1e-2
    # Against the unquantized weights: int8 rounding noise (measured 0.8% here).
    assert relative_error(layer(x), x.float() @ weight.T) < 2e-2
    # Each weight within half a step of the original, plus the bf16 rounding of its row's scale.
    bound = layer.scales.float() / 2 + weight.abs().amax(dim=1) * 2**-8
    assert bool(((dequantized - weight).abs() <= bound[:, None]).all())


@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_int4_matmul_matches_its_dequantized_weights_and_the_float_weights(weight_and_inputs, rows,
                                                                           group_size) -> None:
    weight, inputs = weight_and_inputs
    x = inputs[rows]
    layer = Int4Linear.quantize(weight, group_size, BF16)
    # Read the weights back through the kernel itself: x = identity gives Wᵀ.
    dequantized = layer(torch.eye(576, dtype=BF16)).float().T
    assert max_error_over_scale(layer(x), x.float() @ dequantized.T) < 1e-2
    # 16 levels per group: measured 7.7% (g32) and 9.1% (g64) relative output error on Gaussian weights.
    assert relative_error(layer(x), x.float() @ weight.T) < 0.12
    # Every weight within half a quantization step (plus bf16 rounding of scale and zero) of the original.
    groups = weight.reshape(384, -1, group_size)
    step = (groups.amax(-1) - groups.amin(-1)) / 15
    bound = (step / 2 + groups.abs().amax(-1) * 2**-7)[..., None].expand_as(groups).reshape_as(weight)
    assert bool(((dequantized - weight).abs() <= bound).all())


def test_int4_group_size_must_divide_the_input_size() -> None:
    with pytest.raises(ValueError, match="group size 128 does not divide"):
        Int4Linear.quantize(torch.randn(64, 576), 128, BF16)


def test_int8_rows_are_the_dequantized_embedding_rows(weight_and_inputs) -> None:
    weight, _ = weight_and_inputs
    layer = Int8Linear.quantize(weight, BF16)
    ids = torch.tensor([0, 7, 383, 7])
    want = (layer.qweight.float() * layer.scales.float()[:, None])[ids]
    assert torch.allclose(layer.rows(ids).float(), want, rtol=2**-7, atol=0)


def test_gguf_q4_1_codes_reproduce_the_files_dequantization_exactly(model_path) -> None:
    gguf_file = GGUFFile(model_path)
    name = "blk.0.ffn_up.weight"
    assert gguf_file.tensor_type(name) == "Q4_1"
    codes, scales, minimums = gguf_q4_codes(*gguf_file.raw_tensor(name))
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15
    rebuilt = codes.reshape(codes.shape[0], -1, 32).float() * scales[..., None] + minimums[..., None]
    assert torch.equal(rebuilt.reshape(codes.shape), gguf_file.tensor(name))


def within_output_rounding(got: torch.Tensor, want: torch.Tensor) -> bool:
    """got (bf16) is want (fp64) up to fp32 summation error and the final rounding to bf16 (half a step, 2^-9)."""
    bound = want.abs() * 2**-8 + want.abs().max() * 1e-5
    return bool(((got.double() - want).abs() <= bound).all())


def file_layers(model_path) -> dict[str, torch.nn.Module]:
    gguf_file = GGUFFile(model_path)
    return {"Q4_1": GgufQ4Linear(*gguf_q4_codes(*gguf_file.raw_tensor("blk.3.ffn_down.weight"))),
            "Q8_0": GgufQ8Linear(*gguf_q8_codes(*gguf_file.raw_tensor("token_embd.weight")))}


@pytest.mark.parametrize(("kind", "name"), [("Q4_1", "blk.3.ffn_down.weight"), ("Q8_0", "token_embd.weight")])
def test_gguf_layers_hold_the_files_exact_weights(model_path, kind, name) -> None:
    gguf_file = GGUFFile(model_path)
    assert gguf_file.tensor_type(name) == kind
    layer = file_layers(model_path)[kind]
    assert torch.equal(layer.dequantized(), gguf_file.tensor(name))


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_gguf_matmul_is_the_files_weights_up_to_output_rounding(model_path, kind, rows) -> None:
    layer = file_layers(model_path)[kind]
    x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(rows)).to(BF16)
    want = x.double() @ layer.dequantized().double().T
    got = layer(x)
    assert got.dtype == BF16 and within_output_rounding(got, want)
    # Measured: all but ~1% of outputs are the correctly rounded bf16 value.
    assert float((got == want.to(BF16)).float().mean()) > 0.95
    # As an LM head it returns the fp32 sums unrounded: only fp32 summation error remains.
    logits = layer.logits(x)
    assert logits.dtype == torch.float32
    assert float((logits.double() - want).abs().max() / want.abs().max()) < 1e-5


@pytest.mark.parametrize("out_features", [16, 40, 200])
@pytest.mark.parametrize("in_features", [32, 96, 576])
def test_gguf_matmuls_handle_partial_row_tiles_and_are_batch_invariant(out_features, in_features) -> None:
    gen = torch.Generator().manual_seed(out_features + in_features)
    blocks = (out_features, in_features // 32)
    q4 = GgufQ4Linear(torch.randint(0, 16, (out_features, in_features), generator=gen),
                      (torch.rand(blocks, generator=gen) * 0.01).half().float(),
                      (-torch.rand(blocks, generator=gen) * 0.08).half().float())
    q8 = GgufQ8Linear(torch.randint(-128, 128, (out_features, in_features), generator=gen),
                      (torch.rand(blocks, generator=gen) * 0.01).half())
    x = torch.randn(13, in_features, generator=gen).to(BF16)
    for layer in (q4, q8):
        y = layer(x)
        assert y.shape == (13, out_features)
        assert within_output_rounding(y, x.double() @ layer.dequantized().double().T)
        # Each output row goes through the same operations whatever the batch: bit-identical alone.
        assert torch.equal(torch.cat([layer(x[i:i + 1]) for i in range(13)]), y)


def test_gguf_q8_rows_are_the_files_embedding_rows(model_path) -> None:
    gguf_file = GGUFFile(model_path)
    ids = torch.tensor([0, 17, 49151, 17, 300])
    got = file_layers(model_path)["Q8_0"].rows(ids)
    assert torch.equal(got, gguf_file.tensor("token_embd.weight")[ids].to(BF16))


def test_gguf_q4_rows_are_the_files_rows(model_path) -> None:
    gguf_file = GGUFFile(model_path)
    ids = torch.tensor([0, 17, 575, 17, 300, 31])  # rows in every position of their tile of 16, repeated ones
    layer = file_layers(model_path)["Q4_1"]
    assert torch.equal(layer.dequantized(ids), gguf_file.tensor("blk.3.ffn_down.weight")[ids])
    assert torch.equal(layer.rows(ids), gguf_file.tensor("blk.3.ffn_down.weight")[ids].to(BF16))


@pytest.mark.parametrize("tensor_type", ["Q4_0", "Q4_K", "Q6_K"])
def test_a_tied_embedding_in_a_block_format_serves_the_gguf_engine(tmp_path, tensor_type) -> None:
    """A tied token_embd in a 4-bit format (a pure Q4_0 file's, say) is the LM head's block layer and the embedding
    table at once: its rows are the file's, and the engine runs on them."""
    path = write_tiny_gguf(tmp_path / f"tied_{tensor_type}.gguf", hidden=256, heads=4, kv_heads=2, ff=256,
                           tensor_type=tensor_type, metadata={"tokenizer.ggml.merges": []})
    llm = LLM(str(path), dtype="bfloat16", device="cpu", num_kv_blocks=32, weight_format="gguf")
    embed = llm.engine.model.embed
    ids = torch.tensor([3, 299, 16, 3])
    assert torch.equal(embed.rows(ids), GGUFFile(path).tensor("token_embd.weight")[ids].to(BF16))
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 6


def test_gguf_layers_reject_values_the_file_format_cannot_hold() -> None:
    with pytest.raises(ValueError, match="float16"):
        GgufQ8Linear(torch.zeros(16, 32, dtype=torch.int8), torch.full((16, 1), 1e-9))
    with pytest.raises(ValueError, match="multiple"):
        GgufQ4Linear(torch.zeros(16, 48), torch.ones(16, 1), torch.zeros(16, 1))


@pytest.mark.parametrize(("options", "field"), [
    ({"weight_format": "int3"}, "weight_format"),
    ({"int4_group_size": 48}, "int4_group_size"),
])
def test_bad_weight_options_name_the_field(options, field) -> None:
    with pytest.raises(ValueError, match=field):
        EngineConfig(**options)


def test_quantized_formats_need_bf16_on_cpu() -> None:
    with pytest.raises(ValueError, match="bfloat16"):
        check_weight_format("int4", torch.float32, torch.device("cpu"))
    for fmt in ("int8", "int4", "gguf"):  # refused by the config, before the model loads
        with pytest.raises(ValueError, match="needs dtype 'bfloat16' or 'auto'"):
            EngineConfig(weight_format=fmt, dtype="float32")
    EngineConfig(weight_format="gguf", dtype="bf16")
    with pytest.raises(ValueError, match="weight_format='float'"):
        check_weight_format("int8", BF16, torch.device("cuda"))
    assert EngineConfig(weight_format="int4", device="cpu").torch_dtype() == BF16


@pytest.fixture(scope="module")
def quantized_llms(model_path):
    from tokenmill import LLM

    # No prefix caching: a prompt whose blocks the batched run cached would have its last rows computed by the
    # decode attention kernel instead of the prefill-chunk one (another summation order in bf16), which is not what
    # the batch-invariance test below is about.
    options = {"device": "cpu", "num_kv_blocks": 256, "enable_prefix_caching": False}
    llms = {fmt: LLM(str(model_path), weight_format=fmt, **options) for fmt in ("int8", "int4", "gguf", "q4")}
    llms["gguf+int8"] = LLM(str(model_path), weight_format="gguf", gguf_activations="int8", **options)
    return llms


# int8 activations are left out: on this prompt "The" leads "L" by 0.08 nats in fp32, and rounding the activations to
# int8 flips it, in tokenmill as in llama.cpp (same scheme, same answer); their quality test is the perplexity below.
@pytest.mark.parametrize("fmt", ["int8", "int4", "gguf"])
def test_quantized_engine_answers_and_reads_fewer_bytes(quantized_llms, fmt) -> None:
    llm = quantized_llms[fmt]
    reply = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                     SamplingParams(max_tokens=16, temperature=0))[0]
    assert "Paris" in reply.text
    bf16_bytes = 2 * (134_515_008 - 576 * 61)  # parameters without norms, in bf16
    assert llm.engine.model.weight_bytes() < (0.55 if fmt == "int8" else 0.4) * bf16_bytes


@pytest.mark.parametrize("fmt", ["int4", "gguf", "gguf+int8"])
def test_quantized_greedy_output_is_batch_invariant(quantized_llms, fmt) -> None:
    from conftest import RAW_PROMPTS

    llm = quantized_llms[fmt]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    batched = [r.token_ids for r in llm.generate(RAW_PROMPTS[:8], params, use_tqdm=False)]
    alone = [llm.generate(p, params, use_tqdm=False)[0].token_ids for p in RAW_PROMPTS[:8]]
    assert batched == alone


PROSE = (
    "The river runs past the old mill at the edge of the village. In spring the water rises and the wheel turns "
    "faster, and the miller grinds more grain than the village can eat, so the carts leave for the market town "
    "before dawn. In summer the river falls, the wheel slows, and the children swim in the pool below the weir. "
    "When autumn comes the miller mends the sluice gates, oils the great gears, and counts the sacks stacked in the "
    "loft, while his daughter keeps the accounts and argues with the merchants about the price of flour."
)


def test_int8_activations_keep_the_perplexity_of_bf16_activations(quantized_llms) -> None:
    from tokenmill.bench.quality import perplexity

    bf16, int8 = (perplexity(quantized_llms[fmt].engine, PROSE, window=128, max_windows=1).perplexity
                  for fmt in ("gguf", "gguf+int8"))
    assert bf16 != int8 and abs(int8 / bf16 - 1) < 0.03


def test_int8_activations_reach_every_gguf_layer_and_need_gguf_weights(quantized_llms) -> None:
    model = quantized_llms["gguf+int8"].engine.model
    layers = [m for m in model.modules() if isinstance(m, GgufQ4Linear | GgufQ8Linear)]
    assert len(layers) == 4 * 30 + 1 and all(layer.int8_activations for layer in layers)  # and the tied LM head
    assert not any(m.int8_activations for m in quantized_llms["gguf"].engine.model.modules()
                   if isinstance(m, GgufQ4Linear | GgufQ8Linear))
    with pytest.raises(ValueError, match="applies to the block formats"):
        EngineConfig(weight_format="int4", gguf_activations="int8")
    with pytest.raises(ValueError, match="gguf_activations must be one of"):
        EngineConfig(weight_format="gguf", gguf_activations="int4")


def test_q4_requantizes_every_layer_and_the_head_into_fewer_bytes_than_the_files_blocks(quantized_llms) -> None:
    # SmolLM2's file is Q4_1 with a Q8_0 embedding: q4 keeps the Q4_1 layers' values and rounds the head to 4 bits.
    q4, gguf = (quantized_llms[fmt].engine.model for fmt in ("q4", "gguf"))
    layers = [m for m in q4.modules() if isinstance(m, GgufQ4Linear | GgufQ8Linear)]
    assert len(layers) == 4 * 30 + 1 and all(isinstance(m, GgufQ4Linear) for m in layers)
    assert q4.weight_bytes() < gguf.weight_bytes()
    q4_down, gguf_down = q4.layers[0].down, gguf.layers[0].down
    assert isinstance(gguf_down, GgufQ4Linear)
    step = gguf_down.scales.float().amax()
    assert float((q4_down.dequantized() - gguf_down.dequantized()).abs().max()) <= float(step) * 0.51
    # The head in 4 bits costs perplexity (and flips the near tie of the "Paris" test above): a draft's format.
    from tokenmill.bench.quality import perplexity

    exact, rounded = (perplexity(quantized_llms[fmt].engine, PROSE, window=128, max_windows=1).perplexity
                      for fmt in ("gguf", "q4"))
    assert exact < rounded < 1.15 * exact


def test_gguf_layers_fall_back_to_an_fp32_matmul_without_the_kernels(model_path, monkeypatch) -> None:
    import tokenmill.model.linear as linear

    layers = file_layers(model_path)
    gen = torch.Generator().manual_seed(7)
    inputs = {kind: torch.randn(3, layer.in_features, generator=gen).to(BF16) for kind, layer in layers.items()}
    with_kernels = {kind: layer.logits(inputs[kind]) for kind, layer in layers.items()}
    monkeypatch.setattr(linear, "_gguf_kernels", lambda: None)
    for kind, layer in layers.items():
        x = inputs[kind]
        want = x.double() @ layer.dequantized().double().T
        assert within_output_rounding(layer(x), want)
        assert layer.logits(x).dtype == torch.float32
        # Kernel and fallback differ by fp32 summation order only.
        assert float((layer.logits(x) - with_kernels[kind]).abs().max() / want.abs().max()) < 1e-5


# oneDNN packs bf16 weights only on CPUs with its bf16 path (AVX-512 BW/VL/DQ or AVX-NE-CONVERT).
needs_onednn_bf16 = pytest.mark.skipif(not linear_module._has_onednn(),
                                       reason="this CPU has no oneDNN bf16 path: weights are never prepacked here")


@needs_onednn_bf16
@pytest.mark.parametrize("with_bias", [False, True])
def test_onednn_prepacked_float_weights_give_bit_identical_results_at_every_batch_size(with_bias) -> None:
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(960, 576, generator=gen).to(BF16)
    bias = torch.randn(960, generator=gen).to(BF16) if with_bias else None
    x = torch.randn(300, 576, generator=gen).to(BF16)
    plain = FloatLinear(weight, bias)
    packed = FloatLinear(weight, bias)
    assert packed.prepack(keep_weight=False, kernel="onednn") and packed.packing == "onednn"
    assert packed.weight is None and packed.weight_bytes() == plain.weight_bytes()
    whole = packed(x)
    assert torch.equal(whole, plain(x))
    for rows in (1, 7, 64, 256):  # and each row the same alone as in a batch
        assert torch.equal(packed(x[:rows].contiguous()), whole[:rows])
    with pytest.raises(RuntimeError, match="dropped"):
        packed.rows(torch.tensor([0]))


@pytest.mark.parametrize("with_bias", [False, True])
def test_tokenmill_prepacked_float_weights_are_row_exact_at_every_batch_size(with_bias) -> None:
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(576, 1536, generator=gen).to(BF16)  # the down projection, where oneDNN is not row-exact
    bias = torch.randn(576, generator=gen).to(BF16) if with_bias else None
    x = torch.randn(300, 1536, generator=gen).to(BF16)
    packed = FloatLinear(weight, bias)
    assert packed.prepack(keep_weight=False) and packed.packing == "tokenmill" and packed.weight is None
    assert packed.weight_bytes() == FloatLinear(weight, bias).weight_bytes()
    whole, logits = packed(x), packed.logits(x)
    assert whole.dtype == BF16 and logits.dtype == torch.float32
    for first, rows in ((0, 1), (5, 1), (0, 7), (3, 64), (0, 65), (10, 256)):
        part = x[first:first + rows].contiguous()
        assert torch.equal(packed(part), whole[first:first + rows])
        assert torch.equal(packed.logits(part), logits[first:first + rows])
    assert torch.equal(logits.to(BF16), whole)  # one rounding, of the logits' fp32 sums
    assert within_output_rounding(whole, x.double() @ weight.double().T + (0 if bias is None else bias.double()))


def test_prepack_leaves_other_dtypes_and_devices_alone() -> None:
    layer = FloatLinear(torch.randn(8, 16))  # fp32: F.linear's own kernel stays the reference there
    assert not layer.prepack(keep_weight=False) and layer.packed is None and layer.weight is not None
    with pytest.raises(ValueError, match="kernel"):
        FloatLinear(torch.randn(8, 16).to(BF16)).prepack(keep_weight=True, kernel="mkl")


def test_prepack_declines_on_a_cpu_without_onednn_bf16(monkeypatch) -> None:
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    weight = torch.randn(8, 16).to(BF16)
    layer = FloatLinear(weight)
    assert not layer.prepack(keep_weight=False, kernel="onednn") and layer.packed is None
    x = torch.randn(3, 16).to(BF16)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, weight))
    # tokenmill's kernel needs no oneDNN; without the C++ kernels it falls back to oneDNN, here absent too.
    assert FloatLinear(weight).prepack(keep_weight=True)
    monkeypatch.setattr(linear_module, "_cpu_kernels", lambda: None)
    assert not FloatLinear(weight).prepack(keep_weight=True)


def test_engine_greedy_output_in_bf16_does_not_depend_on_the_batch(model_path) -> None:
    """With tokenmill's packed kernel each prompt's greedy tokens are the same alone as in a batch (its rows meet
    other prompts' rows in every step of the batch); oneDNN's packed weights are bit-identical to the plain ones."""
    from conftest import RAW_PROMPTS

    from tokenmill import LLM

    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    # No prefix cache: a prompt found cached in part attends its other tokens as a chunk over the cached ones, which
    # rounds differently in bf16 unless batch_invariant (test_fused_step.py).
    llm = LLM(str(model_path), dtype="bfloat16", device="cpu", num_kv_blocks=256, enable_prefix_caching=False)
    packed_layers = [m for m in llm.engine.model.modules() if isinstance(m, FloatLinear) and m.packed is not None]
    assert len(packed_layers) == 121 and {m.packing for m in packed_layers} == {"tokenmill"}  # 4 a layer, the head
    assert llm.engine.model.embed.weight is not None  # the embedding keeps its rows
    # Eight copies: steps of over a hundred rows, where oneDNN's kernels change how they split the sums.
    batched = [r.token_ids for r in llm.generate(RAW_PROMPTS * 8, params, use_tqdm=False)]
    assert batched == [llm.generate(p, params, use_tqdm=False)[0].token_ids for p in RAW_PROMPTS] * 8
    if linear_module._has_onednn():
        outputs = [[r.token_ids for r in LLM(str(model_path), dtype="bfloat16", device="cpu", num_kv_blocks=256,
                                             prepack_weights=prepack, bf16_kernel="onednn").generate(
                        RAW_PROMPTS, params, use_tqdm=False)] for prepack in (True, False)]
        assert outputs[0] == outputs[1]
