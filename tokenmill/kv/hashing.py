"""The prefix cache's block hashes, torch-free so that a router can compute them without loading a model.

A full block is named by a hash chained over (its parent block's hash, its token ids). The chain starts at a root
derived from the engine's salt (model, dtype, KV format), and from the request's own `cache_salt` (a tenant) when
it has one; equal hashes therefore mean equal KV.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

DIGEST_BYTES = 8  # a compact digest of a block hash: what replicas report to a router


def engine_root(engine_salt: str) -> bytes:
    return hashlib.sha256(engine_salt.encode()).digest()


def request_root(root: bytes, cache_salt: str | None) -> bytes:
    """The chain's start for a request: the engine's root, moved elsewhere by the request's own salt."""
    if cache_salt is None:
        return root
    return hashlib.sha256(root + b"|salt|" + cache_salt.encode()).digest()


def chain_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


def block_hashes(token_ids: Sequence[int], block_size: int, root: bytes, limit: int | None = None) -> list[bytes]:
    """The chain hashes of the full blocks of `token_ids` (at most `limit` of them)."""
    count = len(token_ids) // block_size
    if limit is not None:
        count = min(count, limit)
    hashes: list[bytes] = []
    parent = root
    for i in range(count):
        parent = chain_hash(parent, token_ids[i * block_size:(i + 1) * block_size])
        hashes.append(parent)
    return hashes


def digest(block_hash: bytes) -> int:
    return int.from_bytes(block_hash[:DIGEST_BYTES], "little")
