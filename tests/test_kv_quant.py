"""Quantized KV (tokenmill/kv/quant.py, kernels/kv_quant.cpp): the reference quantizer's round trips, the kernels'
stored blocks against it bit for bit, attention over quantized blocks against a float64 reference of the
own-block rule over several steps (decodes, verify-sized runs, chunks crossing blocks), and the engine: chunking
does not change greedy tokens, prefix hits reuse quantized blocks, residual slots come back, bad combinations are
refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import write_tiny_gguf

from tests.test_fused_step import LEVELS
from tokenmill import LLM, SamplingParams
from tokenmill.config import EngineConfig
from tokenmill.kernels import KernelBuild, cpu_kernels
from tokenmill.kv.quant import KVFormat, dequantize, pack, quantize, unpack
from tokenmill.kv.quantized_cache import QuantizedKVCache
from tokenmill.request import Request
from tokenmill.scheduler.plan import ScheduledSeq, StepPlan

BS = 16


@pytest.fixture(scope="module", params=LEVELS)
def kernels(request):
    build = cpu_kernels(request.param)
    assert build.module is not None, build.error
    return build.module


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("keys", [True, False])
def test_reference_round_trip_is_within_half_a_step(bits: int, keys: bool) -> None:
    x = torch.randn(BS, 64, generator=torch.Generator().manual_seed(bits)) * 3
    x[:, 5] += 40  # an outlier channel, as keys have
    codes, params = quantize(x, bits, keys)
    assert torch.equal(unpack(pack(codes, bits), bits, 64), codes)
    assert pack(codes, bits).shape == (BS, KVFormat(bits).row_bytes(64))
    restored = dequantize(codes, params, bits, keys)
    if bits == 8:
        step = params.float()[:, None].expand(BS, 64)
    elif keys:
        step = params.float()[:64].expand(BS, 64)
    else:
        step = params.float().view(BS, 2)[:, :1].expand(BS, 64)
    # Half a step, plus the fp16 rounding of the minimum (at most half an fp16 ulp of it).
    slack = 1e-3 * x.abs().amax() if bits != 8 else 1e-6
    assert bool(((restored - x).abs() <= step / 2 + slack).all())
    levels = 127 if bits == 8 else (1 << bits) - 1
    assert int(codes.abs().max()) <= levels


def test_constant_input_quantizes_to_its_minimum() -> None:
    codes, params = quantize(torch.full((BS, 64), 2.5), 4, keys=True)
    assert int(codes.abs().sum()) == 0
    assert torch.equal(dequantize(codes, params, 4, True), torch.full((BS, 64), 2.5))


def test_bytes_per_token() -> None:
    # head_dim 64: bf16 stores 256 bytes per token and KV head.
    assert KVFormat(8).bytes_per_block_head(16, 64) / 16 == 132
    assert KVFormat(4).bytes_per_block_head(16, 64) / 16 == 84
    assert KVFormat(4).bytes_per_block_head(64, 64) / 64 == 72  # 3.56x fewer than bf16
    assert KVFormat(2).bytes_per_block_head(16, 64) / 16 == 52
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        KVFormat.from_name("int3")
    assert KVFormat.from_name("auto") is None


class QuantStepper:
    """Runs paged_attention_quantized step by step for a few sequences, keeping every token's full-precision K/V
    for the reference."""

    def __init__(self, kernels, bits: int, dtype: torch.dtype, kv_heads: int, head_dim: int, num_seqs: int) -> None:
        self.kernels, self.bits, self.dtype, self.head_dim = kernels, bits, dtype, head_dim
        fmt = KVFormat(bits)
        blocks = 40
        self.k_data = torch.zeros(1, kv_heads, blocks, BS * fmt.row_bytes(head_dim), dtype=torch.uint8)
        self.v_data = torch.zeros_like(self.k_data)
        self.k_params = torch.zeros(1, kv_heads, blocks, fmt.key_params(BS, head_dim), dtype=torch.float16)
        self.v_params = torch.zeros(1, kv_heads, blocks, fmt.value_params(BS), dtype=torch.float16)
        self.k_res = torch.zeros(1, kv_heads, num_seqs + 1, BS, head_dim, dtype=dtype)
        self.v_res = torch.zeros_like(self.k_res)
        self.kv = kernels.QuantKV(bits, BS, self.k_data, self.k_params, self.v_data, self.v_params, self.k_res,
                                  self.v_res)
        order = torch.randperm(blocks, generator=torch.Generator().manual_seed(1)).tolist()
        self.tables = [order[i * 8:(i + 1) * 8] for i in range(num_seqs)]  # scattered blocks
        self.slots = list(range(num_seqs, 0, -1))
        self.keys = [torch.empty(0, kv_heads, head_dim, dtype=dtype) for _ in range(num_seqs)]
        self.values = [torch.empty(0, kv_heads, head_dim, dtype=dtype) for _ in range(num_seqs)]

    def step(self, new_tokens: list[int], num_heads: int, generator: torch.Generator) -> None:
        kv_heads, dim, total = self.k_data.shape[1], self.head_dim, sum(new_tokens)
        q = torch.randn(total, num_heads, dim, generator=generator).to(self.dtype)
        # K and V as slices of one qkv row, as the fused step hands them over.
        kv = torch.randn(total, 2 * kv_heads * dim, generator=generator).to(self.dtype) * 2
        k = kv[:, :kv_heads * dim].view(total, kv_heads, dim)
        v = kv[:, kv_heads * dim:].view(total, kv_heads, dim)
        starts = [0]
        for n in new_tokens:
            starts.append(starts[-1] + n)
        for s in range(len(new_tokens)):
            self.keys[s] = torch.cat((self.keys[s], k[starts[s]:starts[s + 1]]))
            self.values[s] = torch.cat((self.values[s], v[starts[s]:starts[s + 1]]))
        context = [len(self.keys[s]) for s in range(len(new_tokens))]
        got = self.kernels.paged_attention_quantized(q, k, v, self.kv, 0, torch.tensor(starts),
                                                     torch.tensor(self.tables), torch.tensor(context),
                                                     torch.tensor(self.slots))
        want = torch.cat([self.reference(q[starts[s]:starts[s + 1]], s) for s in range(len(new_tokens))])
        tolerance = 1e-5 if self.dtype == torch.float32 else 2e-2
        assert float((got.double() - want).abs().max() / want.abs().max()) <= tolerance

    def seen(self, s: int, keys: bool, position: int) -> torch.Tensor:
        """What a query at `position` reads: its own block in full precision, earlier blocks dequantized."""
        rows = (self.keys if keys else self.values)[s][: position + 1].float()
        out = rows.clone()
        for block in range(position // BS):
            for h in range(rows.shape[1]):
                x = rows[block * BS:(block + 1) * BS, h]
                restored = dequantize(*quantize(x, self.bits, keys), self.bits, keys)
                out[block * BS:(block + 1) * BS, h] = restored.to(self.dtype).float()
        return out.double()

    def reference(self, q: torch.Tensor, s: int) -> torch.Tensor:
        group = q.shape[1] // self.k_data.shape[1]
        ctx = len(self.keys[s])
        out = torch.empty(q.shape, dtype=torch.float64)
        for j in range(q.shape[0]):
            position = ctx - q.shape[0] + j
            keys = self.seen(s, True, position).repeat_interleave(group, 1)  # [t, H, D]
            values = self.seen(s, False, position).repeat_interleave(group, 1)
            scores = torch.einsum("hd,thd->ht", q[j].double(), keys) / self.head_dim**0.5
            out[j] = torch.einsum("ht,thd->hd", scores.softmax(-1), values)
        return out

    def check_stored_blocks(self) -> None:
        """Every full block holds the reference's codes and parameters; open blocks sit in the residual slots."""
        for s, table in enumerate(self.tables):
            ctx = len(self.keys[s])
            for block in range(ctx // BS):
                for keys, data, params, rows in ((True, self.k_data, self.k_params, self.keys[s]),
                                                 (False, self.v_data, self.v_params, self.values[s])):
                    for h in range(data.shape[1]):
                        codes, want_params = quantize(rows[block * BS:(block + 1) * BS, h], self.bits, keys)
                        assert torch.equal(data[0, h, table[block]].view(BS, -1), pack(codes, self.bits))
                        assert torch.equal(params[0, h, table[block]], want_params)
            start = ctx // BS * BS
            for residual, rows in ((self.k_res, self.keys[s]), (self.v_res, self.values[s])):
                assert torch.equal(residual[0, :, self.slots[s], : ctx - start], rows[start:].transpose(0, 1))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_attention_of_a_token_tree_sees_each_rows_own_entries(kernels, bits, dtype) -> None:
    """A tree of 6 rows in the open block after 37 entries (two quantized blocks), beside a decode: each row attends
    to the entries its visible count names, then its own, against the float64 reference of what it reads."""
    from tokenmill.spec.tree import visible_entries

    generator = torch.Generator().manual_seed(5)
    stepper = QuantStepper(kernels, bits, dtype, kv_heads=2, head_dim=64, num_seqs=2)
    stepper.step([37, 5], 6, generator)
    q = torch.randn(7, 6, 64, generator=generator).to(dtype)
    k = torch.randn(7, 2, 64, generator=generator).to(dtype) * 2
    v = torch.randn(7, 2, 64, generator=generator).to(dtype) * 2
    for s, (first, end) in enumerate(((0, 6), (6, 7))):
        stepper.keys[s] = torch.cat((stepper.keys[s], k[first:end]))
        stepper.values[s] = torch.cat((stepper.values[s], v[first:end]))
    visible = [37, *visible_entries((0, 1, 2, 0, 1), 37, 0, 5), -1]  # a spine of 4 rows, leaves at depths 1 and 2
    got = kernels.paged_attention_quantized(q, k, v, stepper.kv, 0, torch.tensor([0, 6, 7]),
                                            torch.tensor(stepper.tables), torch.tensor([43, 6]),
                                            torch.tensor(stepper.slots), row_visible=torch.tensor(visible))
    for row, (s, own) in enumerate([(0, 37 + j) for j in range(6)] + [(1, 5)]):
        seen = visible[row] if visible[row] >= 0 else own
        entries = [*range(seen), own]
        keys = stepper.seen(s, True, own)[entries].repeat_interleave(3, 1)
        values = stepper.seen(s, False, own)[entries].repeat_interleave(3, 1)
        scores = torch.einsum("hd,thd->ht", q[row].double(), keys) / 64**0.5
        want = torch.einsum("ht,thd->hd", scores.softmax(-1), values)
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        assert float((got[row].double() - want).abs().max() / want.abs().max()) <= tolerance, f"row {row}"


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("num_heads", "kv_heads", "head_dim"), [(9, 3, 64), (10, 2, 64), (4, 2, 128)])
def test_quantized_attention_matches_the_own_block_reference(kernels, bits, dtype, num_heads, kv_heads,
                                                              head_dim) -> None:
    generator = torch.Generator().manual_seed(bits)
    stepper = QuantStepper(kernels, bits, dtype, kv_heads, head_dim, num_seqs=3)
    # Prefill chunk, verify-sized run and decode; then a decode, a chunk into a half-full block, a run crossing a
    # block boundary; then runs ending exactly on block boundaries.
    for new_tokens in ([37, 5, 1], [1, 30, 16], [11, 13, 15]):
        stepper.step(new_tokens, num_heads, generator)
        stepper.check_stored_blocks()


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folded_decode_matches_the_dequantizing_decode(kernels, bits, dtype) -> None:
    """Decode rows with each block's quantization folded into the query and the probabilities (the default) against
    the same rows with every cached row dequantized first (kv_quant_folded(0)), on the same cache: they differ by the
    order of fp32 sums and, on bf16 with vdpbf16ps, the folded query and weights rounded to bf16."""
    generator = torch.Generator().manual_seed(bits + 7)
    stepper = QuantStepper(kernels, bits, dtype, kv_heads=2, head_dim=64, num_seqs=3)
    stepper.step([100, 77, 64], 10, generator)  # 6, 4 and 4 quantized blocks; the last one's row opens a block
    context = [len(keys) + 1 for keys in stepper.keys]
    q = torch.randn(3, 10, 64, generator=generator).to(dtype)
    k = (torch.randn(3, 2, 64, generator=generator) * 2).to(dtype)
    v = (torch.randn(3, 2, 64, generator=generator) * 2).to(dtype)
    args = (q, k, v, stepper.kv, 0, torch.arange(4), torch.tensor(stepper.tables), torch.tensor(context),
            torch.tensor(stepper.slots))
    try:
        assert kernels.kv_quant_folded(0) is False
        rows = kernels.paged_attention_quantized(*args)
        assert kernels.kv_quant_folded(1) is True
        folded = kernels.paged_attention_quantized(*args)  # storing the step's rows again changes nothing
    finally:
        kernels.kv_quant_folded(1)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert float((folded.double() - rows.double()).abs().max() / rows.double().abs().max()) <= tolerance


