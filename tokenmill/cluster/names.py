"""The Serve deployments' names, and the ids of an application's running engine replicas (Ray's named actors)."""

from __future__ import annotations

REPLICA_DEPLOYMENT = "EngineReplica"
INGRESS_DEPLOYMENT = "Ingress"
PREFILL_DEPLOYMENT = "PrefillReplica"


def replica_ids(app_name: str = "tokenmill") -> list[str]:
    """The ids of the application's engine replicas that Ray knows of (named actors of Serve's namespace)."""
    import ray

    prefix = f"SERVE_REPLICA::{app_name}#{REPLICA_DEPLOYMENT}#"
    return sorted(a["name"][len(prefix):] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(prefix))
