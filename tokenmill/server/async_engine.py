"""An LLMEngine driven by its own thread, exposed to asyncio code.

The engine is not thread-safe, so exactly one thread — the engine thread — ever touches it. Everything else talks
to that thread through a command list guarded by a condition variable:

* `submit()` posts an "add" command carrying a `concurrent.futures.Future`; the engine thread validates and queues
  the requests (all of a group or none) and resolves the future, so validation errors reach the caller as
  exceptions.
* Each step's outputs (deltas) are batched per event loop and handed over with one `loop.call_soon_threadsafe` per
  step; they land in the `OutputStream` of the HTTP request that owns them, which merges what its reader has not
  taken yet and cuts off a reader that falls too far behind.
* `abort()` posts an "abort" command; the engine frees the requests' KV blocks before its next step.
* `submit(..., after=fn)` runs `fn(engine)` on the engine thread right after the step that finished the group's
  last request, before any other step: it sees the cache as those requests left it (their freed blocks still
  cached), which a later `call()` cannot promise once other requests have taken blocks in between.
* Requests past their deadline are aborted by the engine thread between steps.
* A failure is kept to its request where the engine can tell which one it is (`LLMEngine.step`); if the engine
  thread itself dies, every waiter gets EngineStoppedError and `has_failed` tells the server to exit.

When there is nothing to do the thread sleeps on the condition variable instead of spinning.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import heapq
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from tokenmill.config import EngineConfig
from tokenmill.engine import EngineStats, LLMEngine, PrefixCacheIndex
from tokenmill.output.types import RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.defaults import DEFAULT_MAX_STREAM_BACKLOG
from tokenmill.structured.params import StructuredOutputs
from tokenmill.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How long the engine thread waits before retrying when it has requests but the scheduler found nothing to run.
_IDLE_RETRY_S = 0.005


class EngineOverloadedError(RuntimeError):
    """Too many requests are already waiting; the caller should retry later."""


class EngineStoppedError(RuntimeError):
    """The engine thread is stopped (or was never started)."""


class EngineStepError(RuntimeError):
    """The engine failed while running this request (the details are in the server's log, not in the message)."""


class RequestTimeoutError(RuntimeError):
    """The request ran past its deadline and was aborted."""


class StreamBacklogError(RuntimeError):
    """The reader of a stream fell too far behind; its requests were aborted."""


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    fork_of: str | None = None  # an earlier request of the same group with the same prompt (n > 1)
    cache_salt: str | None = None  # prefix-cache partition (a tenant)
    priority: int = 0  # lower first under the priority policy
    client_id: str | None = None  # whose service this is (fair policy, per-client metrics)


@dataclass(frozen=True)
class Origin:
    """Who sent an HTTP request, as the app works it out from its key and fields."""

    cache_salt: str | None = None  # the prefix-cache partition
    client_id: str | None = None  # the API key's tenant when keys are configured, else the `user` field


class EngineObserver(Protocol):
    """Receives per-request timings from the engine thread (e.g. Prometheus histograms); must be thread-safe."""

    def on_first_token(self, seconds: float) -> None: ...

    def on_next_token(self, seconds: float) -> None: ...

    def on_finished(self, reason: str, seconds: float, num_prompt_tokens: int, num_generation_tokens: int) -> None: ...


class OutputStream:
    """The outputs of one group of engine requests (the choices of one HTTP request), as `(index, output)` pairs.

    `index` is the position of the request in the submitted list. Iteration ends once every request finished.
    Only the event loop that submitted the group touches this object.

    The engine's outputs are deltas. A request's outputs that arrive while the reader is busy are merged into one,
    so a slow reader costs memory in proportion to the tokens it has not read, not to the steps; once those pass
    `max_backlog` tokens the reader is cut off: its requests are aborted (`on_overflow`) and iteration raises
    `StreamBacklogError`.
    """

    def __init__(self, request_ids: list[str], max_backlog: int | None = None) -> None:
        self.request_ids = request_ids
        self.max_backlog = max_backlog
        self.on_overflow: Callable[[], None] | None = None
        # submit(after=fn): fn's result once every request finished (it is not run if one was aborted or failed)
        self.after: concurrent.futures.Future[Any] | None = None
        self._index = {request_id: i for i, request_id in enumerate(request_ids)}
        self._pending: dict[str, RequestOutput] = {}  # insertion order = arrival order of each request's first item
        self._backlog = 0  # tokens in _pending
        self._error: BaseException | None = None
        self._ready = asyncio.Event()
        self._unfinished = set(request_ids)

    @property
    def finished(self) -> bool:
        return not self._unfinished

    def _put(self, item: RequestOutput | BaseException) -> None:
        if self._error is not None:
            return
        if isinstance(item, BaseException):
            self._fail(item)
            return
        queued = self._pending.get(item.request_id)
        if queued is None:
            self._pending[item.request_id] = item
        else:
            queued.merge_delta(item)
        self._backlog += len(item.token_ids)
        self._ready.set()
        if self.max_backlog is not None and self._backlog > self.max_backlog:
            self._fail(StreamBacklogError(
                f"the client read too slowly: {self._backlog} generated tokens were not read (limit "
                f"{self.max_backlog}); the request was aborted"))
            if self.on_overflow is not None:
                self.on_overflow()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._pending.clear()
        self._backlog = 0
        self._ready.set()

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if not self._unfinished:
            raise StopAsyncIteration
        while not self._pending and self._error is None:
            self._ready.clear()
            await self._ready.wait()
        if self._error is not None:
            self._unfinished.clear()
            raise self._error
        request_id = next(iter(self._pending))
        item = self._pending.pop(request_id)
        self._backlog -= len(item.token_ids)
        if item.finished:
            self._unfinished.discard(item.request_id)
        return self._index[item.request_id], item


@dataclass
class _Call:
    fn: Callable[[LLMEngine], Any]
    future: concurrent.futures.Future[Any]


@dataclass
class _After:
    """A group's `after` call, run when the last of its `remaining` requests has finished."""

    call: _Call
    remaining: int


@dataclass
class _Route:
    """Where a request's outputs go, and its timings (engine thread only)."""

    stream: OutputStream
    loop: asyncio.AbstractEventLoop
    arrival: float
    deadline: float | None = None
    last_token: float | None = None
    after: _After | None = None


@dataclass
class _Add:
    requests: list[EngineRequest]
    stream: OutputStream
    loop: asyncio.AbstractEventLoop
    future: concurrent.futures.Future[None]
    arrival: float = field(default_factory=time.monotonic)
    timeout: float | None = None
    after: _Call | None = None


@dataclass
class _Abort:
    request_ids: list[str]


_Command = _Add | _Abort | _Call


_Deliveries = dict[asyncio.AbstractEventLoop, list[tuple[OutputStream, RequestOutput | BaseException]]]


class AsyncEngine:
    """Owns an LLMEngine and the thread that steps it; `submit()` and `abort()` may be called from any event loop."""

    def __init__(self, engine: LLMEngine, max_waiting_requests: int | None = None) -> None:
        if max_waiting_requests is not None and max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be >= 1 or None, got {max_waiting_requests}")
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.max_stream_backlog: int | None = DEFAULT_MAX_STREAM_BACKLOG  # unread tokens per stream
        self.failure: BaseException | None = None  # what ended the engine thread, if not shutdown()
        self._deadlines: list[tuple[float, str]] = []  # heap, engine thread only
        self._observers: list[EngineObserver] = []
        self._cond = threading.Condition()
        self._commands: list[_Command] = []
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

    def compile_grammar(self, constraint: StructuredOutputs) -> None:
        """Compiles a request's grammar into the engine's cache from the calling thread (a server's worker), so that
        adding the request does not compile on the engine thread; raises InvalidRequestError for a bad one."""
        self.engine.structured.compiler.compile(constraint)

    def stats(self) -> EngineStats:
        """The engine's stats as of the end of its latest loop iteration."""
        return self._stats

    def prefix_cache_index(self) -> PrefixCacheIndex:
        """Read from the calling thread without a lock: the block pool's hash index is a dict that the engine
        thread changes in place, and copying a dict's keys is one C call, which holds the GIL throughout."""
        return self.engine.prefix_cache_index()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.failure is None

    @property
    def has_failed(self) -> bool:
        """The engine thread ended without being asked to: the process should exit so a supervisor restarts it."""
        return self.failure is not None or (self._thread is not None and not self._thread.is_alive()
                                            and not self._stopping)

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

    async def submit(self, requests: list[EngineRequest], timeout: float | None = None,
                     after: Callable[[LLMEngine], Any] | None = None) -> OutputStream:
        """Queue a group of requests (all or none); raises InvalidRequestError, EngineOverloadedError or
        EngineStoppedError without queueing anything. Outputs come as deltas. After `timeout` seconds the requests
        still running are aborted and the stream raises RequestTimeoutError. `after(engine)` runs on the engine
        thread right after the step that finished the last of them, before the next step; `stream.after` holds
        its result (module docstring)."""
        if not requests:
            raise ValueError("no requests to submit")
        requests = [r if r.params.output_kind == "delta" else
                    dataclasses.replace(r, params=dataclasses.replace(r.params, output_kind="delta"))
                    for r in requests]
        stream = OutputStream([r.request_id for r in requests], self.max_stream_backlog)
        stream.on_overflow = lambda: self.abort(stream.request_ids)
        call = None
        if after is not None:
            stream.after = concurrent.futures.Future()
            call = _Call(after, stream.after)
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._post(_Add(requests, stream, asyncio.get_running_loop(), future, timeout=timeout, after=call))
        try:
            await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            self.abort(stream.request_ids)  # the engine may have queued them before we were cancelled
            raise
        return stream

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run `fn(engine)` on the engine thread between two steps (what may not run beside a step, such as
        moving KV blocks in or out of the cache) and return what it returns, or raise what it raises."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._post(_Call(fn, future))
        return await asyncio.wrap_future(future)

    def abort(self, request_ids: list[str]) -> None:
        """Stop these requests and free their KV blocks; unknown or finished ids are ignored. Never blocks."""
        if request_ids:
            self._post(_Abort(list(request_ids)))

    def _post(self, command: _Command) -> None:
        with self._cond:
            if self._stopping or self._thread is None or self.failure is not None:
                if not isinstance(command, _Abort):
                    command.future.set_exception(EngineStoppedError("the engine is not running"))
                return
            self._commands.append(command)
            self._cond.notify()

    # ---- the engine thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:
            # Nothing will step the engine again: say so to everyone waiting, and let the server see it.
            logger.critical("the engine thread died", exc_info=True)
            self.failure = exc
            with self._cond:
                stranded = [c for c in self._commands if not isinstance(c, _Abort)]
                self._commands = []
            for command in stranded:
                command.future.set_exception(EngineStoppedError("the engine is not running"))
            deliveries: _Deliveries = defaultdict(list)
            for route in self._routes.values():
                deliveries[route.loop].append((route.stream, EngineStoppedError("the engine stopped")))
            self._routes.clear()
            self._deliver(deliveries)

    def _loop(self) -> None:
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
            except Exception:  # a bug outside any one request: fail what is in flight, keep serving
                logger.exception("engine loop failed; aborting %d requests", len(self._routes))
                self._fail_all(deliveries)
            self._has_work = self.engine.has_unfinished_requests()
            self._stats = self.engine.stats()
            # Requests pending but nothing scheduled (should not happen): back off briefly instead of spinning.
            idle_wait = _IDLE_RETRY_S if self._has_work and self._stats.steps == steps_before else None
            self._deliver(deliveries)
            if stopping:
                return

    def _iteration(self, commands: list[_Command], stopping: bool, deliveries: _Deliveries) -> None:
        for command in commands:
            try:
                if isinstance(command, _Add):
                    self._add(command)
                elif isinstance(command, _Call):
                    self._call(command)
                else:
                    for request_id in command.request_ids:
                        self._abort(request_id, deliveries)
            except Exception:  # one command's failure must not drop the commands after it
                logger.exception("engine command %s failed", type(command).__name__)
        self._expire(deliveries)
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
                    if route.after is not None and out.finish_reason != "error":
                        route.after.remaining -= 1
                        if route.after.remaining == 0:
                            self._call(route.after.call)
                self._observe(route, out)
                if out.finish_reason == "error":  # this request failed on its own; the reason is in the log
                    deliveries[route.loop].append((route.stream, _request_failed(out.request_id)))
                else:
                    deliveries[route.loop].append((route.stream, out))

    def _expire(self, deliveries: _Deliveries) -> None:
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, request_id = heapq.heappop(self._deadlines)
            route = self._routes.pop(request_id, None)
            if route is None:
                continue  # finished or aborted before its deadline
            self.engine.abort(request_id)
            limit = route.deadline - route.arrival if route.deadline is not None else 0.0
            deliveries[route.loop].append((route.stream, RequestTimeoutError(
                f"the request did not finish within its deadline of {limit:g} s and was aborted")))

    def _fail_all(self, deliveries: _Deliveries) -> None:
        for request_id, route in list(self._routes.items()):
            del self._routes[request_id]
            try:
                self.engine.abort(request_id)
            except Exception:  # the engine may be inconsistent after a failure; free what can be freed
                logger.exception("abort of %s failed", request_id)
            deliveries[route.loop].append((route.stream, _request_failed(request_id)))

    def _call(self, command: _Call) -> None:
        if not command.future.set_running_or_notify_cancel():
            return
        try:
            command.future.set_result(command.fn(self.engine))
        except Exception as exc:
            command.future.set_exception(exc)

    def _add(self, command: _Add) -> None:
        if not command.future.set_running_or_notify_cancel():
            return  # the caller gave up (client gone) before its requests were queued: nothing to add
        added: list[str] = []
        try:
            limit = self.max_waiting_requests
            # The whole group counts: one HTTP request can carry many prompts times n.
            if limit is not None and len(self.engine.scheduler.waiting) + len(command.requests) > limit:
                raise EngineOverloadedError(
                    f"the server is overloaded: {len(self.engine.scheduler.waiting)} requests are waiting and this "
                    f"one adds {len(command.requests)} (limit {limit}); retry later")
            for request in command.requests:
                self.engine.add_request(request.prompt, request.params, request.request_id, fork_of=request.fork_of,
                                        cache_salt=request.cache_salt, priority=request.priority,
                                        client_id=request.client_id)
                added.append(request.request_id)
        except Exception as exc:
            for request_id in added:
                self.engine.abort(request_id)
            command.future.set_exception(exc)
            return
        deadline = command.arrival + command.timeout if command.timeout is not None else None
        after = _After(command.after, len(added)) if command.after is not None else None
        for request_id in added:
            self._routes[request_id] = _Route(command.stream, command.loop, command.arrival, deadline, after=after)
            if deadline is not None:
                heapq.heappush(self._deadlines, (deadline, request_id))
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


def _request_failed(request_id: str) -> EngineStepError:
    return EngineStepError(f"internal error while generating request {request_id}; it was aborted (the other "
                           "requests go on; details are in the server log)")


def _put_all(items: list[tuple[OutputStream, RequestOutput | BaseException]]) -> None:
    for stream, item in items:
        stream._put(item)