def test_quantized_attention_rejects_bad_slots_and_blocks(kernels) -> None:
    stepper = QuantStepper(kernels, 4, torch.float32, 2, 64, num_seqs=1)
    q, k, v = torch.zeros(1, 4, 64), torch.zeros(1, 2, 64), torch.zeros(1, 2, 64)
    args = (torch.tensor([0, 1]), torch.tensor([[0]]), torch.tensor([1]))
    with pytest.raises(RuntimeError, match="residual slot"):
        kernels.paged_attention_quantized(q, k, v, stepper.kv, 0, *args, torch.tensor([9]))
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernels.paged_attention_quantized(q, k, v, stepper.kv, 0, args[0], torch.tensor([[99]]), args[2],
                                          torch.tensor([0]))
    with pytest.raises(RuntimeError, match="no layer"):
        kernels.paged_attention_quantized(q, k, v, stepper.kv, 1, *args, torch.tensor([0]))


def test_residual_slots_are_given_out_once_and_come_back() -> None:
    from tokenmill.model.config import ModelConfig

    cfg = ModelConfig("llama", num_layers=1, hidden_size=64, intermediate_size=64, num_heads=2, num_kv_heads=1,
                      head_dim=32, vocab_size=10, max_position=64, rope_theta=1e4, rms_norm_eps=1e-5,
                      attention_bias=False, tie_word_embeddings=True)
    cache = QuantizedKVCache(cfg, 4, BS, torch.float32, torch.device("cpu"), KVFormat(4), num_residual=2)

    def plan(*ids: str) -> StepPlan:
        return StepPlan(tuple(ScheduledSeq(r, i, 1, 1, (i,)) for i, r in enumerate(ids)))

    assert cache.residual_slots(plan("a", "b")) == [0, 1]
    assert cache.residual_slots(plan("b", "a")) == [1, 0]
    with pytest.raises(RuntimeError, match="residual slots"):
        cache.residual_slots(plan("c"))
    cache.release(["a", "a", "unknown"])  # idempotent: a failed step sends its finished ids again
    assert cache.residual_slots(plan("c")) == [0]
    cache.release(["b", "c"])
    assert cache.num_held == 0


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("kvq") / "tiny.gguf", hidden=256, heads=4, kv_heads=2, ff=256,
                           vocab=300, context=512)


