"""How far prompt lookup can go on real prompts: drafting replayed over the model's own greedy outputs.

The engine writes each prompt's greedy output once (speculation off); `tokenmill.bench.lookup_replay` then replays
drafters over it, counting verify steps and rows without timing them:
- chain: the engine's n-gram proposer (`spec/ngram.py`) with each `--chains` setting (min-max n, k) and the
  engine's adaptive lengths, as the speculator drafts for a request decoding alone;
- tree: the W most recent distinct continuations of the longest matching suffix (W = `--widths`), all verified in
  one step (rows counted as a token tree's: shared prefixes once), the longest accepted one kept;
- copy bound: the longest run of the coming output found anywhere in the context, the most any lookup drafter
  could accept per step.
The projected decode speedup divides the output's 1-row steps by the replayed steps, each priced by the step-cost
model the engine measures at start-up for adaptive lengths (the forward pass alone). The same categories and prompts
as `benchmarks/speculative.py`.

    .venv/bin/python benchmarks/prompt_lookup_replay.py [--num-prompts 12] [--categories summarization,rag]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import speculative as spec_bench  # noqa: E402

from tokenmill import LLM, SamplingParams  # noqa: E402
from tokenmill.bench.lookup_replay import Replay, copy_bound, replay_chain, replay_tree  # noqa: E402
from tokenmill.bench.machine import busy_warning, machine_description  # noqa: E402
from tokenmill.bench.report import write_json  # noqa: E402
from tokenmill.spec.adaptive import StepCostModel  # noqa: E402
from tokenmill.spec.ngram import NgramProposer  # noqa: E402

COST_ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--categories", default=",".join(c.name for c in spec_bench.CATEGORIES))
    p.add_argument("--num-prompts", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-prompt-tokens", type=int, default=1024)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--chains", default="2-4:5,1-4:5,1-4:8", help="min_n-max_n:k, comma-separated")
    p.add_argument("--widths", default="1,2,4,8", help="tree widths (n 1-4, k 5)")
    p.add_argument("--output", type=Path, default=Path("benchmarks/results/prompt_lookup_replay.json"))
    return p.parse_args()


def chain_guess(min_n: int, max_n: int) -> Any:
    proposer = NgramProposer(min_n, max_n)

    def guess(tokens: list[int], k: int) -> list[int]:
        return proposer.propose("replay", tokens, (), k)  # one proposer per output: its index grows with it

    return guess


def row(name: str, label: str, r: Replay, with_rows: bool = True) -> dict[str, Any]:
    line = {"category": name, "drafter": label, "tokens_per_step": r.tokens_per_step, "steps": r.steps}
    if with_rows:
        line |= {"rows_per_step": r.rows / r.steps, "acceptance": r.acceptance, "projected_speedup": r.speedup}
    return line


def main() -> None:
    args = parse_args()
    warning = busy_warning()
    if warning:
        print(warning)
    llm = LLM(dtype=args.dtype, max_num_batched_tokens=args.max_prompt_tokens)
    cost = StepCostModel.measure(llm.engine.runner.time_rows, COST_ROWS, repeats=3)
    print("step-cost model: " + ", ".join(f"{n} rows {t * 1e3:.1f} ms" for n, t in zip(cost.rows, cost.seconds,
                                                                                      strict=True)))
    chains = [(int(s.split("-")[0]), int(s.split("-")[1].split(":")[0]), int(s.split(":")[1]))
              for s in args.chains.split(",")]
    widths = [int(w) for w in args.widths.split(",")]
    bench_args = spec_bench.parse_args(["--categories", args.categories])
    rows: list[dict[str, Any]] = []
    for category in (c for c in spec_bench.CATEGORIES if c.name in bench_args.categories):
        loaded = spec_bench.load_category(category, bench_args, llm.engine.tokenizer, args.max_prompt_tokens,
                                          args.num_prompts)
        if loaded is None:
            continue
        prompts = loaded[0]
        results = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=args.max_tokens), use_tqdm=False)
        pairs = [(p, list(r.outputs[0].token_ids)) for p, r in zip(prompts, results, strict=True)]
        for min_n, max_n, k in chains:
            total = sum((replay_chain(p, o, chain_guess(min_n, max_n), k, cost) for p, o in pairs), Replay())
            rows.append(row(category.name, f"chain n {min_n}-{max_n}, k {k}, adaptive", total))
        for width in widths:
            total = sum((replay_tree(p, o, width, 5, 1, 4, cost) for p, o in pairs), Replay())
            rows.append(row(category.name, f"tree width {width}, n 1-4, k 5", total))
        total = sum((copy_bound(p, o, 5) for p, o in pairs), Replay())
        rows.append(row(category.name, "copy bound, k 5", total, with_rows=False))
        for line in rows[-(len(chains) + len(widths) + 1):]:
            print(line)
    print("\n| category | drafter | tokens/step | rows/step | acceptance | projected decode speedup |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        extra = (f"{r['rows_per_step']:.1f} | {r['acceptance']:.0%} | {r['projected_speedup']:.2f}×"
                 if "rows_per_step" in r else "– | – | –")
        print(f"| {r['category']} | {r['drafter']} | {r['tokens_per_step']:.2f} | {extra} |")
    write_json({"machine": machine_description(), "args": {k: str(v) for k, v in vars(args).items()},
                "step_cost": {"rows": cost.rows, "seconds": cost.seconds}, "rows": rows}, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
