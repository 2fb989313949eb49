"""What the benchmark drives: tokenmill in-process (the engine API) and any OpenAI-compatible HTTP endpoint.

Every backend turns a `BenchRequest` into a `RequestRecord` (send time, the arrival time and token count of each
chunk, end time) with greedy decoding. Timestamps are `time.perf_counter()`, the clock the scenarios use too.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import itertools
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from tokenmill.bench.metrics import RequestRecord
from tokenmill.bench.roofline import MemoryModel, engine_memory_model
from tokenmill.bench.workloads import BenchRequest

WARM_UP = BenchRequest("The quick brown fox jumps over the lazy dog.", 10, 4)


class Backend(abc.ABC):
    """One system under test. `start` loads/connects and warms up; `generate` may run concurrently."""

    name: str
    memory: MemoryModel | None = None  # bytes read per decode step, for achieved-bandwidth figures
    scenarios: tuple[str, ...] = ("offline", "serve", "latency", "concurrency")

    @abc.abstractmethod
    async def start(self) -> None:
        """Load or connect, then send one small request that is not measured."""

    @abc.abstractmethod
    async def generate(self, request: BenchRequest, ignore_eos: bool) -> RequestRecord: ...

    @abc.abstractmethod
    async def stop(self) -> None:
        """Release what `start` acquired."""

    async def pause(self) -> None:
        """Between this backend's runs: release what it need not hold while others are measured (see
        WorkerThreadBackend); `resume` takes it back. Nothing, by default."""
        return

    async def resume(self) -> None:
        """Before each of this backend's runs, after `start` or `pause`. Nothing, by default."""
        return

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": type(self).__name__}

    def counters(self) -> dict[str, int] | None:
        """Cumulative engine counters (forward steps, ...) when the backend can see them; read between runs."""
        return None


# ---- a worker thread behind an async interface ---------------------------------------------------------------------


@dataclass
class PendingRequest:
    request_id: str
    request: BenchRequest
    ignore_eos: bool
    record: RequestRecord
    future: asyncio.Future[RequestRecord]


class WorkerThreadBackend(Backend):
    """Requests run on one worker thread (`_run`): `generate` hands each over through a condition variable, as a
    server would, and awaits the record that the worker resolves with `_resolve`.

    The harness keeps the worker alive only while this backend is measured (`resume` ... `pause`; the model stays
    loaded): PyTorch runs on OpenMP, which keeps a worker pool per thread that ran parallel work, and once the pools
    of two in-process backends together hold more threads than there are cores, libgomp stops spin-waiting between
    parallel regions. tokenmill's single-stream decode step measured 8.5 ms instead of 3.6 with the transformers
    backend's pool alive beside it."""

    token_counting = "engine"  # how the worker counts output tokens (RequestRecord.token_counting)
    join_timeout_s = 60.0

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._incoming: list[PendingRequest] = []
        self._ids = itertools.count()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._thread_name = "bench-worker"
        self._loop: asyncio.AbstractEventLoop | None = None

    @abc.abstractmethod
    def _prepare(self) -> None:
        """On each new worker thread, before it takes requests: load the model the first time, else restore the
        thread count (OpenMP's is per thread)."""

    @abc.abstractmethod
    def _run(self) -> None:
        """The worker loop: take `_incoming` under `_cv`, run it, `_resolve` each request; leave on `_stopping`."""

    async def _start_worker(self, thread_name: str) -> None:
        """Start the worker, wait until it is prepared (errors surface here) and send the unmeasured warm-up
        request."""
        self._thread_name = thread_name
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._thread_main, args=(ready,), name=thread_name, daemon=True)
        self._thread.start()
        await asyncio.wrap_future(ready)
        await self.generate(WARM_UP, ignore_eos=True)

    def _thread_main(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            self._prepare()
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(None)
        self._run()

    async def pause(self) -> None:
        """End the worker thread (and its OpenMP pool), keeping the model loaded."""
        await self._join_worker()
        self._stopping = False
        self._thread = None

    async def resume(self) -> None:
        """Start a worker thread again after `pause`; a no-op while one runs."""
        if self._thread is None:
            await self._start_worker(self._thread_name)

    async def generate(self, request: BenchRequest, ignore_eos: bool) -> RequestRecord:
        assert self._loop is not None, "start() first"
        record = RequestRecord(send_time=time.perf_counter(), prompt_tokens=request.prompt_len,
                               expected_output_tokens=request.output_len, token_counting=self.token_counting)
        pending = PendingRequest(f"bench-{next(self._ids)}", request, ignore_eos, record, self._loop.create_future())
        with self._cv:
            self._incoming.append(pending)
            self._cv.notify()
        return await pending.future

    def _resolve(self, pending: PendingRequest) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_set_result, pending.future, pending.record)

    async def stop(self) -> None:
        await self._join_worker()

    async def _join_worker(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, self.join_timeout_s)


def _set_result(future: asyncio.Future[RequestRecord], record: RequestRecord) -> None:
    if not future.done():
        future.set_result(record)


# ---- tokenmill in-process -----------------------------------------------------------------------------------------


