"""CPU fast path A/B: single-stream decode, prefill and offline throughput for each weight format next to
llama.cpp (llama-cpp-python, in process) on the same prompt tokens; achieved GB/s and percent of the speed of light
(weight bytes per token over measured read bandwidth); perplexity and greedy agreement for each lossy format.
Prints a table, writes JSON.

    .venv/bin/python benchmarks/cpu_decode.py                       # all settings + llama.cpp if installed
    .venv/bin/python benchmarks/cpu_decode.py --settings gguf,gguf:eager --no-quality --profile gguf

A setting is FORMAT[@GROUP][+int8|+onednn][:eager]: a weight format, the int4 group size, `+int8` for gguf or q4 weights
with int8 activations (`--gguf-activations int8`), `+onednn` for float weights in bf16 on oneDNN's matmul instead of
tokenmill's row-exact one (`--bf16-kernel onednn`), and `:eager` for the plain PyTorch operators instead of the fused
C++ decode step (the A/B of that optimization).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tokenmill import SamplingParams
from tokenmill.attention.fused_cpu import FusedCPUBackend
from tokenmill.bench.machine import machine_description, measure_ceilings
from tokenmill.bench.quality import greedy_agreement, perplexity
from tokenmill.bench.report import write_json
from tokenmill.bench.roofline import gguf_file, gguf_memory_model
from tokenmill.config import EngineConfig
from tokenmill.engine import LLMEngine
from tokenmill.kernels import cpu_kernels
from tokenmill.model.gguf_file import resolve_model_path
from tokenmill.model.linear import WEIGHT_FORMATS
from tokenmill.tokenizer import Tokenizer

TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare_first_half.txt"
DEFAULT_SETTINGS = "float,float:eager,int8,int4,int4@64,gguf,gguf+int8,gguf:eager"  # 128 does not divide 576


@dataclass(frozen=True)
class Setting:
    weight_format: str
    group_size: int = 32
    eager: bool = False
    gguf_activations: str = "bf16"
    bf16_kernel: str = "tokenmill"

    @classmethod
    def parse(cls, text: str) -> Setting:
        body, _, mode = text.partition(":")
        body, _, activations = body.partition("+")
        fmt, _, group = body.partition("@")
        if (fmt not in WEIGHT_FORMATS or mode not in ("", "eager") or (group and fmt != "int4")
                or activations not in ("", "int8", "onednn") or (activations == "int8" and fmt not in ("gguf", "q4"))
                or (activations == "onednn" and fmt != "float")):
            raise ValueError(f"bad setting {text!r}: expected FORMAT[@GROUP][+int8|+onednn][:eager], FORMAT in "
                             f"{WEIGHT_FORMATS}, a group only for int4, +int8 only for gguf and q4, +onednn only "
                             "for float")
        return cls(fmt, int(group) if group else 32, mode == "eager", "int8" if activations == "int8" else "bf16",
                   "onednn" if activations == "onednn" else "tokenmill")

    @property
    def name(self) -> str:
        group = f"@{self.group_size}" if self.weight_format == "int4" and self.group_size != 32 else ""
        activations = "+int8" if self.gguf_activations == "int8" else "+onednn" if self.bf16_kernel == "onednn" else ""
        return f"{self.weight_format}{group}{activations}{':eager' if self.eager else ''}"


@dataclass
class Result:
    name: str
    bytes_per_token: int
    startup_s: float = 0.0
    prefill_tok_s: float = 0.0
    decode_tok_s: float = 0.0
    offline_tok_s: float = 0.0
    decode_gb_s: float = 0.0
    percent_of_light: float = 0.0
    quality: dict[str, Any] = field(default_factory=dict)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--settings", default=DEFAULT_SETTINGS,
                   help="comma-separated FORMAT[@GROUP][+int8|+onednn][:eager] (see the module docstring)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--prefill-len", type=int, default=256, help="prompt tokens for the prefill measurement")
    p.add_argument("--decode-prompt-len", type=int, default=32)
    p.add_argument("--decode-len", type=int, default=128, help="tokens generated in the single-stream run")
    p.add_argument("--offline-requests", type=int, default=32)
    p.add_argument("--offline-len", type=int, default=128, help="prompt and output tokens of each offline request")
    p.add_argument("--repeats", type=int, default=3, help="single-stream runs per setting (median reported)")
    p.add_argument("--no-llama-cpp", action="store_true")
    p.add_argument("--no-quality", action="store_true")
    p.add_argument("--agreement-prompts", type=int, default=64,
                   help="64-token prompts whose 32 greedy tokens are compared with the exact path")
    p.add_argument("--profile", default=None, help="setting whose decode step is profiled (top ops by time)")
    p.add_argument("--bandwidth-gb-s", type=float, default=31.0,
                   help="read bandwidth for the speed of light (default: 29-33 GB/s on 2 threads, "
                        "../shared/benchmarking.md); the quick probe's figure is recorded beside it")
    p.add_argument("--output", default="benchmarks/results/cpu_decode.json")
    return p.parse_args(argv)


@functools.cache
def text() -> str:
    return TEXT.read_text()


def build_prompts(model_path: Path, args: argparse.Namespace) -> dict[str, list[list[int]]]:
    """Every prompt set of the run, tokenized once: consecutive stretches of the text, exactly as long as asked."""
    ids = Tokenizer.from_gguf_metadata(gguf_file(str(model_path)).metadata).encode(text())

    def cut(count: int, length: int) -> list[list[int]]:
        if len(ids) < count * length:
            raise ValueError(f"text has {len(ids)} tokens, need {count * length}")
        return [ids[i * length : (i + 1) * length] for i in range(count)]

    return {"prefill": cut(1, args.prefill_len), "decode": cut(1, args.decode_prompt_len),
            "offline": cut(args.offline_requests, args.offline_len), "quality": cut(args.agreement_prompts, 64)}


def run_to_end(engine: LLMEngine, prompts: list[list[int]],
               max_tokens: int) -> tuple[dict[str, list[int]], list[float]]:
    """Generate greedily for all prompts at once; returns token ids per request and the time of each step."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    outputs: dict[str, list[int]] = {}
    times = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = list(out.token_ids)
        times.append(time.perf_counter())
    return {i: outputs[i] for i in ids}, times


