"""Build a `LlamaModel` from a GGUF file, dequantizing each tensor to the requested dtype."""

from __future__ import annotations

import torch

from tokenmill.model.config import ModelConfig
from tokenmill.model.gguf_file import GGUFFile
from tokenmill.model.llama import LlamaModel, rope_tables


def unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo the row permutation llama.cpp's converter applies to llama q/k weights.

    The GGUF stores each head's rotary pairs interleaved (2i, 2i+1); the model here uses the half-split rotary form,
    so rows go back to the original order.
    """
    rows, cols = weight.shape[0], weight.shape[1:]
    head_dim = rows // num_heads
    return weight.reshape(num_heads, head_dim // 2, 2, *cols).transpose(1, 2).reshape(rows, *cols)


def load_model(gguf_file: GGUFFile, dtype: torch.dtype, device: torch.device) -> LlamaModel:
    cfg = ModelConfig.from_gguf_metadata(gguf_file.metadata, gguf_file.tensor_names())
    with torch.device("meta"):
        model = LlamaModel(cfg, dtype)
    model = model.to_empty(device=device)
    model.rope_cos, model.rope_sin = rope_tables(cfg, dtype, device)

    def get(name: str) -> torch.Tensor:
        return gguf_file.tensor(name, dtype)

    def maybe_unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
        return unpermute_rope_rows(weight, heads) if cfg.architecture == "llama" else weight

    with torch.no_grad():
        model.embed.copy_(get("token_embd.weight"))
        model.final_norm.copy_(get("output_norm.weight"))
        if not cfg.tie_word_embeddings:
            model.output.copy_(get("output.weight"))
        for i, layer in enumerate(model.layers):
            p = f"blk.{i}."
            q = maybe_unpermute(get(p + "attn_q.weight"), cfg.num_heads)
            k = maybe_unpermute(get(p + "attn_k.weight"), cfg.num_kv_heads)
            layer.qkv_weight.copy_(torch.cat([q, k, get(p + "attn_v.weight")]))
            if layer.qkv_bias is not None:
                layer.qkv_bias.copy_(torch.cat([get(p + "attn_q.bias"), get(p + "attn_k.bias"),
                                                get(p + "attn_v.bias")]))
            layer.o_weight.copy_(get(p + "attn_output.weight"))
            layer.gate_up_weight.copy_(torch.cat([get(p + "ffn_gate.weight"), get(p + "ffn_up.weight")]))
            layer.down_weight.copy_(get(p + "ffn_down.weight"))
            layer.attn_norm.copy_(get(p + "attn_norm.weight"))
            layer.ffn_norm.copy_(get(p + "ffn_norm.weight"))
    return model.eval()
