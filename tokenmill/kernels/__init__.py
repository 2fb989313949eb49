"""Hand-written C++ kernels, built on first use with PyTorch's extension builder and cached between runs, one build
per instruction-set level (`isa.py`)."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from tokenmill.kernels import isa

logger = logging.getLogger(__name__)

_SOURCES = [str(Path(__file__).with_name(name))
            for name in ("cpu_step.cpp", "attention.cpp", "kv_quant.cpp", "kv_quant_decode.cpp", "gguf_matmul.cpp",
                         "small_gemm.cpp", "bf16_gemm.cpp", "kv_rotate.cpp", "shm_all_reduce.cpp")]
# -ffp-contract=off: no FMA contraction, so fp32 rounding matches the eager operators (see the source's header).
# The target comes from the ISA level, never -march=native, so a cached build is only loaded where it can run.
_CFLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]


@dataclass(frozen=True)
class KernelBuild:
    module: ModuleType | None
    seconds: float
    error: str | None = None
    isa: str = ""


_lock = threading.Lock()
_builds: dict[str, KernelBuild] = {}


def cpu_kernels(level: str | None = None) -> KernelBuild:
    """The compiled CPU kernels (the fused model step, attention, GGUF block matmuls, the row-exact fp32 matmul, greedy
    sampling), built once per source version (torch caches the build on disk, under $TORCH_EXTENSIONS_DIR or
    ~/.cache/torch_extensions); `module` is None with the reason when it cannot be built. `level`: an ISA level this
    CPU supports (default: the highest, or $TOKENMILL_CPU_ISA)."""
    level = level or _default_level()
    build = _builds.get(level)
    if build is not None:  # the GGUF layers ask on every forward: no lock once built
        return build
    with _lock:
        if level not in _builds:
            _builds[level] = _compile(level)
            logger.info("CPU kernels for ISA level %s (%s)", level, " ".join(isa.build_flags(level)) or "default")
        return _builds[level]


@functools.cache
def _default_level() -> str:
    return isa.current_level()


def _compile(level: str) -> KernelBuild:
    started = time.perf_counter()
    # pip installs ninja into the environment's bin, which is not on PATH when the venv is not activated.
    env_bin = str(Path(sys.executable).parent)
    if shutil.which("ninja") is None and env_bin not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = env_bin + os.pathsep + os.environ.get("PATH", "")
    try:
        from torch.utils.cpp_extension import load

        module = load(name=f"tokenmill_cpu_{level}", sources=_SOURCES, extra_cflags=_CFLAGS + isa.build_flags(level),
                      extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # a missing compiler or ninja: the engine falls back to the eager step
        return KernelBuild(None, time.perf_counter() - started, f"{type(exc).__name__}: {exc}", level)
    prefetch_rows = os.environ.get("TOKENMILL_GGUF_PREFETCH_ROWS")  # the GGUF tiles' weight prefetch (0: off)
    if prefetch_rows is not None:
        module.gguf_prefetch_rows(int(prefetch_rows))
    return KernelBuild(module, time.perf_counter() - started, None, level)
