"""Hand-written C++ kernels, built on first use with PyTorch's extension builder and cached between runs."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

_SOURCES = [str(Path(__file__).with_name(name)) for name in ("cpu_step.cpp", "attention.cpp", "gguf_matmul.cpp")]
# -ffp-contract=off: no FMA contraction, so fp32 rounding matches the eager operators (see the source's header).
_CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]


@dataclass(frozen=True)
class KernelBuild:
    module: ModuleType | None
    seconds: float
    error: str | None = None


_lock = threading.Lock()
_build: KernelBuild | None = None


def cpu_kernels() -> KernelBuild:
    """The compiled CPU kernels (the fused model step, attention, GGUF block matmuls, greedy sampling), built once
    per source version (torch caches the build on disk, under $TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions);
    `module` is None with the reason when it cannot be built."""
    global _build
    if _build is not None:  # the GGUF layers ask on every forward: no lock once built
        return _build
    with _lock:
        if _build is None:
            _build = _compile()
        return _build


def _compile() -> KernelBuild:
    started = time.perf_counter()
    # pip installs ninja into the environment's bin, which is not on PATH when the venv is not activated.
    env_bin = str(Path(sys.executable).parent)
    if shutil.which("ninja") is None and env_bin not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = env_bin + os.pathsep + os.environ.get("PATH", "")
    try:
        from torch.utils.cpp_extension import load

        module = load(name="tokenmill_cpu", sources=_SOURCES, extra_cflags=_CFLAGS,
                      extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # a missing compiler or ninja: the engine falls back to the eager step
        return KernelBuild(None, time.perf_counter() - started, f"{type(exc).__name__}: {exc}")
    return KernelBuild(module, time.perf_counter() - started)
