"""The fused CPU backend: a model step as one C++ call (tokenmill/kernels/cpu_step.cpp) for any flat batch a plan
holds — decodes, prefill chunks or both: the layer loop, fused small operators and attention over the paged cache in
place, with PyTorch's matmul kernels or the GGUF block kernel per weight format."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from tokenmill.attention.backend import AttentionBackend
from tokenmill.kv.cache import KVCache
from tokenmill.kv.quantized_cache import QuantizedKVCache
from tokenmill.model.linear import (
    FloatLinear,
    GgufQ4Linear,
    GgufQ8Linear,
    Int4Linear,
    Int8Linear,
    Linear,
    StackedLinear,
)
from tokenmill.model.llama import LlamaModel
from tokenmill.scheduler.plan import StepPlan

FUSED_DTYPES = (torch.float32, torch.bfloat16)
FUSED_HEAD_DIMS = (64, 128)  # the attention loops are unrolled for these head sizes


def supports(model: LlamaModel) -> bool:
    return model.dtype in FUSED_DTYPES and model.cfg.head_dim in FUSED_HEAD_DIMS


def rows_attention(mode: str, dtype: torch.dtype, quantized: bool) -> bool:
    """Whether prefill chunks are attended row by row as one-token decodes (EngineConfig.chunk_attention). "auto":
    in bf16 on a plain cache, where the decode kernel keeps up with the tiled one on long chunks; fp32's decode
    kernel and the quantized cache's per-row unpacking are slower there (benchmarks/attention.py)."""
    if mode == "auto":
        return dtype == torch.bfloat16 and not quantized
    return mode == "rows"


def _linear(kernels: ModuleType, layer: Linear) -> Any:
    unused = torch.empty(0)
    if isinstance(layer, FloatLinear):
        if layer.packing is not None:
            kind = 6 if layer.packing == "tokenmill" else 5
            return kernels.make_linear(kind, layer.packed, unused, unused, layer.bias, 0, layer.out_features)
        return kernels.make_linear(0, layer.weight, unused, unused, layer.bias, 0, layer.out_features)
    if isinstance(layer, Int8Linear):
        return kernels.make_linear(1, layer.qweight, layer.scales, unused, layer.bias, 0, layer.out_features)
    if isinstance(layer, Int4Linear):
        return kernels.make_linear(2, layer.packed, layer.scales_zeros, unused, layer.bias, layer.group_size,
                                   layer.out_features)
    if isinstance(layer, GgufQ4Linear):
        return kernels.make_linear(3, layer.packed, layer.scales, layer.minimums, layer.bias, 32, layer.out_features,
                                   layer.int8_activations)
    if isinstance(layer, StackedLinear):
        return kernels.make_stacked([_linear(kernels, part) for part in layer.parts], layer.bias)
    if isinstance(layer, GgufQ8Linear):
        return kernels.make_linear(4, layer.packed, layer.scales, unused, layer.bias, 32, layer.out_features,
                                   layer.int8_activations)
    raise TypeError(f"no fused step support for {type(layer).__name__}")


@dataclass
class SequenceBatch:
    """The step's sequences: sequence s owns token rows [query_starts[s], query_starts[s + 1])."""

    slot_mapping: torch.Tensor  # [T]
    query_starts: torch.Tensor  # [S + 1]
    block_tables: torch.Tensor  # [S, max_blocks], padded with block 0; with lane tables [layers, S, kv_heads, ...]
    context_lens: torch.Tensor  # [S] KV entries of each sequence, its new tokens' included
    residual_slots: torch.Tensor | None = None  # [S] with a quantized cache: where each open block lives
    # When the plan collects it: [S, kv_heads, max_blocks * block_size], or [layers, S, ...] with lane tables
    attention_mass: torch.Tensor | None = None
    row_visible: torch.Tensor | None = None  # [T] with a token tree: entries each row sees (-1: all before it)


def row_visible(plan: StepPlan) -> torch.Tensor | None:
    """[T] int64: per row, the entries of its sequence it sees besides its own, or -1 for every one before it; None
    when the plan has no token tree."""
    if not any(s.draft_parents for s in plan.seqs):
        return None
    out = torch.full((plan.num_tokens,), -1, dtype=torch.long)
    for seq in plan.seqs:
        visible = seq.visible_entries()
        if visible is not None:
            out[seq.query_start : seq.query_start + seq.num_tokens] = torch.tensor(visible, dtype=torch.long)
    return out


