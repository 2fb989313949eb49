"""The CPU kernels build for aarch64 (Apple Silicon under Linux, AWS Graviton, Ampere): every source cross-compiled
to an object file against torch's headers, with the flags the extension builder uses, for the baseline target the
`generic` level gets. Skips without Debian's g++-aarch64-linux-gnu, which .ci/run installs where it can.

Only the build is checked: the kernels need libtorch to link and run, and there is no aarch64 libtorch here. On
aarch64 they run their portable loops (the `generic` level); the Python fallbacks cover a machine without a compiler.
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

CROSS = shutil.which("aarch64-linux-gnu-g++")
EM_AARCH64 = 183  # ELF e_machine


def compile_for(source: str, target: str, out: Path) -> subprocess.CompletedProcess[str]:
    includes = [flag for path in [*include_paths(), sysconfig.get_paths()["include"]] for flag in ("-isystem", path)]
    # -O1: what is checked is that the code builds; full optimisation would double the time for no more coverage.
    flags = [flag for flag in kernels._CFLAGS if not flag.startswith("-O")]
    return subprocess.run([CROSS, "-std=c++20", "-fPIC", "-O1", *flags, f"-march={target}", "-DTORCH_EXTENSION_NAME=t",
                           *includes, "-c", source, "-o", str(out)], capture_output=True, text=True, check=False)


@pytest.mark.skipif(CROSS is None, reason="no aarch64 cross compiler (apt-get install g++-aarch64-linux-gnu)")
def test_every_kernel_source_compiles_for_aarch64(tmp_path) -> None:
    target = "armv8-a"  # what the generic level builds for (no NEON kernels yet, so +dotprod would add nothing)
    sources = kernels._SOURCES
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda s: compile_for(s, target, tmp_path / (Path(s).stem + ".o")), sources))
    for source, result in zip(sources, results, strict=True):
        assert result.returncode == 0, f"{Path(source).name} for {target}:\n{result.stderr[-3000:]}"
        header = (tmp_path / (Path(source).stem + ".o")).read_bytes()[:20]
        assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == EM_AARCH64