PROMPTS = [[(7 * i + 3 * j) % 290 + 5 for j in range(n)] for i, n in enumerate((45, 20, 77, 3))]


def test_a_budget_the_residual_slots_fill_is_refused_before_loading(tiny_model) -> None:
    llm = LLM(str(tiny_model), dtype="float32", device="cpu", num_kv_blocks=1, kv_cache_dtype="int4",
              max_num_seqs=1)
    cfg = llm.engine.model_config
    slots = QuantizedKVCache.residual_bytes(cfg, BS, torch.float32, 8)
    block = QuantizedKVCache.bytes_per_block(cfg, BS, KVFormat.from_name("int4"))
    options = dict(dtype="float32", device="cpu", block_size=BS, kv_cache_dtype="int4",
                   kv_cache_memory_gib=(slots + 3 * block) / 2**30)
    assert LLM(str(tiny_model), max_num_seqs=8, **options).engine.kv_cache.num_blocks == 3
    with pytest.raises(ValueError, match="no KV block .* 9 residual slots"):
        LLM(str(tiny_model), max_num_seqs=9, **options)


def greedy(llm: LLM, prompts: list[list[int]], max_tokens: int = 24) -> list[list[int]]:
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "int4"])
def test_engine_tokens_do_not_depend_on_chunking_and_prefix_hits_reuse_quantized_blocks(tiny_model,
                                                                                         kv_cache_dtype) -> None:
    options = dict(dtype="float32", device="cpu", num_kv_blocks=64, block_size=BS, kv_cache_dtype=kv_cache_dtype,
                   max_num_seqs=4)
    whole = LLM(str(tiny_model), max_num_batched_tokens=512, enable_prefix_caching=False, **options)
    chunked = LLM(str(tiny_model), max_num_batched_tokens=9, **options)
    want = greedy(whole, PROMPTS)
    assert greedy(chunked, PROMPTS) == want
    # Again on the chunked engine: prompts now hit its prefix cache (their full blocks, quantized).
    assert greedy(chunked, PROMPTS) == want
    assert chunked.engine.scheduler.kv_cache.stats.hits > 0
    # A cache too small for the batch: requests are preempted (their slots come back) and recomputed, same tokens.
    tight = LLM(str(tiny_model), max_num_batched_tokens=64, **{**options, "num_kv_blocks": 8})
    assert greedy(tight, PROMPTS) == want
    assert tight.engine.stats().num_preemptions > 0
    for llm in (whole, chunked, tight):
        llm.engine.step()  # an empty step hands the runner the last finished ids
        assert llm.engine.kv_cache.num_held == 0  # every request's residual slot came back
    plain = LLM(str(tiny_model), max_num_batched_tokens=512, dtype="float32", device="cpu", num_kv_blocks=64,
                block_size=BS)
    agree = sum(a == b for x, y in zip(greedy(plain, PROMPTS), want, strict=True) for a, b in zip(x, y, strict=True))
    assert agree >= len(PROMPTS) * 24 // 2  # a random tiny model's logits are close; most tokens agree