class FusedCPUBackend(AttentionBackend):
    """The whole layer loop runs in the kernel, attention included; same contract as the eager backend."""

    def __init__(self, kernels: ModuleType, model: LlamaModel, kv_cache: KVCache | QuantizedKVCache,
                 exact_rows: bool = False, chunk_attention: str = "auto") -> None:
        """`exact_rows`: batch_invariant (every matmul and attention row as each row alone computes it);
        `chunk_attention`: EngineConfig's. A tensor-parallel shard (parallel/tensor.py) runs with its layers' head
        counts and all-reduce."""
        if not supports(model):
            raise ValueError(f"the fused step supports dtypes {FUSED_DTYPES} and head sizes {FUSED_HEAD_DIMS}, "
                             f"not {model.dtype} and {model.cfg.head_dim}")
        cfg = self.cfg = model.layers[0].cfg  # this rank's heads
        self.model = model
        self.kv_cache = kv_cache
        layers = [kernels.LayerWeights(_linear(kernels, layer.qkv), _linear(kernels, layer.o),
                                       _linear(kernels, layer.gate_up), _linear(kernels, layer.down),
                                       layer.attn_norm, layer.ffn_norm)
                  for layer in model.layers]
        self.step = kernels.FusedStep(layers, model.final_norm, model.rope_cos.contiguous(),
                                      model.rope_sin.contiguous(), cfg.rms_norm_eps, cfg.num_heads,
                                      cfg.num_kv_heads, cfg.head_dim, exact_rows,
                                      rows_attention(chunk_attention, model.dtype,
                                                     isinstance(kv_cache, QuantizedKVCache)),
                                      model.layers[0].all_reduce)
        self.quant_kv = None
        if isinstance(kv_cache, QuantizedKVCache):
            self.quant_kv = kernels.QuantKV(kv_cache.format.bits, kv_cache.block_size, kv_cache.k_data,
                                            kv_cache.k_params, kv_cache.v_data, kv_cache.v_params,
                                            kv_cache.k_residual, kv_cache.v_residual)

    def build_metadata(self, plan: StepPlan) -> SequenceBatch:
        seqs = plan.seqs
        block_size, cfg = self.kv_cache.block_size, self.cfg
        width = max(-(-s.context_len // block_size) for s in seqs)
        tables = torch.tensor([list(s.block_table[:width]) + [0] * (width - min(width, len(s.block_table)))
                               for s in seqs], dtype=torch.long)
        lanes = any(s.lane_tables is not None for s in seqs)
        if lanes:
            tables = tables[None, :, None].expand(cfg.num_layers, -1, cfg.num_kv_heads, -1).clone()
            for i, s in enumerate(seqs):
                if s.lane_tables is not None:
                    n = min(width, s.lane_tables.shape[1])
                    tables[:, i, :, :n] = s.lane_tables[:, :n].view(cfg.num_layers, cfg.num_kv_heads, n)
        mass = None
        if plan.collect_attention:
            shape = (len(seqs), cfg.num_kv_heads, width * block_size)
            mass = torch.zeros((cfg.num_layers, *shape) if lanes else shape, dtype=torch.float32)
        return SequenceBatch(
            torch.tensor(plan.slot_mapping, dtype=torch.long),
            torch.tensor([*(s.query_start for s in seqs), plan.num_tokens], dtype=torch.long),
            tables,
            torch.tensor([s.context_len for s in seqs], dtype=torch.long),
            torch.tensor(self.kv_cache.residual_slots(plan), dtype=torch.long)
            if isinstance(self.kv_cache, QuantizedKVCache) else None,
            mass,
            row_visible(plan),
        )

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: SequenceBatch) -> torch.Tensor:
        x = self.model.embed.rows(input_ids)
        kv = self.kv_cache
        if isinstance(kv, QuantizedKVCache):
            return self.step.forward_quantized(x, positions, metadata.query_starts, metadata.block_tables,
                                               metadata.context_lens, self.quant_kv, metadata.residual_slots,
                                               metadata.attention_mass, metadata.row_visible)
        return self.step.forward(x, positions, metadata.slot_mapping, metadata.query_starts, metadata.block_tables,
                                 metadata.context_lens, kv.k, kv.v, kv.block_size, metadata.attention_mass,
                                 metadata.row_visible)

    def attention_mass(self, metadata: SequenceBatch) -> torch.Tensor | None:
        mass = metadata.attention_mass
        if mass is None:
            return None
        if mass.dim() == 4:  # [layers, S, kv_heads, E]: one lane per layer's KV head
            return mass.permute(1, 0, 2, 3).flatten(1, 2)
        return mass.sum(1, keepdim=True)