class InProcessBackend(WorkerThreadBackend):
    """An `LLMEngine` stepped by the worker thread; the token timestamps are taken on that thread right after the
    `step()` that produced them."""

    def __init__(self, config: Any = None, name: str = "tokenmill", engine: Any = None) -> None:
        super().__init__()
        self.name = name
        self.config = config
        self.engine = engine
        self._active: dict[str, PendingRequest] = {}
        self._num_threads: int | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._start_worker("bench-engine")
        self.memory = engine_memory_model(self.engine)

    def _prepare(self) -> None:
        import torch

        from tokenmill.engine import LLMEngine

        if self.engine is None:
            self.engine = LLMEngine(self.config)  # sets this thread's thread count from the config
        if self._num_threads is None:
            self._num_threads = torch.get_num_threads()
        torch.set_num_threads(self._num_threads)

    def _run(self) -> None:
        from tokenmill.sampling_params import SamplingParams

        engine = self.engine
        while True:
            with self._cv:
                while not (self._incoming or self._stopping or engine.has_unfinished_requests()):
                    self._cv.wait()
                if self._stopping:
                    break
                incoming, self._incoming = self._incoming, []
            for p in incoming:
                params = SamplingParams(temperature=0.0, max_tokens=p.request.output_len, ignore_eos=p.ignore_eos)
                try:
                    engine.add_request(p.request.prompt, params, p.request_id)
                except Exception as exc:  # an invalid request fails alone
                    p.record.success, p.record.error, p.record.end_time = False, str(exc), time.perf_counter()
                    self._resolve(p)
                else:
                    self._active[p.request_id] = p
            if not engine.has_unfinished_requests():
                continue
            try:
                outputs = engine.step()
            except Exception as exc:  # the step failed: every request in flight fails, the loop goes on
                for request_id, p in list(self._active.items()):
                    engine.abort(request_id)
                    p.record.success, p.record.error, p.record.end_time = False, repr(exc), time.perf_counter()
                    self._resolve(p)
                self._active.clear()
                continue
            now = time.perf_counter()
            if not outputs:
                time.sleep(0.001)  # nothing schedulable this instant; do not spin
            for out in outputs:
                p = self._active.get(out.request_id)
                if p is None:
                    continue
                p.record.add_chunk(now, len(out.delta_token_ids))
                if out.finished:
                    p.record.output_tokens = len(out.token_ids)
                    p.record.prompt_tokens = len(out.prompt_token_ids)
                    p.record.generated_text = out.text
                    p.record.end_time = now
                    del self._active[out.request_id]
                    self._resolve(p)

    def describe(self) -> dict[str, Any]:
        engine = self.engine
        if engine is None:
            return super().describe()
        c = engine.config
        return super().describe() | {
            "model": str(engine.model_path), "dtype": str(engine.dtype), "device": str(engine.device),
            "max_num_seqs": c.max_num_seqs, "max_num_batched_tokens": c.max_num_batched_tokens,
            "num_kv_blocks": engine.scheduler.kv_cache.pool.num_blocks, "block_size": c.block_size,
            "max_model_len": engine.max_model_len, "prefix_caching": c.enable_prefix_caching,
            "chunked_prefill": c.enable_chunked_prefill, "threads": c.num_threads}

    def counters(self) -> dict[str, int] | None:
        if self.engine is None:
            return None
        with self._cv:  # between runs the engine thread is parked in wait(), so reading the engine is safe
            s = self.engine.stats()
        return {"steps": s.steps, "preemptions": s.num_preemptions, "prompt_tokens": s.prompt_tokens,
                "generation_tokens": s.generation_tokens, "prefix_cache_queries": s.prefix_cache.queries,
                "prefix_cache_hits": s.prefix_cache.hits}

    def reset_prefix_cache(self) -> bool:
        with self._cv:
            return bool(self.engine.reset_prefix_cache()) if self.engine is not None else False


# ---- OpenAI-compatible HTTP ---------------------------------------------------------------------------------------

EOS_MODES = ("ignore_eos", "min_tokens", "none")


