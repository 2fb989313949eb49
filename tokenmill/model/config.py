"""Model hyper-parameters read from GGUF metadata.

Every value is checked here, so a damaged or hostile file fails with one `ModelLoadError` naming the key rather
than a ZeroDivisionError or a multi-gigabyte allocation later on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tokenmill.model.gguf_file import ModelLoadError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

# Sane bounds, each well above released llama/qwen2 models (405B: 126 layers, hidden 16384, 128 heads; vocabularies
# up to 262k; head_dim up to 256). Anything beyond them is a damaged file, not a model.
MAX_LAYERS = 1024
MAX_HIDDEN = 1 << 17
MAX_HEADS = 4096
MAX_HEAD_DIM = 1024
MAX_FEED_FORWARD = 1 << 20
MAX_VOCAB = 1 << 24
# context_length only bounds the positions a request may use; nothing is allocated in proportion to it (the RoPE
# tables are capped at load, see `load_model`), so any positive int64 is accepted.
MAX_CONTEXT = (1 << 63) - 1


def _as_int(key: str, value: Any, lo: int, hi: int) -> int:
    # bool is an int subclass, and a float or string here is a wrongly typed field: both rejected.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ModelLoadError(f"GGUF metadata '{key}' = {value!r:.80} is not an integer")
    if not lo <= value <= hi:
        raise ModelLoadError(f"GGUF metadata '{key}' = {value} is out of range [{lo}, {hi}]")
    return value


def _as_positive_float(key: str, value: Any, hi: float = math.inf) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ModelLoadError(f"GGUF metadata '{key}' = {value!r:.80} is not a number")
    if not (math.isfinite(value) and 0 < value < hi):
        raise ModelLoadError(f"GGUF metadata '{key}' = {value!r} must be finite and in (0, {hi})")
    return float(value)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position: int
    rope_theta: float
    rms_norm_eps: float
    attention_bias: bool  # qwen2 has q/k/v biases
    tie_word_embeddings: bool

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                     "vocab_size", "max_position"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ModelLoadError(f"model {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ModelLoadError(f"head_dim {self.head_dim} is odd; rotary embeddings rotate pairs")
        for name in ("rope_theta", "rms_norm_eps"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) <= 0:
                raise ModelLoadError(f"model {name} must be finite and > 0, got {getattr(self, name)!r}")

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], tensor_names: list[str]) -> ModelConfig:
        arch = meta.get("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"unsupported architecture {arch!r:.80}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )

        def get(key: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise ModelLoadError(f"GGUF metadata lacks '{arch}.{key}'")
            return value

        def get_int(key: str, lo: int, hi: int, default: Any = None) -> int:
            return _as_int(f"{arch}.{key}", get(key, default), lo, hi)

        hidden = get_int("embedding_length", 1, MAX_HIDDEN)
        heads = get_int("attention.head_count", 1, MAX_HEADS)
        return cls(
            architecture=arch,
            num_layers=get_int("block_count", 1, MAX_LAYERS),
            hidden_size=hidden,
            intermediate_size=get_int("feed_forward_length", 1, MAX_FEED_FORWARD),
            num_heads=heads,
            num_kv_heads=get_int("attention.head_count_kv", 1, heads, heads),
            head_dim=_head_dim(meta, arch, hidden, heads),
            vocab_size=_vocab_size(meta, arch),
            max_position=get_int("context_length", 1, MAX_CONTEXT),
            rope_theta=_as_positive_float(f"{arch}.rope.freq_base", get("rope.freq_base", 10000.0)),
            rms_norm_eps=_as_positive_float(f"{arch}.attention.layer_norm_rms_epsilon",
                                            get("attention.layer_norm_rms_epsilon"), hi=1.0),
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            tie_word_embeddings="output.weight" not in tensor_names,
        )


def _head_dim(meta: dict[str, Any], arch: str, hidden: int, heads: int) -> int:
    key = f"{arch}.attention.key_length"
    if key in meta:
        head_dim = _as_int(key, meta[key], 2, MAX_HEAD_DIM)
    elif hidden % heads:
        raise ModelLoadError(f"GGUF metadata: {arch}.embedding_length {hidden} is not a multiple of "
                             f"{arch}.attention.head_count {heads} (and no {key} is given)")
    else:
        head_dim = _as_int(f"{arch}.embedding_length / head_count", hidden // heads, 2, MAX_HEAD_DIM)
    value_key = f"{arch}.attention.value_length"
    if value_key in meta and meta[value_key] != head_dim:
        raise ModelLoadError(f"GGUF metadata '{value_key}' = {meta[value_key]!r:.80} differs from the key length "
                             f"{head_dim}; only equal key and value head sizes are supported")
    if head_dim % 2:
        raise ModelLoadError(f"head dimension {head_dim} is odd; rotary embeddings rotate pairs")
    rope_key = f"{arch}.rope.dimension_count"
    if rope_key in meta and meta[rope_key] != head_dim:
        # The model rotates whole heads; a partial rotary dimension would load and then give wrong outputs.
        raise ModelLoadError(f"GGUF metadata '{rope_key}' = {meta[rope_key]!r:.80} differs from the head dimension "
                             f"{head_dim}; partial rotary embeddings are not supported")
    return head_dim


def _vocab_size(meta: dict[str, Any], arch: str) -> int:
    """The declared vocabulary size, else the tokenizer's token count (the loader checks both against the
    embedding rows)."""
    key = f"{arch}.vocab_size"
    if key in meta:
        return _as_int(key, meta[key], 1, MAX_VOCAB)
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ModelLoadError(f"GGUF metadata has neither '{key}' nor a tokenizer.ggml.tokens list")
    return _as_int("len(tokenizer.ggml.tokens)", len(tokens), 1, MAX_VOCAB)
