"""Offline throughput (MLPerf "Offline": every request arrives at t=0): tokenmill vs. Hugging Face transformers.

Both backends load the same GGUF, run the same synthetic requests (random prompt token ids, uniform random input
and output lengths, EOS ignored so every request generates exactly its output length), greedy, and are timed
alternately (A, B, A, B...) in one process. Prints a Markdown table and writes JSON with the machine description.

    .venv/bin/python benchmarks/offline_throughput.py            # 256 requests, input/output uniform in [32, 256]
    .venv/bin/python benchmarks/offline_throughput.py --short    # 64 requests, input/output uniform in [16, 64]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.bench.machine import busy_warning, load_average, machine_description, measure_ceilings
from tokenmill.bench.quality import greedy_agreement
from tokenmill.bench.report import write_json
from tokenmill.bench.roofline import count_params, gguf_file, model_config
from tokenmill.config import DTYPES
from tokenmill.model.gguf_file import resolve_model_path
from tokenmill.tokenizer import Tokenizer

BLOCK_SIZE = 16  # tokenmill's default KV block size
SHORT_PRESET = {"num_requests": 64, "input_len_range": (16, 64), "output_len_range": (16, 64)}
Run = dict[str, Any]


# ---- arguments ------------------------------------------------------------------------------------------------


def length_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(",")
    lo, hi = int(low), int(high or low)
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH with 1 <= LOW <= HIGH, got {text!r}")
    return lo, hi


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--backends", default="tokenmill,transformers", help="comma-separated: tokenmill,transformers")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--input-len-range", type=length_range, default=(32, 256), metavar="LOW,HIGH")
    p.add_argument("--output-len-range", type=length_range, default=(32, 256), metavar="LOW,HIGH")
    p.add_argument("--short", action="store_true", help="quick preset: 64 requests, input/output in [16, 64]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-token-id", type=int, default=100, help="prompt ids are drawn from [this, vocab), non-special")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N], for both backends")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per backend, interleaved A,B,A,B")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--num-kv-blocks", type=int, default=None,
                   help="tokenmill KV blocks (default: enough for max-num-seqs of the longest request)")
    p.add_argument("--no-kv-huge-pages", action="store_true", help="tokenmill's KV cache on 4 KiB pages (A/B)")
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--no-ceilings", action="store_true", help="skip measuring memory bandwidth / matmul ceilings")
    p.add_argument("--no-tqdm", action="store_true")
    p.add_argument("--output", default="benchmarks/results/offline_throughput.json")
    args = p.parse_args(argv)
    if args.short:
        for key, value in SHORT_PRESET.items():
            setattr(args, key, value)
    if args.num_requests < 1 or args.repeats < 1 or args.hf_batch_size < 1 or args.threads < 1:
        p.error("--num-requests, --repeats, --hf-batch-size and --threads must be >= 1")
    return args


# ---- model facts and workload -----------------------------------------------------------------------------------


@dataclass
class ModelFacts:
    """Parameter counts from the model config; FLOPs and bytes per step follow from them."""

    path: str
    config: dict[str, Any]
    non_embedding_params: int  # every matmul weight, bias and norm run for every token
    lm_head_params: int  # vocab × hidden, run only for sampled positions (tied or not)
    bytes_per_element: int

    @property
    def weight_bytes_per_step(self) -> int:
        """Weights a forward step reads: the transformer layers plus the LM head (embedding lookup is a gather)."""
        return (self.non_embedding_params + self.lm_head_params) * self.bytes_per_element


def load_model_facts(path: Path, dtype: str) -> tuple[ModelFacts, Tokenizer]:
    cfg = model_config(path)
    non_embedding, lm_head = count_params(cfg)
    element = torch.empty((), dtype=DTYPES[dtype]).element_size()
    facts = ModelFacts(str(path), asdict(cfg), non_embedding, lm_head, element)
    return facts, Tokenizer.from_gguf_metadata(gguf_file(str(path)).metadata)


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def input_lens(self) -> list[int]:
        return [len(p) for p in self.prompts]

    def summary(self) -> dict[str, Any]:
        def stats(values: list[int]) -> dict[str, float]:
            return {"total": sum(values), "mean": statistics.fmean(values), "min": min(values), "max": max(values)}

        return {"num_requests": len(self.prompts), "input_tokens": stats(self.input_lens),
                "output_tokens": stats(self.output_lens)}


def make_workload(args: argparse.Namespace, tokenizer: Tokenizer, vocab_size: int) -> Workload:
    rng = np.random.default_rng(args.seed)
    allowed = np.array([i for i in range(args.min_token_id, vocab_size) if not tokenizer.is_special(i)])
    n = args.num_requests
    input_lens = rng.integers(args.input_len_range[0], args.input_len_range[1] + 1, size=n)
    output_lens = rng.integers(args.output_len_range[0], args.output_len_range[1] + 1, size=n)
    prompts = [rng.choice(allowed, size=int(length)).tolist() for length in input_lens]
    return Workload(prompts, [int(x) for x in output_lens])


# ---- backends -------------------------------------------------------------------------------------------------


class Backend(Protocol):
    name: str
    description: dict[str, Any]

    def warm_up(self) -> None: ...

    def run(self, workload: Workload) -> tuple[Run, list[list[int]]]: ...


class TokenmillBackend:
    """The in-process `LLM`, continuously batching all requests."""

    name = "tokenmill"

    def __init__(self, args: argparse.Namespace, path: Path, workload: Workload) -> None:
        longest = max(i + o for i, o in zip(workload.input_lens, workload.output_lens, strict=True))
        blocks = args.num_kv_blocks or min(args.max_num_seqs, len(workload.prompts)) * math.ceil(
            longest / BLOCK_SIZE) + 1
        self.llm = LLM(model=str(path), dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens, num_kv_blocks=blocks,
                       block_size=BLOCK_SIZE, num_threads=args.threads, kv_huge_pages=not args.no_kv_huge_pages,
                       device=args.device)
        self.use_tqdm = not args.no_tqdm
        engine = self.llm.engine
        self.description = {"dtype": str(engine.dtype), "num_kv_blocks": blocks, "block_size": BLOCK_SIZE,
                            "kv_huge_pages": not args.no_kv_huge_pages,
                            "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                            "max_model_len": engine.max_model_len}

    def warm_up(self) -> None:
        self.llm.generate([[200, 300, 400, 500]] * 2, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                          use_tqdm=False)

    def run(self, workload: Workload) -> tuple[Run, list[list[int]]]:
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in workload.output_lens]
        self.llm.reset_prefix_cache()  # every repeat starts cold
        before = self.llm.engine.stats()
        start = time.perf_counter()
        results = self.llm.generate(workload.prompts, params, use_tqdm=self.use_tqdm)
        wall = time.perf_counter() - start
        after = self.llm.engine.stats()
        outputs = [r.token_ids for r in results]
        check_lengths(self.name, outputs, workload.output_lens)
        run = {"wall_s": wall, "forward_steps": after.steps - before.steps,
               "preemptions": after.num_preemptions - before.num_preemptions,
               "computed_input_tokens": sum(workload.input_lens), "computed_output_tokens": sum(map(len, outputs))}
        return run, outputs


class TransformersBackend:
    """`AutoModelForCausalLM.generate` on left-padded batches taken in arrival order."""

    name = "transformers"

    def __init__(self, args: argparse.Namespace, path: Path, pad_id: int) -> None:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        # Dense weights at the run dtype, as tokenmill runs; newer transformers would otherwise keep the GGUF blocks
        # packed whenever the `kernels` package is installed.
        options = {"quantization_config": transformers.GgufConfig(dequantize=True)} if hasattr(
            transformers, "GgufConfig") else {}
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=DTYPES[args.dtype], **options).eval().to(args.device)
        self.description = {"transformers": transformers.__version__, "weights": sorted(
            {f"{type(m).__name__}:{m.weight.dtype}" for m in self.model.modules() if isinstance(m, torch.nn.Linear)}),
            "attn_implementation": self.model.config._attn_implementation}
        self.batch_size = args.hf_batch_size
        self.pad_id = pad_id
        self.device = torch.device(args.device)

    def _generate(self, prompts: list[list[int]], new_tokens: int) -> torch.Tensor:
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      pad_token_id=self.pad_id)
        return out[:, width:]

    def warm_up(self) -> None:
        self._generate([[200, 300, 400, 500], [600, 700]], 4)

    def run(self, workload: Workload) -> tuple[Run, list[list[int]]]:
        outputs: list[list[int]] = []
        steps = computed_in = computed_out = 0
        start = time.perf_counter()
        for first in range(0, len(workload.prompts), self.batch_size):
            prompts = workload.prompts[first:first + self.batch_size]
            lens = workload.output_lens[first:first + self.batch_size]
            generated = self._generate(prompts, max(lens))
            outputs += [row[:n].tolist() for row, n in zip(generated, lens, strict=True)]
            steps += max(lens)  # one forward per new token (the first is the prefill)
            computed_in += len(prompts) * max(map(len, prompts))
            computed_out += len(prompts) * max(lens)
        wall = time.perf_counter() - start
        check_lengths(self.name, outputs, workload.output_lens)
        run = {"wall_s": wall, "forward_steps": steps, "computed_input_tokens": computed_in,
               "computed_output_tokens": computed_out}
        return run, outputs


def check_lengths(name: str, outputs: list[list[int]], expected: list[int]) -> None:
    wrong = [i for i, (out, n) in enumerate(zip(outputs, expected, strict=True)) if len(out) != n]
    if wrong:
        raise RuntimeError(f"{name}: {len(wrong)} requests did not generate their output length (first: {wrong[0]})")


def make_backends(args: argparse.Namespace, path: Path, workload: Workload, pad_id: int) -> list[Backend]:
    backends: list[Backend] = []
    for name in [b.strip() for b in args.backends.split(",") if b.strip()]:
        if name == "tokenmill":
            backends.append(TokenmillBackend(args, path, workload))
        elif name == "transformers":
            missing = [m for m in ("transformers", "gguf") if importlib.util.find_spec(m) is None]
            if missing:
                print(f"skipping transformers: {' and '.join(missing)} not installed (pip install transformers gguf)")
                continue
            backends.append(TransformersBackend(args, path, pad_id))
        else:
            raise SystemExit(f"unknown backend {name!r}; choose from tokenmill, transformers")
    if not backends:
        raise SystemExit("no backend to run")
    return backends


# ---- metrics ----------------------------------------------------------------------------------------------------


def flops(facts: ModelFacts, tokens: int, sampled: int) -> float:
    """Matmul FLOPs: 2 × non-embedding params per token, plus the LM head for sampled tokens (attention excluded)."""
    return 2.0 * facts.non_embedding_params * tokens + 2.0 * facts.lm_head_params * sampled


def compute_bound_rate(workload: Workload, facts: ModelFacts, ceilings: dict[str, Any] | None) -> float | None:
    """Output tokens/s if every useful matmul FLOP ran at the measured peak: what no backend can exceed here."""
    if not ceilings:
        return None
    n_in, n_out = sum(workload.input_lens), sum(workload.output_lens)
    return ceilings["matmul_gflop_per_s"] * 1e9 * n_out / flops(facts, n_in + n_out, n_out)


def derive(run: Run, workload: Workload, facts: ModelFacts) -> Run:
    wall, steps = run["wall_s"], run["forward_steps"]
    n_in, n_out = sum(workload.input_lens), sum(workload.output_lens)
    computed_in, computed_out = run["computed_input_tokens"], run["computed_output_tokens"]
    return run | {
        "input_tokens": n_in, "output_tokens": n_out,
        "requests_per_s": len(workload.prompts) / wall,
        "output_tok_per_s": n_out / wall,
        "total_tok_per_s": (n_in + n_out) / wall,
        "forward_steps_per_s": steps / wall,
        "weight_gb_per_s": facts.weight_bytes_per_step * steps / wall / 1e9,
        "gflop_per_s": flops(facts, n_in + n_out, n_out) / wall / 1e9,
        "computed_gflop_per_s": flops(facts, computed_in + computed_out, computed_out) / wall / 1e9,
    }


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(runs: list[Run]) -> dict[str, dict[str, float]]:
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float))]
    return {k: spread([float(r[k]) for r in runs]) for k in keys}


# ---- machine ----------------------------------------------------------------------------------------------------


def describe_machine(args: argparse.Namespace, load: list[float]) -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else None
    return machine_description() | {"torch_threads": torch.get_num_threads(), "dtype": args.dtype,
                                    "load_average_at_start": load, "device": args.device, "gpu": gpu}


# ---- running and reporting ------------------------------------------------------------------------------------


def run_interleaved(backends: list[Backend], workload: Workload, facts: ModelFacts,
                    repeats: int) -> tuple[dict[str, list[Run]], dict[str, list[list[int]]]]:
    for backend in backends:
        backend.warm_up()
    runs: dict[str, list[Run]] = {b.name: [] for b in backends}
    outputs: dict[str, list[list[int]]] = {}
    for repeat in range(repeats):
        for backend in backends:
            run, outputs[backend.name] = backend.run(workload)
            runs[backend.name].append(derive(run, workload, facts))
            print(f"repeat {repeat + 1}/{repeats} {backend.name}: {run['wall_s']:.2f} s, "
                  f"{runs[backend.name][-1]['output_tok_per_s']:.1f} output tok/s", flush=True)
    return runs, outputs


def paired_ratios(runs: dict[str, list[Run]], key: str) -> dict[str, float] | None:
    if "tokenmill" not in runs or "transformers" not in runs:
        return None
    return spread([a[key] / b[key] for a, b in zip(runs["tokenmill"], runs["transformers"], strict=True)])


def cell(values: dict[str, float], digits: int, repeats: int) -> str:
    text = f"{values['median']:.{digits}f}"
    return text if repeats == 1 else f"{text} ({values['min']:.{digits}f}–{values['max']:.{digits}f})"


COLUMNS = [("wall s", "wall_s", 2), ("req/s", "requests_per_s", 2), ("output tok/s", "output_tok_per_s", 1),
           ("total tok/s", "total_tok_per_s", 1), ("fwd steps/s", "forward_steps_per_s", 1),
           ("weights GB/s", "weight_gb_per_s", 1), ("GFLOP/s", "gflop_per_s", 1)]


def print_table(summaries: dict[str, dict[str, dict[str, float]]], repeats: int) -> None:
    print("\n| backend | " + " | ".join(label for label, _, _ in COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for name, summary in summaries.items():
        print(f"| {name} | " + " | ".join(cell(summary[key], d, repeats) for _, key, d in COLUMNS) + " |")


def print_notes(report: dict[str, Any]) -> None:
    workload, machine = report["workload"], report["machine"]
    print(f"\n{workload['num_requests']} requests, input {workload['input_tokens']['min']}–"
          f"{workload['input_tokens']['max']} (total {workload['input_tokens']['total']}), output "
          f"{workload['output_tokens']['min']}–{workload['output_tokens']['max']} (total "
          f"{workload['output_tokens']['total']}) tokens; {machine['cpu']}, {machine['cores']} cores, "
          f"torch threads {machine['torch_threads']}, {machine['dtype']}, torch {machine['versions']['torch']}"
          + (f", on {machine['gpu']}" if machine["gpu"] else ""))
    if report["ratio_output_tok_per_s"]:
        r = report["ratio_output_tok_per_s"]
        print(f"tokenmill / transformers output tok/s: {r['median']:.2f}× (paired repeats: {r['min']:.2f}–"
              f"{r['max']:.2f}×)")
    hf = report["results"].get("transformers")
    if hf:
        run = hf["runs"][-1]
        print(f"transformers computed {run['computed_input_tokens']} input + {run['computed_output_tokens']} output "
              f"tokens with padding for {run['input_tokens']} + {run['output_tokens']} useful ones "
              f"({run['computed_gflop_per_s']:.1f} GFLOP/s counting padding)")
    if report["greedy_agreement"]:
        a = report["greedy_agreement"]
        print(f"greedy agreement: {100 * a['identical_sequences']:.0f}% of requests identical, "
              f"{100 * a['prefix_agreement']:.0f}% of tokens before the first difference")
    ceilings = report["ceilings"]
    limits = (f"measured here: read {ceilings['read_gb_per_s']:.1f} GB/s, {machine['dtype']} matmul "
              f"{ceilings['matmul_gflop_per_s']:.0f} GFLOP/s" if ceilings else "ceilings not measured")
    print(f"roofline: weights GB/s = {report['model']['weight_bytes_per_step'] / 1e6:.0f} MB of weights per forward "
          f"step × steps/s (KV reads excluded); GFLOP/s = matmul FLOPs of useful tokens (attention excluded). "
          f"Batched decode is compute-bound, so compare GFLOP/s with the matmul ceiling; {limits}.")
    if report["compute_bound_output_tok_per_s"]:
        ceiling = report["compute_bound_output_tok_per_s"]
        hf_rate = hf["summary"]["output_tok_per_s"]["median"] if hf else None
        versus = f" = {ceiling / hf_rate:.2f}× transformers' rate here" if hf_rate else ""
        print(f"compute-bound ceiling of this workload: {ceiling:.0f} output tok/s (every prompt and output token's "
              f"matmul FLOPs at the measured matmul peak, attention and sampling free){versus}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load = load_average()
    warning = busy_warning()
    if warning:
        print(f"warning: {warning}")
    torch.set_num_threads(args.threads)
    path = resolve_model_path(args.model)
    facts, tokenizer = load_model_facts(path, args.dtype)
    workload = make_workload(args, tokenizer, facts.config["vocab_size"])
    pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    backends = make_backends(args, path, workload, pad_id)
    # The ceilings are the CPU's (memory read, matmul): not measured for a GPU run.
    ceilings = None if args.no_ceilings or args.device != "cpu" else measure_ceilings(args.dtype)
    runs, outputs = run_interleaved(backends, workload, facts, args.repeats)
    names = list(outputs)
    report = {
        "benchmark": "offline_throughput", "args": {k: v for k, v in vars(args).items()},
        "machine": describe_machine(args, load), "ceilings": ceilings,
        "backends": {b.name: b.description for b in backends},
        "model": asdict(facts) | {"weight_bytes_per_step": facts.weight_bytes_per_step},
        "workload": workload.summary(),
        "results": {name: {"summary": summarize(r), "runs": r} for name, r in runs.items()},
        "ratio_output_tok_per_s": paired_ratios(runs, "output_tok_per_s"),
        "ratio_total_tok_per_s": paired_ratios(runs, "total_tok_per_s"),
        "greedy_agreement": greedy_agreement(outputs[names[0]], outputs[names[1]]) if len(names) == 2 else None,
        "compute_bound_output_tok_per_s": compute_bound_rate(workload, facts, ceilings),
    }
    print_table({name: report["results"][name]["summary"] for name in names}, args.repeats)
    print_notes(report)
    write_json(report, Path(args.output))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
