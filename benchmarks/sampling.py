"""The sampler alone, A/B on the logits of real decode steps: the engine's (`tokenmill/sampler`: top-k, top-p and
min-p over the likeliest 256, then 4,096, then all tokens; the draw by inverse CDF, one uniform per row) against
what it replaced, kept here as the reference (a full sort of every filtered row; the draw as an exponential race,
argmax of p / q with one Exp(1) noise per vocabulary entry).

The logits are the default model's own: it decodes `--batch` chat prompts sampling at temperature 1, and the logits
of one decode step are taken as the runner hands them to the sampler (the model dtype, every row of the batch).
Each setting and batch size (its first rows) is timed with both samplers alternately, the median over --repeats;
printed as ms per step, rows per second, the GB/s of logits each reads (one fp32 copy per row; the reference's
sort and noise read more), and the speedup. Writes JSON.

    .venv/bin/python benchmarks/sampling.py
    .venv/bin/python benchmarks/sampling.py --batch-sizes 1,32 --repeats 21
    .venv/bin/python benchmarks/sampling.py --settings "t=1,t=1 logit_bias 300"    # what a logit bias costs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill import LLM, SamplingParams  # noqa: E402
from tokenmill.bench.machine import machine_description, start_benchmark  # noqa: E402
from tokenmill.bench.report import write_json  # noqa: E402
from tokenmill.sampler.sampler import Sampler, SamplingRow, apply_bias  # noqa: E402

SETTINGS: dict[str, dict[str, Any] | list[dict[str, Any]]] = {
    "t=1": dict(temperature=1.0),
    "t=0.7 top-p 0.9": dict(temperature=0.7, top_p=0.9),
    "t=0.8 top-k 40": dict(temperature=0.8, top_k=40),
    "t=1 min-p 0.05": dict(temperature=1.0, min_p=0.05),
    "t=1 seeded": dict(temperature=1.0, seed=1),
    # OpenAI's logit_bias on 300 tokens spread over the vocabulary: its cost is "t=1" beside it.
    "t=1 logit_bias 300": dict(temperature=1.0, logit_bias={i * 163: -5.0 for i in range(300)}),
    # Requests with different parameters in one batch, row by row in turn.
    "mixed t=1/top-p/top-k": [dict(temperature=1.0), dict(temperature=0.7, top_p=0.9), dict(temperature=0.8, top_k=40)],
}
QUESTIONS = ["Write a short story about a lighthouse keeper.", "Explain how a hash map works.",
             "What are the benefits of exercise?", "Summarize the plot of Hamlet.", "Write a poem about rain.",
             "How do I reverse a list in Python?", "Describe the water cycle.", "Give me three tips for sleep."]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="1,8,32,64")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"among: {'; '.join(SETTINGS)}")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--decode-step", type=int, default=4, help="which decode step's logits (after the prefill)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/sampling.json"))
    return p.parse_args(argv)


class _Capture:
    """The runner's sampler, keeping a copy of the logits of every step with `batch` rows."""

    def __init__(self, sampler: Sampler, batch: int) -> None:
        self.sampler, self.batch, self.seen = sampler, batch, []

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> Any:
        if logits.shape[0] == self.batch:
            self.seen.append(logits.clone())
        return self.sampler(logits, rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sampler, name)


def captured_logits(batch: int, step: int) -> torch.Tensor:
    """The logits the sampler gets at the `step`-th decode step of `batch` chat prompts sampled at temperature 1."""
    llm = LLM(max_num_seqs=batch)
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                                 add_generation_prompt=True) for i in range(batch)]
    capture = llm.engine.runner.sampler = _Capture(llm.engine.runner.sampler, batch)
    llm.generate(prompts, [SamplingParams(temperature=1.0, seed=i, max_tokens=step + 2, ignore_eos=True)
                           for i in range(batch)], use_tqdm=False)
    return capture.seen[min(step, len(capture.seen) - 1)]


