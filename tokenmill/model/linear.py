"""Linear layers in four weight formats: float, int8 and int4 weight-only, and the GGUF file's own 4-bit codes.

A single-stream decode step reads every weight once, so its time is the weight bytes over memory bandwidth. The
quantized formats stay packed in memory and multiply with PyTorch's CPU weight-only kernels
(`_weight_int8pack_mm`: 1 byte per weight, `_weight_int4pack_mm_for_cpu`: half a byte plus a bf16 scale and zero per
group) instead of dequantizing the model to float. Those kernels have a vectorized path only for bfloat16
activations — with fp32 or fp16 inputs they were ~50x slower on the dev CPU — so quantized formats require bf16.

Formats:
- ``float``: every weight dequantized to the model dtype (the exact path in fp32).
- ``int8``: per-output-channel symmetric int8, the embedding/LM head included.
- ``int4``: grouped asymmetric int4 (round to nearest) for the decoder layers; the LM head in int8, as 4-bit GGUF
  files themselves keep it at 8 bits.
- ``gguf``: the file's own Q4_0/Q4_1 codes, groups, scales and minimums used as they are (no re-quantization; the
  kernel keeps scale and zero in bf16); other tensor types as in ``int8``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_FORMATS = ("float", "int8", "int4", "gguf")
INT4_GROUP_SIZES = (32, 64, 128, 256)


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

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of W as activations, for an embedding table tied to the LM head."""
        raise NotImplementedError(f"{type(self).__name__} cannot serve as an embedding table")


class FloatLinear(Linear):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids]


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
        rows, cols = weight.shape
        _check_group_size(cols, group_size)
        groups = weight.float().reshape(rows, cols // group_size, group_size)
        minimums = groups.amin(dim=-1)
        scales = ((groups.amax(dim=-1) - minimums) / 15.0).clamp(min=torch.finfo(torch.float32).tiny)
        codes = torch.round((groups - minimums[..., None]) / scales[..., None]).clamp(0, 15)
        return cls(codes.reshape(rows, cols), scales, minimums, group_size, dtype, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_zeros)
        return self._add_bias(y)


def _check_group_size(in_features: int, group_size: int) -> None:
    if in_features % group_size:
        raise ValueError(f"int4 group size {group_size} does not divide the layer's input size {in_features}; "
                         f"pick one of {INT4_GROUP_SIZES} that does")


def gguf_q4_codes(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Codes [rows, cols], scales and minimums [rows, cols / 32] of a Q4_0 or Q4_1 tensor, exactly as stored.

    Block layouts (32 weights each): Q4_1 = fp16 d, fp16 m, 16 bytes of nibbles, w = d·q + m;
    Q4_0 = fp16 d, 16 bytes of nibbles, w = d·(q - 8). Byte j holds weight j (low nibble) and j + 16 (high).
    """
    header = {"Q4_0": 2, "Q4_1": 4}[type_name]
    blocks = np.ascontiguousarray(raw).view(np.uint8).reshape(-1, header + 16)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)[:, 0]
    nibbles = blocks[:, header:]
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1)
    stored_min = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0] if header == 4 else None
    minimums = -8.0 * d if stored_min is None else stored_min
    rows, cols = shape
    # uint8 codes: Int4Linear widens them to the int32 its packing op wants.
    return (torch.from_numpy(codes).reshape(rows, cols), torch.from_numpy(d).reshape(rows, cols // 32),
            torch.from_numpy(minimums).reshape(rows, cols // 32))


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
