"""H2O's cache (Zhang et al. 2023, "Heavy-Hitter Oracle"): a request keeps at most a fixed budget of KV entries, its
most recent ones and the "heavy hitters", the entries that have received the most attention so far; the rest are
evicted as it grows, so its memory stays bounded while its positions keep counting.

Scores are the attention probability each cached entry received, accumulated over every query since it was cached,
summed over layers and query heads: the fused kernels add it up as a side output of the probabilities they already
compute (attention.h, `attention_mass`), and the KV manager keeps one running sum per block.

Eviction is by whole blocks, as the paper's per-token eviction would need compaction: freeing a block is a table edit
and the pool's free list, while evicting tokens inside blocks means moving the kept entries of every layer and KV
head together (the block table is shared by all of them) on every step that evicts. Whole blocks also keep every
paged-cache invariant (a block is full or the open one) that the quantized cache and prefix hashing rest on.

Positions are not re-assigned: a kept key stays rotated at its token position and new queries sit at theirs, as in
the paper's implementation, so a request's length is still bounded by the model's context.

Pure arithmetic here; the KV manager applies it to block tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class HeavyHitterBudget:
    """At most `budget_tokens` entries per request (in whole blocks), the last `recent_tokens` of them always kept
    (in whole blocks), the others chosen by score."""

    budget_tokens: int
    recent_tokens: int
    block_size: int

    def __post_init__(self) -> None:
        if self.recent_tokens < 0:
            raise ValueError(f"h2o_recent must be >= 0, got {self.recent_tokens}")
        if self.budget_blocks <= self.recent_blocks:
            raise ValueError(f"h2o_budget ({self.budget_tokens} tokens, {self.budget_blocks} blocks of "
                             f"{self.block_size}) must hold at least one block besides h2o_recent "
                             f"({self.recent_tokens} tokens, {self.recent_blocks} blocks)")

    @property
    def budget_blocks(self) -> int:
        return -(-self.budget_tokens // self.block_size)

    @property
    def recent_blocks(self) -> int:
        return -(-self.recent_tokens // self.block_size)

    @property
    def capacity(self) -> int:
        """The most KV entries a request ever holds: its budget's blocks, full."""
        return self.budget_blocks * self.block_size

    def max_new(self, entries: int) -> int:
        """The most entries one step may add after `entries`: what fits once every block that may go is gone (the
        recent window's full blocks and the open block stay)."""
        full = entries // self.block_size
        kept = min(full, self.recent_blocks) * self.block_size + entries % self.block_size
        return self.capacity - kept

    def victims(self, scores: Sequence[float], entries: int, num_new: int) -> list[int]:
        """Indices (ascending) of the request's blocks to evict so that `num_new` more entries fit after `entries`:
        the lowest-scored full blocks older than the recent window, the older first among equal scores. `scores`
        holds one accumulated score per block of the request's table."""
        over = -(-(entries + num_new) // self.block_size) - self.budget_blocks
        if over <= 0:
            return []
        candidates = range(max(0, entries // self.block_size - self.recent_blocks))
        if over > len(candidates):
            raise ValueError(f"{num_new} new entries after {entries} exceed the budget's room "
                             f"({self.max_new(entries)})")
        return sorted(sorted(candidates, key=lambda i: (scores[i], i))[:over])
