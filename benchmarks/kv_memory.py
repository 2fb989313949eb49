"""KV memory modes through the public API: StreamingLLM's long-stream experiment and the decode cost of a window.

stream: the text of ../shared/data/tinyshakespeare_first_half.txt fed as one prompt of `--tokens` tokens, scored
with `prompt_logprobs` (teacher forcing, chunks of `--chunk` tokens), under
  - sinks:  attention_sinks=4, sliding_window=W   (StreamingLLM)
  - window: sliding_window=W, no sinks            (the paper's failing baseline)
  - dense:  the full cache, over the first `--dense-tokens` tokens only (it cannot go past the context)
Per segment of `--segment` tokens: perplexity; per mode: the most KV blocks held, process RSS as the stream goes,
tokens/s. Each scored token sees between W - chunk and W + chunk earlier tokens in the window modes.

decode: single-stream decode time per token with a window that evicts (sinks + W, prompt longer than W), its key
rotations done in place by the CPU kernel and by the PyTorch path, against the full cache on the same prompt, run
alternately (window, window with the PyTorch rotation, full, and again), plus the time of one eviction's key rotation
on each path measured apart, with the bytes it moves.

h2o: heavy-hitter eviction (H2O) at a per-request budget of `--h2o-budget` (a fraction) of `--h2o-length`-token
segments of the same text, each scored with `prompt_logprobs` in chunks of `--h2o-chunk` tokens (one block: each
scored token sees at most the budget plus its own block), against the full cache and StreamingLLM (4 sinks and a
window) at the same budget; H2O at each fraction of the budget kept for recent tokens in `--h2o-recent`. Perplexity
over every scored token and over those past the budget (where eviction has happened), token-weighted over
`--h2o-segments` segments.

h2o-granularity: the same at one token per step over the first segment (each token sees the budget at most): the
engine's H2O, per head and shared, against a plain-PyTorch H2O (tokenmill/bench/h2o_reference.py) on the paper's
schedule (one token dropped per token added, per head: "head", or shared: "token"); its "per-head" and "shared"
forms follow the engine's rule, a check (their logprobs agree to float rounding).

h2o-budget: offline throughput when the KV budget (`--h2o-budget-gib`) limits the batch: `--h2o-requests` prompts
of `--h2o-prompt` tokens from the text, `--h2o-output` greedy tokens each, with the full cache and with H2O at
`--h2o-budget` of a request's final length, alternately; output tokens/s and how many requests ran at once.

h2o-decode: single-stream decode TPOT at a long prompt with H2O evicting (the budget a fraction of the prompt), with
H2O collecting scores but never evicting (a budget beyond the context: the side output's cost alone) and with the
full cache, run alternately.

    .venv/bin/python benchmarks/kv_memory.py [--parts stream,decode,h2o,h2o-granularity,h2o-budget,h2o-decode]
        [--tokens 100000] [--window 1024] [--h2o-length 2048] [--h2o-budget 0.2] [--h2o-recent 0.5,0.75,0.9]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from tokenmill import LLM, SamplingParams
from tokenmill.bench.machine import machine_description
from tokenmill.bench.report import write_json
from tokenmill.kernels import cpu_kernels
from tokenmill.kv.cache import KVCache
from tokenmill.model.llama import rope_rotation

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare_first_half.txt"
RESULTS = Path(__file__).resolve().parent / "results"


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_llm(args: argparse.Namespace, mode: str) -> LLM:
    options: dict[str, Any] = {"max_num_batched_tokens": args.chunk, "kv_cache_memory_gib": args.kv_gib}
    if mode == "sinks":
        options |= {"sliding_window": args.window, "attention_sinks": args.sinks}
    elif mode == "window":
        options |= {"sliding_window": args.window}
    return LLM(args.model, **options)


def score_stream(llm: LLM, ids: list[int], segment: int) -> dict[str, Any]:
    """Prompt logprobs of the whole stream in one request, with the KV blocks held and RSS sampled as it goes."""
    engine = llm.engine
    rid = engine.add_request(ids, SamplingParams(max_tokens=1, prompt_logprobs=0, output_kind="delta"))
    most_blocks, rss_trace, final = 0, [], None
    start = time.perf_counter()
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out if out.request_id == rid and out.prompt_logprobs else final
        stats = engine.stats()
        most_blocks = max(most_blocks, stats.num_total_blocks - stats.num_free_blocks)
        steps += 1
        if steps % 50 == 0:
            request = engine.scheduler.get(rid)
            done = request.num_computed_tokens if request is not None else len(ids)
            rss_trace.append((done, round(rss_mib(), 1)))
    wall = time.perf_counter() - start
    assert final is not None and final.prompt_logprobs is not None
    logprobs = [e.logprob for e in final.prompt_logprobs[1:] if e is not None]
    segments = []
    for first in range(0, len(logprobs), segment):
        part = logprobs[first : first + segment]
        segments.append({"tokens": [first + 1, first + len(part)], "ppl": math.exp(-sum(part) / len(part))})
    per_block = KVCache.bytes_per_block(engine.model_config, engine.kv_cache.block_size, engine.dtype)
    return {"tokens": len(ids), "wall_s": wall, "tok_s": len(ids) / wall,
            "ppl": math.exp(-sum(logprobs) / len(logprobs)), "segments": segments, "most_kv_blocks": most_blocks,
            "most_kv_mib": most_blocks * per_block / 2**20, "rss_mib_trace": rss_trace}


def part_stream(args: argparse.Namespace, report: dict[str, Any]) -> None:
    text = DATA.read_text()
    out: dict[str, Any] = report.setdefault("stream", {})
    for mode in ("sinks", "window", "dense"):
        llm = make_llm(args, mode)
        # The full cache holds the context at most, one position left for the sampled token.
        wanted = min(args.dense_tokens, llm.engine.max_model_len - 1) if mode == "dense" else args.tokens
        ids = llm.tokenizer.encode(text)[:wanted]
        if len(ids) < wanted:
            print(f"note: the text has only {len(ids)} tokens")
        out[mode] = result = score_stream(llm, ids, args.segment)
        write_json(report, args.out)  # each mode as it completes
        rss = result["rss_mib_trace"][-1][1] if result["rss_mib_trace"] else float("nan")
        print(f"{mode:7s} {result['tokens']:7d} tokens  ppl {result['ppl']:8.2f}  {result['tok_s']:7.1f} tok/s  "
              f"KV held at most {result['most_kv_mib']:.1f} MiB  RSS at the end {rss:.0f} MiB")
        print("         per segment: " + "  ".join(f"{s['ppl']:.1f}" for s in result["segments"]))
        del llm


def decode_tpot(llm: LLM, prompt: list[int], tokens: int) -> float:
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    engine = llm.engine
    engine.add_request(prompt, params)
    first = None
    while engine.has_unfinished_requests():
        outs = engine.step()
        if first is None and any(o.token_ids for o in outs):
            first = time.perf_counter()
    assert first is not None
    return (time.perf_counter() - first) / (tokens - 1)


def rotation_seconds(llm: LLM, num_blocks: int, repeats: int = 20) -> float:
    cache = llm.engine.kv_cache
    cos, sin = rope_rotation(llm.engine.model_config, -cache.block_size)
    blocks = list(range(num_blocks))
    cache.rotate_keys(blocks, cos, sin)
    start = time.perf_counter()
    for _ in range(repeats):
        cache.rotate_keys(blocks, cos, sin)
    return (time.perf_counter() - start) / repeats


def part_decode(args: argparse.Namespace) -> dict[str, Any]:
    """Decode TPOT with the window (its key rotations in place by the CPU kernel, and by the PyTorch path) and with
    the full cache, alternated; and one eviction's rotation alone on each path."""
    window = make_llm(args, "sinks")
    full = LLM(args.model, kv_cache_memory_gib=args.kv_gib)
    prompt = window.tokenizer.encode(DATA.read_text())[: args.window + 64]
    cache = window.engine.kv_cache
    kernels = cpu_kernels().module
    rotations = {"window": kernels, "window, PyTorch rotation": None}
    runs: dict[str, list[float]] = {"window": [], "window, PyTorch rotation": [], "full": []}
    for llm in (window, full):  # untimed: the first decode in a process or on fresh KV pages pays one-time costs
        decode_tpot(llm, prompt, args.decode_tokens)
    for _ in range(args.repeats):
        for name in runs:
            if name in rotations:
                cache.use_kernels(rotations[name])
            runs[name].append(decode_tpot(full if name == "full" else window, prompt, args.decode_tokens))
    window_blocks = -(-args.window // cache.block_size)
    rotate: dict[str, float] = {}
    for name, module in rotations.items():
        cache.use_kernels(module)
        rotate[name] = rotation_seconds(window, window_blocks)
    cache.use_kernels(kernels)
    moved = 2 * window_blocks * cache.block_size * cache.k.shape[0] * cache.k.shape[1] * cache.k.shape[3] * \
        cache.k.element_size()  # read and write the window's keys
    tpot = {name: statistics.median(values) for name, values in runs.items()}
    result = {"prompt_tokens": len(prompt), "decode_tokens": args.decode_tokens, "dtype": str(cache.k.dtype),
              "tpot_s": runs, "median_tpot_s": tpot, "window_over_full": tpot["window"] / tpot["full"],
              "pytorch_rotation_over_full": tpot["window, PyTorch rotation"] / tpot["full"],
              "rotation_bytes": moved, "rotation_s_per_eviction": rotate,
              "rotation_gb_s": {name: moved / s / 1e9 for name, s in rotate.items()},
              "rotation_s_per_token": {name: s / cache.block_size for name, s in rotate.items()}}
    print(f"decode TPOT ({cache.k.dtype}): " + ", ".join(f"{name} {t * 1e3:.2f} ms" for name, t in tpot.items()) +
          f" (window / full {result['window_over_full']:.3f}, with the PyTorch rotation "
          f"{result['pytorch_rotation_over_full']:.3f})")
    for name, seconds in rotate.items():
        print(f"one eviction's rotation, {name}: {seconds * 1e3:.2f} ms ({moved / 2**20:.1f} MiB moved, "
              f"{moved / seconds / 1e9:.1f} GB/s), {seconds / cache.block_size * 1e3:.3f} ms per token")
    return result


def prompt_logprobs(llm: LLM, ids: list[int]) -> list[float]:
    out = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    entries = out[0].prompt_logprobs
    assert entries is not None
    return [e.logprob for e in entries[1:] if e is not None]


def h2o_modes(args: argparse.Namespace, budget: int) -> dict[str, dict[str, Any]]:
    modes: dict[str, dict[str, Any]] = {"full": {},
                                        "sinks": {"sliding_window": budget - args.block_size, "attention_sinks": 4}}
    fractions = [float(f) for f in args.h2o_recent.split(",")]
    for frac in fractions:
        modes[f"h2o recent {frac:g}"] = {"h2o_budget": budget, "h2o_recent": int(budget * frac)}
    modes[f"h2o shared, recent {fractions[0]:g}"] = {"h2o_budget": budget, "h2o_recent": int(budget * fractions[0]),
                                                     "h2o_per_head": False}
    return modes


def part_h2o(args: argparse.Namespace) -> dict[str, Any]:
    ids_all = LLM(args.model, kv_cache_memory_gib=0.05).tokenizer.encode(DATA.read_text())
    length = args.h2o_length
    budget = int(length * args.h2o_budget)
    segments = [ids_all[i * length : (i + 1) * length] for i in range(args.h2o_segments)]
    results: dict[str, Any] = {}
    for mode, options in h2o_modes(args, budget).items():
        llm = LLM(args.model, max_num_batched_tokens=args.h2o_chunk, kv_cache_memory_gib=args.kv_gib, **options)
        capacity = -(-budget // args.block_size) * args.block_size
        every: list[float] = []
        past: list[float] = []
        start = time.perf_counter()
        for ids in segments:
            logprobs = prompt_logprobs(llm, ids)
            every += logprobs
            past += logprobs[capacity:]
        wall = time.perf_counter() - start
        results[mode] = {"options": options, "ppl": math.exp(-sum(every) / len(every)),
                         "ppl_past_budget": math.exp(-sum(past) / len(past)), "tokens": len(every),
                         "tok_s": len(every) / wall}
        del llm
    full = results["full"]
    print(f"H2O quality: {args.h2o_segments} segments of {length} tokens, budget {budget} tokens "
          f"({args.h2o_budget:.0%}), chunks of {args.h2o_chunk}")
    print(f"{'mode':26s} {'ppl':>8s} {'vs full':>8s} {'past budget':>12s} {'vs full':>8s} {'tok/s':>7s}")
    for mode, r in results.items():
        r["ppl_ratio"] = r["ppl"] / full["ppl"]
        r["ppl_past_budget_ratio"] = r["ppl_past_budget"] / full["ppl_past_budget"]
        print(f"{mode:26s} {r['ppl']:8.3f} {r['ppl_ratio']:8.3f} {r['ppl_past_budget']:12.3f} "
              f"{r['ppl_past_budget_ratio']:8.3f} {r['tok_s']:7.1f}")
    return {"length": length, "budget_tokens": budget, "segments": args.h2o_segments, "chunk": args.h2o_chunk,
            "modes": results}


def part_h2o_granularity(args: argparse.Namespace) -> dict[str, Any]:
    from tokenmill.bench.h2o_reference import H2OReference
    from tokenmill.kv.h2o import HeavyHitterBudget

    full = LLM(args.model, max_num_batched_tokens=16, kv_cache_memory_gib=args.kv_gib)
    ids = full.tokenizer.encode(DATA.read_text())[: args.h2o_length]
    budget = int(len(ids) * args.h2o_budget)
    recent = int(budget * float(args.h2o_recent.split(",")[0]))
    runs: dict[str, list[float]] = {"full": prompt_logprobs(full, ids)}
    del full
    for name, per_head in (("engine (per-head)", True), ("engine (shared)", False)):
        engine = LLM(args.model, max_num_batched_tokens=1, kv_cache_memory_gib=args.kv_gib, h2o_budget=budget,
                     h2o_recent=recent, h2o_per_head=per_head)
        runs[name] = prompt_logprobs(engine, ids)
    model = engine.engine.model
    for granularity in args.h2o_reference.split(","):
        rule = HeavyHitterBudget(budget, recent, args.block_size)
        runs[f"reference ({granularity})"] = H2OReference(model, rule, granularity, len(ids)).logprobs(ids)
    capacity = -(-budget // args.block_size) * args.block_size
    result: dict[str, Any] = {"tokens": len(ids), "budget_tokens": budget, "recent_tokens": recent, "modes": {}}
    print(f"H2O granularity: {len(ids)} tokens one per step, budget {budget} tokens, {recent} of them recent")
    for mode, logprobs in runs.items():
        ppl = math.exp(-sum(logprobs) / len(logprobs))
        past = math.exp(-sum(logprobs[capacity:]) / len(logprobs[capacity:]))
        result["modes"][mode] = {"ppl": ppl, "ppl_past_budget": past}
    base = result["modes"]["full"]
    for mode, r in result["modes"].items():
        r["ppl_ratio"] = r["ppl"] / base["ppl"]
        r["ppl_past_budget_ratio"] = r["ppl_past_budget"] / base["ppl_past_budget"]
        print(f"{mode:24s} ppl {r['ppl']:8.3f} ({r['ppl_ratio']:.3f}x)  past the budget {r['ppl_past_budget']:8.3f} "
              f"({r['ppl_past_budget_ratio']:.3f}x)")
    for form in ("per-head", "shared"):
        if form in args.h2o_reference.split(","):
            result[f"engine_vs_reference_{form}_max_abs_logprob"] = difference = max(
                abs(a - b) for a, b in zip(runs[f"engine ({form})"], runs[f"reference ({form})"], strict=True))
            print(f"engine vs reference ({form}): logprobs differ by at most {difference:.2e}")
    return result


def part_h2o_budget(args: argparse.Namespace) -> dict[str, Any]:
    from kv_quant import offline_run  # benchmarks/, beside this script

    budget = int((args.h2o_prompt + args.h2o_output) * args.h2o_budget)
    options: dict[str, Any] = {"kv_cache_memory_gib": args.h2o_budget_gib, "max_num_seqs": 64}
    llms = {"full": LLM(args.model, **options), "h2o": LLM(args.model, h2o_budget=budget, **options)}
    ids = llms["full"].tokenizer.encode(DATA.read_text())
    prompts = [ids[i * 997 : i * 997 + args.h2o_prompt] for i in range(args.h2o_requests)]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in llms}
    for _ in range(args.repeats):
        for name, llm in llms.items():
            runs[name].append(r := offline_run(llm, prompts, args.h2o_output))
            print(f"{name:5s} {r['output_tok_s']:7.1f} output tok/s, {r['mean_running']:.1f} running on average "
                  f"(at most {r['most_running']}), {r['preemptions']} preemptions")
    median = {name: statistics.median(r["output_tok_s"] for r in values) for name, values in runs.items()}
    print(f"H2O at {budget} tokens per request: {median['h2o'] / median['full']:.2f}x the full cache's output tok/s "
          f"({llms['full'].engine.kv_cache.num_blocks} KV blocks of {args.block_size})")
    return {"budget_tokens": budget, "kv_blocks": llms["full"].engine.kv_cache.num_blocks, "runs": runs,
            "median_output_tok_s": median, "h2o_over_full": median["h2o"] / median["full"]}


def part_h2o_decode(args: argparse.Namespace) -> dict[str, Any]:
    prompt = LLM(args.model, kv_cache_memory_gib=0.05).tokenizer.encode(DATA.read_text())[: args.h2o_length]
    budget = int(len(prompt) * args.h2o_budget)
    configs = {"h2o": {"h2o_budget": budget}, "collect only": {"h2o_budget": 1 << 20}, "full": {}}
    llms = {name: LLM(args.model, kv_cache_memory_gib=args.kv_gib, **options) for name, options in configs.items()}
    runs: dict[str, list[float]] = {name: [] for name in llms}
    for _ in range(args.repeats):
        for name, llm in llms.items():
            runs[name].append(decode_tpot(llm, prompt, args.decode_tokens))
    tpot = {name: statistics.median(values) for name, values in runs.items()}
    print(f"decode TPOT after a {len(prompt)}-token prompt: " + ", ".join(
        f"{name} {t * 1e3:.2f} ms ({t / tpot['full']:.3f}x full)" for name, t in tpot.items()))
    return {"prompt_tokens": len(prompt), "budget_tokens": budget, "decode_tokens": args.decode_tokens,
            "tpot_s": runs, "median_tpot_s": tpot, "over_full": {n: t / tpot["full"] for n, t in tpot.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--parts", default="stream,decode")
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--dense-tokens", type=int, default=8192)
    parser.add_argument("--segment", type=int, default=8192)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--kv-gib", type=float, default=1.0)
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=16, help="the engine's (the default)")
    parser.add_argument("--h2o-length", type=int, default=2048)
    parser.add_argument("--h2o-segments", type=int, default=4)
    parser.add_argument("--h2o-budget", type=float, default=0.2)
    parser.add_argument("--h2o-recent", default="0.5,0.75,0.9")
    parser.add_argument("--h2o-chunk", type=int, default=16)
    parser.add_argument("--h2o-budget-gib", type=float, default=1 / 16)
    parser.add_argument("--h2o-requests", type=int, default=16)
    parser.add_argument("--h2o-prompt", type=int, default=512)
    parser.add_argument("--h2o-output", type=int, default=128)
    parser.add_argument("--h2o-reference", default="per-head,head,token",
                        help="h2o-granularity's reference forms (tokenmill/bench/h2o_reference.py)")
    parser.add_argument("--out", type=Path, default=RESULTS / "kv_memory.json")
    args = parser.parse_args()
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()},
                              "machine": machine_description() | {"threads": torch.get_num_threads()}}
    parts = args.parts.split(",")
    if "stream" in parts:
        part_stream(args, report)
    for part, run in (("decode", part_decode), ("h2o", part_h2o), ("h2o-granularity", part_h2o_granularity),
                      ("h2o-budget", part_h2o_budget), ("h2o-decode", part_h2o_decode)):
        if part in parts:
            report[part.replace("-", "_")] = run(args)
            write_json(report, args.out)  # each part as it completes
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
