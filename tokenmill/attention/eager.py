"""The eager attention backend: PyTorch operators over the paged KV cache, for one flat batch of tokens from many
sequences. The reference path, and the one that runs off CPU.

The cache of a layer is laid out head-major, [kv_heads, num_blocks * block_size, head_dim], so that gathering a
sequence's blocks yields whole contiguous blocks and the batched matmuls below need no transposing copies.

A plan orders the batch as: all single-token sequences (decodes) first, then the prefill chunks. Each group is
attended with two batched matmuls: queries laid out padded per sequence, keys/values gathered block-wise from the
sequence's own block table, a mask for causality and padding. Keeping decodes apart from prefill chunks avoids padding
every decode query up to the longest chunk. (Measured on the 2-core dev CPU, this beats torch's
`scaled_dot_product_attention` for decode: 0.36 ms vs 5.3 ms in bf16, 0.78 vs 0.80 ms in fp32, 64 seqs × 256 keys.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.attention.backend import AttentionBackend
from tokenmill.kv.cache import KVCache
from tokenmill.model.llama import LlamaModel
from tokenmill.scheduler.plan import ScheduledSeq, StepPlan


@dataclass
class AttentionGroup:
    """Sequences attended together: S sequences, queries padded to `max_q`, keys padded to whole blocks."""

    token_start: int  # first flat token of the group
    num_tokens: int
    num_seqs: int
    max_q: int
    query_scatter: torch.Tensor | None  # [num_tokens] position of each token in the [S * max_q] padded layout
    block_tables: torch.Tensor  # [S, max_blocks] (padding points at block 0 and is masked)
    # True = attend. Prefill chunks: [S, max_q, max_blocks * block_size]. Decodes (max_q = 1, no query_scatter):
    # [S, max_blocks * block_size] over the keys before the new token, which `decode_attention` adds itself.
    mask: torch.Tensor
    context_lens: torch.Tensor  # [S] keys of each sequence, its new tokens included


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot receiving each new token's K/V
    groups: list[AttentionGroup]


def build_group(
    token_start: int,
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device,
    visible: list[list[int] | None] | None = None,
) -> AttentionGroup:
    """Index tensors for one group. `context_lens[i]` counts the keys of sequence i including its new tokens;
    `visible[i]`, for a token tree, how many of its keys each of its rows sees besides its own."""
    num_seqs = len(query_lens)
    max_q = max(query_lens)
    max_blocks = max(-(-c // block_size) for c in context_lens)
    # One tensor built from padded lists: a per-sequence torch.tensor call costs more than the whole step's math.
    used = [blocks[:max_blocks] for blocks in block_tables]
    table = torch.tensor([u + [0] * (max_blocks - len(u)) for u in used], dtype=torch.long)
    q_lens = torch.tensor(query_lens, dtype=torch.long)
    ctx_lens = torch.tensor(context_lens, dtype=torch.long)

    kv_pos = torch.arange(max_blocks * block_size, dtype=torch.long)
    if max_q == 1:
        # Decodes score their own new key apart (see `decode_attention`): the mask covers the keys before it.
        mask = kv_pos[None, :] < (ctx_lens - 1)[:, None]
        return AttentionGroup(token_start, num_seqs, num_seqs, 1, None, table.to(device), mask.to(device),
                              ctx_lens.to(device))
    kv_valid = kv_pos[None, :] < ctx_lens[:, None]
    # Query j of sequence i sits at absolute position ctx - q_len + j and sees keys up to that position.
    q_idx = torch.arange(max_q, dtype=torch.long)
    q_pos = (ctx_lens - q_lens)[:, None] + q_idx[None, :]
    q_valid = q_idx[None, :] < q_lens[:, None]
    mask = (kv_pos[None, None, :] <= q_pos[:, :, None]) & kv_valid[:, None, :]
    for i, rows in enumerate(visible or ()):
        if rows is not None:  # a tree's row: its own key and the first `rows[j]` keys
            seen = torch.tensor(rows, dtype=torch.long)
            own = kv_pos[None, :] == q_pos[i, : len(rows), None]
            mask[i, : len(rows)] = (kv_pos[None, :] < seen[:, None]) | own
    # Padded query rows attend to key 0 only so softmax stays finite; their outputs are dropped.
    mask = torch.where(q_valid[:, :, None], mask, kv_pos[None, None, :] == 0)

    query_scatter = (torch.arange(num_seqs)[:, None] * max_q + q_idx[None, :])[q_valid].to(device)
    return AttentionGroup(token_start, int(q_lens.sum()), num_seqs, max_q, query_scatter, table.to(device),
                          mask.to(device), ctx_lens.to(device))


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store new keys/values ([T, kv_heads, D]) at their slots of the head-major cache."""
    k_cache.index_copy_(1, slot_mapping, k.transpose(0, 1))
    v_cache.index_copy_(1, slot_mapping, v.transpose(0, 1))


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor, block_size: int) -> torch.Tensor:
    """[kv_heads, S, max_blocks * block_size, D]: each sequence's keys (or values) in position order."""
    kv_heads, num_slots, head_dim = cache.shape
    # index_select copies whole blocks; advanced indexing with a leading slice was ~3x slower here.
    blocks = cache.view(kv_heads, num_slots // block_size, block_size * head_dim)
    blocks = blocks.index_select(1, block_tables.flatten())
    return blocks.view(kv_heads, block_tables.shape[0], -1, head_dim)


def attend_group(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [S, Lq, H, D], keys/values [Hkv, S, L, D], mask [S, Lq, L] → [S, Lq, H, D].

    The G = H / Hkv query heads sharing a KV head ride in the matmul's row dimension (GQA without repeating K/V).
    """
    num_seqs, q_len, num_heads, head_dim = q.shape
    kv_heads, _, kv_len, _ = keys.shape
    group = num_heads // kv_heads
    # Scaling q (S·Lq·H·D values) is cheaper than scaling the scores (S·Lq·H·L).
    q = (q * head_dim**-0.5).view(num_seqs, q_len, kv_heads, group, head_dim).permute(2, 0, 3, 1, 4)
    q = q.reshape(kv_heads, num_seqs, group * q_len, head_dim)
    scores = torch.matmul(q, keys.transpose(-1, -2)).view(kv_heads, num_seqs, group, q_len, kv_len)
    scores.masked_fill_(~mask[None, :, None], float("-inf"))
    # Softmax accumulates in fp32 whatever the model dtype.
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = probs.view(kv_heads, num_seqs, group * q_len, kv_len)
    out = torch.matmul(probs, values).view(kv_heads, num_seqs, group, q_len, head_dim)
    return out.permute(1, 3, 0, 2, 4).reshape(num_seqs, q_len, num_heads, head_dim)


def decode_attention(
    q: torch.Tensor,  # [B, H, D] one new token per sequence
    k: torch.Tensor,  # [B, Hkv, D]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [Hkv, num_slots, D] for this layer
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks]
    cached_mask: torch.Tensor,  # [B, max_blocks * block_size] True for the cached keys before the new token
    block_size: int,
) -> torch.Tensor:
    """Attention of each new token over its cached keys and itself, reading the cache but never writing it.

    The new token's own key is scored apart and joined before the softmax, so the step stays free of side effects
    and can be compiled as one graph; the runner writes all layers' new K/V afterwards.
    """
    num_seqs, num_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = num_heads // kv_heads
    keys = gather_blocks(k_cache, block_tables, block_size)  # [Hkv, B, L, D]
    values = gather_blocks(v_cache, block_tables, block_size)
    q = (q * head_dim**-0.5).view(num_seqs, kv_heads, group, head_dim).transpose(0, 1)  # [Hkv, B, G, D]
    own_k, own_v = k.transpose(0, 1).unsqueeze(2), v.transpose(0, 1).unsqueeze(2)  # [Hkv, B, 1, D]
    cached_scores = torch.matmul(q, keys.transpose(-1, -2)).masked_fill(~cached_mask[None, :, None], float("-inf"))
    own_score = (q * own_k).sum(-1, keepdim=True)
    probs = torch.softmax(torch.cat([cached_scores, own_score], dim=-1), dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs[..., :-1], values) + probs[..., -1:] * own_v  # [Hkv, B, G, D]
    return out.transpose(0, 1).reshape(num_seqs, num_heads, head_dim)


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [Hkv, num_slots, D] for this layer
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    block_size: int,
) -> torch.Tensor:
    # New K/V go into the cache first so that every group simply reads its keys from the cache.
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    num_heads, head_dim = q.shape[1], q.shape[2]
    out = torch.empty_like(q)
    for group in meta.groups:
        tokens = slice(group.token_start, group.token_start + group.num_tokens)
        if group.query_scatter is None:
            out[tokens] = decode_attention(q[tokens], k[tokens], v[tokens], k_cache, v_cache, group.block_tables,
                                           group.mask, block_size)
            continue
        q_pad = q.new_zeros(group.num_seqs * group.max_q, num_heads, head_dim)
        q_pad[group.query_scatter] = q[tokens]
        q_pad = q_pad.view(group.num_seqs, group.max_q, num_heads, head_dim)
        keys = gather_blocks(k_cache, group.block_tables, block_size)
        values = gather_blocks(v_cache, group.block_tables, block_size)
        attn = attend_group(q_pad, keys, values, group.mask)
        out[tokens] = attn.reshape(group.num_seqs * group.max_q, num_heads, head_dim)[group.query_scatter]
    return out


class EagerBackend(AttentionBackend):
    """`paged_attention` inside the model's own layer loop: decodes as one group, prefill chunks as another."""

    def __init__(self, model: LlamaModel, kv_cache: KVCache) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = kv_cache.k.device

    def build_metadata(self, plan: StepPlan) -> AttentionMetadata:
        decodes = [s for s in plan.seqs if s.num_tokens == 1]
        chunks = [s for s in plan.seqs if s.num_tokens > 1]
        groups = [self._group(group) for group in (decodes, chunks) if group]
        slots = torch.tensor(plan.slot_mapping, dtype=torch.long, device=self.device)
        return AttentionMetadata(slots, groups)

    def _group(self, seqs: list[ScheduledSeq]) -> AttentionGroup:
        return build_group(seqs[0].query_start, [s.num_tokens for s in seqs], [s.context_len for s in seqs],
                           [list(s.block_table) for s in seqs], self.kv_cache.block_size, self.device,
                           [s.visible_entries() for s in seqs])

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        kv = self.kv_cache

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return paged_attention(q, k, v, kv.k[layer], kv.v[layer], metadata, kv.block_size)

        return self.model(input_ids, positions, attend)
