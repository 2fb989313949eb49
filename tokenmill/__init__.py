"""tokenmill: an LLM inference and serving engine on PyTorch."""

from __future__ import annotations

import importlib
from typing import Any

# Resolved on first use so that importing a submodule (scheduler, block pool) does not load the whole engine.
_EXPORTS = {
    "LLM": "tokenmill.entrypoints.llm",
    "LLMEngine": "tokenmill.engine",
    "EngineConfig": "tokenmill.config",
    "SamplingParams": "tokenmill.sampling_params",
    "InvalidRequestError": "tokenmill.sampling_params",
    "StructuredOutputs": "tokenmill.structured.params",
    "ModelLoadError": "tokenmill.model.gguf_file",
    "CompletionOutput": "tokenmill.output.types",
    "GenerationResult": "tokenmill.output.types",
    "RequestOutput": "tokenmill.output.types",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tokenmill' has no attribute {name!r}")
