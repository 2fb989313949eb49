"""Build a `LlamaModel` from a GGUF file in the requested dtype and weight format (see `linear.py`)."""

from __future__ import annotations

import itertools
import struct

import torch

from tokenmill.model.config import ModelConfig
from tokenmill.model.gguf_blocks import (
    Q4_TYPES,
    Q8_TYPES,
    gguf_q4_codes,
    gguf_q6k_codes,
    gguf_q8_codes,
    q4_requantize,
    q8_requantize,
)
from tokenmill.model.gguf_file import GGUFFile, ModelLoadError
from tokenmill.model.linear import (
    FloatLinear,
    GgufQ4Linear,
    GgufQ8Linear,
    Int4Linear,
    Int8Linear,
    Linear,
    StackedLinear,
    check_weight_format,
)
from tokenmill.model.llama import DecoderLayer, LlamaModel


def _tile_family(tensor_type: str) -> str | None:
    """Which block tiles run a GGUF tensor type as stored: "q4", "q8" (Q8_0, Q5_0), "q6k", or None (none do)."""
    if tensor_type in Q4_TYPES:
        return "q4"
    if tensor_type in Q8_TYPES:
        return "q8"
    return "q6k" if tensor_type == "Q6_K" else None


def unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo the row permutation llama.cpp's converter applies to llama q/k weights.

    The GGUF stores each head's rotary pairs interleaved (2i, 2i+1); the model here uses the half-split rotary form,
    so rows go back to the original order.
    """
    rows, cols = weight.shape[0], weight.shape[1:]
    head_dim = rows // num_heads
    return weight.reshape(num_heads, head_dim // 2, 2, *cols).transpose(1, 2).reshape(rows, *cols)


class _LayerBuilder:
    """Makes each linear layer of the model in the requested weight format from the file's tensors."""

    def __init__(self, gguf_file: GGUFFile, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                 weight_format: str, int4_group_size: int, int8_activations: bool) -> None:
        self.file, self.cfg, self.dtype, self.device = gguf_file, cfg, dtype, device
        self.weight_format, self.int4_group_size = weight_format, int4_group_size
        self.int8_activations = int8_activations

    def float_tensor(self, name: str) -> torch.Tensor:
        return self.file.tensor(name, self.dtype)

    def _unpermute(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """llama's q/k rows (weights, or per-row codes and scales) back in half-split rotary order."""
        if self.cfg.architecture != "llama":
            return rows
        if name.endswith("attn_q.weight"):
            return unpermute_rope_rows(rows, self.cfg.num_heads)
        if name.endswith("attn_k.weight"):
            return unpermute_rope_rows(rows, self.cfg.num_kv_heads)
        return rows

    def _file_blocks(self, names: list[str], bias: torch.Tensor | None) -> Linear | None:
        """The file's own blocks of tensors stacked by rows, when every one has a tile (Q4_0/Q4_1/Q4_K: 4-bit,
        Q8_0/Q5_0: 8-bit, Q6_K: gguf_blocks.py); a stack mixing those families keeps each run of one family in a
        layer of its own behind one `StackedLinear`. With int8 activations any other stack (the other K-quants,
        float tensors) is requantized into 8-bit blocks of 32 for the 8-bit tiles, whose integer dot products beat
        PyTorch's int8 kernel there; with bf16 activations that kernel is the faster one, and None leaves such a
        stack to it (as it does a width that is not a multiple of 32)."""
        families = [_tile_family(self.file.tensor_type(n)) for n in names]
        if None not in families:
            runs = [[n for n, _ in run] for _, run in itertools.groupby(zip(names, families, strict=True),
                                                                         key=lambda item: item[1])]
            if len(runs) == 1:
                return self._block_layer(names, bias)
            return StackedLinear([self._block_layer(run, None) for run in runs], bias)
        if not self.int8_activations:
            return None
        weight = torch.cat([self._unpermute(n, self.file.tensor(n, torch.float32)) for n in names])
        if weight.shape[1] % 32:
            return None
        layer = GgufQ8Linear(*q8_requantize(weight), bias=bias)
        layer.int8_activations = True
        return layer

    def _block_layer(self, names: list[str], bias: torch.Tensor | None) -> GgufQ4Linear | GgufQ8Linear:
        """Tensors of one tile family (`_tile_family`) stacked by rows in their own blocks."""
        family = _tile_family(self.file.tensor_type(names[0]))
        layer: GgufQ4Linear | GgufQ8Linear
        if family == "q4":
            layer = GgufQ4Linear(*self._stack(names, [gguf_q4_codes(*self.file.raw_tensor(n)) for n in names]),
                                 bias=bias)
        elif family == "q8":
            layer = GgufQ8Linear(*self._stack(names, [gguf_q8_codes(*self.file.raw_tensor(n)) for n in names]),
                                 bias=bias)
        else:
            codes, d, sc = self._stack(names, [gguf_q6k_codes(*self.file.raw_tensor(n)) for n in names])
            layer = GgufQ8Linear(codes, d, bias=bias, sub_scales=sc)
        layer.int8_activations = self.int8_activations
        return layer

    def _stack(self, names: list[str], parts: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
        """Per-row tensors (codes, scales, ...) of several GGUF tensors stacked, q/k rows in rotary order."""
        return [torch.cat([self._unpermute(n, p[i]) for n, p in zip(names, parts, strict=True)])
                for i in range(len(parts[0]))]

    def linear(self, names: list[str], bias_names: list[str] | None = None, head: bool = False) -> Linear:
        """One linear layer whose weight is the named tensors stacked by rows (fused qkv, gate_up)."""
        bias = torch.cat([self.float_tensor(n) for n in bias_names]).to(self.device) if bias_names else None
        fmt = self.weight_format
        if fmt == "gguf" and (blocks := self._file_blocks(names, bias)) is not None:
            return blocks.to(self.device)
        weight = torch.cat([self._unpermute(n, self.file.tensor(n, torch.float32)) for n in names])
        if fmt == "float":
            return FloatLinear(weight.to(self.dtype), bias).to(self.device)
        if fmt == "q4" and weight.shape[1] % 32 == 0:
            layer = GgufQ4Linear(*q4_requantize(weight), bias=bias)
            layer.int8_activations = self.int8_activations
            return layer.to(self.device)
        if fmt == "int4" and not head:
            return Int4Linear.quantize(weight, self.int4_group_size, self.dtype, bias).to(self.device)
        return Int8Linear.quantize(weight, self.dtype, bias).to(self.device)


def layer_linears(i: int) -> dict[str, list[str]]:
    """Decoder layer i's linear layers (fused qkv, o, fused gate/up, down): the tensors each one stacks by rows."""
    p = f"blk.{i}."
    return {"qkv": [p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"], "o": [p + "attn_output.weight"],
            "gate_up": [p + "ffn_gate.weight", p + "ffn_up.weight"], "down": [p + "ffn_down.weight"]}


def head_tensor(cfg: ModelConfig) -> str:
    """The LM head's tensor: the embedding table when tied."""
    return "token_embd.weight" if cfg.tie_word_embeddings else "output.weight"


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The (rows, cols) shape, in torch order, that each tensor the model reads must have given its config."""
    h, q, kv, ff = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (cfg.vocab_size, h), "output_norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["output.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"blk.{i}."
        shapes |= {p + "attn_q.weight": (q, h), p + "attn_k.weight": (kv, h), p + "attn_v.weight": (kv, h),
                   p + "attn_output.weight": (h, q), p + "ffn_gate.weight": (ff, h), p + "ffn_up.weight": (ff, h),
                   p + "ffn_down.weight": (h, ff), p + "attn_norm.weight": (h,), p + "ffn_norm.weight": (h,)}
        if cfg.attention_bias:
            shapes |= {p + "attn_q.bias": (q,), p + "attn_k.bias": (kv,), p + "attn_v.bias": (kv,)}
    return shapes


def check_tensor_shapes(gguf_file: GGUFFile, cfg: ModelConfig) -> None:
    """Every tensor the model reads against the shape its config implies, and the tokenizer against the embedding.

    The fused CPU step sizes its qkv split from the config, and token ids index the embedding rows: a file whose
    tensors disagree with its own metadata must fail here, not read out of bounds later.
    """
    for name, want in expected_shapes(cfg).items():
        if not gguf_file.has_tensor(name):
            raise ModelLoadError(f"tensor '{name}' missing from {gguf_file.path}")
        got = gguf_file.raw_tensor(name)[2]
        if got != want:
            raise ModelLoadError(f"tensor '{name}' in {gguf_file.path} has shape {list(got)}, expected {list(want)} "
                                 f"from the model metadata")
    tokens = gguf_file.metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and len(tokens) > cfg.vocab_size:
        raise ModelLoadError(f"the tokenizer of {gguf_file.path} has {len(tokens)} tokens but the embedding table only "
                             f"{cfg.vocab_size} rows")


# What a damaged file can make numpy, torch or the gguf package raise while the model is built.
_BUILD_ERRORS = (IndexError, KeyError, ValueError, TypeError, OverflowError, MemoryError, RuntimeError,
                 struct.error)


def load_model(gguf_file: GGUFFile, dtype: torch.dtype, device: torch.device, weight_format: str = "float",
               int4_group_size: int = 32, max_positions: int | None = None,
               int8_activations: bool = False) -> LlamaModel:
    """The model of `gguf_file`, its RoPE tables for min(its context, `max_positions`) positions (a default cap
    when None, see `LlamaModel`); `int8_activations`: the GGUF block layers' int8-activation mode. Whatever is wrong
    with the file raises ModelLoadError."""
    check_weight_format(weight_format, dtype, device)
    if max_positions is not None and max_positions < 1:
        raise ValueError(f"max_positions must be >= 1, got {max_positions}")
    try:
        return _build(gguf_file, dtype, device, weight_format, int4_group_size, max_positions, int8_activations)
    except ModelLoadError:
        raise
    except _BUILD_ERRORS as exc:
        raise ModelLoadError(f"cannot build the model from {gguf_file.path}: {type(exc).__name__}: {exc}") from exc


def _build(gguf_file: GGUFFile, dtype: torch.dtype, device: torch.device, weight_format: str, int4_group_size: int,
           max_positions: int | None, int8_activations: bool) -> LlamaModel:
    cfg = ModelConfig.from_gguf_metadata(gguf_file.metadata, gguf_file.tensor_names())
    check_tensor_shapes(gguf_file, cfg)
    build = _LayerBuilder(gguf_file, cfg, dtype, device, weight_format, int4_group_size, int8_activations)
    layers = []
    for i in range(cfg.num_layers):
        p, names = f"blk.{i}.", layer_linears(i)
        layers.append(DecoderLayer(
            cfg,
            qkv=build.linear(names["qkv"], [p + "attn_q.bias", p + "attn_k.bias", p + "attn_v.bias"]
                             if cfg.attention_bias else None),
            o=build.linear(names["o"]),
            gate_up=build.linear(names["gate_up"]),
            down=build.linear(names["down"]),
            attn_norm=build.float_tensor(p + "attn_norm.weight").to(device),
            ffn_norm=build.float_tensor(p + "ffn_norm.weight").to(device),
        ))
    # The embedding is read a row per token; as the tied LM head it is read whole, so it takes the head's format.
    if cfg.tie_word_embeddings:
        embed, output = build.linear([head_tensor(cfg)], head=True), None
    else:
        embed = FloatLinear(build.float_tensor("token_embd.weight").to(device))
        output = build.linear([head_tensor(cfg)], head=True)
    final_norm = build.float_tensor("output_norm.weight").to(device)
    return LlamaModel(cfg, dtype, embed, layers, final_norm, output, max_positions).eval()
