"""Prompt lookup (n-gram) drafting: find the sequence's latest earlier occurrence of its own last n tokens, in the
prompt or the output, and guess that the tokens which followed it then follow again now.

The longest n in [min_n, max_n] that matches wins; among its occurrences the most recent one. An index from each
n-gram to the end of its latest occurrence is kept per request and extended by the new tokens only, so a step costs
O(new tokens × n) per request whatever the context length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from tokenmill.spec.proposer import Proposer


@dataclass
class _Index:
    tokens: list[int] = field(default_factory=list)  # prompt + output so far (a copy: the index reads it a lot)
    ends: dict[tuple[int, ...], int] = field(default_factory=dict)  # n-gram -> end position of its latest occurrence
    indexed: int = 0  # n-grams ending before this position are in `ends`


class NgramProposer(Proposer):
    def __init__(self, min_n: int = 2, max_n: int = 4) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n} and {max_n}")
        self.min_n, self.max_n = min_n, max_n
        self._indexes: dict[str, _Index] = {}

    def propose(self, request_id: str, prompt_token_ids: Sequence[int], output_token_ids: Sequence[int],
                max_tokens: int) -> list[int]:
        if max_tokens <= 0:
            return []
        index = self._sync(request_id, prompt_token_ids, output_token_ids)
        tokens, length = index.tokens, len(index.tokens)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            end = index.ends.get(tuple(tokens[length - n:]))
            if end is not None:
                return tokens[end + 1 : end + 1 + max_tokens]
        return []

    def drop(self, request_id: str) -> None:
        self._indexes.pop(request_id, None)

    def _sync(self, request_id: str, prompt: Sequence[int], output: Sequence[int]) -> _Index:
        index = self._indexes.get(request_id)
        total = len(prompt) + len(output)
        if index is None or len(index.tokens) > total:
            index = self._indexes[request_id] = _Index()
        tokens = index.tokens
        if len(tokens) < len(prompt):
            tokens.extend(prompt[len(tokens):])
        tokens.extend(output[len(tokens) - len(prompt):])
        # Index every n-gram that ends before the last token: the last one's own n-grams are the query, and an
        # occurrence must have at least one token after it to guess from.
        ends, max_n = index.ends, self.max_n
        for end in range(index.indexed, len(tokens) - 1):
            for n in range(self.min_n, min(max_n, end + 1) + 1):
                ends[tuple(tokens[end - n + 1 : end + 1])] = end
        index.indexed = max(index.indexed, len(tokens) - 1)
        return index