def reference_tokens(logits: torch.Tensor, rows: list[SamplingRow], generator: torch.Generator) -> torch.Tensor:
    """The sampler before: the fp32 copy and its clone, a full sort of filtered rows, an exponential race (logit
    biases added as the engine adds them, so that both arms do that work)."""
    biased = logits.float().clone()
    apply_bias(biased, rows)
    scaled = biased / torch.tensor([[r.params.temperature] for r in rows])
    if all(r.params.top_k <= 0 and r.params.top_p >= 1.0 and r.params.min_p <= 0.0 for r in rows):
        probs = torch.softmax(scaled, dim=-1)
    else:
        sorted_logits, sorted_idx = torch.sort(scaled, dim=-1, descending=True)
        vocab = scaled.shape[1]
        top_k = torch.tensor([r.params.top_k if r.params.top_k > 0 else vocab for r in rows]).unsqueeze(1)
        keep = torch.arange(vocab).unsqueeze(0) < top_k
        probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
        top_p = torch.tensor([[r.params.top_p if r.params.top_p < 1.0 else 2.0] for r in rows])
        keep &= (torch.cumsum(probs, dim=-1) - probs) < top_p
        keep &= probs >= torch.tensor([[r.params.min_p] for r in rows]) * probs[:, :1]
        keep[:, 0] = True
        sorted_probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
        probs = torch.zeros_like(sorted_probs).scatter_(1, sorted_idx, sorted_probs)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    for i, row in enumerate(rows):
        if row.generator is not None:
            noise[i] = torch.empty(probs.shape[1]).exponential_(generator=row.generator)
    return (probs / (noise + 1e-20)).argmax(dim=-1)


def sampling_rows(setting: dict[str, Any] | list[dict[str, Any]], batch: int) -> list[SamplingRow]:
    settings = setting if isinstance(setting, list) else [setting]
    params = [SamplingParams(**settings[i % len(settings)]) for i in range(batch)]
    return [SamplingRow(p, (), (), torch.Generator().manual_seed(i) if p.seed is not None else None)
            for i, p in enumerate(params)]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warning = start_benchmark(args.threads)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    logits = captured_logits(max(sizes), args.decode_step)
    print(f"logits: {tuple(logits.shape)} {logits.dtype}, decode step {args.decode_step}, "
          f"{torch.get_num_threads()} threads")
    engine, generator = Sampler(generator=torch.Generator().manual_seed(0)), torch.Generator().manual_seed(0)
    arms = {"reference": lambda x, rows: reference_tokens(x, rows, generator),
            "engine": lambda x, rows: engine(x, rows).token_ids}
    results = []
    print("| setting | rows | reference ms | engine ms | speedup | engine rows/s | engine GB/s |")
    print("|---|---|---|---|---|---|---|")
    for name in args.settings.split(","):
        for batch in sizes:
            x, rows = logits[:batch].contiguous(), sampling_rows(SETTINGS[name], batch)
            times: dict[str, list[float]] = {arm: [] for arm in arms}
            for _ in range(args.repeats + 2):
                for arm, fn in arms.items():
                    start = time.perf_counter()
                    fn(x, rows)
                    times[arm].append(time.perf_counter() - start)
            ref, new = (statistics.median(times[arm][2:]) for arm in arms)  # the first two warm up
            gbs = batch * x.shape[1] * 4 / new / 1e9
            results.append({"setting": name, "rows": batch, "reference_ms": ref * 1e3, "engine_ms": new * 1e3,
                            "speedup": ref / new, "engine_rows_per_s": batch / new, "engine_gb_s": gbs})
            print(f"| {name} | {batch} | {ref * 1e3:.3f} | {new * 1e3:.3f} | {ref / new:.1f}× | {batch / new:,.0f} "
                  f"| {gbs:.2f} |")
    write_json({"machine": machine_description(), "args": vars(args), "busy_warning": warning,
                "logits": {"shape": list(logits.shape), "dtype": str(logits.dtype)}, "results": results}, args.out)


if __name__ == "__main__":
    main()
