"""Server limits' defaults, shared by the app (server/app.py) and `tokenmill serve` (server/cli.py).

A module of their own so that the command line can show them without importing FastAPI, and the app can use them
without importing the command line.
"""

from __future__ import annotations

DEFAULT_MAX_WAITING_REQUESTS = 256
DEFAULT_MAX_REQUEST_BYTES = 1 << 20
DEFAULT_DRAIN_TIMEOUT_S = 30.0
