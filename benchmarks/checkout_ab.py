"""Two checkouts of tokenmill on the same workloads, timed alternately (A, B, A, B...): does a change move speed?

Each measurement is a fresh subprocess whose working directory is the checkout, so it imports that checkout's
`tokenmill` (and builds its kernels into its own extension cache). Two workloads, EOS ignored, greedy unless
`--temperature` (with `--top-p`, `--top-k`; each request seeded by its index) samples:
- offline: `--num-requests` random-token prompts, input/output lengths uniform in the given ranges, one `generate`
  call; output tokens per second;
- single stream: one prompt of `--stream-prompt-len` tokens, `--stream-tokens` generated; time to the first token
  (TTFT: the prompt's chunks, `max_num_batched_tokens=1024` each) and prefill tokens per second, time per output
  token after it (TPOT) and tokens per second.

    .venv/bin/python benchmarks/checkout_ab.py --a /path/to/base --b . --repeats 2
    .venv/bin/python benchmarks/checkout_ab.py --a . --b . --dtype float32 --b-dtype bfloat16   # two dtypes
    .venv/bin/python benchmarks/checkout_ab.py --a /path/to/base --b . --temperature 0.7 --top-p 0.9   # sampled
    .venv/bin/python benchmarks/checkout_ab.py --a /path/to/base --b . --weight-format gguf --gguf-activations int8

Prints a Markdown table with the paired ratios (B / A) and writes JSON with the machine description.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill.bench.machine import busy_warning, git_revision, machine_description  # noqa: E402
from tokenmill.bench.report import write_json  # noqa: E402

# Runs inside the checkout under test; prints one JSON line. Uses only the public API both sides have.
_CHILD = r"""
import json, random, sys, time
import torch
from tokenmill import LLM, SamplingParams
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
llm = LLM(args["model"], dtype=args["dtype"], max_num_seqs=256, max_num_batched_tokens=1024, kv_cache_memory_gib=2.0,
          **args["engine"])
rng = random.Random(args["seed"])
vocab = 49152
def prompt(n):
    return [rng.randrange(100, vocab) for _ in range(n)]
reqs = [(prompt(rng.randint(*args["input"])), rng.randint(*args["output"])) for _ in range(args["num_requests"])]
llm.generate([p for p, _ in reqs[:4]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
def sampling(max_tokens, seed):
    return SamplingParams(max_tokens=max_tokens, temperature=args["temperature"], top_p=args["top_p"],
                          top_k=args["top_k"], seed=seed if args["temperature"] > 0 else None, ignore_eos=True)
params = [sampling(o, i) for i, (_, o) in enumerate(reqs)]
llm.reset_prefix_cache()
start = time.perf_counter()
out = llm.generate([p for p, _ in reqs], params, use_tqdm=False)
offline_s = time.perf_counter() - start
tokens = sum(len(r.token_ids) for r in out)
engine = llm.engine
engine.add_request(prompt(args["stream_prompt"]), sampling(args["stream_tokens"], 0), "stream")
times, first = [], None
stream_start = time.perf_counter()
while engine.has_unfinished_requests():
    got_token = any(o.token_ids for o in engine.step())
    times.append(time.perf_counter())
    first = len(times) - 1 if first is None and got_token else first
tpot = (times[-1] - times[first]) / (len(times) - 1 - first)
ttft = times[first] - stream_start
print(json.dumps({"offline_tok_s": tokens / offline_s, "offline_s": offline_s, "tpot_ms": tpot * 1e3,
                  "stream_tok_s": 1.0 / tpot, "ttft_ms": ttft * 1e3, "prefill_tok_s": args["stream_prompt"] / ttft,
                  "dtype": str(engine.dtype)}))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", required=True, help="checkout A (the reference)")
    p.add_argument("--b", required=True, help="checkout B (the change)")
    p.add_argument("--python", default=sys.executable, help="interpreter with tokenmill's dependencies")
    p.add_argument("--repeats", type=int, default=2, help="A, B pairs")
    p.add_argument("--model", default=None, help="model file (default: the default model)")
    p.add_argument("--weight-format", default=None, help="EngineConfig.weight_format (default: the engine's)")
    p.add_argument("--gguf-activations", default=None, help="EngineConfig.gguf_activations (default: the engine's)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--b-dtype", default=None, help="B's dtype when it differs from A's (--dtype): with --a and --b "
                                                    "the same checkout, an A/B of two dtypes")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--input-len-range", default="32,128")
    p.add_argument("--output-len-range", default="32,128")
    p.add_argument("--stream-prompt-len", type=int, default=128)
    p.add_argument("--stream-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/checkout_ab.json")
    return p.parse_args(argv)


def run_child(checkout: Path, args: argparse.Namespace, ext_dir: Path, dtype: str) -> dict[str, float]:
    config = {"threads": args.threads, "dtype": dtype, "seed": args.seed, "num_requests": args.num_requests,
              "input": [int(v) for v in args.input_len_range.split(",")],
              "output": [int(v) for v in args.output_len_range.split(",")],
              "stream_prompt": args.stream_prompt_len, "stream_tokens": args.stream_tokens,
              "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "model": args.model,
              "engine": {key: value for key, value in (("weight_format", args.weight_format),
                                                       ("gguf_activations", args.gguf_activations)) if value}}
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext_dir), "PYTHONPATH": str(checkout)}
    done = subprocess.run([args.python, "-c", _CHILD, json.dumps(config)], cwd=checkout, env=env, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warning = busy_warning()
    if warning:
        print(warning, file=sys.stderr)
    checkouts = {"A": Path(args.a).resolve(), "B": Path(args.b).resolve()}
    ext_dirs = {name: Path(tempfile.mkdtemp(prefix=f"tokenmill_ab_{name}_")) for name in checkouts}
    runs: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
    for i in range(args.repeats):
        for name, checkout in checkouts.items():
            dtype = args.b_dtype if name == "B" and args.b_dtype else args.dtype
            result = run_child(checkout, args, ext_dirs[name], dtype)
            runs[name].append(result)
            print(f"repeat {i + 1} {name}: {result}", file=sys.stderr)
    rows = []
    for metric, label in (("offline_tok_s", "offline output tok/s"), ("stream_tok_s", "single stream tok/s"),
                          ("tpot_ms", "single stream TPOT ms"), ("ttft_ms", "single stream TTFT ms"),
                          ("prefill_tok_s", "single stream prefill tok/s")):
        ratios = [b[metric] / a[metric] for a, b in zip(runs["A"], runs["B"], strict=True)]
        rows.append((label, statistics.median(r[metric] for r in runs["A"]),
                     statistics.median(r[metric] for r in runs["B"]), ratios))
    print(f"A = {checkouts['A']} ({git_revision(checkouts['A'])}), B = {checkouts['B']} "
          f"({git_revision(checkouts['B'])}), dtype {runs['A'][0]['dtype']} / {runs['B'][0]['dtype']}, "
          f"{args.threads} threads, temperature {args.temperature}, top-p {args.top_p}, top-k {args.top_k}\n")
    print("| metric | A (median) | B (median) | paired B/A |\n|---|---|---|---|")
    for label, a, b, ratios in rows:
        print(f"| {label} | {a:,.1f} | {b:,.1f} | {', '.join(f'{r:.3f}' for r in ratios)} |")
    write_json({"machine": machine_description(), "args": vars(args),
                "revisions": {n: git_revision(c) for n, c in checkouts.items()}, "runs": runs}, Path(args.out))


if __name__ == "__main__":
    main()
