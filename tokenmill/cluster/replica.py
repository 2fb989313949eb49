"""One engine replica: an AsyncEngine and the OpenAI request handling (server/serving.py) behind a Ray Serve
deployment. The ingress sends it JSON bodies and gets back plain data (`Reply` items, and for a stream the SSE
strings), so that no exception type has to survive the trip through Ray."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from tokenmill.config import EngineConfig
from tokenmill.kv.hashing import digest
from tokenmill.kv.transfer import KVTransfer
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.app import model_card
from tokenmill.server.async_engine import AsyncEngine, EngineRequest, Origin, OutputStream
from tokenmill.server.config import ServerConfig
from tokenmill.server.errors import APIError
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.protocol import ChatCompletionRequest, CompletionRequest, parse_request
from tokenmill.server.serving import OpenAIServing

logger = logging.getLogger(__name__)

KV_WAIT_S = 60.0  # how long a decode replica waits for a prompt's KV before computing it itself
# A replica reports at most this many cached blocks, the most recently registered; past that, a router finds
# older prefixes only through what it routed itself.
MAX_REPORTED_DIGESTS = 1 << 14
STARTED = 102  # the status of the first item a replica sends for every request (HTTP's "Processing")
REPLICA_HEADER = "x-tokenmill-replica"
NODE_HEADER = "x-tokenmill-node"


@dataclass(frozen=True)
class Reply:
    """An HTTP answer as data: `body` is the JSON reply or error, None for the head of a stream that follows."""

    status: int
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


class EngineReplica:
    def __init__(self, engine_config: EngineConfig, server_config: ServerConfig) -> None:
        self.engine = AsyncEngine.from_config(engine_config, server_config.max_waiting_requests)
        self.engine.max_stream_backlog = server_config.max_stream_backlog
        self.engine.start()
        self.serving = OpenAIServing(self.engine, server_config.served_model_name, server_config.request_timeout)
        self.metrics = ServerMetrics(self.engine, self.serving.model_name)
        self.identity = {REPLICA_HEADER: _replica_id(), NODE_HEADER: _node_id()}
        self._reports = 0
        self.waiting_for_kv = 0  # requests whose prompt KV is on its way from a prefill replica
        self.transfer_stats = {"imported_blocks": 0, "exported_blocks": 0, "short_exports": 0, "fallbacks": 0}
        self._report: dict[str, Any] = {}

    async def generate(self, kind: str, body: Any, origin: Origin, stream: bool, hint: Any = None,
                       kv: list[Any] | None = None) -> AsyncIterator[Reply | str]:
        """First `STARTED`: from then on the request is this replica's, and if the replica dies the ingress
        reports the failure instead of trying another replica (a request that kills replicas would otherwise kill
        them all). Then a `Reply`: the error that refuses the request, the whole reply, or with `stream` a 200
        head followed by the server-sent events. If the ingress goes away (a client disconnected, a call was
        cancelled) the engine requests are aborted at once. `hint` is the router's (ray_router.py). `kv`: a
        one-item list holding the object ref of a prefill replica's `KVTransfer` for this prompt (in a list, so
        that Ray hands over the ref instead of waiting for it before the call)."""
        yield Reply(STARTED, None, dict(self.identity))
        if kv:
            await self._import(kv[0])
        try:
            reply, engine_stream = await self._start(kind, body, origin, stream)
        except APIError as exc:
            yield Reply(exc.status_code, exc.body(), {**(exc.headers or {}), **self.identity})
            return
        try:
            if isinstance(reply, dict):
                yield Reply(200, reply, dict(self.identity))
                return
            yield Reply(200, None, dict(self.identity))
            async for chunk in reply:
                yield chunk
        finally:
            if not engine_stream.finished:
                self.engine.abort(engine_stream.request_ids)

    async def _import(self, ref: Any) -> None:
        """Wait for a prompt's KV and put it into the prefix cache; on any failure (the prefill replica died or
        refused, the wait timed out, the KV does not fit this engine) the prompt is computed here instead."""
        self.waiting_for_kv += 1
        try:
            transfer = await asyncio.wait_for(ref, KV_WAIT_S)
            self.transfer_stats["imported_blocks"] += await self.engine.call(lambda e: e.import_prefix(transfer))
        except Exception as exc:  # whatever went wrong, local prefill is the answer
            logger.warning("KV transfer failed (%s: %s); computing the prompt here", type(exc).__name__, exc)
            self.transfer_stats["fallbacks"] += 1
        finally:
            self.waiting_for_kv -= 1

    async def prefill(self, token_ids: list[int], cache_salt: str | None, hint: Any = None) -> KVTransfer:
        """A prefill replica's work: compute a prompt's KV (through one generated token, dropped) and hand out
        its full blocks for a decode replica to import."""
        request = EngineRequest(f"prefill-{uuid.uuid4().hex}", list(token_ids), SamplingParams(max_tokens=1),
                                cache_salt=cache_salt)
        # Exported right after the step that finished the request, before any other step: its blocks were freed
        # with it but are still cached, and no allocation can have evicted them yet.
        stream = await self.engine.submit([request], self.serving.request_timeout,
                                          after=lambda e: e.export_prefix(token_ids, cache_salt))
        try:
            async for _ in stream:
                pass
        finally:
            if not stream.finished:  # the call was cancelled
                self.engine.abort(stream.request_ids)
        assert stream.after is not None
        transfer: KVTransfer = await asyncio.wrap_future(stream.after)
        self.transfer_stats["exported_blocks"] += transfer.num_blocks
        if transfer.num_blocks < (len(token_ids) - 1) // transfer.block_size:
            self.transfer_stats["short_exports"] += 1
        return transfer

    async def _start(self, kind: str, body: Any, origin: Origin, stream: bool
                     ) -> tuple[dict[str, Any] | AsyncIterator[str], OutputStream]:
        if kind == "chat":
            chat = parse_request(ChatCompletionRequest, body)
            return await self.serving.chat(chat.model_copy(update={"stream": stream}), origin)
        completion = parse_request(CompletionRequest, body)
        return await self.serving.completions(completion.model_copy(update={"stream": stream}), origin)

    async def model_card(self) -> dict[str, Any]:
        return model_card(self.serving)

    async def record_routing_stats(self) -> dict[str, Any]:
        """Called by Ray Serve every `routing_stats_period_s`; what the router (ray_router.py) reads."""
        index = self.engine.prefix_cache_index()
        stats = self.engine.stats()
        digests = [digest(h) for h in index.hashes[-MAX_REPORTED_DIGESTS:]]
        if digests != self._report.get("digests"):  # `seq` tells routers whether to rebuild their index
            self._reports += 1
        self._report = {"seq": self._reports, "hash_root": index.hash_root, "block_size": index.block_size,
                        "digests": digests, "free_blocks": stats.num_free_blocks,
                        "ongoing": stats.num_running + stats.num_waiting}
        return self._report

    async def engine_stats(self, replica: str | None = None) -> dict[str, Any]:
        """Counters for benchmarks and tests: where this replica runs and what its prefix cache saved. `replica`
        is for the router, which sends the call to the replica of that id (deploy.replica_stats)."""
        stats = self.engine.stats()
        return {**self.identity, "prefix_cache_queries": stats.prefix_cache.queries,
                "prefix_cache_hits": stats.prefix_cache.hits, "prompt_tokens": stats.prompt_tokens,
                "generation_tokens": stats.generation_tokens, "requests": stats.prefix_cache.requests,
                "waiting_for_kv": self.waiting_for_kv, **self.transfer_stats}

    async def metrics_text(self, replica: str | None = None) -> str:
        """This replica's Prometheus exposition, as a single server's `/metrics` gives it; `replica` is for the
        router (the ingress merges every replica's, cluster/metrics.py)."""
        return self.metrics.render().decode()

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine thread died is replaced."""
        if self.engine.has_failed:
            raise RuntimeError(f"the engine thread has died: {self.engine.failure!r}")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(timeout=5.0)


def _replica_id() -> str:
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:  # constructed outside Serve (tests)
        return "local"


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
