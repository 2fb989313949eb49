"""`tokenmill serve`: arguments and the uvicorn runner. Heavy imports happen only when serving starts."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from types import FrameType
from typing import Any

from tokenmill.server.defaults import DEFAULT_DRAIN_TIMEOUT_S, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_WAITING_REQUESTS

logger = logging.getLogger(__name__)

API_KEY_ENV = "TOKENMILL_API_KEY"


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_path", nargs="?", default=None, metavar="MODEL",
                        help="GGUF file to serve (same as --model; default: SmolLM2-135M-Instruct)")
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV} if set)")
    g.add_argument("--served-model-name", default=None,
                   help="model name in the API (default: smollm2-135m-instruct, or the GGUF file's stem)")
    g.add_argument("--max-waiting-requests", type=int, default=DEFAULT_MAX_WAITING_REQUESTS,
                   help="answer 503 when this many requests are already waiting (0: no limit)")
    g.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help="largest accepted request body")
    g.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_TIMEOUT_S,
                   help="on SIGTERM/SIGINT, seconds to let running requests finish before aborting them")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    g.add_argument("--no-access-log", action="store_true", help="do not log every HTTP request")


def cmd_serve(args: argparse.Namespace) -> int:
    from tokenmill.entrypoints.args import engine_config
    from tokenmill.model.gguf_file import ModelLoadError

    if args.model_path and args.model and args.model_path != args.model:
        print("tokenmill: error: give the model either as MODEL or as --model, not both", file=sys.stderr)
        return 2
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    try:
        run_server(engine_config(args, model=args.model_path), host=args.host, port=args.port, api_key=api_key,
                   served_model_name=args.served_model_name,
                   max_waiting_requests=args.max_waiting_requests or None,
                   max_request_bytes=args.max_request_bytes, drain_timeout=args.drain_timeout,
                   log_level=args.log_level, access_log=not args.no_access_log)
    except ModelLoadError as exc:
        print(f"tokenmill: error: {exc}", file=sys.stderr)
        return 2
    return 0


def run_server(engine: Any = None, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               served_model_name: str | None = None, max_waiting_requests: int | None = DEFAULT_MAX_WAITING_REQUESTS,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_S,
               log_level: str = "info",
               access_log: bool = True) -> None:
    """Load the model (an EngineConfig, an AsyncEngine or None for the default) and serve until SIGTERM/SIGINT,
    then stop accepting, let running requests finish (at most `drain_timeout` s) and stop the engine."""
    import uvicorn

    from tokenmill.server.app import create_app

    if max_request_bytes < 1:
        raise ValueError(f"max_request_bytes must be >= 1, got {max_request_bytes}")
    if not _is_loopback(host) and not api_key:
        logger.warning("listening on %s without an API key: anyone who can reach this port can use the model",
                       host)
    app = create_app(engine, api_key=api_key, served_model_name=served_model_name,
                     max_waiting_requests=max_waiting_requests, max_request_bytes=max_request_bytes,
                     drain_timeout=drain_timeout)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=max(1, round(drain_timeout)), lifespan="on")
    draining_server(config, app.state.serving).run()


def draining_server(config: Any, serving: Any) -> Any:
    """A uvicorn.Server that, once SIGTERM/SIGINT arrives, also answers 503 to new requests on connections that are
    still open (uvicorn itself stops accepting connections and waits for running responses)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            serving.draining = True
            super().handle_exit(sig, frame)

    return Server(config)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
