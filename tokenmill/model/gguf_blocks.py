"""The file's own quantized blocks as codes and per-32-weight scales, exactly as stored, for the GGUF block kernels.

Two kernel families take them (tokenmill/kernels/gguf_matmul.cpp, `GgufQ4Linear` / `GgufQ8Linear`):
- Q4 tiles, W = d · q + m with 4-bit codes q and per-block d, m: Q4_0, Q4_1, and Q4_K, whose 256-weight super-block
  holds eight 32-weight sub-blocks with 6-bit scales and minimums under an f16 d and dmin. A sub-block's d · sc and
  dmin · m are products of an 11-bit and a 6-bit integer significand, exact in fp32 but not in f16, so Q4_K's
  scales and minimums are fp32 (`GgufQ4Linear` keeps f16 where every value is one).
- Q8 tiles, W = d · q with int8 codes: Q8_0 and Q5_0 (f16 d, 5-bit q − 16 in [-16, 15], exact in int8), one f16
  scale per 32 weights; and Q6_K, whose 256-weight super-block holds sixteen 16-weight sub-blocks of 6-bit q − 32 (in
  [-32, 31]) under an int8 sc each and an f16 d: the tiles read d and sc as stored and form d · sc in fp32 (exact: an
  11-bit times an 8-bit significand; not exact in f16).

Q5_1, Q5_K, Q3_K and Q2_K have no tile here; the loader gives a stack holding one of them the int8 fallback, and a
stack mixing the tile families one block layer per family (`loader.py`).
"""

from __future__ import annotations

import numpy as np
import torch

Q4_TYPES = frozenset({"Q4_0", "Q4_1", "Q4_K"})
Q8_TYPES = frozenset({"Q8_0", "Q5_0"})


