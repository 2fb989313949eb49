"""StreamingLLM's cache (Xiao et al. 2023): a request keeps its first blocks (the attention sinks) and its most recent
ones (the window); the blocks in between are evicted as it grows, so a stream of any length runs at fixed memory.

Positions follow the paper: a token's RoPE position is its index in the cache, not in the text. When blocks are
evicted, every later entry moves back by the entries evicted, so the keys of the window's blocks are rotated back by
that many positions (`KVShift`, applied by the model runner before the step, in fp32). The alternative, keys cached
before RoPE and rotated at every read, would put a rotation of the whole window into every decode step's attention;
this way the rotation happens once per eviction, one block's worth of tokens apart.

Eviction is by whole blocks: the sinks are the first ceil(S / block_size) blocks, the window ceil(W / block_size)
blocks. Pure arithmetic here; the KV manager applies it to block tables.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KVShift:
    """Keys of `blocks` (every layer) move back by `delta` positions: the entries evicted before them."""

    blocks: tuple[int, ...]
    delta: int


@dataclass(frozen=True)
class StreamingWindow:
    sink_tokens: int
    window_tokens: int
    block_size: int

    def __post_init__(self) -> None:
        if self.sink_tokens < 0:
            raise ValueError(f"attention_sinks must be >= 0, got {self.sink_tokens}")
        if self.window_tokens < self.block_size:
            raise ValueError(f"sliding_window must be at least one block ({self.block_size}), got {self.window_tokens}")

    @property
    def sink_blocks(self) -> int:
        return -(-self.sink_tokens // self.block_size)

    @property
    def window_blocks(self) -> int:
        return -(-self.window_tokens // self.block_size)

    @property
    def capacity(self) -> int:
        """The most KV entries a request ever holds: sink blocks and window blocks, full."""
        return (self.sink_blocks + self.window_blocks) * self.block_size

    def blocks_to_evict(self, entries: int, num_new: int) -> int:
        """How many of the oldest window blocks to drop so that `num_new` more entries fit after `entries`.

        Only full blocks older than the one being filled go; a request whose new entries do not fit even then asked
        for more than `max_new` allows."""
        sink_entries = self.sink_blocks * self.block_size
        over = entries + num_new - self.capacity
        if over <= 0 or entries <= sink_entries:
            return 0
        full_window_blocks = (entries - sink_entries) // self.block_size
        return min(-(-over // self.block_size), full_window_blocks)

    def max_drafts(self, entries: int) -> int:
        """The most draft tokens a decode step at `entries` may verify after its real token without evicting more
        than that token alone would. Each of the step's rows then attends to the entries that decoding it alone
        would have kept, so speculation under a window stays lossless; a rejected draft never cost a block."""
        kept = entries - self.blocks_to_evict(entries, 1) * self.block_size
        return max(0, self.capacity - kept - 1)

    def max_new(self, entries: int) -> int:
        """The most entries one step may add after `entries`: what fits once every evictable block is gone (a
        prefill chunk must not overrun the window its own queries attend to)."""
        sink_entries = self.sink_blocks * self.block_size
        kept = entries if entries <= sink_entries else sink_entries + (entries - sink_entries) % self.block_size
        return self.capacity - kept
