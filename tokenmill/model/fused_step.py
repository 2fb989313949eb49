"""A model step as one C++ call (tokenmill/kernels/cpu_decode.cpp) for any flat batch the scheduler hands out —
decodes, prefill chunks or both: the layer loop, fused small operators and attention over the paged cache in place,
with PyTorch's matmul kernels or the GGUF block kernel per weight format."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from tokenmill.model.linear import FloatLinear, GgufQ4Linear, GgufQ8Linear, Int4Linear, Int8Linear, Linear
from tokenmill.model.llama import KVCache, LlamaModel

FUSED_DTYPES = (torch.float32, torch.bfloat16)
FUSED_HEAD_DIMS = (64, 128)  # the attention loops are unrolled for these head sizes


def supports(model: LlamaModel) -> bool:
    return model.dtype in FUSED_DTYPES and model.cfg.head_dim in FUSED_HEAD_DIMS


def _linear(kernels: ModuleType, layer: Linear) -> Any:
    unused = torch.empty(0)
    if isinstance(layer, FloatLinear):
        if layer.packed is not None:
            return kernels.make_linear(5, layer.packed, unused, unused, layer.bias, 0, layer.out_features)
        return kernels.make_linear(0, layer.weight, unused, unused, layer.bias, 0, layer.out_features)
    if isinstance(layer, Int8Linear):
        return kernels.make_linear(1, layer.qweight, layer.scales, unused, layer.bias, 0, layer.out_features)
    if isinstance(layer, Int4Linear):
        return kernels.make_linear(2, layer.packed, layer.scales_zeros, unused, layer.bias, layer.group_size,
                                   layer.out_features)
    if isinstance(layer, GgufQ4Linear):
        return kernels.make_linear(3, layer.packed, layer.scales, layer.minimums, layer.bias, 32, layer.out_features)
    if isinstance(layer, GgufQ8Linear):
        return kernels.make_linear(4, layer.packed, layer.scales, unused, layer.bias, 32, layer.out_features)
    raise TypeError(f"no fused step support for {type(layer).__name__}")


class FusedStep:
    """Same contract as `LlamaModel.forward` over the same batch: final hidden states of every new token, with their
    keys and values stored at their slots. The batch is grouped by sequence: sequence s owns token rows
    [query_starts[s], query_starts[s + 1]), the last of its `context_lens[s]` positions, read through
    `block_tables[s]`."""

    def __init__(self, kernels: ModuleType, model: LlamaModel) -> None:
        if not supports(model):
            raise ValueError(f"the fused step supports dtypes {FUSED_DTYPES} and head sizes {FUSED_HEAD_DIMS}, "
                             f"not {model.dtype} and {model.cfg.head_dim}")
        cfg = model.cfg
        self.model = model
        layers = [kernels.LayerWeights(_linear(kernels, layer.qkv), _linear(kernels, layer.o),
                                       _linear(kernels, layer.gate_up), _linear(kernels, layer.down),
                                       layer.attn_norm, layer.ffn_norm)
                  for layer in model.layers]
        self.greedy = kernels.greedy  # the kernels' greedy sampling, for the runner's sampler
        self.step = kernels.FusedStep(layers, model.final_norm, model.rope_cos.contiguous(),
                                      model.rope_sin.contiguous(), cfg.rms_norm_eps, cfg.num_heads,
                                      cfg.num_kv_heads, cfg.head_dim)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                 query_starts: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                 kv_cache: KVCache) -> torch.Tensor:
        x = self.model.embed.rows(input_ids)
        return self.step.forward(x, positions, slot_mapping, query_starts, block_tables, context_lens, kv_cache.k,
                                 kv_cache.v, kv_cache.block_size)
