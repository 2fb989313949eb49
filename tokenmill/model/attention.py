"""Attention over a paged KV cache for one flat batch of tokens from many sequences.

The runner orders the batch as: all decode tokens (one per sequence) first, then the prefill chunks. Each of the two
groups is attended in one batched `scaled_dot_product_attention` call: queries are laid out padded per sequence and
each sequence's keys/values are gathered from its own blocks through precomputed slot indices. Keeping decodes apart
from prefill chunks avoids padding every decode query up to the longest chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionGroup:
    """Sequences attended together: S sequences, queries padded to `max_q`, keys padded to `max_kv`."""

    token_start: int  # first flat token of the group
    num_tokens: int
    num_seqs: int
    max_q: int
    query_scatter: torch.Tensor | None  # [num_tokens] position of each token in the [S * max_q] padded layout
    kv_slots: torch.Tensor  # [S, max_kv] cache slot of each key position (padding points at slot 0, masked)
    mask: torch.Tensor  # [S, 1, max_q, max_kv] bool, True = attend


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
) -> AttentionGroup:
    """Index tensors for one group. `context_lens[i]` counts the keys of sequence i including its new tokens."""
    num_seqs = len(query_lens)
    max_q, max_kv = max(query_lens), max(context_lens)
    max_blocks = max(len(t) for t in block_tables)
    table = torch.zeros(num_seqs, max_blocks, dtype=torch.long)
    for i, blocks in enumerate(block_tables):
        table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)
    q_lens = torch.tensor(query_lens, dtype=torch.long)
    ctx_lens = torch.tensor(context_lens, dtype=torch.long)

    kv_pos = torch.arange(max_kv, dtype=torch.long)
    block_idx = (kv_pos // block_size).clamp(max=max_blocks - 1)
    kv_slots = table[:, block_idx] * block_size + kv_pos % block_size
    kv_valid = kv_pos[None, :] < ctx_lens[:, None]
    kv_slots = torch.where(kv_valid, kv_slots, torch.zeros_like(kv_slots))

    # Query j of sequence i sits at absolute position ctx - q_len + j and sees keys up to that position.
    q_idx = torch.arange(max_q, dtype=torch.long)
    q_pos = (ctx_lens - q_lens)[:, None] + q_idx[None, :]
    q_valid = q_idx[None, :] < q_lens[:, None]
    mask = (kv_pos[None, None, :] <= q_pos[:, :, None]) & kv_valid[:, None, :]
    # Padded query rows attend to key 0 only so softmax stays finite; their outputs are dropped.
    mask = torch.where(q_valid[:, :, None], mask, kv_pos[None, None, :] == 0)

    query_scatter = None
    if max_q > 1:
        query_scatter = (torch.arange(num_seqs)[:, None] * max_q + q_idx[None, :])[q_valid]
    return AttentionGroup(
        token_start=token_start,
        num_tokens=int(q_lens.sum()),
        num_seqs=num_seqs,
        max_q=max_q,
        query_scatter=None if query_scatter is None else query_scatter.to(device),
        kv_slots=kv_slots.to(device),
        mask=mask[:, None].to(device),
    )


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_slots, Hkv, D] for this layer
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:
    # New K/V go into the cache first so that every group simply reads its keys from the cache.
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    num_heads, head_dim = q.shape[1], q.shape[2]
    out = torch.empty_like(q)
    for group in meta.groups:
        q_group = q[group.token_start : group.token_start + group.num_tokens]
        if group.query_scatter is None:
            q_pad = q_group.unsqueeze(1)
        else:
            q_pad = q.new_zeros(group.num_seqs * group.max_q, num_heads, head_dim)
            q_pad[group.query_scatter] = q_group
            q_pad = q_pad.view(group.num_seqs, group.max_q, num_heads, head_dim)
        keys = k_cache[group.kv_slots].transpose(1, 2)  # [S, Hkv, max_kv, D]
        values = v_cache[group.kv_slots].transpose(1, 2)
        attn = F.scaled_dot_product_attention(
            q_pad.transpose(1, 2), keys, values, attn_mask=group.mask, enable_gqa=True
        )  # [S, H, max_q, D]
        attn = attn.transpose(1, 2).reshape(group.num_seqs * group.max_q, num_heads, head_dim)
        if group.query_scatter is not None:
            attn = attn[group.query_scatter]
        out[group.token_start : group.token_start + group.num_tokens] = attn
    return out
