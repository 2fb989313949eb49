"""Greedy outputs with the prefix cache on against the cache off, per dtype: how often a cached prompt changes them.

ShareGPT first turns (`../shared/data/sharegpt_v3_first_turn.jsonl`, 50 to 1,500 characters) behind one system
prompt, chat-templated, greedy, all in one `generate` call. Cache on: the batch once (later requests hit the system
prompt's blocks), then again (every prompt cached but its tail), then the first 8 one at a time (cached). Cache off:
the batch once, the reference. A cached prompt's tail is computed by other kernels than a whole prefill
(docs/architecture.md, "Prefix caching") unless every attention row is computed as a one-token decode computes it
(`chunk_attention="rows"`, the default in bf16) and the matmuls are row-invariant (`--weight-format gguf`, bf16 float
weights on tokenmill's packed kernel, the default `--bf16-kernel`, or fp32 with `batch_invariant`). Modes: `tiled`
(the tiled chunk kernel), `rows`, `invariant` (`batch_invariant`). Their price: prefill tokens/s of 8,000 prompt
tokens (8 prompts of 1,000 tokens, and 80 of 100) in each mode, alternated (--prefill-repeats rounds, medians).

    .venv/bin/python benchmarks/cache_identity.py
    .venv/bin/python benchmarks/cache_identity.py --dtypes bfloat16 --weight-format gguf --modes tiled,invariant
    .venv/bin/python benchmarks/cache_identity.py --dtypes bfloat16 --prompts 8 --max-tokens 16 --prefill-repeats 0
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tokenmill import LLM, SamplingParams  # noqa: E402
from tokenmill.bench.machine import busy_warning, machine_description  # noqa: E402
from tokenmill.bench.report import write_json  # noqa: E402
from tokenmill.config import BF16_KERNELS  # noqa: E402

SYSTEM = "You are a helpful assistant. Answer briefly and precisely, in plain English, without lists unless asked."
DATA = Path(__file__).resolve().parents[2] / "shared/data/sharegpt_v3_first_turn.jsonl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--weight-format", default="float", help="float, or gguf: the file's blocks (row-invariant tiles)")
    p.add_argument("--modes", default="tiled,rows", help="comma-separated: tiled, rows, invariant")
    p.add_argument("--bf16-kernel", default="tokenmill", choices=BF16_KERNELS,
                   help="bf16 float weights' matmul: tokenmill's row-exact one or oneDNN's")
    p.add_argument("--prefill-repeats", type=int, default=3, help="rounds of the prefill price (0: skip it)")
    p.add_argument("--prefill-lengths", default="1000,100", help="prompt lengths of the prefill price")
    p.add_argument("--output", type=Path, default=Path("benchmarks/results/cache_identity.json"))
    return p.parse_args(argv)


def questions(count: int) -> list[str]:
    with DATA.open() as f:
        texts = [json.loads(line)["human"] for line in f]
    return [t for t in texts if 50 < len(t) < 1500][:count]


MODES = {"tiled": {"chunk_attention": "tiled"}, "rows": {"chunk_attention": "rows"},
         "invariant": {"batch_invariant": True}}


def agreement(dtype: str, mode: str, prompts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    options: dict[str, Any] = {"dtype": dtype, "num_threads": args.threads, "max_num_seqs": len(prompts),
                               "weight_format": args.weight_format, "bf16_kernel": args.bf16_kernel, **MODES[mode]}
    cached = LLM(**options)
    chats = [cached.tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM},
                                                   {"role": "user", "content": q}]) for q in prompts]
    first = [o.token_ids for o in cached.generate(chats, params, use_tqdm=False)]
    again = [o.token_ids for o in cached.generate(chats, params, use_tqdm=False)]
    alone = [cached.generate(c, params, use_tqdm=False)[0].token_ids for c in chats[:8]]
    hits = cached.engine.stats().prefix_cache.hits
    del cached
    plain = LLM(**options, enable_prefix_caching=False)
    reference = [o.token_ids for o in plain.generate(chats, params, use_tqdm=False)]

    def same(outs: list[list[int]]) -> int:
        return sum(a == b for a, b in zip(outs, reference, strict=False))

    return {"dtype": dtype, "mode": mode, "prompts": len(chats), "cached_tokens": hits,
            "first_batch": same(first), "batch_again": same(again), "alone": same(alone), "alone_of": len(alone)}


def prefill_price(dtype: str, modes: list[str], length: int, args: argparse.Namespace) -> dict[str, list[float]]:
    """Prefill tokens/s of 8,000 tokens in prompts of `length` (one output token each, no prefix cache), the modes
    alternated."""
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    llms = {mode: LLM(dtype=dtype, num_threads=args.threads, weight_format=args.weight_format,
                      bf16_kernel=args.bf16_kernel, enable_prefix_caching=False, **MODES[mode])
            for mode in rates}
    ids = llms[modes[0]].tokenizer.encode((DATA.parents[0] / "tinyshakespeare_first_half.txt").read_text())
    prompts = [ids[i * length:(i + 1) * length] for i in range(8000 // length)]
    for _ in range(args.prefill_repeats):
        for mode, llm in llms.items():
            started = time.perf_counter()
            llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
            rates[mode].append(len(prompts) * length / (time.perf_counter() - started))
    return rates


def linear_row_invariance(rows: tuple[int, ...] = (1, 2, 5, 16, 17, 33, 64)) -> dict[str, list[int]]:
    """For bf16 weights prepacked for oneDNN (`bf16_kernel="onednn"`), which row counts M give the last M rows of a
    300-row product bit for bit: per (in, out) shape of SmolLM2-135M's layers."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for k, n in ((576, 960), (576, 3072), (1536, 576)):
        weight = (torch.randn(n, k, generator=gen) * 0.05).to(torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 256)
        x = torch.randn(300, k, generator=gen).to(torch.bfloat16)
        full = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        out[f"{k}x{n}"] = [m for m in rows if torch.equal(
            torch.ops.mkldnn._linear_pointwise(x[-m:].contiguous(), packed, None, "none", [], ""), full[-m:])]
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if (warning := busy_warning()) is not None:
        print(warning)
    prompts = questions(args.prompts)
    modes = args.modes.split(",")
    if unknown := set(modes) - set(MODES):
        raise SystemExit(f"unknown modes {sorted(unknown)}: choose from {list(MODES)}")
    rows = [agreement(d, mode, prompts, args) for d in args.dtypes.split(",") for mode in modes]
    print(f"weights {args.weight_format}; outputs equal to the cache-off batch's:")
    print("| dtype | mode | first batch (system prompt cached) | batch again (prompts cached) | "
          "one at a time (cached) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['mode']} | {r['first_batch']}/{r['prompts']} | "
              f"{r['batch_again']}/{r['prompts']} | {r['alone']}/{r['alone_of']} |")
    prices = {length: prefill_price(args.dtypes.split(",")[-1], modes, length, args)
              for length in map(int, args.prefill_lengths.split(","))} if args.prefill_repeats else {}
    for length, price in prices.items():
        first = statistics.median(price[modes[0]])
        print(f"prefill tok/s, prompts of {length}: " + ", ".join(
            f"{mode} {statistics.median(r):.1f} ({statistics.median(r) / first:.2f}×)" for mode, r in price.items())
            + f"; rounds {price}")
    invariant = linear_row_invariance()
    for shape, ms in invariant.items():
        print(f"bf16 oneDNN linear {shape}: row counts equal to the same rows of a 300-row product: {ms}")
    report = {"machine": machine_description(), "rows": rows, "linear_rows_invariant": invariant,
              "prefill_tok_s": prices}
    write_json(report | {"args": vars(args) | {"output": str(args.output)}}, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
