"""Waiting queues: FCFS order with preempted requests back at the head, or a heap by a fixed key; removal in O(1).

An abort of a waiting request only marks it; marked entries are dropped when they reach the head. A server that
aborts many waiting requests at once (a client gone with a large batch) then pays O(1) per abort instead of a scan
of the queue per abort.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterator

from tokenmill.request import Request


class WaitingQueue:
    def __init__(self) -> None:
        self._queue: deque[Request] = deque()
        self._removed: set[int] = set()  # id() of removed requests still in the deque (which keeps them alive)

    def append(self, request: Request) -> None:
        self._queue.append(request)

    def appendleft(self, request: Request) -> None:
        self._queue.appendleft(request)

    def remove(self, request: Request) -> None:
        """Drop a request that is in the queue (the caller knows it is: the request's status says so)."""
        self._removed.add(id(request))

    def head(self) -> Request | None:
        self._drop_removed_head()
        return self._queue[0] if self._queue else None

    def popleft(self) -> Request:
        self._drop_removed_head()
        return self._queue.popleft()

    def _drop_removed_head(self) -> None:
        while self._queue and id(self._queue[0]) in self._removed:
            self._removed.discard(id(self._queue.popleft()))

    def __len__(self) -> int:
        return len(self._queue) - len(self._removed)

    def __bool__(self) -> bool:
        return len(self) > 0

    def __iter__(self) -> Iterator[Request]:
        return (r for r in self._queue if id(r) not in self._removed)

    def __getitem__(self, index: int) -> Request:
        return list(self)[index]


class HeapQueue:
    """Waiting requests ordered by a key fixed when each is pushed (smallest first; ties by push order), with the same
    O(1) removal by marking as WaitingQueue."""

    def __init__(self) -> None:
        self._heap: list[tuple[tuple[float, ...], int, Request]] = []
        self._pushes = 0
        self._removed: set[int] = set()

    def push(self, request: Request, key: tuple[float, ...]) -> None:
        self._pushes += 1
        heapq.heappush(self._heap, (key, self._pushes, request))

    def remove(self, request: Request) -> None:
        self._removed.add(id(request))

    def head(self) -> Request | None:
        self._drop_removed_head()
        return self._heap[0][2] if self._heap else None

    def popleft(self) -> Request:
        self._drop_removed_head()
        return heapq.heappop(self._heap)[2]

    def _drop_removed_head(self) -> None:
        while self._heap and id(self._heap[0][2]) in self._removed:
            self._removed.discard(id(heapq.heappop(self._heap)[2]))

    def __len__(self) -> int:
        return len(self._heap) - len(self._removed)

    def __iter__(self) -> Iterator[Request]:
        """Live requests in admission order (a sort: for inspection, not for the step loop)."""
        return (r for _, _, r in sorted(self._heap, key=lambda e: e[:2]) if id(r) not in self._removed)
