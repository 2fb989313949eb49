"""What a verify-shaped step costs by its number of rows: one sequence of N rows (the last token and N - 1 drafts)
over a cached context, the model's whole forward pass (`ModelRunner.time_rows`, the step-time model speculative
decoding measures at start-up). Extra rows are what speculation spends; on a CPU they should be nearly free.

    .venv/bin/python benchmarks/step_rows.py \\
        --model ~/.cache/tokenmill/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf \\
        --weight-format gguf --gguf-activations int8 --dtype bfloat16

Each row count is timed `--repeats` times, alternating counts (1, 5, 9, ..., 1, 5, 9, ...); prints the median ms per
step and per extra row; writes JSON with the machine description.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill import LLM  # noqa: E402
from tokenmill.bench.machine import machine_description, start_benchmark  # noqa: E402
from tokenmill.bench.report import write_json  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--weight-format", default="float")
    p.add_argument("--gguf-activations", default="bf16")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--rows", default="1,2,5,9,16", help="rows per step (one sequence each, at most 16)")
    p.add_argument("--context", type=int, default=200, help="cached entries the rows attend over")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", default="benchmarks/results/step_rows.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warning = start_benchmark(args.threads)
    rows = [int(n) for n in args.rows.split(",")]
    if any(not 1 <= n <= 16 for n in rows):
        raise SystemExit("--rows: between 1 and 16 rows per step")
    options = {"weight_format": args.weight_format, "dtype": args.dtype, "num_kv_blocks": 64}
    if args.gguf_activations != "bf16":
        options["gguf_activations"] = args.gguf_activations
    runner = LLM(args.model, **options).engine.runner
    for n in rows:  # warm-up: kernels, allocator, caches
        runner.time_rows(n, rows_per_seq=n, context=args.context)
    times: dict[int, list[float]] = {n: [] for n in rows}
    for _ in range(args.repeats):
        for n in rows:
            times[n].append(runner.time_rows(n, rows_per_seq=n, context=args.context))
    medians = {n: statistics.median(t) * 1e3 for n, t in times.items()}
    base = medians[rows[0]]
    print(f"| rows | ms per step | ms per row past {rows[0]} |\n|---|---|---|")
    for n in rows:
        extra = f"{(medians[n] - base) / (n - rows[0]):.1f}" if n != rows[0] else "–"
        print(f"| {n} | {medians[n]:.1f} | {extra} |")
    machine = machine_description()
    print(f"\n{machine.get('cpu', '?')}, {args.weight_format} ({args.gguf_activations} activations), "
          f"{args.context} cached entries, median of {args.repeats}")
    write_json({"args": vars(args), "machine": machine, "busy_warning": warning,
                "ms_per_step": {str(n): medians[n] for n in rows},
                "samples_ms": {str(n): [t * 1e3 for t in times[n]] for n in rows}}, Path(args.output))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
