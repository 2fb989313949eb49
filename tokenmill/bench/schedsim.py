"""Scheduling policies in simulated time: the engine's own Scheduler and KV manager, a fitted step-cost model instead
of the model.

A policy comparison on the real engine takes minutes per arm and one run is noisy; the scheduler is pure Python, so
the same arrivals can be replayed through it with each step's duration predicted from its plan. `StepCost` is a
linear model of a step's seconds in what the plan holds (`FEATURES`: decoding sequences, prefill tokens, context
entries read, whether it prefills), fitted by least squares on steps timed on the machine itself (`timed_steps`).
Every scheduling decision (admission, budget, chunked prefill, prefix hits, preemption) is the engine's; only the
forward pass and the sampler are not run: each sample row yields one token, and requests stop at `max_tokens` or the
context limit, as `ignore_eos` runs do.

`DeadlineSJF` is an analysis policy, not an engine one: SJF (no pausing) whose requests are due by a deadline given
from outside (for example arrival + b times each request's queueing time, arrival to admission, in a simulated FCFS
run of the same arrivals): what a wait bound with a perfect estimate of the FCFS wait would give.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from tokenmill.kv.manager import KVCacheManager
from tokenmill.request import Request, RequestStatus
from tokenmill.sampling_params import SamplingParams
from tokenmill.scheduler.plan import SeqSamples, StepPlan, StepResult
from tokenmill.scheduler.policy import SchedulingPolicy
from tokenmill.scheduler.scheduler import Scheduler, SchedulerConfig
from tokenmill.scheduler.sjf import SJFPolicy

if TYPE_CHECKING:
    from tokenmill.engine import LLMEngine

FEATURES = ("step", "decoding sequence", "prefill token", "context entry", "step with prefill")


def plan_features(plan: StepPlan) -> tuple[float, ...]:
    """What a step's time is modelled on, in `FEATURES` order."""
    prefill = sum(s.num_tokens for s in plan.seqs if s.num_tokens > 1)
    return (1.0, float(sum(s.num_tokens == 1 for s in plan.seqs)), float(prefill),
            float(sum(s.context_len for s in plan.seqs)), float(prefill > 0))


@dataclass(frozen=True)
class StepCost:
    """Seconds of one step: `coefficients` (one per `FEATURES` entry) dotted with the plan's features."""

    coefficients: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.coefficients) != len(FEATURES):
            raise ValueError(f"need {len(FEATURES)} coefficients ({', '.join(FEATURES)}), got "
                             f"{len(self.coefficients)}")

    def seconds(self, plan: StepPlan) -> float:
        return max(0.0, float(np.dot(self.coefficients, plan_features(plan))))

    @classmethod
    def fit(cls, rows: Sequence[tuple[tuple[float, ...], float]]) -> StepCost:
        """Least squares over (features, seconds) rows."""
        if len(rows) < len(FEATURES):
            raise ValueError(f"need at least {len(FEATURES)} timed steps to fit, got {len(rows)}")
        x = np.array([features for features, _ in rows], dtype=np.float64)
        y = np.array([seconds for _, seconds in rows], dtype=np.float64)
        coefficients, *_ = np.linalg.lstsq(x, y, rcond=None)
        return cls(tuple(float(c) for c in coefficients))

    def relative_error(self, rows: Sequence[tuple[tuple[float, ...], float]]) -> tuple[float, float]:
        """Mean and root mean square of (predicted - measured) / measured over the rows: bias and spread."""
        errors = np.array([(float(np.dot(self.coefficients, f)) - s) / s for f, s in rows if s > 0])
        if not errors.size:
            return 0.0, 0.0
        return float(errors.mean()), float(np.sqrt((errors**2).mean()))


def timed_steps(engine: LLMEngine, plans: list[StepPlan] | None = None) -> list[tuple[tuple[float, ...], float]]:
    """Step the engine until it has no work, timing each step with the features of its plan (non-empty plans; each
    plan is also appended to `plans` when given)."""
    scheduler = engine.scheduler
    recorded: list[StepPlan] = [] if plans is None else plans
    schedule = scheduler.schedule
    own = vars(scheduler).get("schedule")  # an instance-level override to put back, if there was one

    def recording() -> StepPlan:
        plan = schedule()
        recorded.append(plan)
        return plan

    rows = []
    scheduler.schedule = recording  # type: ignore[method-assign]
    try:
        while engine.has_unfinished_requests():
            start = time.perf_counter()
            engine.step()
            seconds = time.perf_counter() - start
            if recorded and not recorded[-1].is_empty:
                rows.append((plan_features(recorded[-1]), seconds))
    finally:
        if own is None:
            del scheduler.schedule  # the class's method again
        else:
            scheduler.schedule = own  # type: ignore[method-assign]
    return rows


@dataclass(frozen=True)
class SimRequest:
    arrival: float  # seconds
    prompt: tuple[int, ...]
    max_tokens: int


