"""A draft model's LM head over part of the vocabulary (FR-Spec, Zhao et al. 2025): a large vocabulary makes the head
a large share of a small draft model's step (docs/benchmarks.md has the bytes), and most of its rows are tokens a
draft almost never needs to guess.

The draft scores only the `size` lowest token ids and the tokenizer's stop tokens. In a byte-level BPE vocabulary the
ids are the merge order, and a merge was made because its pair was frequent in the tokenizer's training text, so
the low ids are the frequent tokens (SentencePiece vocabularies are ordered by score, to the same effect); this
needs no corpus and no file beside the model. Besides those, each row may name the tokens of its own request
(the draft-model proposer passes them): code and answers copy identifiers from their prompt, rare ones too, which
the low ids lack. Any other token is never drafted, so a draft that would have named it is
lost, never wrong: the verifier judges drafts against the target's full distribution, and a
draft deterministic given the tokens keeps the one-hot rejection rule exact. The off switch is `None` (the whole
head).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from tokenmill.model.linear import GgufQ8Linear, Int8Linear, Linear


def draft_vocabulary(vocab_size: int, size: int, always: Iterable[int] = ()) -> torch.Tensor:
    """The ids a reduced draft head scores, increasing: the `size` lowest and `always` (the stop tokens)."""
    if not 0 < size <= vocab_size:
        raise ValueError(f"a draft vocabulary holds between 1 and the model's {vocab_size} tokens, got {size}")
    extra = sorted({t for t in always if size <= t < vocab_size})
    return torch.cat([torch.arange(size), torch.tensor(extra, dtype=torch.long)])


class SubsetHead(Linear):
    """`head`'s outputs `ids` computed by a layer of the same format holding only those rows; every other output is
    -inf, so greedy choice, top-k and softmax over the whole vocabulary see only the subset.

    A row may also score tokens of its own request that the subset lacks (`set_rows`): a draft that copies an
    identifier from the prompt can still name it. Those few scores come from the whole head's rows, dequantized
    and multiplied in fp32, so they may round differently from the subset's; a guess stays a function of its own
    request's tokens, which is what the verifier's one-hot rule needs.
    """

    _CACHED_ROWS = 4096  # dequantized rows of the whole head kept for tokens the subset lacks

    def __init__(self, head: Linear, ids: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = head.in_features, head.out_features
        self.inner = head.select_rows(ids)
        self.register_buffer("ids", ids.to(torch.long))
        self.register_buffer("bias", None)
        self.__dict__["whole"] = head  # the model's own layer, outside this module's tree (its bytes are counted there)
        self._member = torch.zeros(self.out_features, dtype=torch.bool)
        self._member[ids] = True
        self._rows: dict[int, torch.Tensor] = {}
        self._seen: dict[str, tuple[int, list[int]]] = {}  # per request: tokens read so far, those outside the subset
        self._row_extras: list[list[int]] | None = None
        try:  # a layer that cannot give its rows (GGUF 4-bit heads, dropped float weights) keeps to the subset
            _float_rows(head, ids[:1])
            self.extends = True
        except (NotImplementedError, RuntimeError):
            self.extends = False

    def set_rows(self, rows: Sequence[tuple[str, Sequence[int]]] | None) -> None:
        """For the next call: per output row, its request's id and tokens (prompt and output: they only grow, so
        each call reads only the new ones); None: the subset alone."""
        if rows is None or not self.extends:
            self._row_extras = None
            return
        extras = []
        for request_id, tokens in rows:
            read, outside = self._seen.get(request_id, (0, []))
            if read > len(tokens):  # a new request under an id that was not forgotten
                read, outside = 0, []
            new = torch.tensor(tokens[read:], dtype=torch.long)
            if len(new):
                outside = outside + sorted(set(new[~self._member[new]].tolist()) - set(outside))
            self._seen[request_id] = (len(tokens), outside)
            extras.append(outside)
        self._row_extras = extras

    def forget(self, request_id: str) -> None:
        self._seen.pop(request_id, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._spread(self.inner(x), x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._spread(self.inner.logits(x), x)

    def _spread(self, scores: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = scores.new_full((scores.shape[0], self.out_features), float("-inf"))
        out[:, self.ids] = scores
        extras, self._row_extras = self._row_extras, None
        if extras is None or not any(extras):
            return out
        if len(extras) != x.shape[0]:
            raise ValueError(f"set_rows gave {len(extras)} rows for a call with {x.shape[0]}")
        union = sorted({t for row in extras for t in row})
        at = {t: i for i, t in enumerate(union)}
        whole = self.__dict__["whole"]
        extra_scores = x.float() @ self._whole_rows(union).T  # [rows, union]
        if whole.bias is not None:
            extra_scores += whole.bias[union].float()
        rows = torch.tensor([r for r, row in enumerate(extras) for _ in row])
        tokens = [t for row in extras for t in row]
        out[rows, torch.tensor(tokens)] = extra_scores[rows, torch.tensor([at[t] for t in tokens])].to(out.dtype)
        return out

    def _whole_rows(self, tokens: list[int]) -> torch.Tensor:
        missing = [t for t in tokens if t not in self._rows]
        if missing:
            if len(self._rows) + len(missing) > self._CACHED_ROWS:
                self._rows.clear()
            rows = _float_rows(self.__dict__["whole"], torch.tensor(missing))
            self._rows.update(zip(missing, rows, strict=True))
        return torch.stack([self._rows[t] for t in tokens])

    def weight_bytes(self) -> int:
        return self.inner.weight_bytes()


def _float_rows(head: Linear, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of the head's weights in fp32: exact for the GGUF 8-bit and int8 formats, whose `rows` (an embedding
    lookup's) round to the activation dtype."""
    if isinstance(head, GgufQ8Linear):
        return head.dequantized(ids)
    if isinstance(head, Int8Linear):
        return head.qweight[ids].float() * head.scales[ids].float()[:, None]
    return head.rows(ids).float()
