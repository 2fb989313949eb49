"""A draft model's LM head over part of the vocabulary (FR-Spec, Zhao et al. 2025): a large vocabulary makes the head
a large share of a small draft model's step (docs/benchmarks.md has the bytes), and most of its rows are tokens a
draft almost never needs to guess.

The draft scores only the `size` lowest token ids and the tokenizer's stop tokens. In a byte-level BPE vocabulary the
ids are the merge order, and a merge was made because its pair was frequent in the tokenizer's training text, so
the low ids are the frequent tokens (SentencePiece vocabularies are ordered by score, to the same effect); this
needs no corpus and no file beside the model. A token outside the subset is never drafted, so a draft that would
have named it is lost, never wrong: the verifier judges drafts against the target's full distribution, and a
draft deterministic given the tokens keeps the one-hot rejection rule exact. The off switch is `None` (the whole
head).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from tokenmill.model.linear import Linear


def draft_vocabulary(vocab_size: int, size: int, always: Iterable[int] = ()) -> torch.Tensor:
    """The ids a reduced draft head scores, increasing: the `size` lowest and `always` (the stop tokens)."""
    if not 0 < size <= vocab_size:
        raise ValueError(f"a draft vocabulary holds between 1 and the model's {vocab_size} tokens, got {size}")
    extra = sorted({t for t in always if size <= t < vocab_size})
    return torch.cat([torch.arange(size), torch.tensor(extra, dtype=torch.long)])


class SubsetHead(Linear):
    """`head`'s outputs `ids` computed by a layer of the same format holding only those rows; every other output is
    -inf, so greedy choice, top-k and softmax over the whole vocabulary see only the subset."""

    def __init__(self, head: Linear, ids: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = head.in_features, head.out_features
        self.inner = head.select_rows(ids)
        self.register_buffer("ids", ids.to(torch.long))
        self.register_buffer("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._spread(self.inner(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._spread(self.inner.logits(x))

    def _spread(self, scores: torch.Tensor) -> torch.Tensor:
        out = scores.new_full((scores.shape[0], self.out_features), float("-inf"))
        out[:, self.ids] = scores
        return out

    def weight_bytes(self) -> int:
        return self.inner.weight_bytes()
