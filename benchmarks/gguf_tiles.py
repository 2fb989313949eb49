"""The GGUF block matmuls (`q4_matmul`, `q8_matmul`, tokenmill/kernels/gguf_matmul.cpp) A/B across the ISA levels
this CPU can run and both activation modes (bf16, int8), on the default model's layer shapes (SmolLM2-135M: Q4_1
layers, the Q8_0 LM head) and Qwen2.5-Coder-1.5B's fused gate/up projection as 4-bit blocks (`qwen15_gate_up`) and
its `ffn_down` as Q6_K (codes q - 32, the file's d and sc) and as the 8-bit blocks of 32 a requantization gives
(`qwen15_down_q6k`, `qwen15_down_q8`), and the 0.5B draft's layers as the `q4` weight format holds them
(`qwen05_*`), at the row counts of decode, batched decode and prefill.

Each level is its own build of the kernels (`TOKENMILL_CPU_ISA` picks one for the engine; here all are loaded side by
side), so the same process times, for example, the int8 tiles on AVX-512 VNNI against the AVX2 ones. Weights are
random codes in the real layouts, with enough copies to span --span-mb (past the last-level cache), one call per
copy; the variants run alternately (A, B, C, ..., A, B, C, ...) and each cell is the median over the repeats. Prints
µs per call, weight GB/s and multiply-adds per second (GMAC/s); writes JSON. `--prefetch-rows 16,0` times every
variant with the tiles' weight prefetch on and off (`gguf_prefetch_rows`); `--checkouts A=DIR,B=.` times the
kernels of two checkouts (a change and the commit before it) side by side.

    .venv/bin/python benchmarks/gguf_tiles.py
    .venv/bin/python benchmarks/gguf_tiles.py --levels avx512bf16,avx2 --rows 1,16 --shapes gate_up,lm_head
    .venv/bin/python benchmarks/gguf_tiles.py --checkouts A=/path/to/before,B=. --levels avx2 --modes int8
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill.bench.machine import machine_description, start_benchmark  # noqa: E402
from tokenmill.bench.report import write_json  # noqa: E402
from tokenmill.kernels import cpu_kernels, isa  # noqa: E402
from tokenmill.model.linear import GgufQ4Linear, GgufQ8Linear  # noqa: E402

# (format, out_features, in_features) of SmolLM2-135M's Q4_1 file: attention and MLP in Q4_1, the tied LM head Q8_0;
# and the 1.5B's Q6_K down projection, as stored and requantized.
SHAPES = {"qkv": ("q4", 960, 576), "o": ("q4", 576, 576), "gate_up": ("q4", 3072, 576), "down": ("q4", 576, 1536),
          "lm_head": ("q8", 49152, 576), "qwen15_gate_up": ("q4", 17920, 1536), "qwen15_down_q6k": ("q6", 1536, 8960),
          "qwen15_down_q8": ("q8", 1536, 8960), "qwen05_gate_up": ("q4", 9728, 896), "qwen05_down": ("q4", 896, 4864),
          "qwen05_qkv": ("q4", 1152, 896), "qwen05_lm_head": ("q4", 151936, 896)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    levels = [level for level in isa.supported_levels(isa.cpu_flags()) if level != "scalar"]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", default=",".join(levels), help="ISA levels to compare (default: all but scalar)")
    p.add_argument("--modes", default="bf16,int8", help="activation modes: bf16, int8")
    p.add_argument("--shapes", default="qkv,o,gate_up,down,lm_head", help=f"layers among {', '.join(SHAPES)}")
    p.add_argument("--rows", default="1,4,16,64", help="activation rows per matmul")
    p.add_argument("--prefetch-rows", default="16",
                   help="weight prefetch settings to compare (gguf_prefetch_rows: the most activation rows that "
                        "prefetch; 0 = off), e.g. 16,0")
    p.add_argument("--checkouts", default="",
                   help="TAG=DIR,... : time the kernels of each checkout (built from its sources) instead of this "
                        "one's, e.g. A=/path/to/before,B=.")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup-s", type=float, default=1.0, help="untimed passes of every variant before each row count")
    p.add_argument("--span-mb", type=float, default=128.0, help="weight copies per shape span this many MB")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", type=Path, default=Path("benchmarks/results/gguf_tiles.json"))
    return p.parse_args(argv)


def level_kernels(level: str) -> Any:
    """This checkout's kernels for `level`, the engine's own build."""
    build = cpu_kernels(level)
    if build.module is None:
        raise SystemExit(f"the CPU kernels did not build for {level}: {build.error}")
    return build.module


def checkout_kernels(root: Path, level: str) -> Any:
    """Another checkout's kernels (every .cpp of its tokenmill/kernels) built for `level` under a name of their own,
    loaded beside this one's: a before/after of a kernel change in one process."""
    from torch.utils.cpp_extension import load

    from tokenmill.kernels import _CFLAGS

    sources = sorted(str(p) for p in (root / "tokenmill" / "kernels").glob("*.cpp"))
    tag = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:8]
    return load(name=f"tokenmill_checkout_{tag}_{level}", sources=sources,
                extra_cflags=_CFLAGS + isa.build_flags(level), extra_ldflags=["-fopenmp"], verbose=False)


