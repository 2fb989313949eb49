"""What one decode step asks of the host: operator calls and compute kernels per step and per layer, from the torch
profiler, beside the step's wall time. On a GPU the eager path launches every kernel from Python, so a step is as
slow as its launches when the kernels are small; this counts them (docs/benchmarks.md, "On an NVIDIA H200").

    .venv/bin/python benchmarks/step_profile.py                      # a tiny random 30-layer model, CPU, eager
    .venv/bin/python benchmarks/step_profile.py --batch 16 --no-eager
    python3 benchmarks/step_profile.py --device cuda --model random.gguf --dtype bfloat16   # on a GPU

On the CPU "kernels" are the leaf operators that compute (views and composite operators left out); on CUDA they
are the device's kernels, with their summed device time: busy / wall is how much of the step the GPU works.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokenmill import LLM, SamplingParams  # noqa: E402
from tokenmill.bench.machine import machine_description  # noqa: E402
from tokenmill.bench.report import write_json  # noqa: E402

# Operators that only re-describe memory or dispatch to others: not counted as kernels on the CPU.
NOT_KERNELS = {"as_strided", "view", "slice", "transpose", "reshape", "expand", "narrow", "unsqueeze", "squeeze", "t",
               "_unsafe_view", "_reshape_alias", "resolve_conj", "resolve_neg", "detach", "alias", "chunk", "split",
               "select", "permute", "to", "contiguous", "empty", "empty_strided", "matmul", "linear", "lift_fresh",
               "unbind", "split_with_sizes", "result_type", "as_strided_", "squeeze_", "unsqueeze_", "resize_",
               "flatten", "new_empty", "empty_like", "_local_scalar_dense", "item"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file (default: a tiny random llama of --layers layers)")
    p.add_argument("--layers", type=int, default=30, help="layers of the default tiny model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--no-eager", action="store_true", help="the engine's default step (the fused one on CPU)")
    p.add_argument("--batch", type=int, default=1, help="requests decoding together")
    p.add_argument("--steps", type=int, default=10, help="decode steps profiled")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", type=Path, default=Path("benchmarks/results/step_profile.json"))
    args = p.parse_args(argv)
    if min(args.layers, args.batch, args.steps, args.threads) < 1:
        p.error("--layers, --batch, --steps and --threads must be >= 1")
    return args


def default_model(layers: int) -> Path:
    from tests.conftest import write_tiny_gguf  # the tests' random-GGUF writer

    path = Path(f"/tmp/tokenmill_step_profile_{layers}.gguf")
    if not path.exists():
        write_tiny_gguf(path, layers=layers, hidden=128, heads=2, kv_heads=1, ff=128, vocab=300, context=1024,
                        metadata={"tokenizer.ggml.merges": [], "tokenizer.ggml.eos_token_id": 0})
    return path


def is_cpu_kernel(event: Any) -> bool:
    """An operator that computes and none of whose callees does (so that each kernel counts once: `mm` itself,
    but the five operators of a decomposed `rms_norm` and not the `rms_norm`)."""
    if not event.name.startswith("aten::") or event.name[6:] in NOT_KERNELS:
        return False
    return not any(is_cpu_kernel(child) for child in event.cpu_children)


def count(prof: Any, cuda: bool) -> dict[str, float]:
    """Operator calls, kernels and (CUDA) device microseconds over the profiled span."""
    calls = kernels = 0
    device_us = 0.0
    for event in prof.events():
        if cuda and event.device_type == torch.autograd.DeviceType.CUDA:
            kernels += 1
            device_us += getattr(event, "device_time", None) or getattr(event, "cuda_time", 0.0)
        elif event.name.startswith("aten::"):
            calls += 1
            kernels += not cuda and is_cpu_kernel(event)
    return {"operator_calls": calls, "kernels": kernels, "device_us": device_us}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = Path(args.model) if args.model else default_model(args.layers)
    llm = LLM(str(model), device=args.device, dtype=args.dtype, enforce_eager=not args.no_eager,
              num_threads=args.threads, enable_prefix_caching=False, num_kv_blocks=64 * args.batch, block_size=16)
    engine, cuda = llm.engine, args.device.startswith("cuda")
    layers = engine.model.cfg.num_layers
    prompts = [[5 + i, 6, 7, 8] for i in range(args.batch)]
    params = SamplingParams(temperature=0, max_tokens=args.steps + 8, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)  # warm-up: allocations and kernel builds
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, params, request_id=f"p{i}")
    for _ in range(4):  # the prefill and a few decodes before the profiled ones
        engine.step()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    walls = []
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            started = time.perf_counter()
            engine.step()
            walls.append(time.perf_counter() - started)
    while engine.has_unfinished_requests():
        engine.step()
    counted = count(prof, cuda)
    per_step = {k: v / args.steps for k, v in counted.items()}
    wall_ms = statistics.median(walls) * 1e3  # under the profiler: its own cost included
    result = {"model": str(model), "layers": layers, "device": args.device, "dtype": str(engine.dtype),
              "backend": type(engine.runner.backend).__name__, "batch": args.batch, "steps": args.steps,
              "wall_ms_per_step_profiled": wall_ms, **{f"{k}_per_step": v for k, v in per_step.items()},
              "kernels_per_layer": per_step["kernels"] / layers,
              "device_busy_fraction": per_step["device_us"] / 1e3 / wall_ms if cuda else None}
    print(f"{result['backend']}, {layers} layers, batch {args.batch}, {args.device} {result['dtype']}: "
          f"{per_step['operator_calls']:.0f} operator calls and {per_step['kernels']:.0f} kernels per step "
          f"({result['kernels_per_layer']:.1f} per layer), {wall_ms:.2f} ms per step under the profiler"
          + (f", GPU busy {per_step['device_us'] / 1e3:.2f} ms of it" if cuda else ""))
    write_json({"benchmark": "step_profile", "args": vars(args), "machine": machine_description(), "result": result},
               args.output)


if __name__ == "__main__":
    main()