def measure_tokenmill(setting: Setting, prompts: dict[str, list[list[int]]],
                      args: argparse.Namespace) -> tuple[Result, LLMEngine]:
    started = time.perf_counter()
    engine = LLMEngine(EngineConfig(model=args.model, weight_format=setting.weight_format,
                                    int4_group_size=setting.group_size, enforce_eager=setting.eager,
                                    gguf_activations=setting.gguf_activations, bf16_kernel=setting.bf16_kernel,
                                    num_threads=args.threads,
                                    enable_prefix_caching=False, max_num_batched_tokens=1024,
                                    kv_cache_memory_gib=1.0))
    if not setting.eager and not isinstance(engine.runner.backend, FusedCPUBackend):
        raise SystemExit(f"{setting.name}: the fused decode step is unavailable here (see the warning above)")
    result = Result(setting.name, engine.model.weight_bytes(), startup_s=time.perf_counter() - started)
    prefill_prompt, decode_prompt = prompts["prefill"], prompts["decode"]
    run_to_end(engine, decode_prompt, 8)  # warm-up
    prefill, decode = [], []
    for _ in range(args.repeats):
        begin = time.perf_counter()
        run_to_end(engine, prefill_prompt, 1)
        prefill.append(args.prefill_len / (time.perf_counter() - begin))
        _, times = run_to_end(engine, decode_prompt, args.decode_len)
        decode.append((len(times) - 1) / (times[-1] - times[0]))
    result.prefill_tok_s, result.decode_tok_s = statistics.median(prefill), statistics.median(decode)
    begin = time.perf_counter()
    outputs, _ = run_to_end(engine, prompts["offline"], args.offline_len)
    result.offline_tok_s = sum(len(o) for o in outputs.values()) / (time.perf_counter() - begin)
    return result, engine


def profile_decode(engine: LLMEngine, prompt: list[int], steps: int = 20) -> list[dict[str, Any]]:
    """Top operators of single-stream decode steps, milliseconds per step."""
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(max_tokens=steps + 10, temperature=0, ignore_eos=True)
    engine.add_request(prompt, params)
    for _ in range(5):
        engine.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        begin = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall_ms = (time.perf_counter() - begin) / steps * 1e3
    while engine.has_unfinished_requests():
        engine.step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    in_ops_ms = sum(e.self_cpu_time_total for e in events) / 1e3 / steps
    rows = [{"op": e.key, "ms_per_step": e.self_cpu_time_total / 1e3 / steps, "calls_per_step": e.count / steps}
            for e in events[:12]]
    # The fused step's own loops (norms, RoPE, attention, SwiGLU) are not PyTorch operators: they show up here.
    outside = {"op": "(outside PyTorch operators: fused C++ loops, Python)", "ms_per_step": wall_ms - in_ops_ms,
               "calls_per_step": 1}
    return [{"op": "(wall time of one step, profiler on)", "ms_per_step": wall_ms, "calls_per_step": 1}, *rows,
            outside]


def measure_llama_cpp(model_path: Path, prompts: dict[str, list[list[int]]], args: argparse.Namespace) -> Result | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama.cpp peer skipped: pip install llama-cpp-python", file=sys.stderr)
        return None
    file_bytes = gguf_memory_model(model_path).weight_bytes
    started = time.perf_counter()
    llm = Llama(model_path=str(model_path), n_ctx=2048, n_batch=512, n_threads=args.threads,
                n_threads_batch=args.threads, verbose=False)
    result = Result("llama.cpp (the same file)", file_bytes, startup_s=time.perf_counter() - started)

    def generate(prompt: list[int], count: int) -> list[float]:
        times = []
        for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            times.append(time.perf_counter())
            if len(times) == count:
                break
        return times

    generate(prompts["decode"][0], 8)  # warm-up
    prefill, decode = [], []
    for _ in range(args.repeats):
        llm.reset()
        begin = time.perf_counter()
        llm.eval(prompts["prefill"][0])
        prefill.append(len(prompts["prefill"][0]) / (time.perf_counter() - begin))
        times = generate(prompts["decode"][0], args.decode_len)
        decode.append((len(times) - 1) / (times[-1] - times[0]))
    result.prefill_tok_s, result.decode_tok_s = statistics.median(prefill), statistics.median(decode)
    begin = time.perf_counter()
    generated = sum(len(generate(p, args.offline_len)) for p in prompts["offline"])  # one sequence at a time
    result.offline_tok_s = generated / (time.perf_counter() - begin)
    return result


