"""The FastAPI app: routes, API keys (tenants), body-size and type checks, OpenAI-shaped errors, disconnects, graceful
drain, and the engine watchdog."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from tokenmill.config import EngineConfig
from tokenmill.server.async_engine import AsyncEngine, Origin, OutputStream
from tokenmill.server.config import ServerConfig
from tokenmill.server.errors import APIError, bad_request, default_type, error_body
from tokenmill.server.guards import HostCheckMiddleware, install_openapi, request_body_schema
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.protocol import ChatCompletionRequest, CompletionRequest, parse_request
from tokenmill.server.serving import OpenAIServing

logger = logging.getLogger(__name__)

T = TypeVar("T")

_WATCHDOG_INTERVAL_S = 0.5


def create_app(engine: AsyncEngine | EngineConfig | None = None, config: ServerConfig | None = None,
               **options: Any) -> FastAPI:
    """An OpenAI-compatible app. Given a config (or None: the default model) the app loads and owns its engine and
    stops it on shutdown; given an AsyncEngine it only starts it, and the caller shuts it down. Settings come as a
    ServerConfig or as its fields (`create_app(engine, api_key="...")`)."""
    config = config or ServerConfig(**options)
    owns_engine = not isinstance(engine, AsyncEngine)
    if isinstance(engine, AsyncEngine):
        async_engine = engine
        if config.max_waiting_requests is not None:
            async_engine.max_waiting_requests = config.max_waiting_requests
    else:
        async_engine = AsyncEngine.from_config(engine, config.max_waiting_requests)
    async_engine.max_stream_backlog = config.max_stream_backlog
    serving = OpenAIServing(async_engine, config.served_model_name, config.request_timeout)
    metrics = ServerMetrics(async_engine, serving.model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        watchdog = asyncio.create_task(_watch_engine(app, async_engine))
        try:
            yield
        finally:
            watchdog.cancel()
            if not await serving.drain(config.drain_timeout):
                logger.warning("drain timeout: %d requests still in flight are aborted", serving.inflight)
            if owns_engine:
                await asyncio.to_thread(async_engine.shutdown)

    app = FastAPI(title="tokenmill", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = async_engine
    app.state.serving = serving
    app.state.metrics = metrics
    app.state.on_engine_failure = None  # set by the runner: how to stop the process when the engine dies
    authorize = guard(app, config)

    @app.get("/health")
    async def health() -> Response:
        if not async_engine.is_running:
            raise APIError(503, "the engine is not running", code="engine_not_running")
        return JSONResponse({"status": "ok"})

    metrics_auth = [] if config.public_metrics else [Depends(authorize)]

    @app.get("/metrics", dependencies=metrics_auth)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @v1.get("/models")
    async def list_models() -> Response:
        return JSONResponse({"object": "list", "data": [model_card(serving)]})

    @v1.get("/models/{model:path}")
    async def retrieve_model(model: str) -> Response:
        serving.check_model(model)
        return JSONResponse(model_card(serving))

    @v1.post("/completions", openapi_extra=request_body_schema(CompletionRequest))
    async def completions(request: Request) -> Response:
        req = parse_request(CompletionRequest, await read_json(request, config.max_request_bytes))
        work = serving.completions(req, request_origin(request, req, config))
        return await _generate(request, serving, work, bool(req.stream))

    @v1.post("/chat/completions", openapi_extra=request_body_schema(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        req = parse_request(ChatCompletionRequest, await read_json(request, config.max_request_bytes))
        work = serving.chat(req, request_origin(request, req, config))
        return await _generate(request, serving, work, bool(req.stream))

    app.include_router(v1)
    install_openapi(app, [CompletionRequest, ChatCompletionRequest])
    return app


async def _watch_engine(app: FastAPI, engine: AsyncEngine) -> None:
    """If the engine thread dies, /health already answers 503; this also stops the process (through the runner's
    `on_engine_failure`), so that a supervisor restarts it instead of leaving a server that can only fail."""
    while not engine.has_failed:
        await asyncio.sleep(_WATCHDOG_INTERVAL_S)
    logger.critical("the engine thread has died (%r): stopping the server", engine.failure)
    if app.state.on_engine_failure is not None:
        app.state.on_engine_failure()


def request_origin(request: Request, req: CompletionRequest | ChatCompletionRequest, config: ServerConfig) -> Origin:
    """The prefix-cache partition (the tenant's, with isolation on, and the request's own salt) and the client: the
    API key's tenant when keys are configured (a key holder cannot claim several shares by varying `user`), else
    the `user` field."""
    tenant = getattr(request.state, "tenant", None)
    salt = req.cache_salt
    if tenant is not None and config.isolate_prefix_cache:
        salt = tenant if salt is None else f"{tenant}|{salt}"
    return Origin(salt, tenant if tenant is not None else req.user)


def guard(app: FastAPI, config: ServerConfig) -> Callable[[Request], Awaitable[None]]:
    """What every tokenmill app installs: OpenAI-shaped errors and the Host check; returns the API-key
    dependency for the routes that need a key."""
    install_error_handlers(app)
    if config.allowed_hosts is not None:
        app.add_middleware(HostCheckMiddleware, allowed_hosts=config.allowed_hosts)
    return api_key_check(config.api_keys)


def model_card(serving: OpenAIServing) -> dict[str, Any]:
    return {"id": serving.model_name, "object": "model", "created": serving.created, "owned_by": "tokenmill",
            "max_model_len": serving.engine.max_model_len}


async def _generate(request: Request, serving: OpenAIServing, work: Awaitable[tuple[Any, OutputStream]],
                    stream: bool) -> Response:
    """Run a completion; the request counts as in flight (for the drain) until its reply is fully sent."""
    serving.inflight += 1
    if not stream:
        try:
            reply, _ = await unless_disconnected(request, work)
        finally:
            serving.inflight -= 1
        return JSONResponse(reply)
    try:
        chunks, engine_stream = await work
    except BaseException:
        serving.inflight -= 1
        raise
    closed = False

    def on_close() -> None:
        nonlocal closed
        if not engine_stream.finished:  # abandoned or failed: free its KV blocks now
            serving.engine.abort(engine_stream.request_ids)
        if not closed:
            closed = True
            serving.inflight -= 1

    return EventStreamResponse(chunks, on_close)


class _ClientGone(Exception):
    pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (which aborts its engine requests)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise _ClientGone()
    return task.result()


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class EventStreamResponse(StreamingResponse):
    """Server-sent events. Always watches for the client going away (whatever the ASGI spec version) and cancels
    the stream then; `on_close` runs however the response ends, even if the stream never started."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def stream() -> None:
                    await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            self._on_close()


