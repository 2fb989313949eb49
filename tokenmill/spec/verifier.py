"""Lossless verification of draft tokens against the target model's distributions.

A sequence with drafts d_1..d_k is scheduled for k + 1 sample rows: row i holds the target's distribution for the
token after d_1..d_i (row 0: after the last accepted token). Verification walks the rows in order:
- greedy: d_{i+1} is accepted while it is the target's own choice at row i;
- sampling (Leviathan et al. 2023, with a one-hot draft distribution q): d_{i+1} is accepted with probability
  min(1, p(d)/q(d)) = p(d); on rejection the row's token is drawn from norm(max(0, p - q)), which is p without d.
The first row that does not accept yields the sequence's last token, or, when every draft is accepted, the bonus
token drawn from row k. Each emitted token is thereby distributed exactly as the target would sample it, for every
sampling parameter the rows' distributions carry (temperature, top-k/p, min-p, penalties over the history up to that
row, blocked tokens), and seeded requests draw only from their own generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tokenmill.sampler.sampler import Sampler, SamplingRow, TokenLogprobs


@dataclass
class Verified:
    """One sequence's outcome: the emitted tokens (accepted drafts, then one from the target) and their logprobs."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]

    @property
    def num_accepted(self) -> int:
        return len(self.token_ids) - 1


def verify(sampler: Sampler, logits: torch.Tensor, rows: Sequence[SamplingRow],
           drafts: Sequence[Sequence[int]]) -> list[Verified]:
    """`logits` [sum(len(d) + 1), vocab]: each sequence's rows in order, `rows` their sampling rows (histories
    including the drafts before each row); `drafts` per sequence. Returns one `Verified` per sequence."""
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
            accepted = _matching_prefix(tokens, drafts[s])
            out[s] = Verified(tokens[: accepted + 1], picked.logprobs[at : at + accepted + 1])
            at += count
    for s in range(len(drafts)):
        if out[s] is None:
            out[s] = _rejection_sample(sampler, logits[starts[s] : starts[s + 1]], rows[starts[s] : starts[s + 1]],
                                       drafts[s])
    return [v for v in out if v is not None]


def _matching_prefix(choices: Sequence[int], draft: Sequence[int]) -> int:
    accepted = 0
    while accepted < len(draft) and choices[accepted] == draft[accepted]:
        accepted += 1
    return accepted


def _rejection_sample(sampler: Sampler, logits: torch.Tensor, rows: Sequence[SamplingRow],
                      draft: Sequence[int]) -> Verified:
    probs = sampler.probabilities(logits, rows)
    generator = rows[0].generator or sampler.generator
    tokens: list[int] = []
    for i, token in enumerate(draft):
        # One uniform per draft token, from the request's own generator when it has one.
        u = torch.rand((), generator=generator, device=generator.device if generator is not None else "cpu")
        if float(u) < float(probs[i, token]):
            tokens.append(token)
            continue
        residual = probs[i : i + 1].clone()
        residual[0, token] = 0.0
        tokens.append(sampler.draw(residual, rows[i : i + 1]))
        break
    else:
        tokens.append(sampler.draw(probs[len(draft) : len(draft) + 1], rows[len(draft) :]))
    used = len(tokens)
    logprobs = sampler.logprobs(logits[:used], torch.tensor(tokens, dtype=torch.long, device=logits.device),
                                rows[:used])
    return Verified(tokens, logprobs)