def test_speculative_decoding_keeps_greedy_tokens_and_never_fills_a_block_with_drafts(tiny_model) -> None:
    from tests.test_spec_engine import prompts

    options = dict(dtype="float32", device="cpu", num_kv_blocks=128, block_size=BS, kv_cache_dtype="int4")
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    plain = LLM(str(tiny_model), **options)
    spec = LLM(str(tiny_model), speculative="ngram", num_speculative_tokens=4, prompt_lookup_min=1,
               speculative_adaptive=False, **options)
    kv = spec.engine.scheduler.kv_cache
    assert not kv.drafts_fill_blocks
    want = [r.token_ids for r in plain.generate(prompts(), params, use_tqdm=False)]
    assert [r.token_ids for r in spec.generate(prompts(), params, use_tqdm=False)] == want
    stats = spec.engine.stats().spec_decode
    assert stats is not None and 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    # A step's real token and drafts stay inside the open block without filling it.
    request = Request("r", list(range(1, 31)), SamplingParams())
    assert kv.allocate_slots(request, 30)
    kv.commit(request, 30)
    assert kv.max_drafts(request) == 0  # the real token goes to offset 14: a draft would fill the block
    kv.truncate(request, 20)
    assert kv.max_drafts(request) == 10  # entries 20..30 at offsets 4..14
    kv.free(request)


