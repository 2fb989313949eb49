"""Choosing the instruction-set level of the CPU kernels (no compiler involved)."""

from __future__ import annotations

import logging

from tokenmill.kernels import isa

ZEN3 = frozenset(["fpu", "sse2", "ssse3", "fma", "sse4_1", "sse4_2", "avx", "f16c", "avx2", "bmi2"])
ZEN4 = ZEN3 | frozenset(["avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni"])
CASCADE_LAKE = ZEN3 | frozenset(["avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_vnni"])
SKYLAKE_X = ZEN3 | frozenset(["avx512f", "avx512dq", "avx512bw", "avx512vl"])


def test_levels_follow_the_cpu_flags() -> None:
    assert isa.supported_levels(ZEN4, "x86_64") == ["avx512bf16", "avx512vnni", "avx512", "avx2", "scalar"]
    assert isa.supported_levels(SKYLAKE_X, "x86_64") == ["avx512", "avx2", "scalar"]
    assert isa.supported_levels(CASCADE_LAKE, "x86_64") == ["avx512vnni", "avx512", "avx2", "scalar"]  # no BF16
    assert isa.supported_levels(ZEN4 - {"avx512_vnni"}, "x86_64") == ["avx512", "avx2", "scalar"]
    assert isa.supported_levels(ZEN3, "x86_64") == ["avx2", "scalar"]
    assert isa.supported_levels(frozenset({"avx2"}), "x86_64") == ["scalar"]  # AVX2 without FMA: not the AVX2 path
    assert isa.supported_levels(frozenset({"fp", "asimd", "asimddp"}), "aarch64") == ["neon_dotprod", "neon"]
    assert isa.supported_levels(frozenset({"fp", "asimd"}), "aarch64") == ["neon"]  # Cortex-A72 (Raspberry Pi 4)
    assert isa.supported_levels(frozenset({"fp", "asimd", "asimddp"}), "riscv64") == [isa.GENERIC]


def test_an_override_can_lower_the_level_but_never_raise_it(caplog) -> None:
    assert isa.choose_level(ZEN4, None, "x86_64") == "avx512bf16"
    assert isa.choose_level(ZEN4, "avx2", "x86_64") == "avx2"
    assert isa.choose_level(ZEN4, "avx512vnni", "x86_64") == "avx512vnni"
    assert isa.choose_level(SKYLAKE_X, "avx512vnni", "x86_64") == "avx512"  # no VNNI: the highest it has
    assert isa.choose_level(ZEN4, "scalar", "x86_64") == "scalar"
    assert isa.choose_level(frozenset({"asimd", "asimddp"}), None, "aarch64") == "neon_dotprod"
    assert isa.choose_level(frozenset({"asimd", "asimddp"}), "neon", "aarch64") == "neon"
    with caplog.at_level(logging.WARNING, logger="tokenmill.kernels.isa"):
        assert isa.choose_level(ZEN3, "avx512bf16", "x86_64") == "avx2"
    assert "not available on this CPU" in caplog.text


def test_flags_are_read_from_cpuinfo_and_every_level_has_a_target() -> None:
    assert isa.cpu_flags("processor\t: 0\nflags\t\t: fpu avx2 fma\n") == frozenset({"fpu", "avx2", "fma"})
    assert isa.cpu_flags("Features\t: fp asimd asimddp\n") == frozenset({"fp", "asimd", "asimddp"})
    assert isa.build_flags("avx2") == ["-march=x86-64-v3"]
    assert isa.build_flags("neon_dotprod") == ["-march=armv8.2-a+dotprod"]
    assert isa.build_flags(isa.GENERIC) == []
    assert all("-march=native" not in isa.build_flags(level) for level in [*isa.X86_LEVELS, *isa.ARM_LEVELS])
