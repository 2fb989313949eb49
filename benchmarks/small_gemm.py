"""tokenmill's row-exact matmuls A/B against PyTorch's: in fp32 `linear_rows` (tokenmill/kernels/small_gemm.cpp)
against `F.linear` (MKL), in bf16 `linear_packed` (kernels/bf16_gemm.cpp, what the engine runs by default) against
oneDNN's linear on a prepacked weight, on the default model's layer shapes (SmolLM2-135M; `--model-shapes
qwen2.5-1.5b` for a larger model's) at the row counts of decode and speculative verify steps, and with --rows up to
prefill chunks (what `batch_invariant` runs through it).

Each shape is timed over enough copies of its weight to span --span-mb (default 128 MB, past the last-level cache),
one call per copy, so that the weights come from memory as in a real step where every layer has its own; --span-mb 0
times one copy, which then sits in cache. The two kernels run alternately (A, B, A, B, ...) and each cell is the
median over the repeats. Prints ms per call, weight GB/s and GFLOP/s for both, and whether each kernel gives every
row the bits it gives that row alone; writes JSON.

    .venv/bin/python benchmarks/small_gemm.py
    .venv/bin/python benchmarks/small_gemm.py --rows 1,4,9 --shapes qkv,lm_head --span-mb 0
    .venv/bin/python benchmarks/small_gemm.py --dtype bfloat16 --rows 1,4,16,64,96,256,1024
    TOKENMILL_BF16_ROW_GROUP=4 .venv/bin/python benchmarks/small_gemm.py --dtype bfloat16 --model-shapes qwen2.5-1.5b

oneDNN, unaffected by tokenmill's switches, is each run's yardstick: comparing tokenmill/oneDNN ratios across runs
(e.g. with and without TOKENMILL_BF16_ROW_GROUP) takes this machine's drift between processes out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill.bench.machine import machine_description, start_benchmark  # noqa: E402
from tokenmill.bench.report import write_json  # noqa: E402
from tokenmill.kernels import cpu_kernels  # noqa: E402

# (out_features, in_features) per layer. SmolLM2-135M: hidden 576, 9 query heads and 3 KV heads of 64, MLP 1536,
# 49,152 tokens. Qwen2.5-1.5B: hidden 1536, 12 query heads and 2 KV heads of 128, MLP 8960, 151,936 tokens.
SHAPE_SETS = {
    "smollm2-135m": {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536),
                     "lm_head": (49152, 576)},
    "qwen2.5-1.5b": {"qkv": (2048, 1536), "o": (1536, 1536), "gate_up": (17920, 1536), "down": (1536, 8960),
                     "lm_head": (151936, 1536)},
}
SHAPES = SHAPE_SETS["smollm2-135m"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-shapes", choices=list(SHAPE_SETS), default="smollm2-135m",
                   help="whose layer shapes (default: the default model's)")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"layers among {', '.join(SHAPES)}")
    p.add_argument("--rows", default="1,2,4,5,8,9,16,32", help="batch sizes (rows per matmul)")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--span-mb", type=float, default=128.0, help="weight copies per shape span this many MB")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--output", type=Path, default=Path("benchmarks/results/small_gemm.json"))
    return p.parse_args(argv)


def pass_seconds(fn: Any, inputs: torch.Tensor, weights: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for w in weights:
        fn(inputs, w)
    return (time.perf_counter() - start) / len(weights)


def row_exact(fn: Any, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether every row of fn(x) is the bits of that row alone."""
    together = fn(x, weight)
    return all(torch.equal(together[i], fn(x[i:i + 1], weight)[0]) for i in range(x.shape[0]))


