"""A self-draft's catch-up from the target's KV: entries the target has computed are copied, not recomputed.

A self-draft's layers are the target's layers (a subset of them, or all of them in another weight format), so for
every token the target has already run, the target's K/V of those layers is what the draft would compute, or a
better version of it (the draft's rounding is coarser). A draft model's state lags its request by every token the
target produced since its last draft step: the whole prompt on a request's first draft, the accepted drafts and the
target's own tokens after that. Running those tokens through the draft costs a prefill of its own, priced so high
for long prompts that the adaptive lengths never started drafting them; copying the target's entries costs a memory
copy. The draft's guesses stay guesses: the target verifies them, so output is what it is without the copy.

The copy needs the target's cache in the draft's layout: a full-precision `KVCache` whose slots follow positions
(no streaming window or H2O moving entries), all heads on this rank, and the same block size. The engine lends it
only then (`lendable`); a draft model of another architecture computes its own entries as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tokenmill.kv.cache import KVCache, KVStorage


@dataclass(frozen=True)
class TargetKV:
    """The target's cache, lent to the draft: draft layer j's entries are the target layer `layers[j]`'s."""

    cache: KVCache
    layers: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.layers or max(self.layers) >= self.cache.k.shape[0] or min(self.layers) < 0:
            raise ValueError(f"layers {list(self.layers)} outside the target cache's {self.cache.k.shape[0]}")

    def copy_to(self, draft: KVCache, src_slots: Sequence[int], dst_slots: Sequence[int]) -> None:
        """K and V of the target's `src_slots` into the draft's `dst_slots`, every draft layer and head."""
        if len(src_slots) != len(dst_slots):
            raise ValueError(f"{len(src_slots)} source slots for {len(dst_slots)} destinations")
        if not src_slots:
            return
        if draft.k.shape[0] != len(self.layers) or draft.k.shape[1:2] + draft.k.shape[3:] != (
                self.cache.k.shape[1:2] + self.cache.k.shape[3:]):
            raise ValueError(f"a draft cache of shape {tuple(draft.k.shape)} cannot take layers {list(self.layers)} "
                             f"of a target cache of shape {tuple(self.cache.k.shape)}")
        src = torch.tensor(src_slots, dtype=torch.long, device=self.cache.k.device)
        dst = torch.tensor(dst_slots, dtype=torch.long, device=draft.k.device)
        every = self.layers == tuple(range(self.cache.k.shape[0]))
        for mine, theirs in ((draft.k, self.cache.k), (draft.v, self.cache.v)):
            if every:  # one gather for all layers: the whole-depth draft in another weight format
                mine.index_copy_(2, dst, theirs.index_select(2, src).to(mine.dtype))
                continue
            for j, layer in enumerate(self.layers):
                mine[j].index_copy_(1, dst, theirs[layer].index_select(1, src).to(mine.dtype))


def lendable(storage: KVStorage, evicts: bool, sharded: bool) -> KVCache | None:
    """The target's storage when a self-draft can copy entries from it by position, else None: not a quantized cache
    (its full blocks hold codes), not under a streaming window or H2O (`evicts`: slots no longer follow positions),
    not one rank's heads of a tensor-parallel model (`sharded`)."""
    if evicts or sharded or not isinstance(storage, KVCache):
        return None
    return storage


def positions_to_slots(blocks: Sequence[int], block_size: int, start: int, end: int) -> list[int]:
    """The slots of positions [start, end) in a cache whose block table is `blocks`."""
    return [blocks[p // block_size] * block_size + p % block_size for p in range(start, end)]
