"""The routing policies (routing.py) as a Ray Serve request router for the engine replicas' deployment.

Ray Serve runs one router per deployment handle, in the process that holds the handle (the ingress). Each replica's
`record_routing_stats` report reaches it through Serve's controller every `routing_stats_period_s`; the number of
requests in flight per replica comes from Serve's own queue-length cache, which it keeps current as it sends.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from tokenmill.cluster.hints import RouteHint
from tokenmill.cluster.routing import PrefixIndex, ReplicaState, RoutingPolicy, make_policy

logger = logging.getLogger(__name__)

_MAX_REMEMBERED_REQUESTS = 4096


class TokenmillRouter(RequestRouter):
    """Not first-in-first-out on purpose (no FIFOMixin): a replica chosen for one request's prefix must serve that
    request, not whichever request waited longest. A call with a `replica=ID` keyword goes to that replica only.

    Serve may ask again for the same request (after a backoff, when every replica it was offered was full), so
    a request's digests are computed once, and it is recorded as routed once, to the first replica it ranked
    that had room by Serve's queue-length cache: the one Serve sends it to unless that changed meanwhile."""

    def initialize_state(self, policy: str = "affinity", ttl_s: float = 10.0, **options: Any) -> None:
        self.policy: RoutingPolicy = make_policy(policy, **options)
        self.index = PrefixIndex(ttl_s)
        self._report_seen: dict[str, Any] = {}
        # Per pending request (Serve's internal id): its digests per (hash root, block size), and whether it has
        # been recorded as routed. Bounded: entries of requests long routed fall out first.
        self._requests: OrderedDict[str, dict[Any, Any]] = OrderedDict()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        kwargs = pending_request.kwargs if pending_request is not None else {}
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        pinned = kwargs.get("replica")
        if pinned is not None:  # a call meant for one replica (its stats): that one or, until it is up, none
            return [[by_id[pinned]]] if pinned in by_id else []
        memo = self._memo(pending_request)
        digests = {rid: self._digests(r, kwargs.get("hint"), memo) for rid, r in by_id.items()}
        states = [self._state(rid, r, digests[rid]) for rid, r in by_id.items()]
        num_blocks = max((len(d) for d in digests.values()), default=0)
        order = self.policy.rank(states, num_blocks)
        if not memo.get("recorded"):
            taken = next((rid for rid in order if self._has_room(by_id[rid])), order[0])
            if digests[taken]:
                self.index.routed(taken, digests[taken])
            memo["recorded"] = True
        return [[by_id[rid]] for rid in order]

    def _memo(self, pending_request: PendingRequest | None) -> dict[Any, Any]:
        if pending_request is None:
            return {}
        key = pending_request.metadata.internal_request_id
        memo = self._requests.get(key)
        if memo is None:
            memo = self._requests[key] = {}
            while len(self._requests) > _MAX_REMEMBERED_REQUESTS:
                self._requests.popitem(last=False)
        return memo

    def _has_room(self, replica: RunningReplica) -> bool:
        ongoing = self.replica_queue_len_cache.get(replica.replica_id)
        return ongoing is None or ongoing < replica.max_ongoing_requests

    def _digests(self, replica: RunningReplica, hint: Any, memo: dict[Any, Any]) -> list[int]:
        """The request's block digests in this replica's hash chain (known once it has reported)."""
        stats = replica.routing_stats or {}
        if not isinstance(hint, RouteHint) or "hash_root" not in stats:
            return []
        self._take_report(replica.replica_id.unique_id, stats)
        chain = (stats["hash_root"], stats["block_size"])
        if chain not in memo:
            memo[chain] = hint.digests(*chain)
        return memo[chain]

    def _take_report(self, replica_id: str, stats: dict[str, Any]) -> None:
        seq = stats.get("seq")
        if self._report_seen.get(replica_id) != seq:
            self._report_seen[replica_id] = seq
            self.index.report(replica_id, stats.get("digests", ()))

    def _state(self, replica_id: str, replica: RunningReplica, digests: list[int]) -> ReplicaState:
        stats = replica.routing_stats or {}
        ongoing = self.replica_queue_len_cache.get(replica.replica_id)
        if ongoing is None:
            ongoing = stats.get("ongoing", 0)
        return ReplicaState(replica_id, ongoing, stats.get("free_blocks", 0),
                            self.index.matched_blocks(replica_id, digests))

    def on_replica_actor_died(self, replica_id: Any) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget(replica_id.unique_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {r.replica_id.unique_id for r in replicas}
        for rid in [rid for rid in self._report_seen if rid not in live]:  # scaled down or replaced
            self._forget(rid)

    def _forget(self, replica_id: str) -> None:
        self.index.forget(replica_id)
        self._report_seen.pop(replica_id, None)
