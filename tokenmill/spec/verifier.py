"""Lossless verification of draft tokens against the target model's distributions.

A sequence with drafts d_1..d_k is scheduled for k + 1 sample rows: row i holds the target's distribution for the
token after d_1..d_i (row 0: after the last accepted token). Verification walks the rows in order:
- greedy: d_{i+1} is accepted while it is the target's own choice at row i;
- sampling (Leviathan et al. 2023, with a one-hot draft distribution q): d_{i+1} is accepted with probability
  min(1, p(d)/q(d)) = p(d); on rejection the row's token is drawn from norm(max(0, p - q)), which is p without d.
  Both at once, by coupling: the row's token t is drawn from p exactly as decoding without drafts draws it (the same
  function, the same generator), and d_{i+1} is accepted when t = d_{i+1}; otherwise t is the rejection's draw.
The first row that does not accept yields the sequence's last token, or, when every draft is accepted, the bonus
token drawn from row k. Each emitted token is thereby distributed exactly as the target would sample it, for every
sampling parameter the rows' distributions carry (temperature, top-k/p, min-p, penalties over the history up to that
row, blocked tokens). More: a seeded request takes one uniform per emitted token from its own generator, as it
would without drafts, so its tokens are those it gets without speculation, whatever the drafts and whatever else is
batched.

A token tree (spec/tree.py) is walked from row 0 down: greedy takes the child carrying the target's choice; sampling
takes the child carrying the row's draw t, if any. That is SpecInfer's multi-branch rule with one-hot drafts (the
row's children tried in order, child c accepted with probability p'(c), p' being the row's distribution with the
children tried before removed and renormalized; when none is accepted the token is drawn from that residual): child
c is accepted with probability p(c) either way, and t outside the children follows that residual. A chain is the
tree with one child per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tokenmill.sampler.sampler import Sampler, SamplingRow, TokenLogprobs
from tokenmill.spec.tree import children


@dataclass
class Verified:
    """One sequence's outcome: the emitted tokens (accepted drafts, then one from the target), their logprobs, the
    sample rows of the accepted drafts (a chain's: 1, 2, ...), and the target's choice at every row (greedy: its
    token; sampling: the likeliest token of the row's distribution), rows past the rejected ones included."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]
    path: list[int]
    choices: list[int]

    @property
    def num_accepted(self) -> int:
        return len(self.token_ids) - 1


def verify(sampler: Sampler, logits: torch.Tensor, rows: Sequence[SamplingRow], drafts: Sequence[Sequence[int]],
           parents: Sequence[Sequence[int]] | None = None) -> list[Verified]:
    """`logits` [sum(len(d) + 1), vocab]: each sequence's rows in order, `rows` their sampling rows (histories
    including the drafts on the way to each row); `drafts` per sequence, `parents` per sequence its tree's (empty
    for a chain). Returns one `Verified` per sequence."""
    trees = parents or [()] * len(drafts)
    starts = [0]
    for d in drafts:
        starts.append(starts[-1] + len(d) + 1)
    if starts[-1] != logits.shape[0] or len(rows) != logits.shape[0]:
        raise ValueError(f"{len(drafts)} sequences need {starts[-1]} rows, got {logits.shape[0]} logits and "
                         f"{len(rows)} sampling rows")
    out: list[Verified | None] = [None] * len(drafts)
    greedy = [s for s in range(len(drafts)) if rows[starts[s]].params.greedy]
    if greedy:  # the target's choices at every row at once; a sequence keeps them up to the first mismatch
        index = [r for s in greedy for r in range(starts[s], starts[s + 1])]
        picked = sampler(logits[torch.tensor(index, dtype=torch.long, device=logits.device)], [rows[r] for r in index])
        at = 0
        for s in greedy:
            count = len(drafts[s]) + 1
            tokens = picked.token_ids[at : at + count]
            path = _greedy_path(tokens, drafts[s], trees[s])
            out[s] = Verified([drafts[s][r - 1] for r in path] + [tokens[path[-1] if path else 0]],
                              [picked.logprobs[at + r] for r in (0, *path)], path, tokens)
            at += count
    for s in range(len(drafts)):
        if out[s] is None:
            out[s] = _sample(sampler, logits[starts[s] : starts[s + 1]], rows[starts[s] : starts[s + 1]], drafts[s],
                             trees[s])
    return [v for v in out if v is not None]


def _greedy_path(choices: Sequence[int], draft: Sequence[int], parents: Sequence[int]) -> list[int]:
    """The rows accepted walking down from row 0, each the child carrying its parent row's choice (a chain: the
    drafts matching the target's choices, up to the first that does not)."""
    kids = children(parents, len(draft))
    path, row = [], 0
    while True:
        row = next((c for c in kids[row] if draft[c - 1] == choices[row]), 0)
        if not row:
            return path
        path.append(row)


def _sample(sampler: Sampler, logits: torch.Tensor, rows: Sequence[SamplingRow], draft: Sequence[int],
            parents: Sequence[int]) -> Verified:
    """Down the tree (a chain: one child per row), one draw per row reached, each as a row without drafts draws."""
    probs = sampler.probabilities(logits, rows)
    kids = children(parents, len(draft))
    path: list[int] = []
    tokens: list[int] = []
    row = 0
    while True:
        token = sampler.draw(probs[row : row + 1], rows[row : row + 1])
        tokens.append(token)
        row = next((c for c in kids[row] if draft[c - 1] == token), 0)
        if not row:
            break
        path.append(row)
    used = torch.tensor([0, *path], dtype=torch.long, device=logits.device)
    logprobs = sampler.logprobs(logits[used], torch.tensor(tokens, dtype=torch.long, device=logits.device),
                                [rows[r] for r in (0, *path)])
    return Verified(tokens, logprobs, path, probs.argmax(-1).tolist())
