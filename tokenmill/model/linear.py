"""Linear layers in five weight formats: float, int8 and int4 weight-only, the GGUF file's own blocks, and 4-bit
blocks requantized from any file.

A single-stream decode step reads every weight once, so its time is the weight bytes over memory bandwidth. The
quantized formats stay packed in memory instead of being dequantized to float. int8 and int4 multiply with PyTorch's
CPU weight-only kernels (`_weight_int8pack_mm`: 1 byte per weight, `_weight_int4pack_mm_for_cpu`: half a byte plus a
bf16 scale and zero per group); the GGUF formats with tokenmill's own kernel (tokenmill/kernels/gguf_matmul.cpp),
because PyTorch's kernels would round the file's f16 block scales to bf16 and have no per-block int8 scales. All of
them have a vectorized path only for bfloat16 activations — PyTorch's were ~50x slower with fp32 or fp16 inputs on
the dev CPU — so quantized formats require bf16.

Formats:
- ``float``: every weight dequantized to the model dtype (the exact path in fp32).
- ``int8``: per-output-channel symmetric int8, the embedding/LM head included.
- ``int4``: grouped asymmetric int4 (round to nearest) for the decoder layers; the LM head in int8, as 4-bit GGUF
  files themselves keep it at 8 bits.
- ``gguf``: the file's Q4_0/Q4_1/Q4_K, Q8_0/Q5_0 and Q6_K blocks as stored — codes, scales and minimums
  (`gguf_blocks.py`) — so every weight is exactly the file's value, a stack of several types as one layer per
  run of a type family (`StackedLinear`); other tensor types as in ``int8``. Activations
  are bf16 by default; with ``int8_activations`` (``EngineConfig.gguf_activations="int8"``) each row is first
  rounded per block of 32 to int8 with an fp32 scale, llama.cpp's scheme, and the kernel multiplies with integer
  dot products (`int8_blocks`).
- ``q4``: every layer, the LM head included, requantized to 4-bit blocks of 32 in Q4_1's form (`q4_requantize`) on
  the same 4-bit tiles, whatever the file's types (a width not a multiple of 32: as in ``int8``): lossy, fewer bytes
  per step than ``gguf`` where a file holds 5- to 8-bit blocks. Made for draft models
  (`speculative_weight_format="q4"`), whose rounding changes how many drafts are accepted but never the output.
  ``int8_activations`` applies as in ``gguf``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.config import BF16_KERNELS, INT4_GROUP_SIZES, WEIGHT_FORMATS
from tokenmill.model.gguf_blocks import asymmetric_4bit


class Linear(nn.Module):
    """y = x Wᵀ (+ b) for x of shape [tokens, in_features]."""

    in_features: int
    out_features: int
    bias: torch.Tensor | None

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias

    def weight_bytes(self) -> int:
        """Bytes a matmul reads from this layer's weights (what bounds a memory-bound decode step)."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """As the LM head: the output in the model dtype, or in fp32 where the kernel has it before rounding."""
        return self(x)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of W as activations, for an embedding table tied to the LM head."""
        raise NotImplementedError(f"{type(self).__name__} cannot serve as an embedding table")

    def select_rows(self, ids: torch.Tensor) -> Linear:
        """A layer of the same format computing outputs `ids` only, with the same weights (a draft model's LM head
        over part of the vocabulary: spec/draft_vocab.py)."""
        raise NotImplementedError(f"{type(self).__name__} cannot select output rows")

    def _bias_rows(self, ids: torch.Tensor) -> torch.Tensor | None:
        return None if self.bias is None else self.bias[ids]


class FloatLinear(Linear):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.packed: torch.Tensor | None = None  # the weight in a packed layout, see `prepack`
        self.packing: str | None = None  # whose layout: "tokenmill" (kernels/bf16_gemm.cpp) or "onednn"

    def prepack(self, keep_weight: bool, kernel: str = "tokenmill") -> bool:
        """Keep a CPU bf16 weight packed for its matmul kernel: `F.linear` re-lays the plain weight out on every
        call. `kernel="tokenmill"`: the row-exact kernel (kernels/bf16_gemm.cpp), whose every row is the bits it
        would be alone at any batch size, so a speculative verify step or a batch reproduces a decode step; it falls
        back to oneDNN where the C++ kernels cannot be built. `"onednn"`: oneDNN's blocked layout, as PyTorch's own
        CPU compiler does when freezing a model, bit-identical to `F.linear` (tested) but not row-invariant at every
        row count. `keep_weight=False` drops the plain copy (then no `rows`). Returns whether it packed."""
        if kernel not in BF16_KERNELS:
            raise ValueError(f"kernel must be one of {BF16_KERNELS}, got {kernel!r}")
        weight = self.weight
        if weight is None or weight.device.type != "cpu" or weight.dtype != torch.bfloat16:
            return False
        kernels = _cpu_kernels() if kernel == "tokenmill" else None
        if kernels is not None:
            self.packed, self.packing = kernels.pack_bf16(weight), "tokenmill"
        elif _has_onednn():
            # The batch size only guides oneDNN's choice of layout; any batch size works with it (256: measured best
            # or equal from 1 to 1,024 rows on the dev CPU).
            self.packed, self.packing = torch.ops.mkldnn._reorder_linear_weight(weight, 256), "onednn"
        else:
            return False
        if not keep_weight:
            self.weight = None
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packing == "tokenmill":
            return _cpu_kernels().linear_packed(x, self.packed, self.bias, self.out_features)
        if self.packing == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Row-exact where a kernel is: a token's logits are then the same bits whatever else is in its step (a
        speculative verify step reproduces a decode step's logits), as the fused step's own layers are. bf16 packed
        for tokenmill's kernel: its fp32 sums, before the rounding to bf16; fp32 with at most the kernels'
        SMALL_ROWS rows: the row-exact fp32 kernel (kernels/small_gemm.cpp); otherwise as `forward`."""
        if self.packing == "tokenmill":
            return _cpu_kernels().linear_packed(x, self.packed, self.bias, self.out_features, fp32_out=True)
        weight = self.weight
        if (weight is not None and weight.dtype == torch.float32 and x.dtype == torch.float32 and x.dim() == 2
                and x.device.type == "cpu" and weight.device.type == "cpu"
                and (self.bias is None or self.bias.dtype == torch.float32)):
            kernels = _cpu_kernels()
            if kernels is not None and x.shape[0] <= kernels.SMALL_ROWS:
                return kernels.linear_rows(x.contiguous(), weight.contiguous(), self.bias)
        return self(x)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            raise RuntimeError("this layer's plain weight was dropped by prepack(keep_weight=False)")
        return self.weight[ids]

    def select_rows(self, ids: torch.Tensor) -> FloatLinear:
        layer = FloatLinear(self.rows(ids).contiguous(), self._bias_rows(ids))
        if self.packing is not None:
            layer.prepack(keep_weight=False, kernel=self.packing)
        return layer

    def weight_bytes(self) -> int:
        element = torch.empty((), dtype=self.packed.dtype if self.weight is None else self.weight.dtype).element_size()
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.out_features * self.in_features * element + bias


