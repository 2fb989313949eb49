"""Load generators (MLPerf names) and the SLO max-rate search.

- offline: every session starts at t=0 (optionally capped by max concurrency); metric: throughput.
- serve: sessions start by a Poisson process at `rate` requests/s, or a gamma process with a burstiness factor
  (shape = burstiness, mean gap 1/rate; 1 is Poisson, < 1 burstier, > 1 more regular); optional max concurrency
  (requests beyond it wait, and their TTFT is counted from when they are actually sent, as in vLLM).
- latency (SingleStream): one request at a time.
- concurrency N (closed loop, as in llmperf): N clients, each sending its next request when the previous ends.

A multi-turn session sends its next turn as soon as its previous turn finished (turns are the same client).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tokenmill.bench.backends import Backend
from tokenmill.bench.metrics import SLO, RequestRecord, compute_metrics
from tokenmill.bench.roofline import batch_weight_bandwidth, single_stream_bandwidth
from tokenmill.bench.workloads import Session, Workload

SCENARIOS = ("offline", "serve", "latency", "concurrency")


def arrival_offsets(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Start offsets (s) of n arrivals: the first at 0, then gamma gaps with shape `burstiness` and mean 1/rate
    (exponential, i.e. Poisson arrivals, for burstiness 1). An infinite rate puts every arrival at 0."""
    if n <= 0:
        return []
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"rate and burstiness must be > 0, got {rate} and {burstiness}")
    gaps = np.random.default_rng(seed).gamma(burstiness, 1.0 / (rate * burstiness), size=n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


@dataclass
class RunSpec:
    scenario: str
    request_rate: float = math.inf  # serve
    burstiness: float = 1.0  # serve
    max_concurrency: int | None = None  # offline / serve
    concurrency: int = 1  # closed loop
    ignore_eos: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {SCENARIOS}, got {self.scenario!r}")
        if self.scenario == "latency":
            self.concurrency = 1
        if self.concurrency < 1 or (self.max_concurrency is not None and self.max_concurrency < 1):
            raise ValueError("concurrency and max_concurrency must be >= 1")

    @property
    def label(self) -> str:
        if self.scenario == "serve":
            rate = "inf" if math.isinf(self.request_rate) else f"{self.request_rate:g}"
            extra = f", burstiness {self.burstiness:g}" if self.burstiness != 1 else ""
            cap = f", max concurrency {self.max_concurrency}" if self.max_concurrency else ""
            return f"rate {rate}/s{extra}{cap}"
        if self.scenario == "concurrency":
            return f"concurrency {self.concurrency}"
        if self.scenario == "offline" and self.max_concurrency:
            return f"offline, max concurrency {self.max_concurrency}"
        return self.scenario

    def to_json(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "label": self.label,
                "request_rate": None if math.isinf(self.request_rate) else self.request_rate,
                "burstiness": self.burstiness, "max_concurrency": self.max_concurrency,
                "concurrency": self.concurrency, "ignore_eos": self.ignore_eos, "seed": self.seed}


@dataclass
class RunResult:
    backend: str
    spec: RunSpec
    repeat: int
    records: list[RequestRecord]
    metrics: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self, with_records: bool = True) -> dict[str, Any]:
        body = {"backend": self.backend, "repeat": self.repeat, **self.spec.to_json(), "metrics": self.metrics,
                **self.extra}
        if with_records:
            body["requests"] = [r.to_json() for r in self.records]
        return body


class _Progress:
    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="req", dynamic_ncols=True, leave=False)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


async def _run_session(backend: Backend, session: Session, index: int, spec: RunSpec,
                       limit: asyncio.Semaphore | None, records: list[RequestRecord], progress: _Progress,
                       released: float) -> None:
    replies: list[str] = []
    for turn in range(session.num_turns):
        request = session.request(turn, replies)
        async with limit or contextlib.nullcontext():
            record = await backend.generate(request, spec.ignore_eos)
        record.session, record.turn = index, turn
        record.scheduled_time = released if turn == 0 else record.send_time
        records.append(record)
        replies.append(record.generated_text)
        progress.update()


