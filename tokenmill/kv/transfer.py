"""Moving a prompt's KV between engines: the full blocks of a prefix, out of one engine's prefix cache and into
another's under the same hashes (prefill/decode disaggregation, cluster/). The receiving engine then finds the
prompt's blocks as it finds any cached prefix, and computes only what follows them.

Both engines must hash alike (the same hash root: model, dtype, weight and KV format) and keep full-precision KV
(`KVCache`); a transfer between others is refused with ValueError. Engine thread only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tokenmill.kv.cache import KVCache, KVStorage
from tokenmill.kv.hashing import block_hashes, request_root
from tokenmill.kv.manager import KVCacheManager


@dataclass
class KVTransfer:
    """The KV of a prompt's leading full blocks, in chain order; `k` and `v` are [layers, kv_heads, blocks *
    block_size, head_dim], the cache's own layout."""

    hash_root: bytes
    block_size: int
    hashes: list[bytes]
    k: torch.Tensor
    v: torch.Tensor

    @property
    def num_blocks(self) -> int:
        return len(self.hashes)


def _plain(storage: KVStorage) -> KVCache:
    if not isinstance(storage, KVCache):
        raise ValueError(f"KV transfer needs a full-precision KV cache, not {type(storage).__name__}")
    return storage


def _slots(blocks: Sequence[int], block_size: int, device: torch.device) -> torch.Tensor:
    offsets = torch.arange(block_size, device=device)
    return torch.cat([b * block_size + offsets for b in blocks]) if blocks else offsets[:0]


def export_prefix(manager: KVCacheManager, storage: KVStorage, token_ids: Sequence[int],
                  cache_salt: str | None = None) -> KVTransfer:
    """The leading full blocks of `token_ids` that the prefix cache holds (none, if it holds none)."""
    cache = _plain(storage)
    root = request_root(manager.hash_root, cache_salt)
    blocks: list[int] = []
    hashes = block_hashes(token_ids, manager.block_size, root) if manager.enable_prefix_caching else []
    for block_hash in hashes:
        block = manager.pool.cached_block(block_hash)
        if block is None:
            break
        blocks.append(block)
    slots = _slots(blocks, manager.block_size, cache.k.device)
    return KVTransfer(manager.hash_root, manager.block_size, hashes[:len(blocks)], cache.k[:, :, slots].clone(),
                      cache.v[:, :, slots].clone())


def import_prefix(manager: KVCacheManager, storage: KVStorage, transfer: KVTransfer) -> int:
    """Write the transferred blocks this cache lacks into free blocks and register them; returns how many were
    added. They go back to the free queue as cached blocks, to be found by the request that follows or evicted
    like any other. Blocks are taken in chain order and the import stops where no block is free: a prefix with a
    gap would be found only up to the gap."""
    cache = _plain(storage)
    if not manager.enable_prefix_caching:
        raise ValueError("KV transfer needs the prefix cache")
    if transfer.hash_root != manager.hash_root or transfer.block_size != manager.block_size:
        raise ValueError("the KV comes from an engine with another model, dtype, KV format or block size")
    layers, heads, _, dim = cache.k.shape
    expected = (layers, heads, transfer.num_blocks * transfer.block_size, dim)
    if tuple(transfer.k.shape) != expected or tuple(transfer.v.shape) != expected:
        raise ValueError(f"transferred KV has shape {tuple(transfer.k.shape)}, expected {expected}")
    pool = manager.pool
    held: list[int] = []  # every block of the chain so far, referenced so that allocating cannot evict it
    added: list[tuple[int, int]] = []  # (block, its index in the transfer)
    try:
        for i, block_hash in enumerate(transfer.hashes):
            block = pool.cached_block(block_hash)
            if block is None:
                if pool.num_free_blocks == 0:
                    break
                block = pool.allocate(1)[0]
                added.append((block, i))
            else:
                pool.share(block)
            held.append(block)
        if added:
            bs = manager.block_size
            dst = _slots([b for b, _ in added], bs, cache.k.device)
            src = _slots([i for _, i in added], bs, cache.k.device)
            cache.k[:, :, dst] = transfer.k[:, :, src].to(cache.k)
            cache.v[:, :, dst] = transfer.v[:, :, src].to(cache.v)
            for block, i in added:
                pool.register(block, transfer.hashes[i])
    finally:
        pool.free(held)
    return len(added)
