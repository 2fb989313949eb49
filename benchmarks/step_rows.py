"""What a verify-shaped step costs by its number of rows: one sequence of N rows (the last token and N - 1 drafts)
over a cached context, the model's whole forward pass (`ModelRunner.time_rows`, the step-time model speculative
decoding measures at start-up). Extra rows are what speculation spends; on a CPU they should be nearly free.

    .venv/bin/python benchmarks/step_rows.py \\
        --model ~/.cache/tokenmill/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf \\
        --weight-format gguf --gguf-activations int8 --dtype bfloat16

Each row count is timed `--repeats` times, alternating counts (1, 5, 9, ..., 1, 5, 9, ...); prints the median ms per
step and per extra row; writes JSON with the machine description. `--draft-vocab N,...` times every step with the
whole LM head and, right after, with it reduced to the N lowest token ids (spec/draft_vocab.py), as a draft model would
run it with `speculative_draft_vocab=N`:

    .venv/bin/python benchmarks/step_rows.py \\
        --model ~/.cache/tokenmill/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \\
        --weight-format gguf --gguf-activations int8 --dtype bfloat16 --rows 1,2,4 --draft-vocab 32768
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
from tokenmill.model.linear import Linear  # noqa: E402
from tokenmill.spec.draft_vocab import SubsetHead, draft_vocabulary  # noqa: E402


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
    p.add_argument("--draft-vocab", default=None, metavar="N,N,...",
                   help="also time each step with the LM head over the N lowest token ids (and the stop tokens)")
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
    llm = LLM(args.model, **options)
    runner = llm.engine.runner
    heads: dict[str, Linear] = {"whole": runner.lm_head}
    for size in [int(v) for v in args.draft_vocab.split(",")] if args.draft_vocab else []:
        ids = draft_vocabulary(runner.lm_head.out_features, size, llm.engine.tokenizer.stop_token_ids)
        heads[f"{len(ids)} ids"] = SubsetHead(runner.lm_head, ids)
    def time_step(n: int, head: Linear) -> float:
        runner.lm_head = head
        return runner.time_rows(n, rows_per_seq=n, context=args.context)

    for n in rows:  # warm-up: kernels, allocator, caches
        for head in heads.values():
            time_step(n, head)
    times: dict[str, dict[int, list[float]]] = {label: {n: [] for n in rows} for label in heads}
    for _ in range(args.repeats):
        for n in rows:
            for label, head in heads.items():
                times[label][n].append(time_step(n, head))
    medians = {label: {n: statistics.median(t) * 1e3 for n, t in by_rows.items()} for label, by_rows in times.items()}
    print(f"| LM head | rows | ms per step | ms per row past {rows[0]} |\n|---|---|---|---|")
    for label, by_rows in medians.items():
        for n in rows:
            extra = f"{(by_rows[n] - by_rows[rows[0]]) / (n - rows[0]):.1f}" if n != rows[0] else "–"
            print(f"| {label} | {n} | {by_rows[n]:.1f} | {extra} |")
    machine = machine_description()
    print(f"\n{machine.get('cpu', '?')}, {args.weight_format} ({args.gguf_activations} activations), "
          f"{args.context} cached entries, median of {args.repeats}")
    write_json({"args": vars(args), "machine": machine, "busy_warning": warning,
                "ms_per_step": {label: {str(n): m for n, m in by_rows.items()} for label, by_rows in medians.items()},
                "samples_ms": {label: {str(n): [t * 1e3 for t in ts] for n, ts in by_rows.items()}
                               for label, by_rows in times.items()}}, Path(args.output))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
