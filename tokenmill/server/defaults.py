"""Server limits' defaults, shared by the app (server/app.py) and `tokenmill serve` (server/cli.py).

A module of their own so that the command line can show them without importing FastAPI, and the app can use them
without importing the command line.
"""

from __future__ import annotations

DEFAULT_MAX_WAITING_REQUESTS = 256
DEFAULT_MAX_REQUEST_BYTES = 1 << 20
DEFAULT_DRAIN_TIMEOUT_S = 30.0
DEFAULT_MAX_STREAM_BACKLOG = 16384  # generated tokens a stream's reader may leave unread before it is cut off
DEFAULT_REQUEST_TIMEOUT_S = 600.0  # a request still running after this long is aborted
MAX_PROMPTS_PER_REQUEST = 256  # prompts in one batched completions request
MAX_SEQUENCES_PER_REQUEST = 1024  # prompts x n: the engine requests one HTTP request may add
