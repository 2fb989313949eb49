"""Llama-family decoder (llama, qwen2) over a flat token batch; attention, and the KV cache with it, is the
backend's."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.model.config import ModelConfig
from tokenmill.model.linear import FloatLinear, Linear

# Attention of one layer: (layer index, q [T, H, D], k and v [T, Hkv, D]) -> [T, H, D]. The attention backend
# supplies it, and with it the KV cache: the model itself knows nothing of blocks or slots.
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32 whatever the model dtype, as the reference implementation does; one fused op rather than
    # five, which matters at decode where each op costs more in dispatch than in arithmetic.
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotary embedding: x·cos + rotate_half(x)·sin, with rotate_half(x)·sin = roll(x)·[-sin, sin]."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def rope_tables(cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin ([-sin, sin], see `apply_rope`) for positions [0, positions): [positions, head_dim]."""
    exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device=device) / cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta**exponents)
    angles = torch.outer(torch.arange(positions, dtype=torch.float32, device=device), inv_freq)
    return torch.cat((angles, angles), dim=-1).cos().to(dtype), torch.cat((-angles, angles), dim=-1).sin().to(dtype)


def rope_rotation(cfg: ModelConfig, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin ([head_dim], fp32) that move an already rotated key by `offset` positions (negative:
    back), since RoPE rotations compose by adding angles. Angles in float64, so that large offsets stay exact."""
    exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim
    angles = offset / (cfg.rope_theta**exponents)
    return (torch.cat((angles, angles)).cos().float(), torch.cat((-angles, angles)).sin().float())


class DecoderLayer(nn.Module):
    """One transformer block. q, k and v share one matmul, gate and up another: fewer, larger GEMMs per step."""

    def __init__(self, cfg: ModelConfig, qkv: Linear, o: Linear, gate_up: Linear, down: Linear,
                 attn_norm: torch.Tensor, ffn_norm: torch.Tensor) -> None:
        super().__init__()
        self.cfg = cfg
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv, self.o, self.gate_up, self.down = qkv, o, gate_up, down
        # With tensor parallelism (parallel/tensor.py) `o` and `down` give partial sums over this process's heads
        # and columns, which this sums across processes.
        self.all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.register_buffer("attn_norm", attn_norm)
        self.register_buffer("ffn_norm", ffn_norm)

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cfg = self.cfg
        qkv = self.qkv(rms_norm(x, self.attn_norm, cfg.rms_norm_eps))
        # q and k rotate together: one set of ops for both.
        qk = apply_rope(qkv[:, : self.q_size + self.kv_size].view(-1, cfg.num_heads + cfg.num_kv_heads, cfg.head_dim),
                        cos, sin)
        v = qkv[:, self.q_size + self.kv_size :].view(-1, cfg.num_kv_heads, cfg.head_dim)
        return qk[:, : cfg.num_heads], qk[:, cfg.num_heads :], v

    def _finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        out = self.o(attn.reshape(-1, self.q_size))
        x = x + (out if self.all_reduce is None else self.all_reduce(out))
        gate, up = self.gate_up(rms_norm(x, self.ffn_norm, self.cfg.rms_norm_eps)).chunk(2, dim=-1)
        out = self.down(F.silu(gate) * up)
        return x + (out if self.all_reduce is None else self.all_reduce(out))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend,
                index: int) -> torch.Tensor:
        q, k, v = self._qkv(x, cos, sin)
        return self._finish(x, attend(index, q, k, v))


# RoPE table size (positions x head_dim) when no cap is given: 128k positions at head_dim 128, 2 x 64 MiB in fp32.
DEFAULT_ROPE_ELEMENTS = 1 << 24


class LlamaModel(nn.Module):
    """`embed` is the embedding table as a linear layer: with tied embeddings it is the LM head as well.

    The RoPE tables cover positions [0, max_positions), max_positions = min(the model's context, the cap; without
    one, as many positions as DEFAULT_ROPE_ELEMENTS allows): the file's context_length alone must not size an
    allocation. Positions at or past `max_positions` are out of range, so the engine keeps its max_model_len below.
    """

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, embed: Linear, layers: list[DecoderLayer],
                 final_norm: torch.Tensor, output: Linear | None, max_positions: int | None = None) -> None:
        super().__init__()
        if max_positions is not None and max_positions < 1:
            raise ValueError(f"max_positions must be >= 1, got {max_positions}")
        cap = DEFAULT_ROPE_ELEMENTS // cfg.head_dim if max_positions is None else max_positions
        self.max_positions = min(cfg.max_position, cap)
        self.cfg = cfg
        self.dtype = dtype
        self.embed = embed
        self.layers = nn.ModuleList(layers)
        self.register_buffer("final_norm", final_norm)
        self.output = output
        self.rope_cos, self.rope_sin = rope_tables(cfg, dtype, final_norm.device, self.max_positions)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """Hidden states after the final norm for every token of the flat batch: [T, hidden]."""
        x = self.embed.rows(input_ids)
        cos = self.rope_cos[positions].unsqueeze(1)
        sin = self.rope_sin[positions].unsqueeze(1)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, attend, i)
        return rms_norm(x, self.final_norm, self.cfg.rms_norm_eps)

    def prepack_weights(self, kernel: str = "tokenmill") -> int:
        """Float layers' weights packed for `kernel`'s bf16 matmul (`FloatLinear.prepack`; CPU bf16 only), the plain
        copy dropped except for the embedding table. Returns how many layers were packed."""
        packed = 0
        for module in self.modules():
            if isinstance(module, FloatLinear):
                packed += module.prepack(keep_weight=module is self.embed, kernel=kernel)
        return packed

    @property
    def lm_head(self) -> Linear:
        return self.embed if self.output is None else self.output

    def weight_bytes(self) -> int:
        """Bytes one decode step reads: every decoder weight and the LM head (the embedding only by row)."""
        linears = (m for layer in self.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down))
        return sum(m.weight_bytes() for m in linears) + self.lm_head.weight_bytes()

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.logits(hidden).float()
