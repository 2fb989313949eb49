"""The machine a benchmark ran on, and its measured ceilings (memory bandwidth, matmul GFLOP/s)."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

SIMD_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")


def cpu_info() -> tuple[str, list[str]]:
    """CPU model name and the SIMD/matrix flags that matter for inference kernels."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    model, flags = "", []
    for line in lines:
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name" and not model:
            model = value
        elif key == "flags" and not flags:
            flags = [f for f in value.split() if f in SIMD_FLAGS]
    return model or platform.processor() or platform.machine(), flags


def git_revision(cwd: str | Path | None = None) -> str | None:
    """Short HEAD of the tokenmill checkout, with +dirty when the tree has changes."""
    cwd = cwd or Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=cwd)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, check=True, cwd=cwd)
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def load_average() -> list[float]:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else []


def machine_description() -> dict[str, Any]:
    model, flags = cpu_info()
    packages = ("torch", "transformers", "llama_cpp_python", "httpx", "tokenmill")
    return {"cpu": model, "cpu_flags": flags, "cores": os.cpu_count(), "load_average_at_start": load_average(),
            "platform": platform.platform(), "python": platform.python_version(),
            "versions": {p: _version(p.replace("_", "-")) for p in packages}, "tokenmill_git": git_revision(),
            "command": " ".join(sys.argv)}


def start_benchmark(threads: int | None) -> str | None:
    """Sets torch's thread count (when given) and prints and returns busy_warning()."""
    if threads:
        import torch  # only the benchmarks that time torch call this

        torch.set_num_threads(threads)
    warning = busy_warning()
    if warning:
        print(f"WARNING: {warning}")
    return warning


def busy_warning(threshold: float = 0.5) -> str | None:
    """A warning when the 1-minute load average says other work shares the cores (numbers would be skewed)."""
    load = load_average()
    if load and load[0] > threshold:
        return (f"load average {load[0]:.2f} before starting on {os.cpu_count()} cores: other processes skew every "
                f"number; quote only results from a quiet machine")
    return None


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> float:
    """Median wall time of `fn` in ms over `repeats` calls, after `warmup` untimed ones (kernel micro-benchmarks)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _best_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_ceilings(dtype: str = "bfloat16", threads: int | None = None) -> dict[str, float]:
    """Large-array read bandwidth (GB/s) and a 2048² matmul's GFLOP/s at `dtype`, best of 5, on `threads`.

    Measured on a thread of its own that then exits: OpenMP keeps a worker pool per thread that ran parallel work,
    and a pool left on the caller's thread would slow down an engine stepped on another thread (see
    `AsyncEngine.from_config`)."""
    result: dict[str, float] = {}
    worker = threading.Thread(target=lambda: result.update(_measure_ceilings(dtype, threads)), name="ceilings")
    worker.start()
    worker.join()
    if not result:
        raise RuntimeError("measuring the machine's ceilings failed (see the traceback above)")
    return result


def _measure_ceilings(dtype: str, threads: int | None) -> dict[str, float]:
    import torch

    from tokenmill.config import DTYPES

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        array = torch.ones(64 * 2**20, dtype=torch.float32)  # 256 MiB, far beyond the caches
        read_s = _best_time(lambda: array.sum(), 5)
        n = 2048
        torch_dtype = DTYPES.get(dtype, torch.float32)
        a, b = torch.randn(n, n).to(torch_dtype), torch.randn(n, n).to(torch_dtype)
        matmul_s = _best_time(lambda: a @ b, 5)
    finally:
        torch.set_num_threads(previous)
    return {"read_gb_per_s": array.numel() * 4 / read_s / 1e9, "matmul_gflop_per_s": 2 * n**3 / matmul_s / 1e9,
            "dtype": dtype, "threads": threads or previous}  # type: ignore[dict-item]