async def run_once(backend: Backend, workload: Workload, spec: RunSpec, progress: bool = True,
                   slo: SLO | None = None, repeat: int = 0) -> RunResult:
    """Run the workload once under the scenario; returns the records and their metrics."""
    records: list[RequestRecord] = []
    bar = _Progress(workload.num_requests, f"{backend.name} {spec.label}", progress)
    before = backend.counters()
    sessions = workload.sessions
    try:
        if spec.scenario in ("latency", "concurrency"):
            queue = list(enumerate(sessions))[::-1]

            async def client() -> None:
                while queue:
                    index, session = queue.pop()
                    await _run_session(backend, session, index, spec, None, records, bar, time.perf_counter())

            await asyncio.gather(*(client() for _ in range(min(spec.concurrency, len(sessions)))))
        else:
            rate = math.inf if spec.scenario == "offline" else spec.request_rate
            offsets = arrival_offsets(len(sessions), rate, spec.burstiness, spec.seed)
            limit = asyncio.Semaphore(spec.max_concurrency) if spec.max_concurrency else None
            start = time.perf_counter()
            tasks = []
            for index, (session, offset) in enumerate(zip(sessions, offsets, strict=True)):
                delay = start + offset - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(_run_session(backend, session, index, spec, limit, records, bar,
                                                              time.perf_counter())))
            await asyncio.gather(*tasks)
    finally:
        bar.close()
    records.sort(key=lambda r: (r.session, r.turn))
    metrics = compute_metrics(records, slo)
    after = backend.counters()
    extra: dict[str, Any] = {}
    if before is not None and after is not None:
        deltas = {k: after[k] - before[k] for k in after}
        extra["engine"] = deltas
        metrics["forward_steps_per_s"] = deltas["steps"] / metrics["duration_s"] if metrics["duration_s"] else None
        metrics["weights_gb_per_s"] = batch_weight_bandwidth(deltas["steps"], metrics["duration_s"], backend.memory)
    if spec.scenario == "latency" or (spec.scenario == "concurrency" and spec.concurrency == 1):
        metrics["decode_gb_per_s"] = single_stream_bandwidth(records, backend.memory)
    return RunResult(backend.name, spec, repeat, records, metrics, extra)


# ---- SLO search ---------------------------------------------------------------------------------------------------


async def search_max_rate(passes: Callable[[float], Awaitable[bool]], known: dict[float, bool],
                          iterations: int = 3, max_doublings: int = 4) -> dict[str, Any]:
    """Highest request rate that passes, from already-measured `known` {rate: passed} (e.g. a sweep).

    If every known rate passes, the highest is doubled (at most `max_doublings` times) until one fails. Then the
    gap between the highest passing rate below the lowest failing one is bisected geometrically `iterations`
    times. Returns {"max_rate": highest passing (None if none passed), "first_failing": lowest failing (None if
    none), "evaluated": {rate: passed}}. An infinite passing rate means all-at-once still meets the SLOs.
    """
    results = dict(known)

    async def check(rate: float) -> bool:
        if rate not in results:
            results[rate] = await passes(rate)
        return results[rate]

    if not results:
        await check(1.0)
    for _ in range(max_doublings):
        failing = [r for r, ok in results.items() if not ok]
        if failing or math.isinf(max(results)):
            break
        await check(max(results) * 2)
    failing = [r for r, ok in results.items() if not ok]
    if not failing:
        return {"max_rate": max(results), "first_failing": None, "evaluated": dict(sorted(results.items()))}
    low_fail = min(failing)
    passing = [r for r, ok in results.items() if ok and r < low_fail]
    if not passing:
        return {"max_rate": None, "first_failing": low_fail, "evaluated": dict(sorted(results.items()))}
    low, high = max(passing), low_fail
    for _ in range(iterations):
        if math.isinf(high):
            break
        mid = math.sqrt(low * high)
        if await check(mid):
            low = mid
        else:
            high = mid
    return {"max_rate": low, "first_failing": high, "evaluated": dict(sorted(results.items()))}
