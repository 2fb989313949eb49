"""The KV tensors: every layer's keys and values, head-major, addressed by slot = block_id * block_size + offset."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from types import ModuleType

import torch

from tokenmill.kv.huge_pages import zeros as huge_pages_zeros
from tokenmill.model.config import ModelConfig


class KVStorage(ABC):
    """The KV tensors a step reads and writes, in blocks whose ids KVCacheManager hands out.

    Contract (every implementation):
    - `num_blocks` and `block_size` bound the block ids and slots of every plan (runner/checks.py checks them).
    - `release(request_ids)` hears of requests that hold no KV any more (finished, aborted, preempted): any state it
      keeps per request goes; ids it does not know, or hears of twice, are ignored.
    - `copy_blocks` makes the copies of forks, `rotate_keys` the key shifts of a streaming window, `move_rows`
      H2O's row moves (kv/h2o.py) and `move_tree_rows` a token tree's accepted rows (spec/tree.py). A storage that
      cannot do one raises when asked for it, and the engine sets up the KV manager so that it never is.
    """

    num_blocks: int
    block_size: int

    @abstractmethod
    def release(self, request_ids: Iterable[str]) -> None: ...

    @abstractmethod
    def copy_blocks(self, copies: list[tuple[int, int]]) -> None: ...

    @abstractmethod
    def rotate_keys(self, blocks: Sequence[int], cos: torch.Tensor, signed_sin: torch.Tensor) -> None: ...

    def move_rows(self, moves: torch.Tensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot move single KV rows")

    def move_tree_rows(self, request_id: str, moves: Sequence[tuple[int, int]]) -> None:
        """A token tree's accepted rows, written this step after the request's last real token, move to the slots
        right after it where a chain would have put them: (source slot, destination slot) pairs, every layer and
        head; every source is read before any destination is written."""
        self.move_rows(torch.tensor([[-1, src, dst] for src, dst in moves], dtype=torch.long))


class KVCache(KVStorage):
    """`k` and `v` are [layers, kv_heads, num_blocks * block_size, head_dim]: gathering a sequence's blocks yields
    whole contiguous blocks per head. Slots come from `KVCacheManager.slots`; attention backends read and write here."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device, huge_pages: bool = False) -> None:
        shape = (cfg.num_layers, cfg.num_kv_heads, num_blocks * block_size, cfg.head_dim)
        self.k = huge_pages_zeros(shape, dtype, device, huge_pages)
        self.v = huge_pages_zeros(shape, dtype, device, huge_pages)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._kernels: ModuleType | None = None

    def use_kernels(self, module: ModuleType | None) -> None:
        """Rotate keys with the CPU kernels' in-place `rotate_key_blocks` (bit-identical to the PyTorch path, which
        gathers, widens and scatters the blocks); None: the PyTorch path. The fused CPU backend sets it, so
        `enforce_eager` turns it off with the rest of the kernels."""
        usable = self.k.device.type == "cpu" and self.k.dtype in (torch.float32, torch.bfloat16)
        self._kernels = module if usable else None

    def release(self, request_ids: Iterable[str]) -> None:
        """A full-precision cache keeps nothing per request."""

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole blocks (src → dst) in every layer: copy-on-write for forked sequences."""
        if not copies:
            return
        slots = torch.arange(self.block_size, device=self.k.device)
        src = torch.cat([s * self.block_size + slots for s, _ in copies])
        dst = torch.cat([d * self.block_size + slots for _, d in copies])
        for cache in (self.k, self.v):
            cache[:, :, dst] = cache[:, :, src]

    def move_rows(self, moves: torch.Tensor) -> None:
        """Copy single K/V rows, [k, 3] (lane, source slot, destination slot) with lane = layer * kv_heads + head, or
        -1 for every layer and head: H2O moving kept entries out of blocks it frees (kv/h2o.py). No destination is
        any move's source."""
        layers, heads, num_slots, dim = self.k.shape
        moves = moves.to(self.k.device)
        every = moves[moves[:, 0] < 0]
        own = moves[moves[:, 0] >= 0]
        for cache in (self.k, self.v):
            if len(every):
                cache[:, :, every[:, 2]] = cache[:, :, every[:, 1]]
            if len(own):
                by_lane = cache.view(layers * heads, num_slots, dim)
                by_lane[own[:, 0], own[:, 2]] = by_lane[own[:, 0], own[:, 1]]

    def rotate_keys(self, blocks: Sequence[int], cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
        """Apply one RoPE rotation (`tokenmill.model.llama.rope_rotation`) to the keys of whole blocks in every
        layer, in fp32: a streaming window moving its keys back after an eviction (kv/streaming.py)."""
        if not blocks:
            return
        layers, heads, num_slots, dim = self.k.shape
        half = dim // 2
        index = torch.tensor(list(blocks), device=self.k.device)
        cos, sin = cos[:half].to(self.k.device), signed_sin[half:].to(self.k.device)  # the half-split rotation's terms
        if self._kernels is not None:
            self._kernels.rotate_key_blocks(self.k, index, cos.float().contiguous(), sin.float().contiguous(),
                                            self.block_size)
            return
        by_block = self.k.view(layers, heads, num_slots // self.block_size, self.block_size, dim)
        keys = by_block.index_select(2, index).float()
        first, second = keys[..., :half], keys[..., half:]
        rotated = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
        by_block.index_copy_(2, index, rotated.to(self.k.dtype))

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * element