def _blocks(raw: np.ndarray, block_bytes: int) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.uint8).reshape(-1, block_bytes)


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The f16 at byte `offset` of every block, as fp32 [blocks]."""
    return blocks[:, offset:offset + 2].copy().view(np.float16).astype(np.float32)[:, 0]


def gguf_q8_codes(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [rows, cols] int8 and f16 scales [rows, cols / 32]. Q8_0 = f16 d, 32 int8 codes. Q5_0 = f16 d, 4 bytes
    of high bits (bit j: weight j's fifth bit), 16 bytes of nibbles (byte j: weight j low, j + 16 high);
    w = d · (q - 16)."""
    rows, cols = shape
    if type_name == "Q8_0":
        blocks = _blocks(raw, 34)
        codes = blocks[:, 2:].copy().view(np.int8)
    elif type_name == "Q5_0":
        blocks = _blocks(raw, 22)
        high = blocks[:, 2:6].copy().view("<u4")[:, 0]
        fifth = ((high[:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int16) << 4
        nibbles = blocks[:, 6:22].astype(np.int16)
        codes = (np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1) | fifth) - 16
        codes = codes.astype(np.int8)
    else:
        raise ValueError(f"expected a Q8_0 or Q5_0 tensor, got {type_name}")
    d = blocks[:, 0:2].copy().view(np.float16)[:, 0]
    return torch.from_numpy(codes).reshape(rows, cols), torch.from_numpy(d).reshape(rows, cols // 32)


def gguf_q6k_codes(raw: np.ndarray, type_name: str,
                   shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q6_K as stored: codes [rows, cols] int8 (q - 32), f16 d [rows, cols / 256] and int8 sc [rows, cols / 16];
    W[n, 16s + j] = d[n, s // 16] · sc[n, s] · code. A super-block is 210 bytes: 128 of low nibbles, 64 of high bit
    pairs, 16 int8 sc (sub-block s of 16 weights under sc[s]), f16 d. Each 128-weight half has 64 low-nibble bytes L
    and 32 high-bit bytes H; for l < 32, weight l + 32i of the half takes its low 4 bits from L[l] (i = 0, 2: low,
    high nibble) or L[l + 32] (i = 1, 3), and its top 2 from bits 2i, 2i + 1 of H[l]."""
    if type_name != "Q6_K":
        raise ValueError(f"expected a Q6_K tensor, got {type_name}")
    rows, cols = shape
    blocks = _blocks(raw, 210)
    low = blocks[:, :128].reshape(-1, 2, 2, 32)  # [block, half, L[0:32] or L[32:64], l]
    high = blocks[:, 128:192].reshape(-1, 2, 1, 32)
    nibbles = np.stack([low[:, :, 0] & 0x0F, low[:, :, 1] & 0x0F, low[:, :, 0] >> 4, low[:, :, 1] >> 4], axis=2)
    tops = (high >> (2 * np.arange(4, dtype=np.uint8)[None, None, :, None])) & 3
    codes = ((nibbles.astype(np.int16) | (tops.astype(np.int16) << 4)) - 32).astype(np.int8)
    sc = blocks[:, 192:208].copy().view(np.int8)
    d = blocks[:, 208:210].copy().view(np.float16)
    return (torch.from_numpy(codes).reshape(rows, cols), torch.from_numpy(d).reshape(rows, cols // 256),
            torch.from_numpy(sc).reshape(rows, cols // 16))


def _q4k_sub_blocks(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 bytes of 6-bit scales and minimums → ([blocks, 8], [blocks, 8]) integers. Sub-blocks 0-3 keep
    their low 6 bits in bytes 0-3 (scale) and 4-7 (minimum); 4-7 keep their low 4 bits in the nibbles of bytes 8-11
    and their top 2 bits in the top bits of bytes 0-3 (scale) and 4-7 (minimum)."""
    p = packed.astype(np.int32)
    low = np.concatenate([p[:, 0:4] & 63, (p[:, 8:12] & 0x0F) | ((p[:, 0:4] >> 6) << 4)], axis=1)
    mins = np.concatenate([p[:, 4:8] & 63, (p[:, 8:12] >> 4) | ((p[:, 4:8] >> 6) << 4)], axis=1)
    return low, mins


def gguf_q4_codes(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Codes [rows, cols] uint8 in 0..15, fp32 scales and minimums [rows, cols / 32], exactly as stored.

    Q4_1 = f16 d, f16 m, 16 bytes of nibbles, w = d·q + m; Q4_0 = f16 d, 16 bytes, w = d·(q - 8) (byte j: weight
    j low, j + 16 high). Q4_K = f16 d, f16 dmin, 12 bytes of sub-block scales, 128 bytes of nibbles: bytes 32j..32j+31
    hold sub-block 2j in their low nibbles and 2j + 1 in their high ones; w = d·sc·q − dmin·m."""
    rows, cols = shape
    if type_name == "Q4_K":
        blocks = _blocks(raw, 144)
        d, dmin = _f16(blocks, 0), _f16(blocks, 2)
        sc, mins = _q4k_sub_blocks(blocks[:, 4:16])
        nibbles = blocks[:, 16:].reshape(-1, 4, 32)
        codes = np.stack([nibbles & 0x0F, nibbles >> 4], axis=2).reshape(-1, 256)
        # fp32 products of small integers: exact, as llama.cpp forms them.
        scales = (d[:, None] * sc.astype(np.float32)).reshape(-1)
        minimums = -(dmin[:, None] * mins.astype(np.float32)).reshape(-1)
    elif type_name in ("Q4_0", "Q4_1"):
        header = 2 if type_name == "Q4_0" else 4
        blocks = _blocks(raw, header + 16)
        scales = _f16(blocks, 0)
        nibbles = blocks[:, header:]
        codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1)
        minimums = -8.0 * scales if header == 2 else _f16(blocks, 2)
    else:
        raise ValueError(f"expected a Q4_0, Q4_1 or Q4_K tensor, got {type_name}")
    return (torch.from_numpy(np.ascontiguousarray(codes)).reshape(rows, cols),
            torch.from_numpy(scales).reshape(rows, cols // 32), torch.from_numpy(minimums).reshape(rows, cols // 32))


def q8_requantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 weights [rows, cols] (cols a multiple of 32) as 8-bit blocks of 32 in Q8_0's form: an f16 scale
    d = amax / 127 per block (rounded to f16 first) and codes round(w / d) in [-127, 127]. Lossy: the tensor types the
    tiles do not read (Q6_K, the other K-quants, float) become blocks the 8-bit tiles do."""
    rows, cols = weight.shape
    blocks = weight.float().reshape(rows, cols // 32, 32)
    d = (blocks.abs().amax(dim=-1) / 127).to(torch.float16)
    safe = torch.where(d > 0, d.float(), torch.ones_like(d, dtype=torch.float32))
    codes = torch.round(blocks / safe[..., None]).clamp(-127, 127).to(torch.int8)
    return codes.reshape(rows, cols), d


def asymmetric_4bit(weight: torch.Tensor, group: int,
                    grid: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 weights [rows, cols] (cols a multiple of `group`) rounded to 4 bits per group: a minimum m (the group's
    least weight) and a step d = (max - m) / 15, each rounded to `grid` first, and codes round((w - m) / d) in
    [0, 15]. Returns (uint8 codes [rows, cols], d, m [rows, cols / group]) in fp32; each weight lands within about
    half a step of its input (a constant group: step 0, codes 0)."""
    rows, cols = weight.shape
    groups = weight.float().reshape(rows, cols // group, group)
    m = groups.amin(dim=-1).to(grid).float()
    d = ((groups.amax(dim=-1) - m) / 15).to(grid).float()
    safe = torch.where(d > 0, d, torch.ones_like(d))
    codes = torch.round((groups - m[..., None]) / safe[..., None]).clamp(0, 15).to(torch.uint8)
    return codes.reshape(rows, cols), d, m


def q4_requantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 weights [rows, cols] (cols a multiple of 32) as 4-bit blocks of 32 in Q4_1's form, for the 4-bit tiles:
    `asymmetric_4bit` with the minimum and the step rounded to f16, as a Q4_1 file stores them. Lossy."""
    return asymmetric_4bit(weight, 32, torch.float16)
