"""Shortest predicted remaining work first, with a bound on how much later than FCFS any request is admitted (on by
default: b = 2), and optionally aging; either one keeps long requests from starving.

The prediction, in steps: the tokens still to compute (prompt, or prompt and output again after a preemption)
divided by the step's token budget, plus the output tokens the request may still produce, which is its own bound
`max_tokens` capped by the context. A client that sets `max_tokens` close to what it needs is ranked by its true
length; one that leaves the default bound is ranked by that bound. No output-length model is learned.

Aging: a waiting request's standing improves by `aging` steps of work for every scheduler step it has waited since
it arrived. Ranked at arrival step a by `work + aging * a`, which orders requests exactly as `work - aging * waited`
does at any later step, so the key is fixed and the queue is a heap. A request with work W arriving at step a is
passed only by requests arriving before step a + W / aging; none waits forever.

Wait bound (`wait_bound` = b > 0): FCFS would admit a request once the work queued ahead of it at its arrival (W)
has been admitted. Here it is due once b · W more work has been admitted since it arrived, and due requests go first,
earliest due first: shorter requests may pass it, but only while they add up to (b - 1) · W. A request that finds
the queue empty is due at once, so one that FCFS would admit at the next free seat is not pushed back behind later
short ones; that is where SJF otherwise multiplies a small FCFS wait.

Pausing (`pause_ratio` = r ≥ 1, default 4; 0 turns it off): a waiting request that finds every seat taken may
pause the running request with the most predicted work left, if that has at least r times its own work, its first
token out and nothing left to prefill or recompute. The paused request keeps its KV and goes back into the queue
with its remaining work as its key; it resumes where it stopped, without recompute. Seats, not KV, are what short
requests wait for when long replies fill the batch, so this is SRPT without the recompute that made preemption lose
in simulation. Each request may spend at most `pause_budget` (c, default 1.5) steps paused for every step of its
own predicted work (prompt ÷ budget + `max_tokens`): once its allowance runs out it goes first, before due
requests, and it is not paused again. So pauses add at most c times its own decoding time to its latency, and its
wait for the first token is untouched (a request is paused only after it).
"""

from __future__ import annotations

import heapq
import weakref
from collections.abc import Iterator

from tokenmill.request import Request
from tokenmill.scheduler.policy import SchedulingPolicy

_Entry = tuple[float, int, Request]  # (key, entry number, request); live while the number is the request's latest


class SJFPolicy(SchedulingPolicy):
    name = "sjf"

    def __init__(self, max_num_batched_tokens: int, max_model_len: int, aging: float = 0.0,
                 wait_bound: float = 2.0, pause_ratio: float = 4.0, pause_budget: float = 1.5) -> None:
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.aging = aging
        self.wait_bound = wait_bound
        self.pause_ratio = pause_ratio
        self.pause_budget = pause_budget
        self.step = 0
        self._resume_by: list[_Entry] = []  # paused requests by the step their allowance runs out
        self._paused_since: weakref.WeakKeyDictionary[Request, int] = weakref.WeakKeyDictionary()
        self._paused_steps: weakref.WeakKeyDictionary[Request, int] = weakref.WeakKeyDictionary()  # so far, in all
        self.admitted_work = 0.0  # predicted work of every admission so far
        self._by_work: list[_Entry] = []  # SJF order (aged)
        self._by_due: list[_Entry] = []  # due order (wait_bound > 0 only)
        self._live: dict[int, tuple[int, float]] = {}  # id(request) -> (latest entry number, work when it entered)
        self._queued_work = 0.0  # the live requests' work as they entered
        self._entries = 0

    def predicted_work(self, request: Request) -> float:
        to_compute = request.num_tokens - request.num_computed_tokens
        outputs_left = min(request.params.max_tokens - request.num_output_tokens,
                           self.max_model_len - request.num_tokens)
        return to_compute / self.max_num_batched_tokens + max(outputs_left, 0)

    def key(self, request: Request) -> float:
        return self.predicted_work(request) + self.aging * request.arrival_step

    def rank(self, running: list[Request]) -> None:
        # The most work left last: it yields first when KV runs out.
        running.sort(key=self.predicted_work)

    def pause_allowance(self, request: Request) -> float:
        """Steps the request may still spend paused."""
        own = request.num_prompt_tokens / self.max_num_batched_tokens + min(
            request.params.max_tokens, self.max_model_len - request.num_prompt_tokens)
        return self.pause_budget * own - self._paused_steps.get(request, 0)

    def begin_step(self, step: int) -> None:
        self.step = step

    def add(self, request: Request) -> None:
        self._enter(request, self.admitted_work + self.wait_bound * self._queued_work)

    def requeue(self, request: Request) -> None:
        self._enter(request, self.admitted_work)  # preempted: it has waited its turn once (FCFS requeues at the head)

    def may_pause_for(self, candidate: Request, victim: Request) -> bool:
        decoding = victim.num_output_tokens >= 1 and victim.num_tokens - victim.num_computed_tokens == 1
        return (self.pause_ratio > 0 and decoding and self.pause_allowance(victim) >= 1
                and self.predicted_work(victim) >= self.pause_ratio * self.predicted_work(candidate))

    def pause(self, request: Request) -> None:
        # Its work left is queued work (a later arrival's wait estimate counts it), but its resumption is not
        # admitted work: that was counted when it was first admitted.
        self._enter(request, None)
        self._paused_since[request] = self.step
        heapq.heappush(self._resume_by, (self.step + self.pause_allowance(request), self._entries, request))

    def _enter(self, request: Request, due: float | None) -> None:
        self._entries += 1
        work = self.predicted_work(request)
        self._live[id(request)] = (self._entries, work)
        self._queued_work += work
        heapq.heappush(self._by_work, (self.key(request), self._entries, request))
        if self.wait_bound > 0 and due is not None:
            heapq.heappush(self._by_due, (due, self._entries, request))

    def remove(self, request: Request) -> None:
        _, work = self._live.pop(id(request))
        self._queued_work = self._queued_work - work if self._live else 0.0  # no float drift once empty

    def _is_live(self, entry: _Entry) -> bool:
        return self._live.get(id(entry[2]), (None,))[0] == entry[1]

    def _top(self, heap: list[_Entry]) -> _Entry | None:
        while heap and not self._is_live(heap[0]):
            heapq.heappop(heap)  # admitted, aborted or re-entered since
        return heap[0] if heap else None

    def head(self) -> Request | None:
        resume = self._top(self._resume_by)
        if resume is not None and resume[0] <= self.step:
            return resume[2]
        due = self._top(self._by_due)
        if due is not None and due[0] <= self.admitted_work:
            return due[2]
        top = self._top(self._by_work)
        return top[2] if top is not None else None

    def pop(self) -> Request:
        request = self.head()
        if request is None:
            raise IndexError("pop from an empty queue")
        self.remove(request)
        since = self._paused_since.pop(request, None)
        if since is not None:  # resumed (or readmitted, if its KV was taken back while it was paused)
            self._paused_steps[request] = self._paused_steps.get(request, 0) + self.step - since
        else:
            self.admitted_work += self.predicted_work(request)
        return request

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[Request]:
        """Live requests by SJF key (a sort: for inspection, not for the step loop); a due one is admitted first."""
        return (entry[2] for entry in sorted(self._by_work, key=lambda e: e[:2]) if self._is_live(entry))
