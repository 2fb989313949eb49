"""Fixed-size KV blocks: a free list and reference counts. Pure Python, no tensors."""

from __future__ import annotations

from collections import deque


class BlockPool:
    """Hands out block ids. Allocation takes from the front of the free list; freed blocks join its back.

    A block is in use while its reference count is positive; sharing a block (a later prefix cache or a forked
    sequence) only raises the count.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise MemoryError(f"asked for {count} KV blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(count)]
        for block in blocks:
            self._ref_counts[block] = 1
        return blocks

    def share(self, block_id: int) -> None:
        if self._ref_counts[block_id] <= 0:
            raise ValueError(f"block {block_id} is free and cannot be shared")
        self._ref_counts[block_id] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference from each block. Freed in reverse so a sequence's tail blocks are reused first."""
        for block in reversed(block_ids):
            if self._ref_counts[block] <= 0:
                raise ValueError(f"block {block} freed twice")
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free.append(block)
