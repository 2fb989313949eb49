"""Which instruction-set level the CPU kernels are built for: detected once from the CPU, lowered on request.

Each level is compiled with explicit target flags instead of -march=native and cached under a name that carries the
level, so a build cached on one machine (a shared home directory, an image baked elsewhere) only ever loads on a CPU
that has its instructions; a CPU without them picks a lower level and its own build.
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path

logger = logging.getLogger(__name__)

ENV_VAR = "TOKENMILL_CPU_ISA"
# Highest first. The flags name everything the kernels test for (__AVX512BF16__, __AVX512VNNI__, __AVX512BW__,
# __AVX512F__, __AVX2__, __FMA__, __F16C__): x86-64-v3 is AVX2 + FMA + F16C (+ BMI), x86-64-v4 adds AVX-512
# F/BW/DQ/VL/CD. Every CPU with AVX512-BF16 (Cooper Lake, Sapphire Rapids, Zen 4) also has AVX512-VNNI; one with
# VNNI but not BF16 (Cascade Lake, Ice Lake) runs avx512vnni: the int8-activation GGUF tiles on VNNI, the rest as
# avx512.
X86_LEVELS: dict[str, tuple[frozenset[str], list[str]]] = {
    "avx512bf16": (frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16", "avx512_vnni", "avx2",
                              "fma", "f16c"}),
                   ["-march=x86-64-v4", "-mavx512bf16", "-mavx512vnni"]),
    "avx512vnni": (frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx2", "fma", "f16c"}),
                   ["-march=x86-64-v4", "-mavx512vnni"]),
    "avx512": (frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma", "f16c"}),
               ["-march=x86-64-v4"]),
    "avx2": (frozenset({"avx2", "fma", "f16c"}), ["-march=x86-64-v3"]),
    "scalar": (frozenset(), ["-march=x86-64"]),
}
# aarch64: Advanced SIMD (NEON) is part of the base architecture; the int8 dot product (SDOT, `asimddp`: Apple M1
# on, Graviton 2 on, Ampere Altra, Cortex-A55/A76 on) adds the int8-activation GGUF tiles.
ARM_LEVELS: dict[str, tuple[frozenset[str], list[str]]] = {
    "neon_dotprod": (frozenset({"asimd", "asimddp"}), ["-march=armv8.2-a+dotprod"]),
    "neon": (frozenset(), ["-march=armv8-a"]),
}
GENERIC = "generic"  # other architectures: the compiler's default target


_LEVELS_BY_MACHINE = {"x86_64": X86_LEVELS, "AMD64": X86_LEVELS, "aarch64": ARM_LEVELS, "arm64": ARM_LEVELS}


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def supported_levels(flags: frozenset[str], machine: str | None = None) -> list[str]:
    """Every level this CPU can run, highest first."""
    machine = machine or platform.machine()
    table = _LEVELS_BY_MACHINE.get(machine)
    if table is None:
        return [GENERIC]
    return [level for level, (needs, _) in table.items() if needs <= flags]


def choose_level(flags: frozenset[str], requested: str | None, machine: str | None = None) -> str:
    """The highest supported level, or `requested` (TOKENMILL_CPU_ISA) where the CPU supports it; a level the CPU
    lacks falls back to the highest it has, with a warning, rather than crash on an illegal instruction."""
    levels = supported_levels(flags, machine)
    if not requested:
        return levels[0]
    if requested in levels:
        return requested
    logger.warning("%s=%s is not available on this CPU (it supports %s); using %s", ENV_VAR, requested,
                   ", ".join(levels), levels[0])
    return levels[0]


def build_flags(level: str) -> list[str]:
    return [] if level == GENERIC else list({**X86_LEVELS, **ARM_LEVELS}[level][1])


def current_level() -> str:
    return choose_level(cpu_flags(), os.environ.get(ENV_VAR))
