"""A bounds-checked scan of a GGUF header, run before the `gguf` package parses the file.

`gguf.GGUFReader` trusts every count it reads: an array that declares 2^62 elements makes it loop past the end of
the file (reads there return empty arrays, so the loop never stops) while its lists grow. This scan walks the same
structure — header, key/value pairs, tensor infos — with each count and length checked against the bytes left in
the file before anything is done with it, so a hostile file costs at most O(header size) time and no memory beyond
its own names. It reads through a read-only mmap and never allocates in proportion to a declared length.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tokenmill.model.errors import ModelLoadError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# Bounds above any released model (~50 KV pairs, ~2,000 tensors, ~1.3M array elements for a 262k-token vocabulary
# with its scores, types and merges) and low enough for the `gguf` reader that parses the file next: it builds about
# 1 KB of Python objects per array element (and ~50 µs of work), so 2M elements cost it ~2 GB and ~2 minutes.
MAX_KV_COUNT = 1 << 16
MAX_TENSOR_COUNT = 1 << 16
MAX_ARRAY_ELEMENTS = 1 << 21  # summed over all arrays of the file, nested ones included
MAX_ARRAY_DEPTH = 8
MAX_NAME_BYTES = 65535  # keys and tensor names
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
MAX_TENSOR_ELEMENTS = 1 << 40

# GGUF value types (the spec's gguf_metadata_value_type) with a fixed size in bytes.
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = range(13)
_FIXED_SIZES = {_UINT8: 1, _INT8: 1, _UINT16: 2, _INT16: 2, _UINT32: 4, _INT32: 4, _FLOAT32: 4, _BOOL: 1,
                _UINT64: 8, _INT64: 8, _FLOAT64: 8}
_STRING_HEADER = 8  # u64 length
_ARRAY_HEADER = 12  # u32 item type + u64 length

# Names the `gguf` reader gives its own header fields; a file key equal to one of them makes it raise.
_RESERVED_KEYS = frozenset({"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"})


# A tensor info as read: name, type id, dims (GGUF order), offset relative to the data section.
_RawInfo = tuple[str, int, tuple[int, ...], int]


class _Damaged(Exception):
    """A violation found by the scan; `check_gguf_header` turns it into a ModelLoadError naming the file."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_id: int
    dims: tuple[int, ...]  # GGUF order: the row length first
    offset: int  # absolute, in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    alignment: int
    data_offset: int
    tensors: dict[str, TensorInfo]


def quant_sizes() -> dict[int, tuple[int, int]]:
    """(block size in elements, block size in bytes) of every tensor type the `gguf` package knows."""
    import gguf

    return {int(t): sizes for t, sizes in gguf.GGML_QUANT_SIZES.items()}


class _Cursor:
    """Little-endian reads from the mmap, each checked against the bytes left."""

    def __init__(self, buf: mmap.mmap, size: int) -> None:
        self.buf, self.size, self.pos = buf, size, 0
        self.array_elements = 0

    def remaining(self) -> int:
        return self.size - self.pos

    def skip(self, n: int, what: str) -> int:
        if n < 0 or n > self.remaining():
            raise _Damaged(f"{what} needs {n} bytes at offset {self.pos} but only {self.remaining()} are left "
                           "(truncated or corrupt)")
        start, self.pos = self.pos, self.pos + n
        return start

    def u32(self, what: str) -> int:
        return int(struct.unpack_from("<I", self.buf, self.skip(4, what))[0])

    def u64(self, what: str) -> int:
        return int(struct.unpack_from("<Q", self.buf, self.skip(8, what))[0])

    def name(self, what: str) -> str:
        """A length-prefixed UTF-8 name of at most MAX_NAME_BYTES bytes."""
        length = self.u64(f"{what} length")
        if length > MAX_NAME_BYTES:
            raise _Damaged(f"{what} is {length} bytes long (limit {MAX_NAME_BYTES})")
        start = self.skip(length, what)
        try:
            return self.buf[start:start + length].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Damaged(f"{what} at offset {start} is not UTF-8: {exc}") from None

    def count_elements(self, n: int, min_bytes: int, what: str) -> None:
        """Admit an array of n elements of at least min_bytes each, before any of it is walked."""
        if n * min_bytes > self.remaining():
            raise _Damaged(f"{what} declares {n} elements of at least {min_bytes} bytes at offset {self.pos} but only "
                           f"{self.remaining()} bytes are left (truncated or corrupt)")
        self.array_elements += n
        if self.array_elements > MAX_ARRAY_ELEMENTS:
            raise _Damaged(f"{what}: more than {MAX_ARRAY_ELEMENTS} array elements in the file")