def random_layer(fmt: str, n: int, k: int, gen: torch.Generator) -> GgufQ4Linear | GgufQ8Linear:
    blocks = (n, k // 32)
    if fmt == "q4":
        return GgufQ4Linear(torch.randint(0, 16, (n, k), generator=gen),
                            (torch.rand(blocks, generator=gen) * 0.01).half().float(),
                            (-torch.rand(blocks, generator=gen) * 0.08).half().float())
    if fmt == "q6":
        return GgufQ8Linear(torch.randint(-32, 32, (n, k), generator=gen),
                            (torch.rand((n, k // 256), generator=gen) * 1e-3).half(),
                            sub_scales=torch.randint(-128, 128, (n, k // 16), generator=gen, dtype=torch.int8))
    return GgufQ8Linear(torch.randint(-128, 128, (n, k), generator=gen),
                        (torch.rand(blocks, generator=gen) * 0.01).half())


def layer_bytes(layer: GgufQ4Linear | GgufQ8Linear) -> int:
    tensors = [layer.packed, layer.scales] + ([layer.minimums] if isinstance(layer, GgufQ4Linear) else [])
    return sum(t.numel() * t.element_size() for t in tensors)


def call(kernels: Any, layer: GgufQ4Linear | GgufQ8Linear, x: torch.Tensor, int8: bool) -> torch.Tensor:
    if isinstance(layer, GgufQ4Linear):
        return kernels.q4_matmul(x, layer.packed, layer.scales, layer.minimums, layer.out_features, False, int8)
    return kernels.q8_matmul(x, layer.packed, layer.scales, layer.out_features, False, int8)


def pass_seconds(kernels: Any, layers: list[Any], x: torch.Tensor, int8: bool, prefetch_rows: int) -> float:
    kernels.gguf_prefetch_rows(prefetch_rows)
    start = time.perf_counter()
    for layer in layers:
        call(kernels, layer, x, int8)
    return (time.perf_counter() - start) / len(layers)


@torch.inference_mode()
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warning = start_benchmark(args.threads)
    variants = []
    checkouts = dict(spec.split("=", 1) for spec in args.checkouts.split(",")) if args.checkouts else {"": ""}
    settings = [int(rows) for rows in args.prefetch_rows.split(",")]
    for tag, root in checkouts.items():
        for level in args.levels.split(","):
            kernels = checkout_kernels(Path(root), level) if root else level_kernels(level)
            for mode in args.modes.split(","):
                tiles = kernels.gguf_int8_isa() if mode == "int8" else kernels.gguf_isa()
                for rows in settings:
                    name = (f"{tag}: " if tag else "") + f"{mode}@{level}" + (
                        f" prefetch {rows}" if len(settings) > 1 else "")
                    variants.append({"name": name, "checkout": root, "level": level, "mode": mode, "tiles": tiles,
                                     "prefetch_rows": rows, "kernels": kernels})
    gen = torch.Generator().manual_seed(0)
    results = []
    for shape in args.shapes.split(","):
        fmt, n, k = SHAPES[shape]
        first = random_layer(fmt, n, k, gen)
        nbytes = layer_bytes(first)
        copies = max(1, round(args.span_mb * 2**20 / nbytes))
        layers = [first] + [random_layer(fmt, n, k, gen) for _ in range(copies - 1)]
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
            warm_until = time.perf_counter() + args.warmup_s
            while True:  # full passes of every variant: the first second's passes ran slower here, whatever ran before
                for v in variants:
                    pass_seconds(v["kernels"], layers, x, v["mode"] == "int8", v["prefetch_rows"])
                if time.perf_counter() >= warm_until:
                    break
            times: dict[str, list[float]] = {v["name"]: [] for v in variants}
            for _ in range(args.repeats):
                for v in variants:
                    times[v["name"]].append(pass_seconds(v["kernels"], layers, x, v["mode"] == "int8",
                                                        v["prefetch_rows"]))
            row = {"shape": shape, "format": fmt, "out_features": n, "in_features": k, "rows": rows,
                   "copies": len(layers), "weight_bytes": nbytes, "variants": {}}
            for v in variants:
                seconds = statistics.median(times[v["name"]])
                row["variants"][v["name"]] = {"tiles": v["tiles"], "us": seconds * 1e6,
                                              "gb_s": nbytes / seconds / 1e9, "gmac_s": rows * n * k / seconds / 1e9}
            results.append(row)
            print(f"{shape} rows={rows}: " + ", ".join(f"{name} {r['us']:.0f} µs"
                                                       for name, r in row["variants"].items()),
                  file=sys.stderr, flush=True)
        del layers

    names = [v["name"] for v in variants]
    print(f"\n{torch.get_num_threads()} threads; tiles per variant: "
          + ", ".join(f"{v['name']} = {v['tiles']}" for v in variants)
          + f"; weights spanning {args.span_mb:.0f} MB; median of {args.repeats}, interleaved\n")
    print("| layer | N×K | rows | " + " | ".join(f"{name} µs (GB/s, GMAC/s)" for name in names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for r in results:
        cells = [f"{c['us']:.0f} ({c['gb_s']:.1f}, {c['gmac_s']:.0f})" for c in r["variants"].values()]
        print(f"| {r['shape']} | {r['out_features']}×{r['in_features']} | {r['rows']} | " + " | ".join(cells) + " |")
    report = {"machine": machine_description(), "busy_warning": warning, "threads": torch.get_num_threads(),
              "variants": [{k: v for k, v in variant.items() if k != "kernels"} for variant in variants],
              "args": {k: str(v) for k, v in vars(args).items()}, "results": results}
    write_json(report, args.output)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
