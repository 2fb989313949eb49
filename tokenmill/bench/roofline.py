"""Roofline context: bytes a decode step reads, and the memory bandwidth a measured decode speed implies.

A decode step of one sequence reads every weight once (the transformer layers and the LM head; the embedding
lookup is a gather) plus the K and V of every context token. Achieved bandwidth = those bytes × steps per second.
Dense backends (tokenmill, transformers) read weights at their run dtype; llama.cpp reads the GGUF's quantized
blocks as stored and keeps its KV cache in f16.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenmill.bench.metrics import RequestRecord, summarize, tpot


@dataclass(frozen=True)
class MemoryModel:
    weight_bytes: int  # read once per forward step
    kv_bytes_per_token: int  # K and V of one context token, all layers
    source: str  # how weight_bytes was counted

    def decode_step_bytes(self, context_len: float) -> float:
        return self.weight_bytes + self.kv_bytes_per_token * context_len

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def count_params(cfg: Any) -> tuple[int, int]:
    """(non-embedding parameters run for every token, LM head parameters) from a tokenmill ModelConfig."""
    h, d = cfg.hidden_size, cfg.head_dim
    qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * d
    per_layer = h * qkv_out + cfg.num_heads * d * h + 3 * h * cfg.intermediate_size + 2 * h
    if cfg.attention_bias:
        per_layer += qkv_out
    return cfg.num_layers * per_layer + h, cfg.vocab_size * h


def kv_bytes_per_token(cfg: Any, element_size: int) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * element_size


def _element_size(dtype: Any) -> int:
    import torch

    from tokenmill.config import DTYPES

    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    return torch.empty((), dtype=dtype).element_size()


def dense_memory_model(cfg: Any, dtype: Any) -> MemoryModel:
    """Weights as dense tensors of `dtype` (tokenmill, transformers with dequantized GGUF weights)."""
    size = _element_size(dtype)
    non_embedding, lm_head = count_params(cfg)
    return MemoryModel((non_embedding + lm_head) * size, kv_bytes_per_token(cfg, size), f"dense {dtype}")


def engine_memory_model(engine: Any) -> MemoryModel:
    """What a loaded tokenmill engine reads per step, in its own weight format (float, int8, int4, gguf, q4)."""
    size = _element_size(engine.dtype)
    return MemoryModel(engine.model.weight_bytes(), kv_bytes_per_token(engine.model_config, size),
                       f"tokenmill {engine.config.weight_format} weights, {engine.dtype}")


def gguf_memory_model(path: str | Path, kv_element_size: int = 2) -> MemoryModel:
    """Weights as stored in the GGUF (llama.cpp computes on the quantized blocks); KV in f16 by default.

    Every tensor counts except `token_embd.weight` when the file has a separate `output.weight` (then the
    embedding table is only gathered from); tied models read the embedding table as the LM head.
    """
    sizes = dict(gguf_tensor_bytes(str(path)))
    if "output.weight" in sizes:
        sizes.pop("token_embd.weight", None)
    return MemoryModel(sum(sizes.values()), kv_bytes_per_token(model_config(path), kv_element_size),
                       "GGUF tensors as stored")


@lru_cache(maxsize=4)
def gguf_file(path: str) -> Any:
    """The parsed GGUF (metadata and memory-mapped tensors); parsing takes seconds, so it is done once per path."""
    from tokenmill.model.gguf_file import GGUFFile

    return GGUFFile(path)


@lru_cache(maxsize=4)
def gguf_tensor_bytes(path: str) -> tuple[tuple[str, int], ...]:
    import gguf

    return tuple((t.name, int(t.n_bytes)) for t in gguf.GGUFReader(path).tensors)


def model_config(path: str | Path) -> Any:
    from tokenmill.model.config import ModelConfig

    file = gguf_file(str(path))
    return ModelConfig.from_gguf_metadata(file.metadata, file.tensor_names())


def decode_bandwidth_gb_s(record: RequestRecord, memory: MemoryModel) -> float | None:
    """Single-stream decode: bytes per step at the mean decode context (prompt + half the output) / TPOT."""
    value = tpot(record)
    if not value:
        return None
    context = record.prompt_tokens + record.output_tokens / 2
    return memory.decode_step_bytes(context) / value / 1e9


def single_stream_bandwidth(records: Sequence[RequestRecord], memory: MemoryModel | None) -> dict[str, Any] | None:
    """Summary (GB/s) of the per-request achieved bandwidth; meaningful when one request runs at a time."""
    if memory is None:
        return None
    return summarize(decode_bandwidth_gb_s(r, memory) for r in records if r.success)


def batch_weight_bandwidth(steps: int, duration_s: float, memory: MemoryModel | None) -> float | None:
    """Weights GB/s over a batched run from the engine's forward-step count (KV reads excluded: a lower bound)."""
    if memory is None or duration_s <= 0:
        return None
    return memory.weight_bytes * steps / duration_s / 1e9