async def read_json(request: Request, limit: int) -> Any:
    """The decoded JSON body; 415 unless sent as JSON, 413 beyond `limit` bytes (checked before and while reading),
    400 if not JSON.

    The Content-Type check is what keeps a web page from driving the server: a browser sends a cross-site POST
    without asking (no CORS preflight) only as text/plain, form or multipart, never as application/json."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise APIError(415, f"send the request body as JSON with 'Content-Type: application/json' (got "
                            f"{media_type or 'no Content-Type'!r})", code="unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad_request("invalid Content-Length header")
        if int(declared) > limit:
            raise _too_large(limit)
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise _too_large(limit)
    except ClientDisconnect:
        raise _ClientGone() from None
    if not body:
        raise bad_request("the request body is empty; expected a JSON object")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise bad_request(f"the request body is not valid JSON: {exc}") from None


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than the limit of {limit} bytes", code="request_too_large")


def api_key_check(api_keys: tuple[str, ...]) -> Callable[[Request], Awaitable[None]]:
    """A dependency: the request must carry one of the keys; it sets `request.state.tenant` to a name for that key
    that does not reveal it. Every key is compared, in constant time each, so timing does not tell which matched."""
    expected = [(key.encode(), "tenant-" + hashlib.sha256(key.encode()).hexdigest()[:16]) for key in api_keys]

    async def check(request: Request) -> None:
        if not expected:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        tenant = None
        for key, name in expected:
            if hmac.compare_digest(given, key) and scheme.lower() == "bearer":
                tenant = name
        if tenant is None:
            raise APIError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'",
                           type="invalid_request_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        request.state.tenant = tenant

    return check


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(_ClientGone)
    async def client_gone(request: Request, exc: _ClientGone) -> Response:
        return Response(status_code=499)  # nobody is listening; nginx's "client closed request"

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return JSONResponse(error_body(str(exc.detail), default_type(exc.status_code)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal server error ({type(exc).__name__})", "server_error"),
                            status_code=500)
