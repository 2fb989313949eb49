"""`tokenmill serve`: arguments and the uvicorn runner. Heavy imports happen only when serving starts."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from types import FrameType
from typing import Any

from tokenmill.server.defaults import (
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_MAX_STREAM_BACKLOG,
    DEFAULT_MAX_WAITING_REQUESTS,
    DEFAULT_REQUEST_TIMEOUT_S,
)

logger = logging.getLogger(__name__)

API_KEY_ENV = "TOKENMILL_API_KEY"


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_path", nargs="?", default=None, metavar="MODEL",
                        help="GGUF file to serve (same as --model; default: SmolLM2-135M-Instruct)")
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", action="append", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes and /metrics; repeat for several keys, "
                        f"one per tenant (default: ${API_KEY_ENV} if set, comma-separated)")
    g.add_argument("--served-model-name", default=None,
                   help="model name in the API (default: smollm2-135m-instruct, or the GGUF file's stem)")
    g.add_argument("--max-waiting-requests", type=int, default=DEFAULT_MAX_WAITING_REQUESTS,
                   help="answer 503 when this many requests are already waiting (0: no limit)")
    g.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help="largest accepted request body")
    g.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S,
                   help="abort a request still running after this many seconds (0: no deadline)")
    g.add_argument("--max-stream-backlog", type=int, default=DEFAULT_MAX_STREAM_BACKLOG,
                   help="cut off a stream whose reader leaves this many generated tokens unread (0: no limit)")
    g.add_argument("--allowed-hosts", default=None,
                   help="comma-separated Host header values to accept, '*' for any (default: localhost names "
                        "when listening on loopback, any otherwise)")
    g.add_argument("--isolate-prefix-cache", action="store_true",
                   help="API keys (tenants) never share prefix-cache blocks, so response times cannot reveal "
                        "another tenant's prompts")
    g.add_argument("--public-metrics", action="store_true", help="serve /metrics without an API key")
    g.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_TIMEOUT_S,
                   help="on SIGTERM/SIGINT, seconds to let running requests finish before aborting them")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    g.add_argument("--no-access-log", action="store_true", help="do not log every HTTP request")
    add_cluster_args(parser)


def add_cluster_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("cluster (Ray Serve; needs the 'cluster' extra: pip install 'tokenmill[cluster]')")
    g.add_argument("--replicas", type=int, default=None,
                   help="serve with N engine replicas on Ray Serve behind one OpenAI endpoint (a local Ray cluster "
                        "unless --ray-address is given)")
    g.add_argument("--ray-address", default=None, help="join this Ray cluster (e.g. 'auto' or 'ray://head:10001')")
    g.add_argument("--min-replicas", type=int, default=1, help="autoscaling: the fewest replicas")
    g.add_argument("--max-replicas", type=int, default=None,
                   help="autoscale between --min-replicas and this many replicas")
    g.add_argument("--target-ongoing-requests", type=float, default=4.0,
                   help="autoscaling: requests in flight per replica to aim for")
    g.add_argument("--max-ongoing-requests", type=int, default=32, help="requests in flight per replica at most")
    g.add_argument("--max-queued-requests", type=int, default=64,
                   help="requests waiting for a replica at most; beyond that the answer is 503 with Retry-After")
    g.add_argument("--router", default="affinity", choices=["affinity", "power-of-two", "round-robin"],
                   help="how requests are spread: prefix-cache affinity with a load guard (default), the less "
                        "loaded of two random replicas, or in turn")
    g.add_argument("--replica-cpus", type=float, default=1.0,
                   help="CPUs each replica reserves in the Ray cluster (and its threads, unless --threads)")
    g.add_argument("--prefill-replicas", type=int, default=0,
                   help="prefill/decode disaggregation: this many more replicas compute long prompts and send "
                        "their KV blocks to the replica that decodes them")
    g.add_argument("--pd-min-prompt-tokens", type=int, default=256,
                   help="with --prefill-replicas: shorter prompts are computed where they are decoded")


def cmd_serve(args: argparse.Namespace) -> int:
    from tokenmill.entrypoints.args import engine_config
    from tokenmill.model.gguf_file import ModelLoadError
    from tokenmill.server.config import ServerConfig

    if args.model_path and args.model and args.model_path != args.model:
        print("tokenmill: error: give the model either as MODEL or as --model, not both", file=sys.stderr)
        return 2
    keys = args.api_key or [k for k in os.environ.get(API_KEY_ENV, "").split(",") if k.strip()]
    try:
        config = ServerConfig(
            api_key=tuple(k.strip() for k in keys) or None, served_model_name=args.served_model_name,
            max_waiting_requests=args.max_waiting_requests or None, max_request_bytes=args.max_request_bytes,
            drain_timeout=args.drain_timeout, request_timeout=args.request_timeout or None,
            max_stream_backlog=args.max_stream_backlog or None,
            allowed_hosts=default_allowed_hosts(args.host, args.allowed_hosts),
            isolate_prefix_cache=args.isolate_prefix_cache, public_metrics=args.public_metrics)
    except ValueError as exc:
        print(f"tokenmill: error: {exc}", file=sys.stderr)
        return 2
    try:
        engine = engine_config(args, model=args.model_path)
        if (args.replicas is not None or args.max_replicas is not None or args.ray_address is not None
                or args.prefill_replicas):
            return _serve_cluster(args, engine, config)
        return run_server(engine, config, host=args.host, port=args.port, log_level=args.log_level,
                          access_log=not args.no_access_log)
    except ModelLoadError as exc:
        print(f"tokenmill: error: {exc}", file=sys.stderr)
        return 2


def _serve_cluster(args: argparse.Namespace, engine: Any, server: Any) -> int:
    try:
        import ray.serve  # noqa: F401

        from tokenmill.cluster.deploy import ClusterConfig, run_cluster
    except ImportError as exc:
        print(f"tokenmill: error: --replicas needs Ray Serve: pip install 'tokenmill[cluster]' ({exc})",
              file=sys.stderr)
        return 2
    try:
        cluster = ClusterConfig(
            replicas=args.replicas or args.min_replicas, min_replicas=args.min_replicas,
            max_replicas=args.max_replicas, target_ongoing_requests=args.target_ongoing_requests,
            max_ongoing_requests=args.max_ongoing_requests, max_queued_requests=args.max_queued_requests,
            router=args.router, replica_cpus=args.replica_cpus, prefill_replicas=args.prefill_replicas,
            pd_min_prompt_tokens=args.pd_min_prompt_tokens)
    except ValueError as exc:
        print(f"tokenmill: error: {exc}", file=sys.stderr)
        return 2
    return run_cluster(engine, server, cluster, host=args.host, port=args.port, address=args.ray_address)


def default_allowed_hosts(host: str, allowed: str | None) -> tuple[str, ...] | None:
    """Host headers to accept: those given, else the loopback names when listening on loopback, else any."""
    from tokenmill.server.config import LOOPBACK_HOSTS

    if allowed is not None:
        names = tuple(h.strip() for h in allowed.split(",") if h.strip())
        return None if "*" in names else names
    return LOOPBACK_HOSTS if _is_loopback(host) else None


def run_server(engine: Any = None, config: Any = None, *, host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "info", access_log: bool = True) -> int:
    """Load the model (an EngineConfig, an AsyncEngine or None for the default) and serve until SIGTERM/SIGINT,
    then stop accepting, let running requests finish (at most `drain_timeout` s) and stop the engine. Returns the
    process's exit status: 1 if the engine thread died (the server stops then, for a supervisor to restart it)."""
    import uvicorn

    from tokenmill.server.app import create_app
    from tokenmill.server.config import ServerConfig

    config = config or ServerConfig(max_waiting_requests=DEFAULT_MAX_WAITING_REQUESTS,
                                    allowed_hosts=default_allowed_hosts(host, None))
    if not _is_loopback(host) and not config.api_keys:
        logger.warning("listening on %s without an API key: anyone who can reach this port can use the model",
                       host)
    app = create_app(engine, config)
    uvicorn_config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                                    timeout_graceful_shutdown=max(1, round(config.drain_timeout)), lifespan="on")
    server = draining_server(uvicorn_config, app.state.serving)
    failed = False

    def on_engine_failure() -> None:
        nonlocal failed
        failed = True
        app.state.serving.draining = True
        server.should_exit = True

    app.state.on_engine_failure = on_engine_failure
    server.run()
    return 1 if failed else 0


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
