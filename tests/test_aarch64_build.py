"""The CPU kernels on aarch64 (Apple Silicon under Linux, AWS Graviton, Ampere), checked from an x86 machine: every
source cross-compiled against torch's headers for each aarch64 ISA level, and the NEON GGUF tiles run under
qemu-aarch64 by a test program without torch (tests/cpp/gguf_neon_test.cpp). Skips without Debian's
g++-aarch64-linux-gnu (and qemu-user for the run), which .ci/run installs where it can.

The whole extension is not run there: it needs libtorch to link, and there is no aarch64 libtorch here.
"""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from torch.utils.cpp_extension import include_paths

from tokenmill import kernels
from tokenmill.kernels import isa

CROSS = shutil.which("aarch64-linux-gnu-g++")
QEMU = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
ROOT = Path(__file__).resolve().parents[1]
EM_AARCH64 = 183  # ELF e_machine


def compile_for(source: str, out: Path, march: str) -> subprocess.CompletedProcess[str]:
    includes = [flag for path in [*include_paths(), sysconfig.get_paths()["include"]] for flag in ("-isystem", path)]
    # -O1: what is checked is that the code builds; full optimisation would double the time for no more coverage.
    flags = [flag for flag in kernels._CFLAGS if not flag.startswith("-O")]
    # C++17: what older torch releases' extension builders compile with (torch 2.11 on NVIDIA's images does).
    return subprocess.run([CROSS, "-std=c++17", "-fPIC", "-O1", *flags, march, "-DTORCH_EXTENSION_NAME=t",
                           *includes, "-c", source, "-o", str(out)], capture_output=True, text=True, check=False)


@pytest.mark.skipif(CROSS is None, reason="no aarch64 cross compiler (apt-get install g++-aarch64-linux-gnu)")
def test_every_kernel_source_compiles_for_aarch64(tmp_path) -> None:
    # The neon_dotprod level builds every NEON path; the neon level differs only in gguf_matmul.cpp's int8 tiles.
    levels = [(source, "neon_dotprod") for source in kernels._SOURCES]
    levels += [(source, "neon") for source in kernels._SOURCES if source.endswith("gguf_matmul.cpp")]
    jobs = [(source, tmp_path / f"{Path(source).stem}_{level}.o", isa.build_flags(level)[0])
            for source, level in levels]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: compile_for(*job), jobs))
    for (source, out, march), result in zip(jobs, results, strict=True):
        assert result.returncode == 0, f"{Path(source).name} for {march}:\n{result.stderr[-3000:]}"
        header = out.read_bytes()[:20]
        assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == EM_AARCH64


@pytest.mark.skipif(CROSS is None or QEMU is None,
                    reason="no aarch64 cross compiler or no qemu-aarch64 (apt-get install qemu-user)")
@pytest.mark.parametrize("level", list(isa.ARM_LEVELS))
def test_neon_gguf_tiles_match_their_references_under_qemu(tmp_path, level: str) -> None:
    binary = tmp_path / "gguf_neon_test"
    build = subprocess.run([CROSS, "-std=c++17", "-O2", "-ffp-contract=off", *isa.build_flags(level), "-static",
                            f"-I{ROOT}", str(ROOT / "tests" / "cpp" / "gguf_neon_test.cpp"), "-o", str(binary)],
                           capture_output=True, text=True, check=False)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([QEMU, str(binary)], capture_output=True, text=True, check=False, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-1000:]
    int8_tiles = "neon_dotprod" if level == "neon_dotprod" else "none"
    assert run.stdout.strip().splitlines()[-1] == f"OK: exact-weights tiles neon, int8 tiles {int8_tiles}"
