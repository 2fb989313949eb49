"""Quantized KV formats (`kv_cache_dtype`): what a quantized block holds, and the reference quantizer and dequantizer
in PyTorch that the C++ kernels (tokenmill/kernels/kv_quant.cpp) match bit for bit.

- int8: keys and values per token, symmetric: code = round(x / s), s = max|x| / 127 over the token's head_dim values.
  Per token rather than per block, because a token's scale then does not depend on its neighbours, and because a
  symmetric int8 code already resolves 1/254 of the token's range, where per-block scales lose range to outlier
  tokens.
- int4 and int2 (KIVI, Liu et al. 2024): keys per channel over the block's tokens (keys have outlier channels, so a
  channel's own range quantizes it best), values per token; both asymmetric: code = round((x - min) / s),
  s = (max - min) / (2^bits - 1).

Scales and minimums are stored as fp16 and the codes computed against the stored (rounded) values, so dequantizing
(code · s + min) reproduces exactly what the quantizer aimed at. Rounding is half to even everywhere.

A block is quantized once, when it fills: until then it is a sequence's open block and lives in full precision in
the sequence's residual slot (KIVI's full-precision residual window). Attention reads a key in full precision from
the query's own block and from its quantized block otherwise, whatever the step split (kernels/kv_quant.h).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KV_CACHE_DTYPES = ("auto", "int8", "int4", "int2")


@dataclass(frozen=True)
class KVFormat:
    """A quantized KV format: `bits` per stored value (8, 4 or 2)."""

    bits: int

    def __post_init__(self) -> None:
        if self.bits not in (8, 4, 2):
            raise ValueError(f"quantized KV has 8, 4 or 2 bits, not {self.bits}")

    @classmethod
    def from_name(cls, name: str) -> KVFormat | None:
        """The format `kv_cache_dtype` names (None: "auto", the model dtype)."""
        if name not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {name!r}")
        return None if name == "auto" else cls(int(name.removeprefix("int")))

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def row_bytes(self, head_dim: int) -> int:
        return head_dim * self.bits // 8

    def key_params(self, block_size: int, head_dim: int) -> int:
        """fp16 parameters per block and KV head for keys: a scale per token, or (scale, min) per channel."""
        return block_size if self.bits == 8 else 2 * head_dim

    def value_params(self, block_size: int) -> int:
        """... and for values: a scale, or (scale, min), per token."""
        return block_size if self.bits == 8 else 2 * block_size

    def bytes_per_block_head(self, block_size: int, head_dim: int) -> int:
        """Bytes of one block of one KV head in one layer, keys and values, codes and parameters."""
        codes = 2 * block_size * self.row_bytes(head_dim)
        return codes + 2 * (self.key_params(block_size, head_dim) + self.value_params(block_size))


def quantize(x: torch.Tensor, bits: int, keys: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One full block of one KV head, x [block_size, head_dim] (any float dtype): (codes as int64 [B, D], fp16
    parameters laid out as the cache stores them: int8 [B]; int4/int2 keys [scale[D], min[D]], values [B, 2])."""
    x = x.float()
    if bits == 8:
        scale = (x.abs().amax(dim=1) / 127).half()
        s = scale.float()[:, None]
        codes = torch.where(s > 0, torch.round(x / torch.where(s > 0, s, 1)).clamp(-127, 127), 0)
        return codes.long(), scale
    levels = float((1 << bits) - 1)
    dim = 0 if keys else 1
    lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    scale, minimum = ((hi - lo) / levels).half(), lo.half()
    s, m = scale.float(), minimum.float()
    codes = torch.where(s > 0, torch.round((x - m) / torch.where(s > 0, s, 1)).clamp(0, levels), 0).long()
    params = torch.cat((scale.flatten(), minimum.flatten())) if keys else torch.cat((scale, minimum), dim=1).flatten()
    return codes, params


def dequantize(codes: torch.Tensor, params: torch.Tensor, bits: int, keys: bool) -> torch.Tensor:
    """fp32 [B, D] from `quantize`'s output (the kernels then round it to the model dtype)."""
    c = codes.float()
    p = params.float()
    if bits == 8:
        return c * p[:, None]
    if keys:
        dim = c.shape[1]
        return c * p[:dim] + p[dim:]
    pairs = p.view(-1, 2)
    return c * pairs[:, :1] + pairs[:, 1:]


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [B, D] into the cache's bytes [B, D · bits / 8]: int8 as two's complement; int4/int2 with channels
    i, i + D/k, ... (k = 8 / bits) sharing byte i, from its low bits up."""
    if bits == 8:
        return codes.to(torch.int8).view(torch.uint8)
    per_byte = 8 // bits
    parts = codes.view(codes.shape[0], per_byte, -1)
    out = torch.zeros_like(parts[:, 0])
    for k in range(per_byte):
        out |= parts[:, k] << (bits * k)
    return out.to(torch.uint8)


def unpack(data: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """`pack`'s inverse: int64 codes [B, head_dim]."""
    if bits == 8:
        return data.view(torch.int8).long()
    per_byte = 8 // bits
    wide = data.long()
    return torch.cat([(wide >> (bits * k)) & ((1 << bits) - 1) for k in range(per_byte)], dim=1)[:, :head_dim]