def _skip_value(cur: _Cursor, vtype: int, what: str, depth: int = 0) -> None:
    if vtype in _FIXED_SIZES:
        cur.skip(_FIXED_SIZES[vtype], what)
    elif vtype == _STRING:
        cur.skip(cur.u64(f"{what} length"), what)
    elif vtype == _ARRAY:
        _skip_array(cur, what, depth)
    else:
        raise _Damaged(f"{what} has unknown value type {vtype}")


def _skip_array(cur: _Cursor, what: str, depth: int) -> None:
    if depth >= MAX_ARRAY_DEPTH:
        raise _Damaged(f"{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
    item_type = cur.u32(f"{what} item type")
    n = cur.u64(f"{what} length")
    if item_type in _FIXED_SIZES:
        cur.count_elements(n, _FIXED_SIZES[item_type], what)
        cur.skip(n * _FIXED_SIZES[item_type], what)
    elif item_type == _STRING:
        cur.count_elements(n, _STRING_HEADER, what)
        # One by one, but n is now bounded by the bytes left and by the file's element budget.
        for _ in range(n):
            cur.skip(cur.u64(what), what)
    elif item_type == _ARRAY:
        cur.count_elements(n, _ARRAY_HEADER, what)
        for _ in range(n):
            _skip_array(cur, what, depth + 1)
    else:
        raise _Damaged(f"{what} has unknown item type {item_type}")


def _read_kv(cur: _Cursor, index: int, seen: set[str]) -> tuple[str, int, int | None]:
    """One key/value pair: its key, value type, and the value itself if it is a u32 (for general.alignment)."""
    key = cur.name(f"key of metadata entry {index}")
    if key in seen:
        raise _Damaged(f"duplicate metadata key {key!r}")
    seen.add(key)
    vtype = cur.u32(f"type of metadata '{key}'")
    if vtype == _UINT32:
        return key, vtype, cur.u32(f"metadata '{key}'")
    _skip_value(cur, vtype, f"metadata '{key}'")
    return key, vtype, None


def _read_alignment(vtype: int, value: int | None) -> int:
    if vtype != _UINT32 or value is None:
        raise _Damaged(f"general.alignment has value type {vtype}, expected uint32 ({_UINT32})")
    if value == 0 or value & (value - 1):
        raise _Damaged(f"general.alignment {value} is not a power of two")
    return value


def _read_tensor_info(cur: _Cursor, index: int, sizes: dict[int, tuple[int, int]]) -> _RawInfo:
    name = cur.name(f"name of tensor {index}")
    n_dims = cur.u32(f"dimension count of tensor '{name}'")
    if not 1 <= n_dims <= MAX_DIMS:
        raise _Damaged(f"tensor '{name}' has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
    dims = tuple(cur.u64(f"dimension {d} of tensor '{name}'") for d in range(n_dims))
    type_id = cur.u32(f"type of tensor '{name}'")
    offset = cur.u64(f"data offset of tensor '{name}'")
    if type_id not in sizes:
        raise _Damaged(f"tensor '{name}' has unknown type {type_id}")
    return name, type_id, dims, offset


def _tensor_nbytes(name: str, dims: tuple[int, ...], sizes: tuple[int, int]) -> int:
    block, block_bytes = sizes
    elements = 1
    for d in dims:
        if d < 1:
            raise _Damaged(f"tensor '{name}' has an empty dimension: {list(dims)}")
        elements *= d
        if elements > MAX_TENSOR_ELEMENTS:
            raise _Damaged(f"tensor '{name}' has dimensions {list(dims)}: over {MAX_TENSOR_ELEMENTS} elements")
    if dims[0] % block:
        raise _Damaged(f"tensor '{name}' has rows of {dims[0]} elements, not a multiple of its type's block of "
                       f"{block}")
    return elements // block * block_bytes


def _place_tensors(infos: list[_RawInfo], data_offset: int, alignment: int, size: int,
                   sizes: dict[int, tuple[int, int]]) -> dict[str, TensorInfo]:
    """Each tensor's data range [start, start + nbytes) checked to lie inside the file."""
    tensors: dict[str, TensorInfo] = {}
    for name, type_id, dims, offset in infos:
        if name in tensors:
            raise _Damaged(f"duplicate tensor name {name!r}")
        if offset % alignment:
            raise _Damaged(f"tensor '{name}' data offset {offset} is not a multiple of the alignment {alignment}")
        nbytes = _tensor_nbytes(name, dims, sizes[type_id])
        start = data_offset + offset
        if start + nbytes > size:
            raise _Damaged(f"tensor '{name}' data [{start}, {start + nbytes}) extends past the end of the file "
                           f"({size} bytes): truncated or corrupt")
        tensors[name] = TensorInfo(name, type_id, dims, start, nbytes)
    return tensors


def _read_prologue(cur: _Cursor) -> tuple[int, int, int]:
    magic = cur.buf[0:4] if cur.size >= 4 else b""
    if magic != GGUF_MAGIC:
        raise _Damaged(f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    cur.skip(4, "magic")
    version = cur.u32("version")
    if version & 0xFFFF == 0 and version:
        # The `gguf` reader's own test for a file written on a machine of the other byte order.
        raise _Damaged("big-endian GGUF files are not supported")
    if version not in SUPPORTED_VERSIONS:
        raise _Damaged(f"GGUF version {version} is not supported (supported: {SUPPORTED_VERSIONS})")
    tensor_count, kv_count = cur.u64("tensor count"), cur.u64("metadata count")
    if kv_count > MAX_KV_COUNT:
        raise _Damaged(f"metadata count {kv_count} exceeds the limit {MAX_KV_COUNT}")
    if tensor_count > MAX_TENSOR_COUNT:
        raise _Damaged(f"tensor count {tensor_count} exceeds the limit {MAX_TENSOR_COUNT}")
    return version, tensor_count, kv_count


def _scan(buf: mmap.mmap, size: int) -> GGUFHeader:
    cur = _Cursor(buf, size)
    version, tensor_count, kv_count = _read_prologue(cur)
    seen = set(_RESERVED_KEYS)
    alignment = DEFAULT_ALIGNMENT
    for i in range(kv_count):
        key, vtype, value = _read_kv(cur, i, seen)
        if key == "general.alignment":
            alignment = _read_alignment(vtype, value)
    sizes = quant_sizes()
    infos = [_read_tensor_info(cur, i, sizes) for i in range(tensor_count)]
    data_offset = -(-cur.pos // alignment) * alignment
    return GGUFHeader(version, alignment, data_offset, _place_tensors(infos, data_offset, alignment, size, sizes))


def _with_mmap(path: Path, scan: Callable[[mmap.mmap, int], GGUFHeader]) -> GGUFHeader:
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        if size == 0:
            raise _Damaged("the file is empty")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return scan(buf, size)


def check_gguf_header(path: str | Path) -> GGUFHeader:
    """Scan the header of the GGUF file at `path`; any violation raises ModelLoadError naming the file and why."""
    path = Path(path)
    try:
        return _with_mmap(path, _scan)
    except _Damaged as exc:
        raise ModelLoadError(f"damaged or truncated GGUF file {path}: {exc}") from None
    except (OSError, ValueError) as exc:  # unreadable, or not mappable
        raise ModelLoadError(f"cannot read GGUF file {path}: {exc}") from exc
