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
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from tokenmill.request import Request
from tokenmill.scheduler.policy import SchedulingPolicy

_Entry = tuple[float, int, Request]  # (key, entry number, request); live while the number is the request's latest


class SJFPolicy(SchedulingPolicy):
    name = "sjf"

    def __init__(self, max_num_batched_tokens: int, max_model_len: int, aging: float = 0.0,
                 wait_bound: float = 2.0) -> None:
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.aging = aging
        self.wait_bound = wait_bound
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

    def add(self, request: Request) -> None:
        self._enter(request, self.admitted_work + self.wait_bound * self._queued_work)

    def requeue(self, request: Request) -> None:
        self._enter(request, self.admitted_work)  # preempted: it has waited its turn once (FCFS requeues at the head)

    def _enter(self, request: Request, due: float) -> None:
        self._entries += 1
        work = self.predicted_work(request)
        self._live[id(request)] = (self._entries, work)
        self._queued_work += work
        heapq.heappush(self._by_work, (self.key(request), self._entries, request))
        if self.wait_bound > 0:
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
        self.admitted_work += self.predicted_work(request)
        return request

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[Request]:
        """Live requests by SJF key (a sort: for inspection, not for the step loop); a due one is admitted first."""
        return (entry[2] for entry in sorted(self._by_work, key=lambda e: e[:2]) if self._is_live(entry))
