"""An LLMEngine driven by its own thread, exposed to asyncio code.

The engine is not thread-safe, so exactly one thread — the engine thread — ever touches it. Everything else talks
to that thread through a command list guarded by a condition variable:

* `submit()` posts an "add" command carrying a `concurrent.futures.Future`; the engine thread validates and queues
  the requests (all of a group or none) and resolves the future, so validation errors reach the caller as
  exceptions.
* Each step's outputs are batched per event loop and handed over with one `loop.call_soon_threadsafe` per step;
  they land in the `OutputStream` (an `asyncio.Queue`) of the HTTP request that owns them.
* `abort()` posts an "abort" command; the engine frees the requests' KV blocks before its next step.

When there is nothing to do the thread sleeps on the condition variable instead of spinning.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Protocol

from tokenmill.config import EngineConfig
from tokenmill.engine import EngineStats, LLMEngine
from tokenmill.output.types import RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# How long the engine thread waits before retrying when it has requests but the scheduler found nothing to run.
_IDLE_RETRY_S = 0.005


class EngineOverloadedError(RuntimeError):
    """Too many requests are already waiting; the caller should retry later."""


class EngineStoppedError(RuntimeError):
    """The engine thread is stopped (or was never started)."""


class EngineStepError(RuntimeError):
    """The engine failed while running a step; the requests in flight were aborted."""


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    fork_of: str | None = None  # an earlier request of the same group with the same prompt (n > 1)


class EngineObserver(Protocol):
    """Receives per-request timings from the engine thread (e.g. Prometheus histograms); must be thread-safe."""

    def on_first_token(self, seconds: float) -> None: ...

    def on_next_token(self, seconds: float) -> None: ...

    def on_finished(self, reason: str, seconds: float, num_prompt_tokens: int, num_generation_tokens: int) -> None: ...


class OutputStream:
    """The outputs of one group of engine requests (the choices of one HTTP request), as `(index, output)` pairs.

    `index` is the position of the request in the submitted list. Iteration ends once every request finished.
    Only the event loop that submitted the group touches this object.
    """

    def __init__(self, request_ids: list[str]) -> None:
        self.request_ids = request_ids
        self._index = {request_id: i for i, request_id in enumerate(request_ids)}
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._unfinished = set(request_ids)

    @property
    def finished(self) -> bool:
        return not self._unfinished

    def _put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if not self._unfinished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._unfinished.clear()
            raise item
        if item.finished:
            self._unfinished.discard(item.request_id)
        return self._index[item.request_id], item


@dataclass
class _Route:
    """Where a request's outputs go, and its timings (engine thread only)."""

    stream: OutputStream
    loop: asyncio.AbstractEventLoop
    arrival: float
    last_token: float | None = None


@dataclass
class _Add:
    requests: list[EngineRequest]
    stream: OutputStream
    loop: asyncio.AbstractEventLoop
    future: concurrent.futures.Future[None]
    arrival: float = field(default_factory=time.monotonic)


@dataclass
class _Abort:
    request_ids: list[str]


_Deliveries = dict[asyncio.AbstractEventLoop, list[tuple[OutputStream, RequestOutput | BaseException]]]


