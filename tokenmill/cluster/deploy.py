"""The Ray Serve application: the ingress and the engine replicas, their scaling, backpressure, health checks and
router, from one validated `ClusterConfig`; and `run_cluster`, which starts (or joins) a Ray cluster and serves it."""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from dataclasses import dataclass, field
from typing import Any

from tokenmill.cluster.names import INGRESS_DEPLOYMENT, PREFILL_DEPLOYMENT, REPLICA_DEPLOYMENT, replica_ids
from tokenmill.cluster.routing import POLICIES
from tokenmill.config import EngineConfig
from tokenmill.server.config import ServerConfig

logger = logging.getLogger(__name__)

__all__ = ["INGRESS_DEPLOYMENT", "PREFILL_DEPLOYMENT", "REPLICA_DEPLOYMENT", "ClusterConfig", "build_app",
           "replica_ids", "replica_stats", "run_cluster"]


@dataclass(frozen=True)
class ClusterConfig:
    """`replicas` engine replicas, or, with `max_replicas` set, Ray Serve's autoscaling between `min_replicas` and
    `max_replicas` aiming at `target_ongoing_requests` per replica. A replica takes at most `max_ongoing_requests`
    at once; beyond that requests queue in the ingress, and beyond `max_queued_requests` queued the cluster
    answers 503 with Retry-After. `router`: affinity (prefix-cache affinity with a load guard; its thresholds as
    in cluster/routing.py), power-of-two or round-robin. Each replica holds `replica_cpus` CPUs of the Ray
    cluster and, unless the engine config says otherwise, runs as many threads. With `prefill_replicas`, prompts
    of at least `pd_min_prompt_tokens` tokens are computed on one of those, and their KV blocks go to the
    replica that decodes them (prefill/decode disaggregation)."""

    replicas: int = 1
    min_replicas: int = 1
    max_replicas: int | None = None
    target_ongoing_requests: float = 4.0
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    look_back_period_s: float = 30.0  # how far back the autoscaler averages the load
    max_ongoing_requests: int = 32
    max_queued_requests: int = 64
    router: str = "affinity"
    router_options: dict[str, Any] = field(default_factory=dict)
    routing_stats_period_s: float = 1.0
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 30.0
    graceful_shutdown_timeout_s: float = 20.0
    replica_cpus: float = 1.0
    prefill_replicas: int = 0
    pd_min_prompt_tokens: int = 256
    app_name: str = "tokenmill"

    def __post_init__(self) -> None:
        for name in ("replicas", "min_replicas", "max_ongoing_requests", "max_queued_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_replicas is not None and self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})")
        if self.router not in POLICIES:
            raise ValueError(f"router must be one of {sorted(POLICIES)}, got {self.router!r}")
        for name in ("target_ongoing_requests", "routing_stats_period_s", "health_check_period_s",
                     "health_check_timeout_s", "look_back_period_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.prefill_replicas < 0 or self.pd_min_prompt_tokens < 1:
            raise ValueError("prefill_replicas must be >= 0 and pd_min_prompt_tokens >= 1")
        if self.replica_cpus < 0 or self.upscale_delay_s < 0 or self.downscale_delay_s < 0:
            raise ValueError("replica_cpus and the scaling delays must be >= 0")

    def scaling(self) -> dict[str, Any]:
        if self.max_replicas is None:
            return {"num_replicas": self.replicas}
        return {"autoscaling_config": {
            "min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
            "initial_replicas": min(max(self.replicas, self.min_replicas), self.max_replicas),
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
            "look_back_period_s": self.look_back_period_s, "metrics_interval_s": min(10.0, self.look_back_period_s)}}


def build_app(engine: EngineConfig, server: ServerConfig, cluster: ClusterConfig) -> Any:
    """The Serve application (pass it to `serve.run`)."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from tokenmill.cluster.ingress import Ingress
    from tokenmill.cluster.ray_router import TokenmillRouter
    from tokenmill.cluster.replica import EngineReplica

    if engine.num_threads is None:
        engine = dataclasses.replace(engine, num_threads=max(1, int(cluster.replica_cpus)))
    router = RequestRouterConfig(
        request_router_class=TokenmillRouter,
        request_router_kwargs={"policy": cluster.router, **cluster.router_options},
        request_routing_stats_period_s=cluster.routing_stats_period_s)
    common = {"max_ongoing_requests": cluster.max_ongoing_requests,
              "max_queued_requests": cluster.max_queued_requests,
              "health_check_period_s": cluster.health_check_period_s,
              "health_check_timeout_s": cluster.health_check_timeout_s,
              "graceful_shutdown_timeout_s": cluster.graceful_shutdown_timeout_s,
              "ray_actor_options": {"num_cpus": cluster.replica_cpus}, "request_router_config": router}
    replicas = serve.deployment(EngineReplica, name=REPLICA_DEPLOYMENT, **common, **cluster.scaling())
    prefill = None
    if cluster.prefill_replicas:
        prefill = serve.deployment(EngineReplica, name=PREFILL_DEPLOYMENT, num_replicas=cluster.prefill_replicas,
                                   **common).bind(engine, server)
    # The ingress only parses, tokenizes and relays: it asks for no CPU of its own, so it never stands in the way
    # of a replica being placed.
    ingress = serve.deployment(Ingress, name=INGRESS_DEPLOYMENT, ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=cluster.max_ongoing_requests * 64)
    return ingress.bind(replicas.bind(engine, server), engine.model, server, prefill, cluster.pd_min_prompt_tokens)


def replica_stats(app_name: str = "tokenmill", timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """Every engine replica's `engine_stats` (replica.py), each call pinned to its replica by the router."""
    from ray import serve

    handle = serve.get_deployment_handle(REPLICA_DEPLOYMENT, app_name=app_name)
    calls = [handle.engine_stats.remote(replica=rid) for rid in replica_ids(app_name)]
    return [call.result(timeout_s=timeout_s) for call in calls]


def run_cluster(engine: EngineConfig, server: ServerConfig, cluster: ClusterConfig, *, host: str = "127.0.0.1",
                port: int = 8000, address: str | None = None) -> int:
    """Start a local Ray cluster (or join the one at `address`), serve the app at http://host:port/v1 and block
    until SIGINT/SIGTERM; then take the application down (replicas finish their requests for at most
    `graceful_shutdown_timeout_s`)."""
    import ray
    from ray import serve

    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(engine, server, cluster), name=cluster.app_name, route_prefix="/")
        logger.info("serving %s on http://%s:%d/v1 with %s", engine.model or "the default model", host, port,
                    f"{cluster.replicas} replicas" if cluster.max_replicas is None else
                    f"{cluster.min_replicas}-{cluster.max_replicas} replicas")
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        serve.delete(cluster.app_name)
    finally:
        if address is None:
            serve.shutdown()
        ray.shutdown()
    return 0