@torch.inference_mode()
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warning = start_benchmark(args.threads)
    build = cpu_kernels()
    if build.module is None:
        raise SystemExit(f"the CPU kernels did not build: {build.error}")
    kernels = build.module

    dtype = getattr(torch, args.dtype)
    bf16 = dtype == torch.bfloat16
    peer_name = "oneDNN prepacked" if bf16 else "F.linear"
    packed: dict[int, torch.Tensor] = {}  # id of a plain weight -> its oneDNN copy
    ours_packed: dict[int, torch.Tensor] = {}  # id of a plain weight -> its `pack_bf16` copy

    def ours(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if bf16:
            return kernels.linear_packed(x, ours_packed[id(w)], None, w.shape[0])
        return kernels.linear_rows(x, w)

    def mkl(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if bf16:
            return torch.ops.mkldnn._linear_pointwise(x, packed[id(w)], None, "none", [], "")
        return F.linear(x, w)

    rows_list = [int(r) for r in args.rows.split(",")]
    generator = torch.Generator().manual_seed(0)
    results = []
    for name in args.shapes.split(","):
        n, k = SHAPE_SETS[args.model_shapes][name]
        weight_bytes = n * k * dtype.itemsize
        copies = max(1, round(args.span_mb * 2**20 / weight_bytes))
        weights = [torch.randn(n, k, generator=generator).to(dtype) for _ in range(copies)]
        if bf16:
            packed = {id(w): torch.ops.mkldnn._reorder_linear_weight(w, 256) for w in weights}
            ours_packed = {id(w): kernels.pack_bf16(w) for w in weights}
        for rows in rows_list:
            x = torch.randn(rows, k, generator=generator).to(dtype)
            for fn in (ours, mkl, ours, mkl):  # warm up both
                pass_seconds(fn, x, weights[:2])
            times: dict[str, list[float]] = {"ours": [], "mkl": []}
            for _ in range(args.repeats):
                times["ours"].append(pass_seconds(ours, x, weights))
                times["mkl"].append(pass_seconds(mkl, x, weights))
            ours_s, mkl_s = statistics.median(times["ours"]), statistics.median(times["mkl"])
            flops = 2 * rows * n * k
            results.append({
                "shape": name, "out_features": n, "in_features": k, "rows": rows, "copies": copies,
                "linear_rows_ms": ours_s * 1e3, "f_linear_ms": mkl_s * 1e3, "speedup": mkl_s / ours_s,
                "linear_rows_gb_s": weight_bytes / ours_s / 1e9, "f_linear_gb_s": weight_bytes / mkl_s / 1e9,
                "linear_rows_gflop_s": flops / ours_s / 1e9, "f_linear_gflop_s": flops / mkl_s / 1e9,
                "linear_rows_row_exact": row_exact(ours, x, weights[0]),
                "f_linear_row_exact": row_exact(mkl, x, weights[0]),
            })
            r = results[-1]
            print(f"{name} {n}x{k} rows={rows}: linear_rows {r['linear_rows_ms']:.3f} ms, "
                  f"F.linear {r['f_linear_ms']:.3f} ms", file=sys.stderr, flush=True)
        del weights
        packed, ours_packed = {}, {}

    where = f"weights spanning {args.span_mb:.0f} MB (from memory)" if args.span_mb > 0 else "one weight (in cache)"
    ours_name = "linear_packed" if bf16 else "linear_rows"
    print(f"\n{args.dtype}, {ours_name} vs {peer_name}, {torch.get_num_threads()} threads, ISA level {build.isa}, "
          f"{where}; median of {args.repeats}, interleaved\n")
    print(f"| layer | N×K | rows | {ours_name} ms | {peer_name} ms | speed-up | {ours_name} GB/s | {peer_name} GB/s "
          f"| {ours_name} GFLOP/s | {peer_name} GFLOP/s | row-exact ({ours_name} / {peer_name}) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['shape']} | {r['out_features']}×{r['in_features']} | {r['rows']} | {r['linear_rows_ms']:.3f} "
              f"| {r['f_linear_ms']:.3f} | {r['speedup']:.2f}× | {r['linear_rows_gb_s']:.1f} | "
              f"{r['f_linear_gb_s']:.1f} | {r['linear_rows_gflop_s']:.1f} | {r['f_linear_gflop_s']:.1f} | "
              f"{'yes' if r['linear_rows_row_exact'] else 'NO'} / {'yes' if r['f_linear_row_exact'] else 'no'} |")
    report = {"machine": machine_description(), "busy_warning": warning, "isa": build.isa,
              "threads": torch.get_num_threads(), "dtype": args.dtype, "peer": peer_name,
              "small_rows": kernels.SMALL_ROWS, "bf16_row_group": os.environ.get("TOKENMILL_BF16_ROW_GROUP"),
              "args": vars(args), "results": results}
    write_json(report, args.output)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
