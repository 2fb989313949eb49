"""H2O's cache (Zhang et al. 2023, "Heavy-Hitter Oracle"): a request keeps at most a fixed budget of KV entries, its
most recent ones and the "heavy hitters", the entries that have received the most attention so far; the rest are
evicted as it grows, so its memory stays bounded while its positions keep counting.

Scores are the attention probability each cached entry received, accumulated over every query since it was cached:
the fused kernels add it up as a side output of the probabilities they already compute (attention.h,
`attention_mass`), and the KV manager keeps one running sum per entry and lane.

Lanes: per head (the paper's choice, and where its quality comes from) each layer's KV head is a lane with its own
scores, its own choice and its own block table; with one lane, the scores are summed over every layer and head and
one choice serves all. Every lane holds the same physical blocks (in its own order) and the same recent tail, so a
new token's slot is one for all lanes and memory is counted in whole blocks as everywhere else.

Eviction is by tokens, freed by blocks: when a request needs more blocks than its budget, each lane drops its
lowest-scored entries outside the recent window, a block's worth per block needed; the physical blocks freed are
those holding the most dropped entries over all lanes; in each lane, the entries it keeps in those blocks move into
the holes its dropped entries left elsewhere (`LaneEviction.copies`: a few rows per lane, never a whole cache).
Entry order within a lane does not matter: every cached entry precedes the step's new ones, which stay in the tail,
so the kernels' causal rule (by entry index) still holds.

Positions are not re-assigned: a kept key stays rotated at its token position and new queries sit at theirs, as in
the paper's implementation, so a request's length is still bounded by the model's context.

Pure arithmetic here; the KV manager applies it to block tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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

    def evict(self, tables: torch.Tensor, scores: torch.Tensor, entries: int, num_new: int) -> LaneEviction | None:
        """Evict so that `num_new` more entries fit after `entries`. `tables` [lanes, n] holds each lane's physical
        blocks in its order (the same set, the same recent tail), `scores` [lanes, >= entries] each lane's
        accumulated attention per entry. Each lane drops its lowest-scored entries older than the recent window
        (the older first among equal scores). None when nothing needs to go."""
        lanes, n = tables.shape
        bs = self.block_size
        over = -(-(entries + num_new) // bs) - self.budget_blocks
        if over <= 0:
            return None
        candidates = max(0, entries // bs - self.recent_blocks)
        if over > candidates:
            raise ValueError(f"{num_new} new entries after {entries} exceed the budget's room "
                             f"({self.max_new(entries)})")
        order = scores[:, : candidates * bs].sort(dim=1, stable=True).indices
        dropped = torch.zeros(lanes, n * bs, dtype=torch.bool)
        dropped.scatter_(1, order[:, : over * bs], True)
        # The blocks to free: those holding the most dropped entries over all lanes (the fewest rows to move).
        per_block = dropped.view(lanes, n, bs).sum(-1)
        ids, where = tables.unique(return_inverse=True)  # ascending, so a stable sort breaks ties by lower id
        votes = torch.zeros(len(ids), dtype=torch.long).scatter_add_(0, where.flatten(), per_block.flatten())
        freed = sorted(ids[(-votes).sort(stable=True).indices[:over]].tolist())
        in_freed = torch.isin(tables, torch.tensor(freed))
        freed_entries = in_freed.repeat_interleave(bs, dim=1)
        # New entry j of a lane is old entry source[lane, j]: the kept blocks' entries in place, then the survivors
        # of freed blocks moved into the holes, each lane's k-th survivor into its k-th hole.
        source = torch.arange(n * bs).expand(lanes, -1)[~freed_entries].view(lanes, (n - over) * bs).clone()
        hole_lane, hole = (dropped & ~freed_entries)[~freed_entries].view(lanes, -1).nonzero(as_tuple=True)
        mover_lane, mover = (~dropped & freed_entries).nonzero(as_tuple=True)
        assert torch.equal(hole_lane, mover_lane), "each lane fills as many holes as it has survivors to move"
        target = source[hole_lane, hole]
        source[hole_lane, hole] = mover
        new_tables = tables[~in_freed].view(lanes, n - over)

        def slot(lane: torch.Tensor, entry: torch.Tensor) -> torch.Tensor:
            return tables[lane, entry // bs] * bs + entry % bs

        copies = torch.stack((hole_lane, slot(mover_lane, mover), slot(hole_lane, target)), dim=1)
        return LaneEviction(source, new_tables, freed, copies)


@dataclass(frozen=True)
class LaneEviction:
    """One eviction over a request's lanes: `source` [lanes, kept entries], the old entry each new entry of a lane
    holds (scores follow it); `tables` the lanes' new tables; `freed` the physical blocks back to the pool; `copies`
    [k, 3] the (lane, source slot, destination slot) row moves that must happen before the next step reads the
    lanes (no destination is any move's source)."""

    source: torch.Tensor
    tables: torch.Tensor
    freed: list[int]
    copies: torch.Tensor
