"""Which replica serves a request. Plain Python: the Ray Serve router (`ray_router.py`) feeds these the replicas'
loads and prefix matches, and they answer with an order of preference.

Prefix affinity follows the cache-aware routing of SGLang's router: a request goes to the replica holding the longest
cached prefix of its prompt when that prefix is a large enough share of the prompt, else to the least loaded replica;
and whenever the loads are too far apart, to the least loaded replica whatever the caches hold. Matching is exact: a
request's prompt is tokenized and hashed into the engine's own chain of block hashes (kv/hashing.py), and compared
with the hashes the replicas report as cached.
"""

from __future__ import annotations

import random
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class ReplicaState:
    """What the router knows of one replica when it routes one request."""

    replica_id: str
    ongoing: int = 0  # requests in flight there
    free_blocks: int = 0  # free KV blocks at its latest report
    matched_blocks: int = 0  # leading full blocks of this request's prompt that it holds


class RoutingPolicy(ABC):
    """Orders the candidate replicas for one request.

    Contract: `rank` gets at least one candidate, with distinct ids, in any order, and the number of full blocks in
    the request's prompt (0 when unknown). It returns every candidate's id exactly once, the most preferred first;
    the caller sends the request to the first one that has room. It does no I/O and does not block; a policy may
    keep state between calls (a cursor, a seeded generator), and is called from one thread.
    """

    name: ClassVar[str]

    @abstractmethod
    def rank(self, replicas: Sequence[ReplicaState], num_blocks: int) -> list[str]: ...


def _by_load(replicas: Iterable[ReplicaState]) -> list[ReplicaState]:
    """Least loaded first; ties go to the replica with more free KV, then by id so that the order is exact."""
    return sorted(replicas, key=lambda r: (r.ongoing, -r.free_blocks, r.replica_id))


class RoundRobin(RoutingPolicy):
    """Each replica in turn, by id; blind to load and to caches (the baseline)."""

    name = "round-robin"

    def __init__(self) -> None:
        self._turn = 0

    def rank(self, replicas: Sequence[ReplicaState], num_blocks: int) -> list[str]:
        ids = sorted(r.replica_id for r in replicas)
        start = self._turn % len(ids)
        self._turn += 1
        return ids[start:] + ids[:start]


class PowerOfTwo(RoutingPolicy):
    """The less loaded of two replicas drawn at random, then the other, then the rest by load (Ray Serve's own
    default policy, here so that it can be compared on equal terms)."""

    name = "power-of-two"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def rank(self, replicas: Sequence[ReplicaState], num_blocks: int) -> list[str]:
        ordered = sorted(replicas, key=lambda r: r.replica_id)
        drawn = self._rng.sample(ordered, min(2, len(ordered)))
        rest = [r for r in ordered if r not in drawn]
        return [r.replica_id for r in _by_load(drawn) + _by_load(rest)]


class PrefixAffinity(RoutingPolicy):
    """`cache_threshold`: the share of the prompt's blocks a replica must hold for the request to go there.
    Loads are imbalanced when the most and least loaded replicas differ by more than `balance_abs_threshold`
    requests and the most loaded carries more than `balance_rel_threshold` times the least; then the least loaded
    replica is taken. The defaults are SGLang's model gateway's."""

    name = "affinity"

    def __init__(self, cache_threshold: float = 0.3, balance_abs_threshold: int = 64,
                 balance_rel_threshold: float = 1.5) -> None:
        if not 0.0 <= cache_threshold <= 1.0:
            raise ValueError(f"cache_threshold must be in [0, 1], got {cache_threshold}")
        if balance_abs_threshold < 0 or balance_rel_threshold < 1.0:
            raise ValueError("balance_abs_threshold must be >= 0 and balance_rel_threshold >= 1")
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold

    def imbalanced(self, replicas: Sequence[ReplicaState]) -> bool:
        loads = [r.ongoing for r in replicas]
        most, least = max(loads), min(loads)
        return most - least > self.balance_abs_threshold and most > self.balance_rel_threshold * least

    def rank(self, replicas: Sequence[ReplicaState], num_blocks: int) -> list[str]:
        by_load = _by_load(replicas)
        if num_blocks == 0 or self.imbalanced(replicas):
            return [r.replica_id for r in by_load]
        best = max(by_load, key=lambda r: r.matched_blocks)  # the first of equals: the least loaded of them
        if best.matched_blocks == 0 or best.matched_blocks / num_blocks < self.cache_threshold:
            return [r.replica_id for r in by_load]
        return [best.replica_id] + [r.replica_id for r in by_load if r is not best]


POLICIES: dict[str, type[RoutingPolicy]] = {p.name: p for p in (PrefixAffinity, PowerOfTwo, RoundRobin)}


def make_policy(name: str, **options: Any) -> RoutingPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name](**options)


class PrefixIndex:
    """Which block digests (kv/hashing.py) each replica holds, as far as the router knows.

    Two sources: what the replica last reported as cached, which is the truth as of its report; and the prompts
    routed to it since, which it will have cached once they ran. Reports come every few seconds, so without the
    second a burst of requests sharing a new prefix would be spread before any report showed where the first one
    went. Routed digests are forgotten after `ttl_s` seconds, by when a report includes them if they are still
    cached."""

    def __init__(self, ttl_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.ttl_s = ttl_s
        self._clock = clock
        self._reported: dict[str, frozenset[int]] = {}
        self._routed: dict[str, OrderedDict[int, float]] = {}

    def report(self, replica_id: str, digests: Iterable[int]) -> None:
        self._reported[replica_id] = frozenset(digests)

    def routed(self, replica_id: str, digests: Sequence[int]) -> None:
        entries = self._routed.setdefault(replica_id, OrderedDict())
        now = self._clock()
        for d in digests:
            entries[d] = now
            entries.move_to_end(d)
        self._expire(entries, now)

    def _expire(self, entries: OrderedDict[int, float], now: float) -> None:
        while entries and next(iter(entries.values())) < now - self.ttl_s:
            entries.popitem(last=False)

    def matched_blocks(self, replica_id: str, digests: Sequence[int]) -> int:
        """How many leading blocks of a prompt (its chained digests, in order) the replica holds."""
        reported = self._reported.get(replica_id, frozenset())
        routed = self._routed.get(replica_id)
        if routed is not None:
            self._expire(routed, self._clock())
        count = 0
        for d in digests:
            if d not in reported and (routed is None or d not in routed):
                break
            count += 1
        return count

    def forget(self, replica_id: str) -> None:
        """A replica that is gone (its cache went with it)."""
        self._reported.pop(replica_id, None)
        self._routed.pop(replica_id, None)
