"""OpenAI-compatible HTTP server: `tokenmill serve`, or `create_app()` for an ASGI app.

Importing this package is cheap; FastAPI and the engine load when `create_app` or `AsyncEngine` is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "create_app": "tokenmill.server.app",
    "AsyncEngine": "tokenmill.server.async_engine",
    "run_server": "tokenmill.server.cli",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tokenmill.server' has no attribute {name!r}")
