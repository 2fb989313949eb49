"""The scheduler's facade over the KV cache: per request, its block table and how many KV entries it holds; the slots
its next entries go to; growth, truncation, prefix-cache lookups and forks. The one place that knows the block size.

A request's KV entries are counted apart from its token positions (`Request.num_computed_tokens`): today entry i
holds the token at position i, but a cache that drops or sinks entries (StreamingLLM, H2O) keeps positions growing
while entries do not, so slots and context lengths come from here and positions from the request.

Prefix caching: every full block of a request is identified by a hash chained over (parent block's hash, the block's
token ids); the chain starts from a salt naming anything else that changes the KV (model, dtype, KV format), so
blocks are only ever shared between requests whose whole prefix, and whose KV format, match. A request's own
`cache_salt` (a tenant) starts its chain elsewhere again: tenants never share blocks, so the time to first token
cannot tell one tenant what another has asked. Hashes are indexed by
block, so they assume entry i is position i: a cache that evicts entries (`window`, kv/streaming.py; `h2o`,
kv/h2o.py) turns prefix caching and forks off, and then every block is its request's alone, which is what lets
eviction rotate keys in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.kv.block_pool import BlockPool
from tokenmill.kv.h2o import HeavyHitterBudget
from tokenmill.kv.hashing import chain_hash, engine_root, request_root
from tokenmill.kv.streaming import KVShift, StreamingWindow
from tokenmill.request import Request


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up (vLLM: prefix_cache_queries)
    hits: int = 0  # of those, tokens whose KV was reused (vLLM: prefix_cache_hits)
    requests: int = 0
    requests_hit: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False,
                 cache_salt: str = "", window: StreamingWindow | None = None, seals_blocks: bool = False,
                 h2o: HeavyHitterBudget | None = None, h2o_lanes: int = 1) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        for policy in (window, h2o):
            if policy is not None and policy.block_size != block_size:
                raise ValueError(f"{type(policy).__name__} counts blocks of {policy.block_size}, "
                                 f"the cache {block_size}")
        if window is not None and h2o is not None:
            raise ValueError("one eviction policy at a time: a streaming window or H2O")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.window = window
        self.h2o = h2o
        self.h2o_lanes = h2o_lanes  # 1: one choice for every layer and head; L * kv_heads: each its own (kv/h2o.py)
        # `seals_blocks`: the storage transforms a block for good as it fills and keeps open blocks outside the
        # pool (a quantized cache's residual slots). Then forks, which copy a parent's open block, are off, and rows
        # that may be rolled back (speculative drafts) never complete a block. Eviction's rotations rule forks out too.
        evicts = window is not None or h2o is not None
        self.forks = not evicts and not seals_blocks
        # A paused request (scheduler) keeps its KV out of the batch; a quantized cache has residual slots for only
        # max_num_seqs holders of open blocks, so there only running requests hold KV.
        self.pauses = not seals_blocks
        self.drafts_fill_blocks = not seals_blocks
        self.enable_prefix_caching = enable_prefix_caching and not evicts
        self.stats = PrefixCacheStats()
        self.hash_root = engine_root(cache_salt)  # the start of every prefix-cache hash chain (kv/hashing.py)
        self._tables: dict[str, list[int]] = {}
        self._hashes: dict[str, list[bytes]] = {}  # per request: chain hashes of its full blocks so far
        self._num_registered: dict[str, int] = {}  # per request: leading table blocks already registered
        self._num_entries: dict[str, int] = {}  # per request: KV entries written (or shared) so far
        self._num_evicted: dict[str, int] = {}  # per request: entries dropped by the streaming window or H2O
        # Per request with H2O (kv/h2o.py): accumulated attention per lane and entry, each lane's table, and the
        # row moves of evictions not planned yet. Scores and tables may be shorter than the request's entries and
        # table: what lies past them is the same in every lane, with score 0.
        self._scores: dict[str, torch.Tensor] = {}
        self._lane_tables: dict[str, torch.Tensor] = {}
        self._lane_copies: dict[str, list[torch.Tensor]] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        """A copy of the request's block table (plans hold copies, never the manager's own list)."""
        return list(self._tables.get(request_id, ()))

    def num_entries(self, request_id: str) -> int:
        """KV entries the request holds: what its next query attends to before this step's own entries."""
        return self._num_entries.get(request_id, 0)

    def num_evicted(self, request_id: str) -> int:
        """Entries evicted so far: the request's latest token i sits at entry i minus this."""
        return self._num_evicted.get(request_id, 0)

    def position_shift(self, request_id: str) -> int:
        """How far the request's RoPE positions lie below its token indices: under a streaming window a position is
        the entry's index (kv/streaming.py); H2O keeps token positions (kv/h2o.py)."""
        return self.num_evicted(request_id) if self.window is not None else 0

    def max_new_entries(self, request: Request) -> int | None:
        """The most entries one step may add for the request (None: no limit but the blocks)."""
        policy = self.window or self.h2o
        return None if policy is None else policy.max_new(self.num_entries(request.request_id))

    @property
    def collects_attention(self) -> bool:
        """Whether steps must report the attention each entry received (`add_attention`): H2O's scores."""
        return self.h2o is not None

    def entry_scores(self, request_id: str) -> torch.Tensor:
        """H2O's accumulated attention per lane and KV entry of the request, [lanes, entries] (a copy)."""
        n = self.num_entries(request_id)
        scores = torch.zeros(self.h2o_lanes, n, dtype=torch.float64)
        held = self._scores.get(request_id)
        if held is not None:
            width = min(n, held.shape[1])
            scores[:, :width] = held[:, :width]
        return scores

    def add_attention(self, request_id: str, mass: torch.Tensor) -> None:
        """Add one step's attention per lane and entry ([lanes, entries], each lane's entry order as the step's plan
        read its table) to the request's scores."""
        held = self._scores.get(request_id)
        width = min(self.num_entries(request_id), mass.shape[1])
        if held is None or held.shape[1] < width:  # grown since: new entries start at 0
            held = self._scores[request_id] = self.entry_scores(request_id)
        held[:, :width] += mass[:, :width]

    def lane_tables(self, request_id: str) -> torch.Tensor | None:
        """Each lane's block table, [lanes, blocks] (a copy), when there are several lanes; None otherwise."""
        if self.h2o is None or self.h2o_lanes == 1:
            return None
        return self._full_lane_tables(request_id)

    def _full_lane_tables(self, request_id: str) -> torch.Tensor:
        table = self._tables.get(request_id, [])
        tables = torch.tensor(table, dtype=torch.long).expand(self.h2o_lanes, len(table)).clone()
        held = self._lane_tables.get(request_id)
        if held is not None:
            width = min(len(table), held.shape[1])
            tables[:, :width] = held[:, :width]
        return tables

    def pop_lane_copies(self, request_id: str) -> torch.Tensor | None:
        """[k, 3] (lane, source slot, destination slot): the row moves the request's evictions need before its next
        step; lane -1 (one lane) means every layer and head. None when there are none."""
        copies = self._lane_copies.pop(request_id, None)
        return torch.cat(copies) if copies else None

    def max_drafts(self, request: Request) -> int | None:
        """The most draft tokens the request's next step may verify after its real token (None: no limit but the
        budget): with `drafts_fill_blocks` off, the step's rows stay inside its open block without filling it; under
        a streaming window, they evict nothing that the real token alone would not (`StreamingWindow.max_drafts`)."""
        entries = self.num_entries(request.request_id)
        limits = [] if self.drafts_fill_blocks else [max(0, self.block_size - 2 - entries % self.block_size)]
        if self.window is not None:
            limits.append(self.window.max_drafts(entries))
        return min(limits, default=None)

    def evict(self, request: Request, num_new: int) -> KVShift | None:
        """Drop blocks of the request so that `num_new` more entries stay within its eviction policy's room: the
        oldest window blocks (a streaming window; returns the shift its remaining window keys need) or the
        lowest-scored (H2O, whose kept keys need no shift). None when no keys move."""
        if self.h2o is not None:
            self._evict_heavy_hitters(request, num_new)
        if self.window is None:
            return None
        rid = request.request_id
        count = self.window.blocks_to_evict(self.num_entries(rid), num_new)
        if count == 0:
            return None
        table, first = self._tables[rid], self.window.sink_blocks
        dropped = table[first : first + count]
        del table[first : first + count]
        self.pool.free(dropped)
        delta = count * self.block_size
        self._num_entries[rid] -= delta
        self._num_evicted[rid] = self.num_evicted(rid) + delta
        moved = tuple(table[first:])
        assert all(self.pool.ref_count(b) == 1 for b in moved), "a streaming request's blocks are its own"
        return KVShift(moved, delta)

    def _evict_heavy_hitters(self, request: Request, num_new: int) -> None:
        """H2O: each lane drops its lowest-scored entries outside the recent window so that `num_new` more entries
        fit the budget; whole blocks go back to the pool (kv/h2o.py). Kept entries keep their positions."""
        assert self.h2o is not None
        rid = request.request_id
        table, entries = self._tables[rid], self.num_entries(rid)
        scores = torch.zeros(self.h2o_lanes, len(table) * self.block_size, dtype=torch.float64)
        scores[:, :entries] = self.entry_scores(rid)
        eviction = self.h2o.evict(self._full_lane_tables(rid), scores, entries, num_new)
        if eviction is None:
            return
        self.pool.free(eviction.freed)
        freed = set(eviction.freed)
        table[:] = [b for b in table if b not in freed]
        delta = len(eviction.freed) * self.block_size
        self._scores[rid] = scores.gather(1, eviction.source)[:, : entries - delta]
        self._lane_tables[rid] = eviction.tables
        copies = eviction.copies
        if len(copies):
            if self.h2o_lanes == 1:
                copies = copies.clone()
                copies[:, 0] = -1  # one lane: the rows move in every layer and head
            self._lane_copies.setdefault(rid, []).append(copies)
        self._num_entries[rid] -= delta
        self._num_evicted[rid] = self.num_evicted(rid) + delta

    def slots(self, request_id: str, start: int, end: int) -> list[int]:
        """Cache slots of the request's KV entries [start, end), which must be allocated: one range per block."""
        table, bs = self._tables[request_id], self.block_size
        if not 0 <= start <= end <= len(table) * bs:
            raise ValueError(f"entries [{start}, {end}) outside the {len(table) * bs} allocated to {request_id!r}")
        slots: list[int] = []
        for b in range(start // bs, -(-end // bs)):
            base = table[b] * bs
            slots.extend(range(base + max(start - b * bs, 0), base + min(end - b * bs, bs)))
        return slots

    def commit(self, request: Request, num_new: int) -> None:
        """The model wrote `num_new` more entries of the request (into slots allocated before)."""
        total = self.num_entries(request.request_id) + num_new
        if total > len(self._tables.get(request.request_id, ())) * self.block_size:
            raise ValueError(f"{request.request_id!r} commits {total} KV entries beyond its allocated blocks")
        self._num_entries[request.request_id] = total

    # ---- prefix cache ----

    def block_hashes(self, request: Request, num_blocks: int) -> list[bytes]:
        """The request's first `num_blocks` chain hashes, extending its memoised chain as needed."""
        hashes = self._hashes.setdefault(request.request_id, [])
        bs = self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else request_root(self.hash_root, request.cache_salt)
            hashes.append(chain_hash(parent, request.token_ids(i * bs, (i + 1) * bs)))
        return hashes[:num_blocks]

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Blocks holding the longest cached prefix of the request's tokens.

        At least the last token is always left to compute (its logits are needed), so a full hit stops one block
        short when the tokens end exactly on a block boundary.
        """
        if not self.enable_prefix_caching or request.params.prompt_logprobs is not None:
            return []  # scoring the prompt needs the logits of every position, cached or not
        hits: list[int] = []
        for block_hash in self.block_hashes(request, (request.num_tokens - 1) // self.block_size):
            block = self.pool.cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def record_lookup(self, request: Request, cached_blocks: list[int]) -> None:
        """Count an admitted request's prefix lookup (not every retry of one that had to wait)."""
        if not self.enable_prefix_caching:
            return
        self.stats.queries += request.num_tokens
        self.stats.hits += len(cached_blocks) * self.block_size
        self.stats.requests += 1
        self.stats.requests_hit += bool(cached_blocks)

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's blocks that are now fully computed, so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        table = self._tables.get(request.request_id, [])
        # Entries past the request's tokens (accepted drafts not appended yet) wait for the next call: a block is
        # hashed from its tokens, so only blocks of known tokens are registered, and never one holding a draft.
        entries = min(self.num_entries(request.request_id), request.num_tokens)
        num_full = min(entries // self.block_size, len(table))
        start = self._num_registered.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self.block_hashes(request, num_full)
        for i in range(start, num_full):
            self.pool.register(table[i], hashes[i])
        self._num_registered[request.request_id] = num_full

    # ---- allocation ----

    def can_allocate(self, request: Request, num_new_tokens: int, cached_blocks: list[int] | None = None,
                     spare: int = 0) -> bool:
        """Whether `allocate_slots` would succeed with `spare` free blocks still left after it."""
        cached_blocks = cached_blocks or []
        return self._fits(self._growth(request, num_new_tokens, cached_blocks)[1], cached_blocks, spare)

    def _growth(self, request: Request, num_new_tokens: int, cached_blocks: list[int]) -> tuple[int, int]:
        """(entries the request holds once `cached_blocks` are shared, new blocks for `num_new_tokens` after them)."""
        computed = self.num_entries(request.request_id) + len(cached_blocks) * self.block_size
        held = len(self._tables.get(request.request_id, [])) + len(cached_blocks)
        return computed, self.blocks_needed(computed + num_new_tokens) - held

    def _fits(self, needed: int, cached_blocks: list[int], spare: int = 0) -> bool:
        # Cached blocks that sit in the free queue stop being free once shared.
        reclaimed = sum(1 for b in cached_blocks if self.pool.ref_count(b) == 0)
        return needed + spare <= self.pool.num_free_blocks - reclaimed

    def allocate_slots(self, request: Request, num_new_tokens: int, cached_blocks: list[int] | None = None) -> bool:
        """Make room for `num_new_tokens` more entries after `cached_blocks` (a prefix hit, on admission), whose
        entries the request then holds.

        Returns False, with nothing allocated or shared, when free blocks are short.
        """
        cached_blocks = cached_blocks or []
        computed, needed = self._growth(request, num_new_tokens, cached_blocks)
        if not self._fits(needed, cached_blocks):
            return False
        for block in cached_blocks:
            self.pool.share(block)
        table = self._tables.setdefault(request.request_id, [])
        table.extend(cached_blocks)
        if needed > 0:
            table.extend(self.pool.allocate(needed))
        self._num_entries[request.request_id] = computed
        return True

    def fork(self, parent: Request, child: Request, num_tokens: int) -> list[tuple[int, int]] | None:
        """Give `child` the parent's KV for its first `num_tokens` tokens (which the two share).

        Blocks wholly before position `num_tokens` are shared by reference; the block holding that position (the
        child's first write) is copied, since a shared block is never written. Returns the (source, destination)
        block copies the model runner must make before the child's next forward, or None if no block is free.
        """
        parent_table = self._tables[parent.request_id]
        num_shared = num_tokens // self.block_size
        copy_partial = num_tokens % self.block_size != 0
        if copy_partial and self.pool.num_free_blocks < 1:
            return None
        for block in parent_table[:num_shared]:
            self.pool.share(block)
        table = list(parent_table[:num_shared])
        copies = []
        if copy_partial:
            [new_block] = self.pool.allocate(1)
            copies.append((parent_table[num_shared], new_block))
            table.append(new_block)
        self._tables[child.request_id] = table
        self._num_entries[child.request_id] = num_tokens
        return copies

    def truncate(self, request: Request, num_entries: int) -> list[int]:
        """Keep the request's first `num_entries` KV entries (roll back the rest, e.g. rejected speculative tokens)
        and release the blocks that no longer hold any. Returns the released block ids, table order.

        The block kept in part is written again from the cut onwards, so it must be the request's alone; its prefix
        cache entry, if it had one, is dropped (its content no longer matches the hash).
        """
        rid, bs = request.request_id, self.block_size
        held = self.num_entries(rid)
        if not 0 <= num_entries <= held:
            raise ValueError(f"cannot keep {num_entries} of the {held} KV entries of {rid!r}")
        table = self._tables.get(rid, [])
        keep = self.blocks_needed(num_entries)
        if num_entries % bs:
            partial = table[keep - 1]
            if self.pool.ref_count(partial) > 1:
                raise ValueError(f"block {partial} is shared: truncating {rid!r} into it would overwrite another's KV")
            self.pool.unregister(partial)
        released = table[keep:]
        del table[keep:]
        if rid in self._scores:
            self._scores[rid] = self._scores[rid][:, :num_entries]
        if rid in self._lane_tables:
            self._lane_tables[rid] = self._lane_tables[rid][:, :keep]
        if released:
            self.pool.free(released)
        self._num_entries[rid] = num_entries
        if rid in self._num_registered:
            self._num_registered[rid] = min(self._num_registered[rid], num_entries // bs)
        if rid in self._hashes:
            del self._hashes[rid][num_entries // bs:]
        return released

    def free(self, request: Request) -> None:
        self._num_registered.pop(request.request_id, None)
        self._num_evicted.pop(request.request_id, None)
        for held in (self._scores, self._lane_tables, self._lane_copies):
            held.pop(request.request_id, None)
        self._num_entries.pop(request.request_id, None)
        table = self._tables.pop(request.request_id, None)
        if table:
            self.pool.free(table)

    def forget(self, request: Request) -> None:
        """Drop a finished request's memoised hashes (its blocks stay cached in the pool)."""
        self._hashes.pop(request.request_id, None)
