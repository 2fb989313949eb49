"""The KV tensors of a quantized cache (kv/quant.py describes the formats): every layer's quantized blocks, and one
full-precision residual slot per running request for the block it is still filling.

Slots go to requests as they first appear in a plan and come back when a plan names them finished or preempted; at
most `max_num_seqs` requests hold KV at once, so that many slots always suffice. The residual is the runner's
concern, not the scheduler's: blocks, tables and prefix hashes are the same as with a full-precision cache (a full
block is quantized in place, under the same id), and the prefix-cache salt names the format.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from tokenmill.kv.cache import KVStorage
from tokenmill.kv.huge_pages import zeros as huge_pages_zeros
from tokenmill.kv.quant import KVFormat
from tokenmill.model.config import ModelConfig
from tokenmill.scheduler.plan import StepPlan


class QuantizedKVCache(KVStorage):
    """Tensor layout (kernels/kv_quant.h): codes uint8 [layers, kv_heads, blocks, block_size * row_bytes]; fp16
    parameters [layers, kv_heads, blocks, params]; residual slots in the model dtype [layers, kv_heads, slots,
    block_size, head_dim]."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device, fmt: KVFormat, num_residual: int, huge_pages: bool = False) -> None:
        layers, heads, dim = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        self.format = fmt
        self.num_blocks = num_blocks
        self.block_size = block_size
        data = (layers, heads, num_blocks, block_size * fmt.row_bytes(dim))
        self.k_data = huge_pages_zeros(data, torch.uint8, device, huge_pages)
        self.v_data = huge_pages_zeros(data, torch.uint8, device, huge_pages)
        self.k_params = torch.zeros((layers, heads, num_blocks, fmt.key_params(block_size, dim)), dtype=torch.float16,
                                    device=device)
        self.v_params = torch.zeros((layers, heads, num_blocks, fmt.value_params(block_size)), dtype=torch.float16,
                                    device=device)
        residual = (layers, heads, num_residual, block_size, dim)
        self.k_residual = torch.zeros(residual, dtype=dtype, device=device)
        self.v_residual = torch.zeros(residual, dtype=dtype, device=device)
        self._slots: dict[str, int] = {}
        self._free = list(range(num_residual - 1, -1, -1))  # popped from the end: slot 0 first

    @property
    def num_residual(self) -> int:
        return self.k_residual.shape[2]

    def residual_slots(self, plan: StepPlan) -> list[int]:
        """Each of the plan's sequences' residual slot, given out on a request's first step."""
        slots = []
        for seq in plan.seqs:
            slot = self._slots.get(seq.request_id)
            if slot is None:
                if not self._free:
                    raise RuntimeError(f"all {self.num_residual} residual slots are held: more requests run at once "
                                       "than the cache was built for (max_num_seqs)")
                slot = self._slots[seq.request_id] = self._free.pop()
            slots.append(slot)
        return slots

    def release(self, request_ids: Iterable[str]) -> None:
        """Requests that hold no KV any more (finished, aborted or preempted): their slots are free again."""
        for request_id in request_ids:
            slot = self._slots.pop(request_id, None)
            if slot is not None:
                self._free.append(slot)

    @property
    def num_held(self) -> int:
        return len(self._slots)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if copies:  # forks are off with a quantized cache (KVCacheManager(seals_blocks=True))
            raise ValueError("a quantized KV cache does not copy blocks: its open blocks live in residual slots")

    def rotate_keys(self, blocks: Sequence[int], cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
        if blocks:
            raise ValueError("a quantized KV cache cannot rotate keys: streaming windows need kv_cache_dtype='auto'")

    def move_tree_rows(self, request_id: str, moves: Sequence[tuple[int, int]]) -> None:
        """A tree's rows never leave the request's open block (drafts never fill one: `KVCacheManager.max_drafts`),
        which lives in its residual slot: the rows move there."""
        bs = self.block_size
        if any(src // bs != dst // bs for src, dst in moves):
            raise ValueError("a token tree's rows move within the request's open block")
        slot = self._slots[request_id]
        src = torch.tensor([s % bs for s, _ in moves], dtype=torch.long, device=self.k_residual.device)
        dst = torch.tensor([d % bs for _, d in moves], dtype=torch.long, device=self.k_residual.device)
        for residual in (self.k_residual, self.v_residual):
            residual[:, :, slot, dst] = residual[:, :, slot, src]

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, fmt: KVFormat) -> int:
        return cfg.num_layers * cfg.num_kv_heads * fmt.bytes_per_block_head(block_size, cfg.head_dim)

    @staticmethod
    def residual_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype, num_residual: int) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.num_layers * cfg.num_kv_heads * num_residual * block_size * cfg.head_dim * element
