"""Which attention backend a model runs with, for a plain (model-dtype) KV cache: shared by the engine's target
model and a draft model (spec/draft_model.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from tokenmill.attention.backend import AttentionBackend
from tokenmill.attention.eager import EagerBackend
from tokenmill.attention.fused_cpu import FusedCPUBackend
from tokenmill.attention.fused_cpu import supports as fused_step_supports
from tokenmill.kernels import cpu_kernels
from tokenmill.kv.cache import KVCache
from tokenmill.model.llama import LlamaModel

logger = logging.getLogger(__name__)


def plain_backend(model: LlamaModel, kv_cache: KVCache, device: torch.device, enforce_eager: bool,
                  exact_rows: bool = False, chunk_attention: str = "auto",
                  ) -> tuple[AttentionBackend, Callable[[torch.Tensor], torch.Tensor] | None]:
    """The fused CPU step (and the kernels' greedy argmax) unless `enforce_eager`; the eager backend off CPU, for
    dtypes or head sizes the kernels are not built for, or when they cannot be built here (with a warning).
    `exact_rows` and `chunk_attention`: FusedCPUBackend's."""
    eager = EagerBackend(model, kv_cache)
    if enforce_eager or device.type != "cpu" or not fused_step_supports(model):
        return eager, None
    build = cpu_kernels()
    if build.module is None:
        logger.warning("fused CPU step unavailable, running eager steps: %s", build.error)
        return eager, None
    logger.info("fused CPU step ready in %.1fs (compiled on first use, then loaded from the cache): ISA level %s, "
                "GGUF block tiles for %s", build.seconds, build.isa, build.module.gguf_isa())
    kv_cache.use_kernels(build.module)
    return FusedCPUBackend(build.module, model, kv_cache, exact_rows, chunk_attention), build.module.greedy
