"""Scheduling policies: which waiting request is admitted next, and which running request yields first.

The scheduler keeps one loop for every policy (running requests first, from the front of the ranked running list;
then admissions from the policy's queue; victims from the back). A policy only orders requests: it never touches the
KV cache or a request's tokens, so preemption under every policy is the same recompute, and prefix-cache hits make
it cheap.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

from tokenmill.request import Request
from tokenmill.scheduler.queue import HeapQueue, WaitingQueue


class SchedulingPolicy(ABC):
    """The waiting queue and the victim order behind one interface.

    Contract:
    - `add` takes a new request; `requeue` takes a preempted one back, which keeps its standing (it is not sent
      behind requests that arrived after it and rank the same). `remove` drops a waiting request (an abort) in O(1)
      or amortised O(log n). `head` is the next request to admit, or None; `pop` removes and returns it.
    - `len` counts live waiting requests; iterating visits them in admission order, for inspection only.
    - `rank(running)` reorders the running list in place, stably: the scheduler gives the step's budget from the
      front and preempts from the back, so the last request is the first victim.
    - `may_preempt_for(candidate, victim)`: whether the head `candidate`, which cannot get a seat or KV blocks, may
      preempt `victim` (the back of the ranked running list) to get in.
    - `may_pause_for(candidate, victim)`: whether the head `candidate`, which finds no seat, may pause `victim` (the
      back of the ranked running list): the victim leaves the batch but keeps its KV, and `pause` takes it into the
      queue, from which it is admitted again like any request and goes on without recompute. Asked only when
      `may_preempt_for` said no.
    - `begin_step(step)`: the scheduler's step number, before it plans the step (the clock of timed rules).
    - `charge(request, prompt_tokens, output_tokens)`: a step gave the request this service (prompt tokens computed
      for the first time, tokens emitted).
    - `client_counters()`: the policy's per-client service counters, if it keeps any (for /metrics).
    """

    name: str

    @abstractmethod
    def add(self, request: Request) -> None: ...

    @abstractmethod
    def requeue(self, request: Request) -> None: ...

    @abstractmethod
    def remove(self, request: Request) -> None: ...

    @abstractmethod
    def head(self) -> Request | None: ...

    @abstractmethod
    def pop(self) -> Request: ...

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __iter__(self) -> Iterator[Request]: ...

    def __bool__(self) -> bool:
        return len(self) > 0

    def rank(self, running: list[Request]) -> None:
        return None  # admission order: the latest admitted yields first

    def may_preempt_for(self, candidate: Request, victim: Request) -> bool:
        return False

    def may_pause_for(self, candidate: Request, victim: Request) -> bool:
        return False

    def pause(self, request: Request) -> None:
        self.requeue(request)

    def begin_step(self, step: int) -> None:
        return None

    def charge(self, request: Request, prompt_tokens: int, output_tokens: int) -> None:
        return None  # nothing metered

    def client_counters(self) -> dict[str, float]:
        return {}


class QueuePolicy(SchedulingPolicy):
    """A policy over one queue object (`WaitingQueue`, `HeapQueue`): removal, the head and its pop, size and order
    are the queue's; subclasses say how a request enters it."""

    _queue: WaitingQueue | HeapQueue

    def remove(self, request: Request) -> None:
        self._queue.remove(request)

    def head(self) -> Request | None:
        return self._queue.head()

    def pop(self) -> Request:
        return self._queue.popleft()

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)


class FCFSPolicy(QueuePolicy):
    """First come, first served; a preempted request goes back to the head of the queue."""

    name = "fcfs"

    def __init__(self) -> None:
        self._queue = WaitingQueue()

    def add(self, request: Request) -> None:
        self._queue.append(request)

    def requeue(self, request: Request) -> None:
        self._queue.appendleft(request)


class KeyedPolicy(QueuePolicy):
    """A policy whose queue order is a key fixed when the request enters the queue (a preempted request is keyed
    again: its work may have changed, its arrival has not)."""

    def __init__(self) -> None:
        self._queue = HeapQueue()

    @abstractmethod
    def key(self, request: Request) -> tuple[float, ...]: ...

    def add(self, request: Request) -> None:
        self._queue.push(request, self.key(request))

    def requeue(self, request: Request) -> None:
        self._queue.push(request, self.key(request))


class PriorityPolicy(KeyedPolicy):
    """Lower `priority` first, then earlier arrival (vLLM's meaning). The lowest-priority, latest running request
    yields first, also to admit a waiting request of strictly higher priority that finds no seat or no KV."""

    name = "priority"

    def key(self, request: Request) -> tuple[float, ...]:
        return (request.priority, request.arrival_time)

    def rank(self, running: list[Request]) -> None:
        running.sort(key=self.key)

    def may_preempt_for(self, candidate: Request, victim: Request) -> bool:
        return candidate.priority < victim.priority
