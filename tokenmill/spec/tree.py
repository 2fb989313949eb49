"""Token trees (SpecInfer, Medusa): several guessed continuations verified in one step.

A sequence's drafts d_0..d_{k-1} hang off its sample rows: row 0 holds the last real token, row i + 1 draft d_i.
`parents[i]` is the row draft d_i follows (an empty tuple: the chain, draft i after row i). Drafts are listed parents
first, so any first m of them form a tree again (the step's token budget trims from the end).

The verifier walks down from row 0, taking at each row the child that carries the target's token; the accepted path's
KV is then moved to the entries a chain of the same tokens would have used.

The attention kernels take one shape of tree: a *spine* (a chain: drafts 0..s-1 with parents 0..s-1) followed by
leaves that hang off spine rows. Each row then sees the entries before its parent's plus its parent's and its own,
i.e. a prefix of the step's entries and itself, which the kernels compute exactly as the one-token decode of that
prefix (greedy output stays token-identical). Drafters propose this shape: a draft model's argmax chain with its
runner-up tokens as leaves at every depth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Rows of a sequence verifying a tree: the fused kernel's few-row path (kMultiRowMax in attention.cpp) covers them.
MAX_TREE_ROWS = 16


@dataclass(frozen=True)
class DraftTree:
    """Guesses and where each hangs (`parents`, as above; empty for a chain)."""

    token_ids: tuple[int, ...]
    parents: tuple[int, ...] = ()


def spine_length(parents: Sequence[int]) -> int:
    """How many leading drafts form a chain from row 0."""
    n = 0
    while n < len(parents) and parents[n] == n:
        n += 1
    return n


def check_tree(parents: Sequence[int], num_drafts: int) -> None:
    """Raises ValueError unless `parents` is empty (a chain) or a spine with leaves for `num_drafts` drafts."""
    if not parents:
        return
    if len(parents) != num_drafts:
        raise ValueError(f"{len(parents)} parents for {num_drafts} drafts")
    spine = spine_length(parents)
    for i, parent in enumerate(parents):
        if not 0 <= parent <= min(i, spine):
            raise ValueError(f"draft {i} hangs off row {parent}: drafts hang off row 0 or a spine row (the chain "
                             f"of the first {spine} drafts), listed after their parent")


def depths(parents: Sequence[int], num_drafts: int) -> list[int]:
    """Each draft's distance from row 0 (1 for row 0's children): its position past the last real token's."""
    return [parents[i] + 1 for i in range(num_drafts)] if parents else list(range(1, num_drafts + 1))


def path_tokens(parents: Sequence[int], drafts: Sequence[int], row: int) -> list[int]:
    """The drafts on the way to sample row `row` (its own last): the history the row's distribution follows."""
    if row == 0:
        return []
    parent = parents[row - 1] if parents else row - 1
    return [*path_tokens(parents, drafts, parent), drafts[row - 1]]


def children(parents: Sequence[int], num_drafts: int) -> list[list[int]]:
    """children[r]: the sample rows hanging off row r, in draft order."""
    out: list[list[int]] = [[] for _ in range(num_drafts + 1)]
    for i in range(num_drafts):
        out[parents[i] if parents else i].append(i + 1)
    return out


def visible_entries(parents: Sequence[int], first_row_entry: int, root_row: int, num_drafts: int) -> list[int]:
    """For the drafts' rows: how many of the sequence's KV entries each sees besides its own (a chain row sees every
    entry before it). `first_row_entry`: the entry of the sequence's first row this step; `root_row`: the row (of
    this step's) holding the last real token."""
    root_entry = first_row_entry + root_row
    return [root_entry + d for d in depths(parents, num_drafts)]
