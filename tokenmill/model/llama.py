"""Llama-family decoder (llama, qwen2) over a flat token batch with a paged KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.model.attention import AttentionMetadata, paged_attention
from tokenmill.model.config import ModelConfig


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
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.cfg = cfg
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_size, self.kv_size = q_size, kv_size
        # q, k and v share one matmul, gate and up another: fewer, larger GEMMs per step.
        self.qkv_weight = nn.Parameter(torch.empty(q_size + 2 * kv_size, cfg.hidden_size, dtype=dtype),
                                       requires_grad=False)
        self.qkv_bias = (nn.Parameter(torch.empty(q_size + 2 * kv_size, dtype=dtype), requires_grad=False)
                         if cfg.attention_bias else None)
        self.o_weight = nn.Parameter(torch.empty(cfg.hidden_size, q_size, dtype=dtype), requires_grad=False)
        self.gate_up_weight = nn.Parameter(torch.empty(2 * cfg.intermediate_size, cfg.hidden_size, dtype=dtype),
                                           requires_grad=False)
        self.down_weight = nn.Parameter(torch.empty(cfg.hidden_size, cfg.intermediate_size, dtype=dtype),
                                        requires_grad=False)
        self.attn_norm = nn.Parameter(torch.empty(cfg.hidden_size, dtype=dtype), requires_grad=False)
        self.ffn_norm = nn.Parameter(torch.empty(cfg.hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, block_size: int) -> torch.Tensor:
        cfg = self.cfg
        h = rms_norm(x, self.attn_norm, cfg.rms_norm_eps)
        qkv = F.linear(h, self.qkv_weight, self.qkv_bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, cfg.num_heads, cfg.head_dim)
        k = k.view(-1, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(-1, cfg.num_kv_heads, cfg.head_dim)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        attn = paged_attention(q, k, v, k_cache, v_cache, meta, block_size)
        x = x + F.linear(attn.reshape(-1, self.q_size), self.o_weight)
        h = rms_norm(x, self.ffn_norm, cfg.rms_norm_eps)
        gate, up = F.linear(h, self.gate_up_weight).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, self.down_weight)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype), requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, dtype) for _ in range(cfg.num_layers))
        self.final_norm = nn.Parameter(torch.empty(cfg.hidden_size, dtype=dtype), requires_grad=False)
        self.output = (None if cfg.tie_word_embeddings else
                       nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype), requires_grad=False))
        self.rope_cos, self.rope_sin = rope_tables(cfg, dtype, torch.device("cpu"))

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: KVCache) -> torch.Tensor:
        """Hidden states after the final norm for every token of the flat batch: [T, hidden]."""
        x = self.embed[input_ids]
        cos = self.rope_cos[positions].unsqueeze(1)
        sin = self.rope_sin[positions].unsqueeze(1)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv_cache.k[i], kv_cache.v[i], meta, kv_cache.block_size)
        return rms_norm(x, self.final_norm, self.cfg.rms_norm_eps)

    @property
    def lm_head(self) -> torch.Tensor:
        # Resolved on use: a tied head registered as a second parameter would be untied by `to_empty`.
        return self.embed if self.output is None else self.output

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head).float()