class OpenAIHTTPBackend(Backend):
    """Streams `/v1/completions` with `stream_options: {include_usage, continuous_usage_stats}`.

    Tokens per chunk come from the server's cumulative `usage.completion_tokens` when it reports usage in every
    chunk (tokenmill, vLLM). Otherwise (llama-cpp-python sends no usage while streaming) each chunk with text
    counts as one token; the final count is the server's usage if it sends one, else `max_tokens` when the server
    says it stopped for length, else the number of chunks. The record says which (`token_counting`).

    `eos_mode` makes every request generate exactly `max_tokens` when the workload ignores EOS: `ignore_eos` sends
    vLLM's/tokenmill's `ignore_eos: true`; `min_tokens` sends `min_tokens = max_tokens` and a -100 logit bias on the
    stop tokens (`stop_token_ids`), which llama-cpp-python honours; `none` sends neither.
    """

    def __init__(self, base_url: str, name: str | None = None, model: str | None = None, api_key: str | None = None,
                 eos_mode: str = "ignore_eos", stop_token_ids: list[int] | None = None,
                 memory: MemoryModel | None = None, timeout_s: float = 600.0) -> None:
        if eos_mode not in EOS_MODES:
            raise ValueError(f"eos_mode must be one of {EOS_MODES}, got {eos_mode!r}")
        self.base_url = base_url.rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[:-3]
        self.name = name or self.base_url
        self.model = model
        self.api_key = api_key
        self.eos_mode = eos_mode
        self.stop_token_ids = list(stop_token_ids or [])
        self.memory = memory
        self.timeout_s = timeout_s
        self.client: Any = None
        self.server_reports_chunk_usage: bool | None = None

    async def start(self) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.client = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, timeout=httpx.Timeout(self.timeout_s, connect=30.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))
        if self.model is None:
            resp = await self.client.get("/v1/models")
            resp.raise_for_status()
            models = resp.json().get("data") or []
            self.model = models[0]["id"] if models else None
        record = await self.generate(WARM_UP, ignore_eos=True)
        if not record.success:
            raise RuntimeError(f"{self.name}: warm-up request failed: {record.error}")
        self.server_reports_chunk_usage = record.token_counting == "usage"

    def body(self, request: BenchRequest, ignore_eos: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": request.prompt, "max_tokens": request.output_len, "temperature": 0.0,
                                "stream": True,
                                "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
        if self.model is not None:
            body["model"] = self.model
        if ignore_eos and self.eos_mode == "ignore_eos":
            body["ignore_eos"] = True
        elif ignore_eos and self.eos_mode == "min_tokens":
            body["min_tokens"] = request.output_len
            if self.stop_token_ids:
                body["logit_bias"] = {str(t): -100.0 for t in self.stop_token_ids}
        return body

    async def generate(self, request: BenchRequest, ignore_eos: bool) -> RequestRecord:
        assert self.client is not None, "start() first"
        record = RequestRecord(send_time=time.perf_counter(), prompt_tokens=request.prompt_len,
                               expected_output_tokens=request.output_len)
        parser = _StreamState()
        try:
            async with self.client.stream("POST", "/v1/completions", json=self.body(request, ignore_eos)) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")
                    raise RuntimeError(f"HTTP {resp.status_code}: {text[:300]}")
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    parser.feed(json.loads(data), time.perf_counter(), record)
        except Exception as exc:  # network errors, HTTP errors, server-side errors in the stream
            record.success, record.error = False, f"{type(exc).__name__}: {exc}"
        record.end_time = time.perf_counter()
        parser.finish(record, request.output_len)
        return record

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"base_url": self.base_url, "model": self.model, "eos_mode": self.eos_mode,
                                     "server_reports_chunk_usage": self.server_reports_chunk_usage}


class _StreamState:
    """Turns SSE chunk objects into token arrivals on a record (see OpenAIHTTPBackend)."""

    def __init__(self) -> None:
        self.usage_tokens: int | None = None  # last cumulative completion_tokens seen in a chunk with choices
        self.final_usage: dict[str, Any] | None = None
        self.content_chunks = 0
        self.finish_reason: str | None = None
        self.text: list[str] = []

    def feed(self, chunk: dict[str, Any], now: float, record: RequestRecord) -> None:
        if "error" in chunk and not chunk.get("choices"):
            error = chunk["error"]
            raise RuntimeError(error.get("message", error) if isinstance(error, dict) else error)
        choices = chunk.get("choices") or []
        text = "".join(str(c.get("text") or (c.get("delta") or {}).get("content") or "") for c in choices)
        self.text.append(text)
        for c in choices:
            self.finish_reason = c.get("finish_reason") or self.finish_reason
        usage = chunk.get("usage")
        completion = usage.get("completion_tokens") if isinstance(usage, dict) else None
        if completion is not None:
            self.final_usage = usage
        if completion is not None and choices:  # continuous usage: the delta is exact
            new = completion - (self.usage_tokens or 0)
            self.usage_tokens = completion
            record.add_chunk(now, new)
        elif completion is not None:  # usage-only closing chunk
            if self.usage_tokens is not None:
                record.add_chunk(now, completion - self.usage_tokens)
                self.usage_tokens = completion
        elif text and self.usage_tokens is None:  # no usage in chunks: one token per content chunk
            self.content_chunks += 1
            record.add_chunk(now, 1)

    def finish(self, record: RequestRecord, max_tokens: int) -> None:
        record.generated_text = "".join(self.text)
        if self.usage_tokens is not None:
            record.token_counting = "usage"
        elif self.final_usage is not None:
            record.token_counting = "chunks+final-usage"
        elif self.finish_reason == "length":
            record.token_counting = "chunks+length"
        else:
            record.token_counting = "chunks"
        if self.final_usage is not None:
            record.output_tokens = int(self.final_usage["completion_tokens"])
            if self.final_usage.get("prompt_tokens") is not None:
                record.prompt_tokens = int(self.final_usage["prompt_tokens"])
        elif self.finish_reason == "length":
            record.output_tokens = max_tokens  # the server stopped at the limit: exactly max_tokens were generated
        else:
            record.output_tokens = sum(record.chunk_tokens)
        if record.success and not record.chunk_times:
            record.success, record.error = False, "the stream carried no generated token"