def _has_onednn() -> bool:
    """oneDNN with bf16 weight packing: it needs AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT; elsewhere the reorder raises."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class Int8Linear(Linear):
    """Per-output-channel symmetric int8: W[n, k] ≈ scale[n] · q[n, k], q in [-127, 127]."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    @classmethod
    def quantize(cls, weight: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None = None) -> Int8Linear:
        weight = weight.float()
        scales = (weight.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
        qweight = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(qweight, scales.to(dtype), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_bias(torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].to(self.scales.dtype) * self.scales[ids, None]

    def select_rows(self, ids: torch.Tensor) -> Int8Linear:
        return Int8Linear(self.qweight[ids].contiguous(), self.scales[ids].contiguous(), self._bias_rows(ids))


class Int4Linear(Linear):
    """Grouped asymmetric int4: W[n, k] = scale[n, g] · code[n, k] + minimum[n, g], code in [0, 15], g = k // group.

    Stored in the layout of `_weight_int4pack_mm_for_cpu`, which computes (code - 8) · scale + zero per group, so the
    zero stored is minimum + 8 · scale.
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor, group_size: int,
                 dtype: torch.dtype, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        _check_group_size(self.in_features, group_size)
        self.group_size = group_size
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        scales, minimums = scales.float(), minimums.float()
        scales_zeros = torch.stack([scales, minimums + 8.0 * scales], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", scales_zeros.to(dtype))  # [in / group, out, 2]
        self.register_buffer("bias", bias)

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int, dtype: torch.dtype,
                 bias: torch.Tensor | None = None) -> Int4Linear:
        _check_group_size(weight.shape[1], group_size)
        return cls(*asymmetric_4bit(weight, group_size), group_size, dtype, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_zeros)
        return self._add_bias(y)


def _check_group_size(in_features: int, group_size: int) -> None:
    if in_features % group_size:
        raise ValueError(f"int4 group size {group_size} does not divide the layer's input size {in_features}; "
                         f"pick one of {INT4_GROUP_SIZES} that does")


TILE_ROWS = 16  # the GGUF kernels' row tile: one fp32 lane per output row


class _GgufBlockLinear(Linear):
    """Shared by the GGUF block formats: the C++ block kernel, or an fp32 matmul of the dequantized weights where the
    kernels cannot be built; bf16 outputs as a layer, fp32 ones as an LM head. `int8_activations`: the second mode,
    activations rounded by `int8_blocks` before the product (the loader sets it)."""

    int8_activations: bool = False

    def dequantized(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Rows `ids` (all by default) of the file's weights in fp32."""
        raise NotImplementedError

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.dequantized(ids).to(torch.bfloat16)

    def _kernel(self, kernels: Any, x: torch.Tensor, fp32_output: bool) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, fp32_output=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, fp32_output=True)

    def _matmul(self, x: torch.Tensor, fp32_output: bool) -> torch.Tensor:
        kernels = _gguf_kernels()
        if kernels is None:
            xf = x.float()
            if self.int8_activations:
                codes, scales = int8_blocks(xf)
                xf = (codes * scales).reshape(xf.shape)
            y = F.linear(xf, self.dequantized())
            return self._add_bias(y if fp32_output else y.to(x.dtype))
        return self._add_bias(self._kernel(kernels, x, fp32_output))


class GgufQ4Linear(_GgufBlockLinear):
    """The file's 4-bit blocks of 32 (Q4_0/Q4_1, Q4_K sub-blocks): W[n, 32b + j] = d[n, b] · q + m[n, b], d and m
    kept in f16 where every value is one (the file's own) and in fp32 otherwise (Q4_K's products).

    Stored repacked for tokenmill/kernels/gguf_matmul.cpp (its header describes the layout): rows in tiles of 16
    (the last tile padded with zero rows) and, per tile and block, the 16 rows' codes of each k-pair side by side.
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        _check_blocks(self.in_features)
        # [tiles, rows, blocks, half, pair c, element e] -> per tile and block: chunk c, then row, then e.
        tiles = _row_tiles(codes.to(torch.uint8)).reshape(-1, TILE_ROWS, self.in_features // 32, 2, 8, 2)
        tiles = tiles.permute(0, 2, 3, 4, 1, 5)
        packed = tiles[:, :, 0] | (tiles[:, :, 1] << 4)  # k = 2c + e in the low nibble, 16 + 2c + e in the high
        self.register_buffer("packed", packed.reshape(packed.shape[0], -1).contiguous())
        # f16 where every value is one (Q4_0/Q4_1: the file's own), else fp32 (Q4_K's products): exact either way.
        dtype = torch.float16 if all(_is_half(v) for v in (scales, minimums)) else torch.float32
        self.register_buffer("scales", _tiled_scales(scales, "scales", dtype))
        self.register_buffer("minimums", _tiled_scales(minimums, "minimums", dtype))
        self.register_buffer("bias", bias)

    def stored(self, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows `ids` (all by default) as the constructor takes them: uint8 codes [n, K] and fp32 scales and
        minimums [n, K / 32]."""
        tile, row = _tile_and_row(ids, self.out_features)
        packed = self.packed.reshape(-1, self.in_features // 32, 8, TILE_ROWS, 2)[tile, :, :, row]
        codes = torch.stack([packed & 0x0F, packed >> 4], dim=2)  # [n, blocks, half, c, e]
        return codes.reshape(len(tile), -1), self.scales[tile, :, row].float(), self.minimums[tile, :, row].float()

    def dequantized(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Exact: an f16 scale times a 4-bit code plus an f16 minimum fits fp32."""
        codes, scales, minimums = self.stored(ids)
        blocks = codes.reshape(len(codes), -1, 32).float() * scales[..., None] + minimums[..., None]
        return blocks.reshape(len(codes), -1)

    def select_rows(self, ids: torch.Tensor) -> GgufQ4Linear:
        layer = GgufQ4Linear(*self.stored(ids), self._bias_rows(ids))
        layer.int8_activations = self.int8_activations
        return layer

    def _kernel(self, kernels: Any, x: torch.Tensor, fp32_output: bool) -> torch.Tensor:
        return kernels.q4_matmul(x, self.packed, self.scales, self.minimums, self.out_features, fp32_output,
                                 self.int8_activations)


class GgufQ8Linear(_GgufBlockLinear):
    """The file's 8-bit codes: W[n, k] = d[n, k // 32] · q[n, k] with d the stored f16 value (Q8_0; Q5_0 as q - 16),
    or Q6_K (`sub_scales` given): W[n, k] = d[n, k // 256] · sc[n, k // 16] · q[n, k] with q - 32 as the code and
    the stored f16 d and int8 sc, whose product the kernel forms in fp32 (exact). Stored in row tiles of 16 like
    `GgufQ4Linear`, each k-pair's 16 rows side by side; Q6_K's scales per tile and super-block as one byte buffer,
    the 16 rows' d then each sub-block's 16 sc (tokenmill/kernels/gguf_layout.h)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                 sub_scales: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        _check_blocks(self.in_features)
        tiles = _row_tiles(codes.to(torch.int8)).reshape(-1, TILE_ROWS, self.in_features // 32, 16, 2)
        packed = tiles.permute(0, 2, 3, 1, 4)  # [tiles, blocks, pair j, row, element e]
        self.register_buffer("packed", packed.reshape(packed.shape[0], -1).contiguous())
        if sub_scales is None:
            self.register_buffer("scales", _tiled_scales(scales, "scales"))
        else:
            self.register_buffer("scales", _q6k_scales(scales, sub_scales, self.in_features))
        self.register_buffer("bias", bias)

    def stored(self, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Rows `ids` (all by default) as the constructor takes them: int8 codes [n, K], the f16 scales (one per 32
        weights, or Q6_K's d per 256) and Q6_K's int8 sc per 16 weights (None for the others)."""
        tile, row = _tile_and_row(ids, self.out_features)
        codes = self.packed.reshape(-1, self.in_features // 32, 16, TILE_ROWS, 2)[tile, :, :, row, :]
        codes = codes.reshape(len(tile), -1)
        if self.scales.dtype != torch.uint8:
            return codes, self.scales[tile, :, row], None
        d = self.scales[..., :2 * TILE_ROWS].contiguous().view(torch.float16)  # [tiles, supers, rows]
        sc = self.scales[..., 2 * TILE_ROWS:].contiguous().view(torch.int8).reshape(*d.shape[:2], 16, TILE_ROWS)
        return codes, d[tile, :, row], sc[tile, :, :, row].reshape(len(tile), -1)

    def dequantized(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        codes, d, sc = self.stored(ids)
        if sc is None:
            return (codes.reshape(len(codes), -1, 32).float() * d.float()[..., None]).reshape(-1, self.in_features)
        per16 = d.float().repeat_interleave(16, dim=1) * sc.float()  # d · sc per sub-block: exact in fp32
        return (codes.reshape(len(codes), -1, 16).float() * per16[..., None]).reshape(-1, self.in_features)

    def _kernel(self, kernels: Any, x: torch.Tensor, fp32_output: bool) -> torch.Tensor:
        return kernels.q8_matmul(x, self.packed, self.scales, self.out_features, fp32_output, self.int8_activations)

    def select_rows(self, ids: torch.Tensor) -> GgufQ8Linear:
        codes, d, sc = self.stored(ids)
        layer = GgufQ8Linear(codes, d, self._bias_rows(ids), sub_scales=sc)
        layer.int8_activations = self.int8_activations
        return layer


class StackedLinear(Linear):
    """Layers whose outputs sit side by side: y = [part₀(x), part₁(x), ...] (+ b). A fused qkv whose tensors have
    different GGUF types (Q4_K q and k beside a Q6_K v) keeps each run of one tile family in its own block layer, so
    every weight stays the file's, instead of requantizing the whole stack to one format."""

    def __init__(self, parts: list[Linear], bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if len(parts) < 2 or len({p.in_features for p in parts}) != 1 or any(p.bias is not None for p in parts):
            raise ValueError("a stack needs two or more parts without biases of one input size")
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_bias(torch.cat([p(x) for p in self.parts], dim=-1))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_bias(torch.cat([p.logits(x) for p in self.parts], dim=-1))


def int8_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] rounded per block of 32 as the kernel's int8 mode does: codes [M, K / 32, 32] (float, integers in
    [-127, 127], nearest with ties to even) and fp32 scales [M, K / 32, 1] = amax / 127; x ≈ codes · scales."""
    blocks = x.float().reshape(x.shape[0], -1, 32)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    # A true division, as the kernel does: `127.0 / amax` would be 127 · (1 / amax) in torch, which rounds
    # differently and moves a code by one where x · 127 / amax is about half-way between two integers.
    inverse = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    codes = torch.round((blocks * inverse).clamp(-127, 127).nan_to_num(0.0))
    return codes, amax / 127.0


def _check_blocks(in_features: int) -> None:
    if in_features % 32:
        raise ValueError(f"GGUF blocks hold 32 weights; the layer's input size {in_features} is not a multiple")


def _row_tiles(rows: torch.Tensor) -> torch.Tensor:
    """rows padded with zero rows to a multiple of TILE_ROWS."""
    return F.pad(rows, (0, 0, 0, -rows.shape[0] % TILE_ROWS))


def _tiled_scales(values: torch.Tensor, what: str, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """[N, blocks] values, exact in `dtype`, as [tiles, blocks, 16]: one vector per tile and block."""
    exact = _row_tiles(_exact_half(values, what) if dtype == torch.float16 else values.float())
    return exact.reshape(-1, TILE_ROWS, exact.shape[1]).transpose(1, 2).contiguous()


def _q6k_scales(d: torch.Tensor, sc: torch.Tensor, in_features: int) -> torch.Tensor:
    """Q6_K's f16 d [N, K / 256] and int8 sc [N, K / 16] as uint8 [tiles, K / 256, 16 · 2 + 16 · 16]: per tile and
    super-block the 16 rows' d, then per sub-block the 16 rows' sc (the kernel's layout, gguf_layout.h)."""
    if in_features % 256 or d.shape[1] != in_features // 256 or sc.shape[1] != in_features // 16:
        raise ValueError(f"Q6_K scales {tuple(d.shape)} and {tuple(sc.shape)} do not fit {in_features} inputs")
    d_tiles = _row_tiles(d.to(torch.float16)).reshape(-1, TILE_ROWS, d.shape[1]).transpose(1, 2)
    sc_tiles = _row_tiles(sc.to(torch.int8)).reshape(-1, TILE_ROWS, d.shape[1], 16).permute(0, 2, 3, 1)
    parts = [d_tiles.contiguous().view(torch.uint8), sc_tiles.reshape(*d_tiles.shape[:2], -1).view(torch.uint8)]
    return torch.cat(parts, dim=-1).contiguous()


def _tile_and_row(ids: torch.Tensor | None, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where rows `ids` (all `rows` by default) sit in a block layer's tiles of TILE_ROWS."""
    ids = torch.arange(rows) if ids is None else ids
    return ids // TILE_ROWS, ids % TILE_ROWS


def _is_half(values: torch.Tensor) -> bool:
    return torch.equal(values.to(torch.float16).float(), values.float())


def _exact_half(values: torch.Tensor, what: str) -> torch.Tensor:
    half = values.to(torch.float16)
    if not _is_half(values):
        raise ValueError(f"GGUF block {what} must be float16 values, as the file stores them")
    return half


def _cpu_kernels() -> Any:
    """The C++ kernels, or None where they cannot be built."""
    from tokenmill.kernels import cpu_kernels

    return cpu_kernels().module


def _gguf_kernels() -> Any:
    """The C++ kernels, or None where they cannot be built (then the GGUF formats fall back to an fp32 matmul)."""
    return _cpu_kernels()


def check_weight_format(weight_format: str, dtype: torch.dtype, device: torch.device) -> None:
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
    if weight_format == "float":
        return
    if device.type != "cpu":
        raise ValueError(f"weight_format={weight_format!r} uses PyTorch's CPU weight-only kernels; "
                         f"use weight_format='float' on {device.type}")
    if dtype != torch.bfloat16:
        raise ValueError(f"weight_format={weight_format!r} needs dtype bfloat16 (the CPU int8/int4 kernels are only "
                         f"vectorized for bf16 activations), got {dtype}")