class AsyncEngine:
    """Owns an LLMEngine and the thread that steps it; `submit()` and `abort()` may be called from any event loop."""

    def __init__(self, engine: LLMEngine, max_waiting_requests: int | None = None) -> None:
        if max_waiting_requests is not None and max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be >= 1 or None, got {max_waiting_requests}")
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self._observers: list[EngineObserver] = []
        self._cond = threading.Condition()
        self._commands: list[_Add | _Abort] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._home_thread: threading.Thread | None = None  # set when from_config built the engine on its own thread
        self._routes: dict[str, _Route] = {}  # engine thread only
        self._has_work = False  # engine thread only
        self._stats = engine.stats()

    @classmethod
    def from_config(cls, config: EngineConfig | None = None, max_waiting_requests: int | None = None) -> AsyncEngine:
        """Builds the engine on the thread that will step it, and keeps that thread for `start()`.

        Why one thread: PyTorch's CPU kernels run on OpenMP, which gives every OS thread that starts parallel work
        its own pool of workers. Once more pool threads exist than cores, libgomp stops spin-waiting between
        parallel regions, and a decode step (hundreds of short regions) ran 2.1x slower when the model was loaded
        on the main thread and stepped on another (measured: 10.7 vs 5.2 ms per gguf step on 2 cores)."""
        built: concurrent.futures.Future[AsyncEngine] = concurrent.futures.Future()

        def engine_thread() -> None:
            try:
                async_engine = cls(LLMEngine(config), max_waiting_requests)
            except BaseException as exc:
                built.set_exception(exc)
                return
            async_engine._home_thread = threading.current_thread()
            built.set_result(async_engine)
            async_engine._wait_for_start()

        threading.Thread(target=engine_thread, name="tokenmill-engine", daemon=True).start()
        return built.result()

    # ---- read-only facts, safe from any thread ---------------------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def stats(self) -> EngineStats:
        """The engine's stats as of the end of its latest loop iteration."""
        return self._stats

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def add_observer(self, observer: EngineObserver) -> None:
        self._observers.append(observer)

    # ---- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            if self._home_thread is not None:  # from_config: the thread that built the engine runs it
                self._thread = self._home_thread
                self._cond.notify_all()
                return
            self._thread = threading.Thread(target=self._run, name="tokenmill-engine", daemon=True)
            self._thread.start()

    def _wait_for_start(self) -> None:
        """On the thread that built the engine: run the loop once `start()` is called, or end at `shutdown()`."""
        with self._cond:
            while self._thread is None and not self._stopping:
                self._cond.wait()
            if self._thread is not threading.current_thread():
                return
        self._run()

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Abort whatever is still in flight, stop the engine thread and wait for it."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    # ---- requests ----------------------------------------------------------------------------------------------

    async def submit(self, requests: list[EngineRequest]) -> OutputStream:
        """Queue a group of requests (all or none); raises InvalidRequestError, EngineOverloadedError or
        EngineStoppedError without queueing anything."""
        if not requests:
            raise ValueError("no requests to submit")
        stream = OutputStream([r.request_id for r in requests])
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._post(_Add(list(requests), stream, asyncio.get_running_loop(), future))
        try:
            await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            self.abort(stream.request_ids)  # the engine may have queued them before we were cancelled
            raise
        return stream

    def abort(self, request_ids: list[str]) -> None:
        """Stop these requests and free their KV blocks; unknown or finished ids are ignored. Never blocks."""
        if request_ids:
            self._post(_Abort(list(request_ids)))

    def _post(self, command: _Add | _Abort) -> None:
        with self._cond:
            if self._stopping or self._thread is None:
                if isinstance(command, _Add):
                    command.future.set_exception(EngineStoppedError("the engine is not running"))
                return
            self._commands.append(command)
            self._cond.notify()

    # ---- the engine thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        idle_wait: float | None = None
        while True:
            with self._cond:
                if not self._commands and not self._stopping:
                    if not self._has_work:
                        self._cond.wait()
                    elif idle_wait is not None:
                        self._cond.wait(idle_wait)
                commands, self._commands = self._commands, []
                stopping = self._stopping
            deliveries: _Deliveries = defaultdict(list)
            steps_before = self._stats.steps
            try:
                self._iteration(commands, stopping, deliveries)
            except Exception as exc:  # a bug, not bad input: fail what is in flight, keep serving
                logger.exception("engine loop failed; aborting %d requests", len(self._routes))
                self._fail_all(exc, deliveries)
            self._has_work = self.engine.has_unfinished_requests()
            self._stats = self.engine.stats()
            # Requests pending but nothing scheduled (should not happen): back off briefly instead of spinning.
            idle_wait = _IDLE_RETRY_S if self._has_work and self._stats.steps == steps_before else None
            self._deliver(deliveries)
            if stopping:
                return

    def _iteration(self, commands: list[_Add | _Abort], stopping: bool, deliveries: _Deliveries) -> None:
        for command in commands:
            if isinstance(command, _Add):
                self._add(command)
            else:
                for request_id in command.request_ids:
                    self._abort(request_id, deliveries)
        if stopping:
            for request_id in list(self._routes):
                self._abort(request_id, deliveries)
        elif self.engine.has_unfinished_requests():
            outputs = self.engine.step()
            for out in outputs:
                route = self._routes.get(out.request_id)
                if route is None:
                    continue
                if out.finished:
                    del self._routes[out.request_id]
                self._observe(route, out)
                deliveries[route.loop].append((route.stream, out))

    def _fail_all(self, exc: Exception, deliveries: _Deliveries) -> None:
        error = EngineStepError(f"the engine failed while generating: {type(exc).__name__}: {exc}")
        for request_id, route in list(self._routes.items()):
            del self._routes[request_id]
            try:
                self.engine.abort(request_id)
            except Exception:  # the engine may be inconsistent after a failure; free what can be freed
                logger.exception("abort of %s failed", request_id)
            deliveries[route.loop].append((route.stream, error))

    def _add(self, command: _Add) -> None:
        added: list[str] = []
        try:
            limit = self.max_waiting_requests
            if limit is not None and self.engine.stats().num_waiting >= limit:
                raise EngineOverloadedError(
                    f"the server is overloaded: {limit} requests are already waiting; retry later")
            for request in command.requests:
                self.engine.add_request(request.prompt, request.params, request.request_id, fork_of=request.fork_of)
                added.append(request.request_id)
        except Exception as exc:
            for request_id in added:
                self.engine.abort(request_id)
            command.future.set_exception(exc)
            return
        for request_id in added:
            self._routes[request_id] = _Route(command.stream, command.loop, command.arrival)
        command.future.set_result(None)

    def _abort(self, request_id: str, deliveries: _Deliveries) -> None:
        route = self._routes.pop(request_id, None)
        if route is None:
            return
        out = self.engine.abort(request_id)
        if out is not None:
            self._observe(route, out)
            deliveries[route.loop].append((route.stream, out))

    def _observe(self, route: _Route, out: RequestOutput) -> None:
        now = time.monotonic()
        try:
            self._notify(route, out, now)
        except Exception:  # metrics must never take generation down
            logger.exception("engine observer failed")
        if out.delta_token_ids:
            route.last_token = now

    def _notify(self, route: _Route, out: RequestOutput, now: float) -> None:
        for observer in self._observers:
            if out.delta_token_ids:
                if route.last_token is None:
                    observer.on_first_token(now - route.arrival)
                else:
                    observer.on_next_token(now - route.last_token)
            if out.finished:
                observer.on_finished(out.finish_reason or "abort", now - route.arrival, len(out.prompt_token_ids),
                                     len(out.token_ids))

    @staticmethod
    def _deliver(deliveries: _Deliveries) -> None:
        for loop, items in deliveries.items():
            with contextlib.suppress(RuntimeError):  # that event loop is closed: nobody is listening any more
                loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[OutputStream, RequestOutput | BaseException]]) -> None:
    for stream, item in items:
        stream._put(item)
