"""Tensor parallelism on one machine: TP=2 (two processes, one thread each, gloo all-reduces) against TP=1 (one
process, two threads) on the same cores, alternated (A, B, A, B), on the eager step, the fused CPU step, or both
(`--steps`; the fused step all-reduces through a callback from its C++ layer loop).

The model is random, of the llama architecture and SmolLM2-135M's size class but with 16 heads and 4 KV heads
(SmolLM2's 9 and 3 do not split in two): what is measured is the cost of the split and the all-reduces, not
text. Single stream: TPOT of 128 generated tokens after a 128-token prompt; batch: output tokens per second of 16
such requests at once. Bandwidth: the weight bytes a decode step reads (a rank reads its half and the whole LM
head) over TPOT.

    .venv/bin/python benchmarks/tensor_parallel.py [--repeats 2] [--steps eager,fused] [--dtype float32] [--gloo]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "tensor_parallel.json"


def build_model(path: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.conftest import write_tiny_gguf  # the tests' random-GGUF writer, at a realistic size

    if not path.exists():
        write_tiny_gguf(path, layers=16, hidden=1024, heads=16, kv_heads=4, ff=2816, vocab=32000, context=2048)
    return path


def measure(llm: Any, batch: int, prompt_len: int, tokens: int) -> dict[str, float]:
    from tokenmill import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    prompts = [[3 + (i * 7 + j) % 30000 for j in range(prompt_len)] for i in range(batch)]
    start = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    generated = sum(len(r.token_ids) for r in results)
    return {"seconds": seconds, "output_tok_s": generated / seconds}


def single_stream(llm: Any, prompt_len: int, tokens: int) -> float:
    """TPOT in ms: the time of `tokens` generated tokens minus that of one, over tokens - 1."""
    one = measure(llm, 1, prompt_len, 1)["seconds"]
    whole = measure(llm, 1, prompt_len, tokens)["seconds"]
    return (whole - one) / (tokens - 1) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", default="eager,fused", help="comma-separated: eager, fused")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="bfloat16: the fused step's weights prepacked (after the split)")
    parser.add_argument("--gloo", action="store_true",
                        help="also TP=2 with its all-reduces over gloo instead of shared memory")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()

    from tokenmill import LLM
    from tokenmill.bench.machine import machine_description
    from tokenmill.bench.report import write_json

    model = build_model(ROOT / "benchmarks" / "results" / "tp_random_llama.gguf")
    # One engine at a time, built for its measurement and closed after it: a process holds one tensor-parallel
    # group, and an engine sets the process's thread count when it is built.
    arms = {}
    for step in args.steps.split(","):
        common = {"enforce_eager": step == "eager", "dtype": args.dtype, "num_kv_blocks": 512,
                  "prepack_weights": step == "fused"}
        arms[f"{step}, TP=1, 2 threads"] = {"num_threads": 2, **common}
        arms[f"{step}, TP=2, 1 thread each"] = {"num_threads": 1, "tensor_parallel_size": 2, **common}
        if args.gloo:
            arms[f"{step}, TP=2 over gloo"] = {"num_threads": 1, "tensor_parallel_size": 2,
                                               "shared_memory_all_reduce": False, **common}
    bytes_per_step: dict[str, int] = {}
    rows: dict[str, list[dict[str, float]]] = {label: [] for label in arms}
    for repeat in range(args.repeats):
        for label, options in arms.items():
            llm = LLM(str(model), **options)
            try:
                bytes_per_step[label] = llm.engine.model.weight_bytes()
                measure(llm, 2, 16, 4)  # warm-up, not measured
                tpot = single_stream(llm, 128, args.tokens)
                batch = measure(llm, args.batch, 128, args.tokens)["output_tok_s"]
            finally:
                llm.engine.close()
            gbs = bytes_per_step[label] / (tpot / 1000) / 1e9
            rows[label].append({"tpot_ms": tpot, "batch_output_tok_s": batch, "weights_gb_s": gbs})
            print(f"repeat {repeat} {label}: TPOT {tpot:.1f} ms ({gbs:.1f} GB/s of weights), batch of "
                  f"{args.batch}: {batch:.1f} output tok/s", flush=True)
    median = {label: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for label, runs in rows.items()}
    print(f"\n{args.dtype}\n| configuration | TPOT (ms) | weights GB/s per rank | "
          f"batch of {args.batch}, output tok/s |")
    print("|---|---|---|---|")
    for label, m in median.items():
        print(f"| {label} | {m['tpot_ms']:.1f} | {m['weights_gb_s']:.1f} | {m['batch_output_tok_s']:.1f} |")
    write_json({"machine": machine_description(), "args": vars(args), "bytes_per_step": bytes_per_step,
                "runs": rows, "median": median}, Path(args.output))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
