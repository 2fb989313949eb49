"""Fixed-size KV blocks: a free queue, reference counts, and the content-hash index of the prefix cache.

Pure Python, no tensors. Allocation takes from the front of the free queue; freed blocks join its back. A freed block
keeps its content hash, so until it is handed out again its KV can be reused by a later request with the same
prefix: the free queue doubles as the LRU order of cached blocks, and eviction happens only on allocation.
"""

from __future__ import annotations

from collections import OrderedDict


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._ref_counts = [0] * num_blocks
        self._block_hash: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def free_block_ids(self) -> list[int]:
        """Free blocks in eviction order (front first)."""
        return list(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise MemoryError(f"asked for {count} KV blocks, {len(self._free)} free")
        blocks = [self._free.popitem(last=False)[0] for _ in range(count)]
        for block in blocks:
            self._evict(block)
            self._ref_counts[block] = 1
        return blocks

    def _evict(self, block: int) -> None:
        if self._block_hash[block] is not None:
            self.unregister(block)
            self.num_evictions += 1

    def share(self, block_id: int) -> None:
        """Take one more reference on a block in use or on a cached free block (which leaves the free queue)."""
        if self._ref_counts[block_id] == 0:
            if self._block_hash[block_id] is None:
                raise ValueError(f"block {block_id} is free and holds no cached KV")
            del self._free[block_id]
        self._ref_counts[block_id] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference from each block. Freed in reverse so a sequence's tail blocks are evicted first."""
        for block in reversed(block_ids):
            if self._ref_counts[block] <= 0:
                raise ValueError(f"block {block} freed twice")
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free[block] = None

    # ---- prefix cache index ----

    def reset_cache(self) -> bool:
        """Forget every cached block; refused (False) while any block is in use."""
        if any(self._ref_counts):
            return False
        self._cached.clear()
        self._block_hash = [None] * self.num_blocks
        return True

    def cached_hashes(self) -> list[bytes]:
        """The hash of every block whose KV can be reused, in use or free."""
        return list(self._cached)

    def cached_block(self, block_hash: bytes) -> int | None:
        return self._cached.get(block_hash)

    def block_hash(self, block_id: int) -> bytes | None:
        return self._block_hash[block_id]

    def unregister(self, block_id: int) -> None:
        """Forget the block's cached content (about to be overwritten); no-op for a block without one."""
        block_hash = self._block_hash[block_id]
        if block_hash is not None:
            del self._cached[block_hash]
            self._block_hash[block_id] = None

    def register(self, block_id: int, block_hash: bytes) -> None:
        """Record that a full, in-use block holds the KV identified by `block_hash` (first holder wins)."""
        if block_hash in self._cached or self._block_hash[block_id] is not None:
            return
        self._cached[block_hash] = block_id
        self._block_hash[block_id] = block_hash
