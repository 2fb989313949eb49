"""The server's settings: limits, deadlines and security defaults, validated in one place."""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.server.defaults import (
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_MAX_STREAM_BACKLOG,
    DEFAULT_REQUEST_TIMEOUT_S,
)

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class ServerConfig:
    """`api_key`: one key or several (each key is a tenant). `allowed_hosts`: the Host header values accepted
    (None: any), the defence against DNS rebinding for a server on loopback. `isolate_prefix_cache`: tenants (API
    keys) never share prefix-cache blocks, so time to first token cannot reveal another tenant's prompts.
    `public_metrics`: /metrics without a key even when keys are set."""

    api_key: str | tuple[str, ...] | None = None
    served_model_name: str | None = None
    max_waiting_requests: int | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_S
    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT_S
    max_stream_backlog: int | None = DEFAULT_MAX_STREAM_BACKLOG
    allowed_hosts: tuple[str, ...] | None = None
    isolate_prefix_cache: bool = False
    public_metrics: bool = False

    def __post_init__(self) -> None:
        for name in ("max_waiting_requests", "max_stream_backlog"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {self.max_request_bytes}")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise ValueError(f"request_timeout must be > 0 or None, got {self.request_timeout}")
        if self.drain_timeout < 0:
            raise ValueError(f"drain_timeout must be >= 0, got {self.drain_timeout}")
        if any(not key for key in self.api_keys):
            raise ValueError("API keys must not be empty")

    @property
    def api_keys(self) -> tuple[str, ...]:
        if self.api_key is None:
            return ()
        return (self.api_key,) if isinstance(self.api_key, str) else tuple(self.api_key)