@dataclass
class SimTrace:
    arrival: float
    admitted: float = math.nan  # the start of the first step that scheduled it
    first_token: float = math.nan
    last_token: float = math.nan
    running: float = 0.0  # seconds spent in the running list

    @property
    def wait(self) -> float:
        """Arrival to the first token."""
        return self.first_token - self.arrival

    @property
    def latency(self) -> float:
        return self.last_token - self.arrival

    @property
    def queued(self) -> float:
        """Every second not in the running list: the first wait and any wait after a preemption."""
        return self.latency - self.running

    @property
    def stalled(self) -> float:
        """Seconds out of the running list after its admission: paused, or preempted and waiting again."""
        return self.queued - (self.admitted - self.arrival)


@dataclass
class SimRun:
    traces: list[SimTrace]
    seconds: float  # the last step's end
    steps: int
    preemptions: int


@dataclass
class SimClock:
    """The simulated time, readable by an analysis policy while the run goes."""

    now: float = 0.0


@dataclass
class Simulation:
    """One engine-shaped setting; `run` replays arrivals through a fresh scheduler."""

    config: SchedulerConfig
    cost: StepCost
    num_kv_blocks: int
    block_size: int = 16
    enable_prefix_caching: bool = True
    clock: SimClock = field(default_factory=SimClock)

    def run(self, requests: Sequence[SimRequest],
            policy: Callable[[], SchedulingPolicy] | None = None) -> SimRun:
        scheduler = Scheduler(self.config, KVCacheManager(self.num_kv_blocks, self.block_size,
                                                          self.enable_prefix_caching))
        if policy is not None:
            scheduler.policy = policy()
        order = sorted(range(len(requests)), key=lambda i: requests[i].arrival)
        traces = [SimTrace(r.arrival) for r in requests]
        live: dict[str, Request] = {}
        self.clock.now, sent = 0.0, 0
        while sent < len(order) or scheduler.has_unfinished:
            while sent < len(order) and requests[order[sent]].arrival <= self.clock.now:
                i = order[sent]
                sent += 1
                request = Request(str(i), list(requests[i].prompt),
                                  SamplingParams(temperature=0.0, max_tokens=requests[i].max_tokens, ignore_eos=True),
                                  arrival_time=requests[i].arrival)
                live[request.request_id] = request
                scheduler.add_request(request)
            if not scheduler.has_unfinished:
                self.clock.now = requests[order[sent]].arrival  # idle until the next arrival
                continue
            self._step(scheduler, live, traces)
        return SimRun(traces, self.clock.now, scheduler.num_steps, scheduler.num_preemptions)

    def _step(self, scheduler: Scheduler, live: dict[str, Request], traces: list[SimTrace]) -> None:
        plan = scheduler.schedule()
        if plan.is_empty and not scheduler.running:
            raise RuntimeError("no waiting request can be admitted (a prompt larger than the KV cache?)")
        for seq in plan.seqs:
            trace = traces[int(seq.request_id)]
            if math.isnan(trace.admitted):
                trace.admitted = self.clock.now
        seconds = self.cost.seconds(plan)
        self.clock.now += seconds
        for request in scheduler.running:
            traces[int(request.request_id)].running += seconds
        samples = [SeqSamples(s.request_id, [0], [None]) for s in plan.seqs if s.num_samples]
        scheduler.update(plan, StepResult(samples=samples))
        for sample in samples:
            request, trace = live[sample.request_id], traces[int(sample.request_id)]
            request.output_token_ids.append(0)
            if request.num_output_tokens == 1:
                trace.first_token = self.clock.now
            # The engine's two length stops (output/processor.py); no EOS is drawn here.
            limit = request.num_tokens >= self.config.max_model_len
            if request.num_output_tokens >= request.params.max_tokens or limit:
                trace.last_token = self.clock.now
                scheduler.finish(sample.request_id, RequestStatus.FINISHED_STOPPED)
                del live[sample.request_id]


class DeadlineSJF(SJFPolicy):
    """SJF without aging or pausing, but a request whose deadline (`deadlines[int(request_id)]`, seconds on `clock`)
    has passed goes first, earliest deadline first. For analysis: the deadlines come from outside the engine."""

    def __init__(self, max_num_batched_tokens: int, max_model_len: int, deadlines: Sequence[float],
                 clock: SimClock) -> None:
        super().__init__(max_num_batched_tokens, max_model_len, aging=0.0, wait_bound=0.0, pause_ratio=0.0)
        self.deadlines = deadlines
        self.clock = clock
        self._by_deadline: list[tuple[float, int, Request]] = []

    def _enter(self, request: Request, due: float) -> None:
        super()._enter(request, due)
        heapq.heappush(self._by_deadline, (self.deadlines[int(request.request_id)], self._entries, request))

    def head(self) -> Request | None:
        due = self._top(self._by_deadline)
        if due is not None and due[0] <= self.clock.now:
            return due[2]
        return super().head()