def test_adaptive_speculation_measures_its_step_times_within_the_residual_slots(tiny_model) -> None:
    """The start-up step-time model times up to 64 rows; with 2 seats a quantized cache has 2 residual slots, so the
    timed steps must put their rows into at most 2 sequences (this once failed to start)."""
    options = dict(dtype="float32", device="cpu", num_kv_blocks=64, block_size=BS, kv_cache_dtype="int8",
                   max_num_seqs=2)
    spec = LLM(str(tiny_model), speculative="ngram", prompt_lookup_min=1, **options)
    assert spec.engine.speculator.cost is not None and spec.engine.speculator.cost.rows[-1] == 64
    assert greedy(spec, PROMPTS) == greedy(LLM(str(tiny_model), **options), PROMPTS)
    spec.engine.step()
    assert spec.engine.kv_cache.num_held == 0


def test_engine_refuses_what_a_quantized_cache_does_not_do(tiny_model, monkeypatch) -> None:
    import argparse

    from tokenmill.entrypoints.args import add_engine_args, engine_config

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_config(parser.parse_args(["--kv-cache-dtype", "int4"])).kv_cache_dtype == "int4"
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="fp8")
    for options, match in ((dict(sliding_window=64), "sliding_window"), (dict(enforce_eager=True), "enforce_eager")):
        with pytest.raises(ValueError, match=match):
            EngineConfig(kv_cache_dtype="int4", **options)
    llm = LLM(str(tiny_model), dtype="float32", device="cpu", num_kv_blocks=16, block_size=BS, kv_cache_dtype="int2",
              max_num_seqs=2)
    assert not llm.engine.scheduler.kv_cache.forks
    out = llm.generate([PROMPTS[0]], SamplingParams(n=2, temperature=1.0, max_tokens=4, seed=3), use_tqdm=False)
    assert len(out[0].outputs) == 2  # n > 1 siblings compute their prompts instead of forking
    llm.engine.step()
    assert llm.engine.kv_cache.num_held == 0
    # Without the kernels there is nothing that reads quantized blocks: refused, not emulated.
    monkeypatch.setattr("tokenmill.engine.cpu_kernels", lambda: KernelBuild(None, 0.0, "no C++ compiler"))
    with pytest.raises(ValueError, match="no C\\+\\+ compiler"):
        LLM(str(tiny_model), dtype="float32", device="cpu", num_kv_blocks=16, block_size=BS, kv_cache_dtype="int8")
