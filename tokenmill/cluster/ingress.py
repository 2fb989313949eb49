"""The cluster's OpenAI endpoint: a Ray Serve ingress deployment with the single server's routes, keys, body checks
and error shapes (server/app.py), which tokenizes each prompt for the router and hands the request to an engine
replica (replica.py) through a deployment handle routed by ray_router.py.

Failures are told apart by whether the replica had started the request: one that dies before starting it costs
nothing (the request goes to another replica), one that dies after gives its requests a clear 503
(`replica_failed`), or an error event on a stream already under way. A full cluster (every replica at
`max_ongoing_requests` and the handle's queue at `max_queued_requests`) answers 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from tokenmill.cluster.hints import RouteHint, route_hint, worth_prefilling
from tokenmill.cluster.metrics import merge_expositions
from tokenmill.cluster.names import replica_ids
from tokenmill.cluster.replica import STARTED, Reply
from tokenmill.model.gguf_file import GGUFFile, resolve_model_path
from tokenmill.server.app import EventStreamResponse, guard, read_json, request_origin, unless_disconnected
from tokenmill.server.async_engine import Origin
from tokenmill.server.config import ServerConfig
from tokenmill.server.errors import APIError, error_body
from tokenmill.server.formatting import SSE_DONE, sse
from tokenmill.server.protocol import ChatCompletionRequest, CompletionRequest, parse_request
from tokenmill.server.serving import model_not_found
from tokenmill.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_REPLICA_GONE = (ActorDiedError, ActorUnavailableError, RayActorError)
METRICS_TIMEOUT_S = 5.0


def _unavailable(message: str, code: str = "replica_failed") -> APIError:
    return APIError(503, message, code=code, headers={"Retry-After": "1"})


def _overloaded() -> APIError:
    return _unavailable("every replica is busy and the queue is full; retry later", "server_overloaded")


def _replica_failed() -> APIError:
    return _unavailable("the replica serving this request failed while running it; the request was not retried")


@serve.ingress()
class Ingress:
    def __init__(self, replicas: DeploymentHandle, model: str | None, config: ServerConfig,
                 prefill: DeploymentHandle | None = None, pd_min_prompt_tokens: int = 256) -> None:
        self.replicas = replicas
        self.prefill = prefill
        self.pd_min_prompt_tokens = pd_min_prompt_tokens
        self.config = config
        self.tokenizer = Tokenizer.from_gguf_metadata(GGUFFile(resolve_model_path(model)).metadata)
        self._model_card: dict[str, Any] | None = None
        self.app_name = serve.get_replica_context().app_name

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_ingress_app(self)

    async def model_card(self) -> dict[str, Any]:
        if self._model_card is None:
            try:
                self._model_card = await self.replicas.model_card.remote()
            except BackPressureError:
                raise _overloaded() from None
            except _REPLICA_GONE:
                raise _unavailable("no replica is available yet") from None
        return self._model_card

    async def metrics(self) -> bytes:
        """Every engine replica's Prometheus metrics (each call pinned to its replica), merged with a `replica`
        label; a replica that does not answer within METRICS_TIMEOUT_S is left out of this scrape. The calls go one
        after another: issued together from here, the second of two pinned calls was never routed (Ray 2.60)."""
        texts = {}
        for rid in await asyncio.to_thread(replica_ids, self.app_name):
            call = self.replicas.metrics_text.remote(replica=rid)
            try:
                ref = await asyncio.wait_for(call._to_object_ref(), METRICS_TIMEOUT_S)
                texts[rid] = await asyncio.wait_for(ref, METRICS_TIMEOUT_S)
            except Exception as exc:  # a replica starting, stopping or busy: the next scrape will see it
                call.cancel()
                logger.warning("replica %s gave no metrics (%s: %s)", rid, type(exc).__name__, exc)
        return merge_expositions(texts)

    async def open(self, req: CompletionRequest | ChatCompletionRequest, body: Any, origin: Origin
                   ) -> tuple[Reply, DeploymentResponseGenerator]:
        """Send the request to a replica and wait for its answer's head (a `Reply`; the stream follows)."""
        kind = "chat" if isinstance(req, ChatCompletionRequest) else "completions"
        hint = await asyncio.to_thread(route_hint, self.tokenizer, req, origin.cache_salt)
        kv = await self._prefill_elsewhere(req, hint)
        for attempt in range(2):
            call = self.replicas.options(stream=True).generate.remote(kind, body, origin, bool(req.stream),
                                                                       hint=hint, kv=kv)
            try:
                started = await call.__anext__()
            except BackPressureError:
                raise _overloaded() from None
            except _REPLICA_GONE as exc:  # before it started the request: another replica takes it
                call.cancel()  # an unavailable replica may yet come back: it must not run the request too
                logger.warning("a replica died before starting a request (%s); %s", type(exc).__name__,
                               "retrying elsewhere" if attempt == 0 else "giving up")
                continue
            except asyncio.CancelledError:  # the client went away
                call.cancel()
                raise
            if not (isinstance(started, Reply) and started.status == STARTED):
                raise RuntimeError(f"a replica answered {started!r} before starting the request")
            try:
                return await call.__anext__(), call
            except _REPLICA_GONE:
                call.cancel()
                raise _replica_failed() from None
            except asyncio.CancelledError:  # the replica aborts the engine requests
                call.cancel()
                raise
        raise _unavailable("no replica could start this request")

    async def _prefill_elsewhere(self, req: CompletionRequest | ChatCompletionRequest, hint: RouteHint | None
                                 ) -> list[Any] | None:
        """With prefill replicas: start computing a long prompt's KV on one of them, and return the result's
        object ref for the decode replica to wait on (None: the decode replica computes the prompt itself)."""
        if self.prefill is None or hint is None or len(hint.token_ids) < self.pd_min_prompt_tokens:
            return None
        try:
            card = await self.model_card()
        except APIError:  # no decode replica to ask yet: the call to one will say so
            return None
        if not worth_prefilling(req, hint, card, self.pd_min_prompt_tokens):
            return None
        response = self.prefill.prefill.remote(list(hint.token_ids), hint.cache_salt, hint=hint)
        try:
            return [await response._to_object_ref()]
        except asyncio.CancelledError:  # the client went away
            response.cancel()
            raise
        except Exception as exc:  # the decode replica will prefill: a slower answer, not a failed one
            logger.warning("no prefill replica took the prompt (%s: %s)", type(exc).__name__, exc)
            return None


