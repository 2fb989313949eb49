"""Whether a model will fit in memory, answered before its weights are loaded.

On Linux a process that asks for more memory than the machine has is not told: the kernel's OOM killer ends it
(minutes into a load, or a server that then vanishes without a word). So the engine estimates what its weights
and KV cache will hold in the chosen weight format and compares it with the memory available to this process: the
smaller of the kernel's `MemAvailable` and the room left under the process's cgroup limit (a container's
`--memory`). Over it, the load is refused with both numbers and the smaller formats' estimates.

The estimate counts what each linear layer keeps in its format (the loader's own groups: fused qkv, o, gate/up,
down, the LM head; the untied embedding table at the run dtype), the bf16 embedding table a prepacked float head
also keeps, and the largest fp32 temporary the loader makes while building one layer. It leaves out what is small
beside those (norms, RoPE tables, the Python heap), so it is a lower bound by a margin that
`benchmarks/load_memory.py` measures against the process's peak resident memory. `TOKENMILL_MEMORY_CHECK=0` turns
the refusal off (for example where swap makes more room than `MemAvailable` counts).

After the load, `release_freed_memory` hands the allocator's freed heap (the load's temporaries) back to the kernel;
`TOKENMILL_MALLOC_TRIM=0` keeps it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenmill.model.config import ModelConfig
from tokenmill.model.errors import ModelLoadError
from tokenmill.model.gguf_file import GGUFFile
from tokenmill.model.loader import head_tensor, layer_linears

ENV_SWITCH = "TOKENMILL_MEMORY_CHECK"
TRIM_SWITCH = "TOKENMILL_MALLOC_TRIM"
GIB = 2**30


class InsufficientMemoryError(ModelLoadError):
    """The model and its KV cache would not fit in the memory available; the message gives the numbers."""


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int  # bytes the loaded layers keep
    load_temporary: int  # the largest fp32 weight the loader holds beside them while building a layer
    kv_cache: int

    @property
    def total(self) -> int:
        return self.weights + self.load_temporary + self.kv_cache


def _layer_groups(cfg: ModelConfig) -> Iterator[tuple[list[str], bool]]:
    """The loader's linear layers: each one's tensor names and whether it is the LM head."""
    for i in range(cfg.num_layers):
        for names in layer_linears(i).values():
            yield names, False
    yield [head_tensor(cfg)], True


def _numel(gguf_file: GGUFFile, name: str) -> int:
    rows, *cols = gguf_file.raw_tensor(name)[2]
    return rows * (cols[0] if cols else 1)


# Bytes per weight of each GGUF type on the block tiles (model/linear.py, gguf_layout.h): 4-bit codes with an f16
# scale and minimum per 32 (Q4_K's products of its 6-bit scales in fp32), 8-bit codes with an f16 scale per 32
# (Q5_0 widened to 8 bits), Q6_K's codes in 8 bits with its f16 d per 256 and int8 scale per 16.
_TILE_BYTES = {"Q4_0": 20 / 32, "Q4_1": 20 / 32, "Q4_K": 24 / 32, "Q8_0": 34 / 32, "Q5_0": 34 / 32,
               "Q6_K": 1 + 2 / 256 + 1 / 16}


def _layer_bytes(gguf_file: GGUFFile, names: list[str], numel: int, head: bool, weight_format: str, element: int,
                 int4_group_size: int, int8_activations: bool) -> int:
    """What one linear layer of `numel` weights keeps in `weight_format` (the branches of
    loader._LayerBuilder.linear)."""
    cols = gguf_file.raw_tensor(names[0])[2][-1]
    if weight_format == "float":
        return numel * element
    if weight_format == "gguf":
        types = [gguf_file.tensor_type(n) for n in names]
        if all(t in _TILE_BYTES for t in types):
            return sum(int(_numel(gguf_file, n) * _TILE_BYTES[t]) for n, t in zip(names, types, strict=True))
        if int8_activations and cols % 32 == 0:
            return numel * 34 // 32  # requantized to 8-bit blocks of 32 with an f16 scale each
    if weight_format == "q4" and cols % 32 == 0:
        return numel * 20 // 32  # Q4_1's form: 16 bytes of codes, an f16 scale and minimum per 32
    if weight_format == "int4" and not head:
        return numel // 2 + numel // int4_group_size * 2 * element  # a scale and a zero per group
    rows = numel // cols
    return numel + rows * element  # int8 per row: one code a weight, a scale per row


def estimate(gguf_file: GGUFFile, cfg: ModelConfig, weight_format: str, dtype: torch.dtype, kv_cache_bytes: int,
             int4_group_size: int = 32, int8_activations: bool = False, prepack: bool = False) -> MemoryEstimate:
    """What loading `gguf_file` in `weight_format` at `dtype` will hold (module docstring)."""
    element = torch.empty((), dtype=dtype).element_size()
    weights, temporary = 0, 0
    for names, head in _layer_groups(cfg):
        numel = sum(_numel(gguf_file, n) for n in names)
        weights += _layer_bytes(gguf_file, names, numel, head, weight_format, element, int4_group_size,
                                int8_activations)
        temporary = max(temporary, 4 * numel)
    embedding = _numel(gguf_file, "token_embd.weight") * element
    if not cfg.tie_word_embeddings:
        weights += embedding
    # A prepacked bf16 embedding keeps its plain rows beside the packed ones (LlamaModel.prepack_weights).
    if prepack and dtype == torch.bfloat16 and weight_format == "float":
        weights += embedding
    return MemoryEstimate(weights, temporary, kv_cache_bytes)


def with_draft(target: MemoryEstimate, draft: MemoryEstimate | None) -> MemoryEstimate:
    """Both models: the draft loads after the target, so the load's peak is the larger of the target's own and the
    target's weights plus the draft's load. No draft: the target's."""
    if draft is None:
        return target
    weights = target.weights + draft.weights
    peak = max(target.weights + target.load_temporary, weights + draft.load_temporary)
    return MemoryEstimate(weights, peak - weights, target.kv_cache + draft.kv_cache)


