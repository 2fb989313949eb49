"""The routing policies (routing.py) as a Ray Serve request router for the engine replicas' deployment.

Ray Serve runs one router per deployment handle, in the process that holds the handle (the ingress). Each replica's
`record_routing_stats` report reaches it through Serve's controller every `routing_stats_period_s`; the number of
requests in flight per replica comes from Serve's own queue-length cache, which it keeps current as it sends.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from tokenmill.cluster.hints import RouteHint
from tokenmill.cluster.routing import PrefixIndex, ReplicaState, RoutingPolicy, make_policy

logger = logging.getLogger(__name__)


class TokenmillRouter(RequestRouter):
    """Not first-in-first-out on purpose (no FIFOMixin): a replica chosen for one request's prefix must serve that
    request, not whichever request waited longest. A call with a `replica=ID` keyword goes to that replica only."""

    def initialize_state(self, policy: str = "affinity", ttl_s: float = 10.0, **options: Any) -> None:
        self.policy: RoutingPolicy = make_policy(policy, **options)
        self.index = PrefixIndex(ttl_s)
        self._report_seen: dict[str, Any] = {}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        kwargs = pending_request.kwargs if pending_request is not None else {}
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        pinned = kwargs.get("replica")
        if pinned is not None:  # a call meant for one replica (its stats): that one or, until it is up, none
            return [[by_id[pinned]]] if pinned in by_id else []
        hint = kwargs.get("hint")
        digests = {rid: self._digests(r, hint) for rid, r in by_id.items()}
        states = [self._state(rid, r, digests[rid]) for rid, r in by_id.items()]
        num_blocks = max((len(d) for d in digests.values()), default=0)
        order = self.policy.rank(states, num_blocks)
        if digests[order[0]]:
            self.index.routed(order[0], digests[order[0]])
        return [[by_id[rid]] for rid in order]

    def _digests(self, replica: RunningReplica, hint: Any) -> list[int]:
        """The request's block digests in this replica's hash chain (known once it has reported)."""
        stats = replica.routing_stats or {}
        if not isinstance(hint, RouteHint) or "hash_root" not in stats:
            return []
        self._take_report(replica.replica_id.unique_id, stats)
        return hint.digests(stats["hash_root"], stats["block_size"])

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
        self.index.forget(replica_id.unique_id)
        self._report_seen.pop(replica_id.unique_id, None)