def create_ingress_app(ingress: Ingress) -> FastAPI:
    config = ingress.config
    app = FastAPI(title="tokenmill cluster", docs_url=None, redoc_url=None, openapi_url=None)
    authorize = guard(app, config)

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", dependencies=[] if config.public_metrics else [Depends(authorize)])
    async def prometheus_metrics() -> Response:
        return Response(await ingress.metrics(), media_type=CONTENT_TYPE_LATEST)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @v1.get("/models")
    async def list_models() -> Response:
        return JSONResponse({"object": "list", "data": [await ingress.model_card()]})

    @v1.get("/models/{model:path}")
    async def retrieve_model(model: str) -> Response:
        card = await ingress.model_card()
        if model != card["id"]:
            raise model_not_found(model, card["id"])
        return JSONResponse(card)

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        body = await read_json(request, config.max_request_bytes)
        return await _generate(request, ingress, parse_request(CompletionRequest, body), body)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_json(request, config.max_request_bytes)
        return await _generate(request, ingress, parse_request(ChatCompletionRequest, body), body)

    app.include_router(v1)
    return app


async def _generate(request: Request, ingress: Ingress, req: CompletionRequest | ChatCompletionRequest,
                    body: Any) -> Response:
    origin = request_origin(request, req, ingress.config)
    head, call = await unless_disconnected(request, ingress.open(req, body, origin))
    if not req.stream or head.status != 200:
        return JSONResponse(head.body, status_code=head.status, headers=head.headers)
    response = EventStreamResponse(_relay(call), call.cancel)
    response.headers.update(head.headers)
    return response


async def _relay(call: DeploymentResponseGenerator) -> AsyncIterator[str]:
    """A replica's server-sent events; if the replica dies midway, an error event ends the stream."""
    try:
        async for chunk in call:
            yield chunk
    except _REPLICA_GONE:
        error = _replica_failed()
        yield sse(error_body(error.message, error.type, code=error.code))
        yield SSE_DONE
    finally:
        with contextlib.suppress(Exception):
            call.cancel()