def available_bytes(proc: Path = Path("/proc"), cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Memory this process can still take: the smaller of `MemAvailable` and the room under its cgroup's limit;
    None where neither can be read (not Linux)."""
    candidates = [_kib_field(proc / "meminfo", "MemAvailable"), _cgroup_room(proc, cgroup)]
    known = [c for c in candidates if c is not None]
    return min(known) if known else None


def _cgroup_room(proc: Path, root: Path) -> int | None:
    """The limit minus the usage of this process's cgroup (its path from /proc/self/cgroup; in a container, the
    namespace's root): cgroup v2's memory.max and memory.current, or v1's memory controller."""
    paths = {"v2": "", "v1": ""}
    try:
        for line in (proc / "self" / "cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                paths["v2"] = path.lstrip("/")
            elif "memory" in controllers.split(","):
                paths["v1"] = path.lstrip("/")
    except (OSError, ValueError):
        pass
    candidates = [(root / paths["v2"] / "memory.max", root / paths["v2"] / "memory.current"),
                  (root / "memory.max", root / "memory.current"),
                  (root / "memory" / paths["v1"] / "memory.limit_in_bytes",
                   root / "memory" / paths["v1"] / "memory.usage_in_bytes"),
                  (root / "memory" / "memory.limit_in_bytes", root / "memory" / "memory.usage_in_bytes")]
    for limit_file, usage_file in candidates:
        try:
            limit = limit_file.read_text().strip()
            usage = int(usage_file.read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:  # v1 says "no limit" with a huge number
            return None
        return max(0, int(limit) - usage)
    return None


def check_fits(need: MemoryEstimate, available: int | None, what: str, alternatives: dict[str, int]) -> None:
    """Raise InsufficientMemoryError when `need` exceeds `available` (unknown: no check; off by the switch).
    `alternatives`: other weight formats' total estimates, in the order to suggest them (the exact ones first),
    named in the message where they fit."""
    if available is None or os.environ.get(ENV_SWITCH, "1") == "0" or need.total <= available:
        return
    smaller = [f"{name} about {_size(size)}" for name, size in alternatives.items() if size <= available]
    hint = f"; weight formats that would fit: {', '.join(smaller)} (--weight-format)" if smaller else ""
    raise InsufficientMemoryError(
        f"{what} needs about {_size(need.total)} (weights {_size(need.weights)}, a load-time temporary of "
        f"{_size(need.load_temporary)}, KV cache {_size(need.kv_cache)}) and {_size(available)} of memory is "
        f"available{hint}. A smaller --kv-cache-memory-gib also helps; {ENV_SWITCH}=0 loads anyway")


def _size(num_bytes: int) -> str:
    return f"{num_bytes / GIB:.1f} GiB" if num_bytes >= GIB else f"{num_bytes / 2**20:.1f} MiB"


def release_freed_memory(proc: Path = Path("/proc")) -> int | None:
    """Hand the C allocator's freed heap back to the kernel (glibc's `malloc_trim`), once a load's temporaries are
    gone: glibc keeps freed blocks below its (adaptive) mmap threshold in the process, so a load's layer-sized
    temporaries would otherwise stay resident for the engine's life. Returns the resident bytes released, or None
    where there is no `malloc_trim` (not glibc) or `TOKENMILL_MALLOC_TRIM=0` turns it off."""
    trim = _malloc_trim()
    if trim is None or os.environ.get(TRIM_SWITCH, "1") == "0":
        return None
    before = status_bytes("RssAnon", proc)
    trim(0)
    after = status_bytes("RssAnon", proc)
    return None if before is None or after is None else max(0, before - after)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def status_bytes(field: str, proc: Path = Path("/proc")) -> int | None:
    """A memory figure of this process from /proc/self/status (VmRSS, RssAnon, RssFile, ...), in bytes; None where
    it cannot be read."""
    return _kib_field(proc / "self" / "status", field)


def _kib_field(path: Path, field: str) -> int | None:
    """A `Field:   N kB` line of a /proc file, in bytes; None where it cannot be read."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
