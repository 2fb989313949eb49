"""Llama-family decoder (llama, qwen2) over a flat token batch with a paged KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.model.attention import AttentionMetadata, paged_attention
from tokenmill.model.config import ModelConfig
from tokenmill.model.linear import Linear


class KVCache:
    """K and V for every layer, head-major, addressed by slot = block_id * block_size + offset."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        shape = (cfg.num_layers, cfg.num_kv_heads, num_blocks * block_size, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole blocks (src → dst) in every layer: copy-on-write for forked sequences."""
        if not copies:
            return
        slots = torch.arange(self.block_size, device=self.k.device)
        src = torch.cat([s * self.block_size + slots for s, _ in copies])
        dst = torch.cat([d * self.block_size + slots for _, d in copies])
        for cache in (self.k, self.v):
            cache[:, :, dst] = cache[:, :, src]

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * element


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32 whatever the model dtype, as the reference implementation does.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_tables(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for every position in the half-split layout: [max_position, head_dim]."""
    exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device=device) / cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta**exponents)
    angles = torch.outer(torch.arange(cfg.max_position, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


class DecoderLayer(nn.Module):
    """One transformer block. q, k and v share one matmul, gate and up another: fewer, larger GEMMs per step."""

    def __init__(self, cfg: ModelConfig, qkv: Linear, o: Linear, gate_up: Linear, down: Linear,
                 attn_norm: torch.Tensor, ffn_norm: torch.Tensor) -> None:
        super().__init__()
        self.cfg = cfg
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv, self.o, self.gate_up, self.down = qkv, o, gate_up, down
        self.register_buffer("attn_norm", attn_norm)
        self.register_buffer("ffn_norm", ffn_norm)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, block_size: int) -> torch.Tensor:
        cfg = self.cfg
        h = rms_norm(x, self.attn_norm, cfg.rms_norm_eps)
        qkv = self.qkv(h)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, cfg.num_heads, cfg.head_dim)
        k = k.view(-1, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(-1, cfg.num_kv_heads, cfg.head_dim)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        attn = paged_attention(q, k, v, k_cache, v_cache, meta, block_size)
        x = x + self.o(attn.reshape(-1, self.q_size))
        h = rms_norm(x, self.ffn_norm, cfg.rms_norm_eps)
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class LlamaModel(nn.Module):
    """`embed` is the embedding table as a linear layer: with tied embeddings it is the LM head as well."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, embed: Linear, layers: list[DecoderLayer],
                 final_norm: torch.Tensor, output: Linear | None) -> None:
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.embed = embed
        self.layers = nn.ModuleList(layers)
        self.register_buffer("final_norm", final_norm)
        self.output = output
        self.rope_cos, self.rope_sin = rope_tables(cfg, dtype, final_norm.device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: KVCache) -> torch.Tensor:
        """Hidden states after the final norm for every token of the flat batch: [T, hidden]."""
        x = self.embed.rows(input_ids)
        cos = self.rope_cos[positions].unsqueeze(1)
        sin = self.rope_sin[positions].unsqueeze(1)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv_cache.k[i], kv_cache.v[i], meta, kv_cache.block_size)
        return rms_norm(x, self.final_norm, self.cfg.rms_norm_eps)

    @property
    def lm_head(self) -> Linear:
        return self.embed if self.output is None else self.output

    def weight_bytes(self) -> int:
        """Bytes one decode step reads: every decoder weight and the LM head (the embedding only by row)."""
        return sum(m.weight_bytes() for m in self.modules() if isinstance(m, Linear) and m is not self.embed) + (
            self.embed.weight_bytes() if self.output is None else 0)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
