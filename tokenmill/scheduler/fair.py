"""Per-client fairness: the Virtual Token Counter (VTC; Sheng et al., "Fairness in Serving Large Language Models").

Each client has a counter of the service it received: `input_weight` per prompt token and `output_weight` per output
token, charged as the steps compute them. Admission takes the oldest waiting request of the backlogged client (one
with requests waiting) whose counter is smallest. A client that becomes backlogged is first lifted to the smallest
counter among the backlogged clients, or to the counter of the last client that left the queue when none is
backlogged, so that idling earns no credit. Between two clients that stay backlogged, the service gap then stays
within 2 * max(input_weight * L_input, output_weight * M) (the paper's bound; L_input the longest prompt, M the
tokens the KV cache holds).

A prompt token is charged once: recomputing it after a preemption is the engine's cost, not the client's service,
and prefix-cache hits are not computed, so not charged.
"""

from __future__ import annotations

from collections.abc import Iterator

from tokenmill.request import Request
from tokenmill.scheduler.clients import client_of
from tokenmill.scheduler.policy import SchedulingPolicy
from tokenmill.scheduler.queue import WaitingQueue


class FairPolicy(SchedulingPolicy):
    name = "fair"

    def __init__(self, input_weight: float = 1.0, output_weight: float = 2.0, max_clients: int = 4096) -> None:
        self.input_weight = input_weight
        self.output_weight = output_weight
        # A counter per client seen; beyond max_clients the smallest counters of clients with nothing waiting are
        # dropped (such a client comes back at 0 and is lifted like a new one), so memory stays bounded.
        self.max_clients = max_clients
        self.counters: dict[str, float] = {}
        self._queues: dict[str, WaitingQueue] = {}  # backlogged clients only, each queue non-empty
        self._last_left: str | None = None

    def add(self, request: Request) -> None:
        client = client_of(request)
        if client not in self._queues:
            self._lift(client)
            self._queues[client] = WaitingQueue()
        self._queues[client].append(request)

    def _lift(self, client: str) -> None:
        own = self.counters.get(client, 0.0)
        if self._queues:
            floor = min(self.counters.get(c, 0.0) for c in self._queues)
        elif self._last_left is not None:
            floor = self.counters.get(self._last_left, 0.0)
        else:
            floor = own
        self.counters[client] = max(own, floor)
        if len(self.counters) > self.max_clients:
            self._forget_idle()

    def _forget_idle(self) -> None:
        idle = sorted((c for c in self.counters if c not in self._queues), key=self.counters.__getitem__)
        for client in idle[: len(self.counters) - self.max_clients]:
            del self.counters[client]

    def requeue(self, request: Request) -> None:
        # A preempted request was being served: its client's counter is current, so no lift.
        client = client_of(request)
        self._queues.setdefault(client, WaitingQueue()).appendleft(request)

    def remove(self, request: Request) -> None:
        client = client_of(request)
        queue = self._queues[client]
        queue.remove(request)
        if not queue:
            self._left(client)

    def _left(self, client: str) -> None:
        del self._queues[client]
        self._last_left = client

    def _next_client(self) -> str | None:
        if not self._queues:
            return None
        # Ties (equal counters) go to the client whose oldest request arrived first.
        return min(self._queues, key=lambda c: (self.counters.get(c, 0.0), _head(self._queues[c]).arrival_time))

    def head(self) -> Request | None:
        client = self._next_client()
        return _head(self._queues[client]) if client is not None else None

    def pop(self) -> Request:
        client = self._next_client()
        if client is None:
            raise IndexError("pop from an empty queue")
        queue = self._queues[client]
        request = queue.popleft()
        if not queue:
            self._left(client)
        return request

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def __iter__(self) -> Iterator[Request]:
        return iter(sorted((r for q in self._queues.values() for r in q), key=lambda r: r.arrival_time))

    def rank(self, running: list[Request]) -> None:
        # The most-served client's requests last: they yield first when KV runs out.
        running.sort(key=lambda r: self.counters.get(client_of(r), 0.0))

    def charge(self, request: Request, prompt_tokens: int, output_tokens: int) -> None:
        client = client_of(request)
        self.counters[client] = (self.counters.get(client, 0.0) + self.input_weight * prompt_tokens
                                 + self.output_weight * output_tokens)

    def client_counters(self) -> dict[str, float]:
        return dict(self.counters)


def _head(queue: WaitingQueue) -> Request:
    request = queue.head()
    assert request is not None, "only non-empty queues are kept"
    return request
