"""The waiting queue: FCFS order, preempted requests back at the head, removal in O(1).

An abort of a waiting request only marks it; marked entries are dropped when they reach the head. A server that
aborts many waiting requests at once (a client gone with a large batch) then pays O(1) per abort instead of a scan
of the queue per abort.
"""

from __future__ import annotations

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
