"""Quantized KV cache (kv_cache_dtype int8 / int4 / int2) against the full-precision cache, through the public API.

bytes:   KV bytes per token per mode (codes and scales of full blocks; the residual slots apart), and the ratio to bf16
quality: perplexity from `prompt_logprobs` on ../shared/data/tinyshakespeare_first_half.txt (windows of
         `--ppl-window` tokens, each one request), and greedy agreement with the full-precision cache on the first
         `--agreement-prompts` MT-Bench questions (`--agreement-tokens` tokens each)
budget:  offline throughput at a KV budget (`--budget-gib`, residual slots included) that limits the batch:
         `--budget-requests` prompts of `--budget-prompt` tokens, `--budget-output` tokens each, at most
         `--budget-max-seqs` running (one count, or one per mode); modes alternated (auto, int8, int4, auto, ...),
         each under each `--budget-readmit` rule (a preempted request back whole, or a chunk at a time) and each
         `--budget-decode` (quantized decode rows folded, or dequantized a row at a time: `mode/rows`)
int8-scales: int8 with a scale per token (the format) against a scale per block and KV head, by perplexity: the
         model in plain PyTorch over windows of `--ppl-window` tokens, each layer's K/V rounded through either
         int8 scale where the format would read it quantized (keys of blocks before the query's own)
decode:  one layer's decode attention for `--decode-seqs` sequences at `--decode-context` entries, per mode (each
         quantized one folded and, as `mode/rows`, dequantizing rows), the kernels called directly and alternated,
         in `--decode-dtype`; achieved GB/s from the bytes each mode reads

    .venv/bin/python benchmarks/kv_quant.py [--parts bytes,quality,int8-scales,budget,decode] [--block-size 16]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from tokenmill import LLM, SamplingParams
from tokenmill.bench.machine import machine_description
from tokenmill.bench.quality import greedy_agreement
from tokenmill.bench.report import write_json
from tokenmill.kernels import cpu_kernels
from tokenmill.kv.cache import KVCache
from tokenmill.kv.quant import KVFormat
from tokenmill.kv.quantized_cache import QuantizedKVCache

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("auto", "int8", "int4", "int2")


def part_bytes(args: argparse.Namespace) -> dict[str, Any]:
    llm = LLM(args.model, num_kv_blocks=1)
    cfg = llm.engine.model_config
    out: dict[str, Any] = {}
    for block_size in (16, 32, 64):
        bf16 = KVCache.bytes_per_block(cfg, block_size, torch.bfloat16) / block_size
        row = {"bfloat16": bf16, "float32": KVCache.bytes_per_block(cfg, block_size, torch.float32) / block_size}
        for mode in MODES[1:]:
            row[mode] = QuantizedKVCache.bytes_per_block(cfg, block_size, KVFormat.from_name(mode)) / block_size
        out[str(block_size)] = row
        print(f"block {block_size:2d}: bytes/token " + "  ".join(f"{k} {v:.0f} ({bf16 / v:.2f}x fewer than bf16)"
                                                                 for k, v in row.items()))
    return out


def make_llm(args: argparse.Namespace, mode: str, **options: Any) -> LLM:
    return LLM(args.model, kv_cache_dtype=mode, block_size=args.block_size, **options)


def perplexity(llm: LLM, ids: list[int], window: int, windows: int) -> dict[str, Any]:
    prompts = [ids[i : i + window] for i in range(0, window * windows, window)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    logprobs = [e.logprob for o in outs for e in (o.prompt_logprobs or [])[1:] if e is not None]
    return {"ppl": math.exp(-sum(logprobs) / len(logprobs)), "tokens": len(logprobs)}


def use_decode(arm: str) -> None:
    """The quantized decode an arm names: `mode/rows` dequantizes each cached row (kv_quant_folded(0)), any other
    arm folds the quantization into the query and weights (the default). Every arm sets it before it runs."""
    cpu_kernels().module.kv_quant_folded(0 if arm.endswith("/rows") else 1)


def part_quality(args: argparse.Namespace) -> dict[str, Any]:
    """Each mode, and with `--quality-decode folded,rows` each quantized one again with its decode rows dequantized
    (`mode/rows`). `--ppl-chunk 16` scores the prompts in runs of at most 16 tokens, which the kernels attend as
    decode rows: the perplexity then measures the decode kernel's arithmetic, not the prefill kernel's."""
    text = (SHARED / "tinyshakespeare_first_half.txt").read_text()
    questions = [json.loads(line)["turns"][0] for line in (SHARED / "mt_bench_questions.jsonl").open()]
    out: dict[str, Any] = {}
    reference: list[list[int]] = []
    arms = ["auto", *(m + suffix for m in MODES[1:] for suffix in
                      ("" if decode == "folded" else "/rows" for decode in args.quality_decode.split(",")))]
    for arm in arms:
        mode = arm.split("/")[0]
        use_decode(arm)
        llm = make_llm(args, mode, **({"max_num_batched_tokens": args.ppl_chunk} if args.ppl_chunk else {}))
        ids = llm.tokenizer.encode(text)
        result = perplexity(llm, ids, args.ppl_window, args.ppl_windows)
        prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": q}])
                   for q in questions[: args.agreement_prompts]]
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.agreement_tokens, ignore_eos=True),
                            use_tqdm=False)
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        reference = reference or tokens
        result |= greedy_agreement(tokens, reference)
        if mode != "auto":
            result["ppl_increase"] = result["ppl"] / out["auto"]["ppl"] - 1
        out[arm] = result
        print(f"{arm:9s} ppl {result['ppl']:.3f} over {result['tokens']} tokens"
              + (f" ({result['ppl_increase']:+.2%})" if mode != "auto" else "")
              + f"; greedy prefix agreement {result['prefix_agreement']:.3f}, identical "
                f"{result['identical_sequences']:.2f}")
        del llm
    return out


INT8_SCALES = ("none", "token", "block")


def fake_int8(x: torch.Tensor, per: str, block_size: int) -> torch.Tensor:
    """x [kv_heads, T, D] through symmetric int8 with fp16 scales, one per token or per block (T a multiple of the
    block size), and back; "none": x itself."""
    if per == "none":
        return x
    if per == "token":
        scale = x.abs().amax(-1, keepdim=True)
    else:
        scale = x.unflatten(1, (-1, block_size)).abs().amax((-2, -1), keepdim=True)
        scale = scale.expand(-1, -1, block_size, 1).flatten(1, 2)
    scale = (scale / 127).half().float()
    codes = torch.where(scale > 0, x / torch.where(scale > 0, scale, 1), 0).round().clamp(-127, 127)
    return codes * scale


def int8_scales_ppl(model: Any, ids: list[int], per: str, block_size: int) -> list[float]:
    """Logprobs of ids[1:] with every layer's earlier-block K/V rounded through int8 with scales `per` token, block
    or none."""
    n = len(ids)
    own = torch.arange(n)[:, None] // block_size == torch.arange(n)[None, :] // block_size
    causal = torch.arange(n)[None, :] <= torch.arange(n)[:, None]

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cfg = model.cfg
        group = cfg.num_heads // cfg.num_kv_heads
        keys, values = k.transpose(0, 1).float(), v.transpose(0, 1).float()  # [Hkv, T, D]
        quant_keys, quant_values = fake_int8(keys, per, block_size), fake_int8(values, per, block_size)
        queries = q.transpose(0, 1).float().unflatten(0, (cfg.num_kv_heads, group))  # [Hkv, group, T, D]
        scale = cfg.head_dim**-0.5
        scores = torch.where(own, queries @ keys[:, None].transpose(-1, -2),
                             queries @ quant_keys[:, None].transpose(-1, -2)) * scale
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        out = (probs * own) @ values[:, None] + (probs * ~own) @ quant_values[:, None]
        return out.flatten(0, 1).transpose(0, 1).to(q.dtype)

    with torch.inference_mode():
        hidden = model.forward(torch.tensor(ids), torch.arange(n), attend)
        logprobs = model.compute_logits(hidden).double().log_softmax(-1)
    return logprobs[torch.arange(n - 1), torch.tensor(ids[1:])].tolist()


def part_int8_scales(args: argparse.Namespace) -> dict[str, Any]:
    llm = make_llm(args, "auto")
    model, bs = llm.engine.model, args.block_size
    ids = llm.tokenizer.encode((SHARED / "tinyshakespeare_first_half.txt").read_text())
    windows = [ids[i * args.ppl_window : (i + 1) * args.ppl_window] for i in range(args.ppl_windows)]
    out: dict[str, Any] = {}
    for name, per in zip(("full precision", "int8 per token", "int8 per block"), INT8_SCALES, strict=True):
        logprobs = [lp for window in windows for lp in int8_scales_ppl(model, window, per, bs)]
        out[name] = {"ppl": math.exp(-sum(logprobs) / len(logprobs)), "tokens": len(logprobs)}
    base = out["full precision"]["ppl"]
    for name, r in out.items():
        r["ppl_increase"] = r["ppl"] / base - 1
        print(f"{name:15s} ppl {r['ppl']:.4f} ({r['ppl_increase']:+.3%}) over {r['tokens']} tokens")
    dim = model.cfg.head_dim  # int8 codes, and fp16 scales per token or per block, for keys and values
    out["bytes_per_token_and_kv_head"] = {"per token": 2 * (dim + 2), "per block": 2 * (dim + 2 / bs)}
    return out


def offline_run(llm: LLM, prompts: list[list[int]], output: int) -> dict[str, float]:
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=output, ignore_eos=True)
    for p in prompts:
        engine.add_request(p, params)
    preempted, start = engine.stats().num_preemptions, time.perf_counter()
    running: list[int] = []
    while engine.has_unfinished_requests():
        engine.step()
        running.append(len(engine.scheduler.running))
    wall = time.perf_counter() - start
    return {"wall_s": wall, "output_tok_s": len(prompts) * output / wall, "most_running": max(running),
            "mean_running": statistics.fmean(running), "preemptions": engine.stats().num_preemptions - preempted}


def max_seqs_per_mode(spec: str, modes: list[str]) -> dict[str, int]:
    """`8` (every mode) or `auto=3,int4=8`: each mode at the seat count that suits its cache, since seats beyond
    what the blocks hold only add preemptions (and, quantized, residual slots taken from the budget)."""
    if "=" not in spec:
        return dict.fromkeys(modes, int(spec))
    given = {mode: int(n) for mode, n in (item.split("=") for item in spec.split(","))}
    if missing := set(modes) - set(given):
        raise SystemExit(f"--budget-max-seqs names no seat count for {sorted(missing)}")
    return given


def part_budget(args: argparse.Namespace) -> dict[str, Any]:
    modes = args.budget_modes.split(",")
    seats = max_seqs_per_mode(args.budget_max_seqs, modes)
    # An arm is a mode under a readmission rule and a quantized decode: "auto" readmits a preempted request whole
    # (the default), "auto+chunk" a chunk at a time (readmit_whole=False); "int4/rows" decodes with each row
    # dequantized (kv_quant_folded(0)) instead of the quantization folded into the query and weights.
    arms = {mode + ("" if readmit == "whole" else "+chunk") + ("" if decode == "folded" else "/rows"):
            (mode, readmit == "whole")
            for decode in args.budget_decode.split(",") for readmit in args.budget_readmit.split(",")
            for mode in modes if mode != "auto" or decode == "folded"}
    llms = {arm: make_llm(args, mode, kv_cache_memory_gib=args.budget_gib, enable_prefix_caching=False,
                          max_num_seqs=seats[mode], readmit_whole=whole) for arm, (mode, whole) in arms.items()}
    text_ids = next(iter(llms.values())).tokenizer.encode((SHARED / "tinyshakespeare_first_half.txt").read_text())
    prompts = [text_ids[i * 997 : i * 997 + args.budget_prompt] for i in range(args.budget_requests)]
    runs: dict[str, list[dict[str, float]]] = {arm: [] for arm in arms}
    for _ in range(args.repeats):
        for arm in arms:
            use_decode(arm)
            runs[arm].append(offline_run(llms[arm], prompts, args.budget_output))
            r = runs[arm][-1]
            print(f"{arm:10s} {r['output_tok_s']:7.1f} output tok/s, {r['mean_running']:.1f} running on average "
                  f"(at most {r['most_running']}), {r['preemptions']} preemptions "
                  f"({llms[arm].engine.kv_cache.num_blocks} KV blocks)")
    median = {arm: statistics.median(r["output_tok_s"] for r in runs[arm]) for arm in arms}
    out = {"runs": runs, "median_output_tok_s": median, "max_num_seqs": seats,
           "kv_blocks": {arm: llms[arm].engine.kv_cache.num_blocks for arm in arms},
           "over_auto": {arm: median[arm] / median["auto"] for arm in arms} if "auto" in median else {},
           "whole_over_chunk": {m: median[m] / median[m + "+chunk"] for m in modes if m + "+chunk" in median},
           "folded_over_rows": {m: median[m] / median[m + "/rows"] for m in modes if m + "/rows" in median}}
    print("median output tok/s: " + ", ".join(f"{arm} {v:.1f}" for arm, v in median.items()))
    return out


def decode_inputs(args: argparse.Namespace, mode: str, kernels: Any, generator: torch.Generator) -> dict[str, Any]:
    heads, kv_heads, dim, bs = 9, 3, 64, args.block_size
    seqs, ctx, dtype = args.decode_seqs, args.decode_context, getattr(torch, args.decode_dtype)
    blocks_per_seq = -(-ctx // bs)
    num_blocks = seqs * blocks_per_seq
    order = torch.randperm(num_blocks, generator=generator)
    tables = order.view(seqs, blocks_per_seq)
    q = torch.randn(seqs, heads, dim, generator=generator).to(dtype)
    kv_rows = torch.randn(seqs, 2, kv_heads, dim, generator=generator).to(dtype)
    common = {"q": q, "k": kv_rows[:, 0], "v": kv_rows[:, 1], "query_starts": torch.arange(seqs + 1),
              "block_tables": tables, "context_lens": torch.full((seqs,), ctx)}
    if mode == "auto":
        k_cache = torch.randn(kv_heads, num_blocks * bs, dim, generator=generator).to(dtype)
        return common | {"k_cache": k_cache, "v_cache": torch.randn_like(k_cache), "block_size": bs,
                         "bytes": 2 * ctx * seqs * kv_heads * dim * dtype.itemsize}
    fmt = KVFormat.from_name(mode)
    assert fmt is not None
    data = torch.randint(0, 256, (1, kv_heads, num_blocks, bs * fmt.row_bytes(dim)), dtype=torch.uint8,
                         generator=generator)
    k_params = torch.rand(1, kv_heads, num_blocks, fmt.key_params(bs, dim), generator=generator).half()
    v_params = torch.rand(1, kv_heads, num_blocks, fmt.value_params(bs), generator=generator).half()
    residual = torch.randn(1, kv_heads, seqs, bs, dim, generator=generator).to(dtype)
    kv = kernels.QuantKV(fmt.bits, bs, data, k_params, data.clone(), v_params, residual, residual.clone())
    full = ctx // bs * bs
    read = seqs * kv_heads * (full * fmt.bytes_per_block_head(bs, dim) // bs
                              + 2 * (ctx - full) * dim * dtype.itemsize)
    return common | {"kv": kv, "layer": 0, "residual_slots": torch.arange(seqs), "bytes": read}


def part_decode(args: argparse.Namespace) -> dict[str, Any]:
    """Each quantized mode twice: its decode rows with the quantization folded into the query and probabilities (the
    default), and dequantized a row at a time (`kv_quant_folded(0)`, the arm named `mode/rows`)."""
    kernels = cpu_kernels().module
    generator = torch.Generator().manual_seed(0)
    inputs = {m: decode_inputs(args, m, kernels, generator) for m in MODES}
    arms = ["auto", *(f"{m}{suffix}" for m in MODES if m != "auto" for suffix in ("", "/rows"))]
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for _ in range(args.decode_repeats):
        for arm in arms:
            mode = arm.split("/")[0]
            use_decode(arm)
            call = {k: v for k, v in inputs[mode].items() if k != "bytes"}
            fn = kernels.paged_attention if mode == "auto" else kernels.paged_attention_quantized
            fn(**call)
            start = time.perf_counter()
            for _ in range(5):
                fn(**call)
            times[arm].append((time.perf_counter() - start) / 5)
    out: dict[str, Any] = {"dtype": args.decode_dtype, "seqs": args.decode_seqs, "context": args.decode_context}
    full = statistics.median(times["auto"])
    for arm in arms:
        t, read = statistics.median(times[arm]), inputs[arm.split("/")[0]]["bytes"]
        out[arm] = {"ms": t * 1e3, "bytes": read, "gb_s": read / t / 1e9, "over_auto": t / full,
                    "rounds_ms": [x * 1e3 for x in times[arm]]}
        print(f"{arm:9s} decode attention {t * 1e3:7.2f} ms  {read / 2**20:7.1f} MiB read  "
              f"{out[arm]['gb_s']:5.1f} GB/s  ({out[arm]['over_auto']:.2f}x the {args.decode_dtype} cache's time)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--parts", default="bytes,quality,budget,decode")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--ppl-window", type=int, default=1024)
    parser.add_argument("--ppl-windows", type=int, default=8)
    parser.add_argument("--ppl-chunk", type=int, default=0,
                        help="max_num_batched_tokens of the quality part's engines (0: the engine's default)")
    parser.add_argument("--quality-decode", default="folded",
                        help="folded, rows or folded,rows: the quality part's quantized decode rows")
    parser.add_argument("--agreement-prompts", type=int, default=16)
    parser.add_argument("--agreement-tokens", type=int, default=64)
    parser.add_argument("--budget-gib", type=float, default=0.125)
    parser.add_argument("--budget-modes", default="auto,int8,int4")
    parser.add_argument("--budget-requests", type=int, default=32)
    parser.add_argument("--budget-prompt", type=int, default=64)
    parser.add_argument("--budget-output", type=int, default=256)
    parser.add_argument("--budget-max-seqs", default="64",
                        help="max_num_seqs (also the residual slots): N for every mode, or auto=N,int4=M,...")
    parser.add_argument("--budget-readmit", default="whole",
                        help="whole, chunk or whole,chunk: how a preempted request is readmitted (readmit_whole)")
    parser.add_argument("--budget-decode", default="folded",
                        help="folded, rows or folded,rows: quantized decode rows folded (the default) or dequantized")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--decode-seqs", type=int, default=32)
    parser.add_argument("--decode-context", type=int, default=2040)
    parser.add_argument("--decode-repeats", type=int, default=5)
    parser.add_argument("--decode-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the model dtype of the decode part's queries, rows and full-precision cache")
    parser.add_argument("--out", type=Path, default=RESULTS / "kv_quant.json")
    args = parser.parse_args()
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()},
                              "machine": machine_description() | {"threads": torch.get_num_threads()}}
    for part, run in (("bytes", part_bytes), ("quality", part_quality), ("int8-scales", part_int8_scales),
                      ("budget", part_budget), ("decode", part_decode)):
        if part in args.parts.split(","):
            report[part] = run(args)
            write_json(report, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