def quality(engine: LLMEngine, reference: dict[str, Any]) -> dict[str, Any]:
    ppl = perplexity(engine, text()[200_000:], window=512, max_windows=4)
    outputs, _ = run_to_end(engine, reference["prompts"], 32)
    agreement = greedy_agreement(list(outputs.values()), reference["outputs"])
    return {"perplexity": round(ppl.perplexity, 3), "scored_tokens": ppl.tokens, **agreement}


def exact_reference(prompts: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    """Greedy outputs of the exact path (fp32, float weights = the file's values) for the agreement measure."""
    engine = LLMEngine(EngineConfig(model=args.model, dtype="float32", num_threads=args.threads,
                                    enable_prefix_caching=False, enforce_eager=True))
    outputs, _ = run_to_end(engine, prompts, 32)
    ppl = perplexity(engine, text()[200_000:], window=512, max_windows=4)
    return {"prompts": prompts, "outputs": list(outputs.values()), "perplexity": round(ppl.perplexity, 3)}


def print_table(results: list[Result], read_gb_s: float) -> None:
    print(f"\nread bandwidth {read_gb_s:.1f} GB/s (speed of light = bandwidth / weight bytes per token)")
    head = (f"{'setting':28s} {'MB/tok':>7s} {'start s':>8s} {'prefill t/s':>12s} {'decode t/s':>11s} "
            f"{'GB/s':>6s} {'%light':>7s} {'offline t/s':>12s} {'ppl':>7s} {'agree':>6s}")
    print(head)
    print("-" * len(head))
    for r in results:
        ppl = r.quality.get("perplexity")
        agree = r.quality.get("prefix_agreement")
        print(f"{r.name:28s} {r.bytes_per_token / 1e6:7.1f} {r.startup_s:8.1f} {r.prefill_tok_s:12.1f} "
              f"{r.decode_tok_s:11.1f} {r.decode_gb_s:6.1f} {r.percent_of_light:6.1f}% {r.offline_tok_s:12.1f} "
              f"{'' if ppl is None else f'{ppl:.2f}':>7s} {'' if agree is None else f'{agree:.2f}':>6s}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        settings = [Setting.parse(s) for s in args.settings.split(",") if s]
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    torch.set_num_threads(args.threads)
    ceilings = measure_ceilings("bfloat16", args.threads)
    read_gb_s = args.bandwidth_gb_s
    model_path = resolve_model_path(args.model)
    prompts = build_prompts(model_path, args)
    reference = None if args.no_quality else exact_reference(prompts["quality"], args)
    results: list[Result] = []
    profiles: dict[str, Any] = {}
    for setting in settings:
        result, engine = measure_tokenmill(setting, prompts, args)
        if reference is not None:
            result.quality = quality(engine, reference)
        if setting.name == args.profile:
            profiles[setting.name] = profile_decode(engine, prompts["decode"][0])
        results.append(result)
        print(f"{setting.name}: decode {result.decode_tok_s:.1f} tok/s, prefill {result.prefill_tok_s:.1f} tok/s, "
              f"offline {result.offline_tok_s:.1f} tok/s", flush=True)
        del engine
    if not args.no_llama_cpp:
        peer = measure_llama_cpp(model_path, prompts, args)
        if peer is not None:
            results.append(peer)
    for r in results:
        r.decode_gb_s = r.bytes_per_token * r.decode_tok_s / 1e9
        r.percent_of_light = 100 * r.decode_gb_s / read_gb_s
    kernels = cpu_kernels()
    isa_path = {"level": kernels.isa, "gguf_tiles": kernels.module.gguf_isa() if kernels.module else None,
                "gguf_int8_tiles": kernels.module.gguf_int8_isa() if kernels.module else None}
    print(f"\nCPU {machine_description()['cpu']}; kernel ISA level {isa_path['level']}, GGUF tiles "
          f"{isa_path['gguf_tiles']} (bf16 activations), {isa_path['gguf_int8_tiles']} (int8)")
    print_table(results, read_gb_s)
    if reference is not None:
        print(f"exact path (fp32, float weights): perplexity {reference['perplexity']:.2f}")
    for name, rows in profiles.items():
        print(f"\nprofile of one single-stream decode step, {name}:")
        for row in rows:
            print(f"  {row['ms_per_step']:7.3f} ms  {row['calls_per_step']:6.1f}x  {row['op']}")
    report = {"machine": machine_description(), "isa": isa_path, "ceilings": ceilings, "args": vars(args),
              "exact_perplexity": None if reference is None else reference["perplexity"],
              "results": [asdict(r) for r in results], "profiles": profiles}
    write_json(report, Path(args.output))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
