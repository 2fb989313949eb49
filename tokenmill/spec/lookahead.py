"""Lookahead decoding (Fu et al. 2024) on the verify rows: Jacobi iteration and an n-gram pool, no draft model.

Jacobi iteration guesses the next k tokens all at once and refines every guess in parallel: the target's choice at
position i, given the guesses before it, is the next guess for position i; guesses that have become the target's
own choices are accepted. The paper runs that iteration in a separate "lookahead branch" of W × (N - 1) extra rows
per step and verifies n-grams collected from its trajectories in a "verification branch". On a CPU every extra row
costs compute, so here the iteration rides on the verify rows themselves: a request's chain of drafts is the
current Jacobi guess, and the target's choices at the rows past the accepted drafts (which plain speculation throws
away) are the next guess. Each step also adds to the request's n-gram pool every N-gram "guesses, then the target's
choice after them" that the rows show; when the pool holds an n-gram starting with the request's last token, its
continuation is drafted instead (the paper's verification branch, one candidate per step: a chain).

State per request: the pool (first token -> the latest `pool_size` continuations of N - 1 tokens) and the guess,
anchored at the sequence length it continues. A guess whose anchor no longer matches (rejected drafts, a stop, a
preemption) is dropped; guesses are never wrong, only wasted, since the target verifies them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from tokenmill.spec.proposer import Proposer


@dataclass
class _State:
    pool: dict[int, list[tuple[int, ...]]] = field(default_factory=dict)
    guess: list[int] = field(default_factory=list)
    guess_at: int = -1  # sequence length the guess continues
    drafted_at: int = -1  # sequence length when the last draft was made
    last_token: int = -1  # the token before that draft


class LookaheadProposer(Proposer):
    def __init__(self, ngram_size: int = 4, pool_size: int = 8) -> None:
        if ngram_size < 2 or pool_size < 1:
            raise ValueError(f"need ngram_size >= 2 and pool_size >= 1, got {ngram_size} and {pool_size}")
        self.ngram_size, self.pool_size = ngram_size, pool_size
        self._states: dict[str, _State] = {}

    def propose(self, request_id: str, prompt_token_ids: Sequence[int], output_token_ids: Sequence[int],
                max_tokens: int) -> list[int]:
        length = len(prompt_token_ids) + len(output_token_ids)
        if max_tokens <= 0 or length == 0:
            return []
        state = self._states.setdefault(request_id, _State())
        last = output_token_ids[-1] if output_token_ids else prompt_token_ids[-1]
        continuations = state.pool.get(last)
        if continuations:
            draft = list(continuations[-1])
        elif state.guess_at == length and state.guess:
            draft = list(state.guess)
        else:  # a first guess: the sequence's own last tokens, which Jacobi iteration then refines
            tail = list(prompt_token_ids[-max_tokens:]) + list(output_token_ids[-max_tokens:])
            draft = tail[-max_tokens:]
        draft = self._extend(state, draft, max_tokens)[:max_tokens]
        state.drafted_at, state.last_token = length, last
        return draft

    def _extend(self, state: _State, draft: list[int], max_tokens: int) -> list[int]:
        """Continues a short draft with pool n-grams from its last token, while there are any."""
        while len(draft) < max_tokens:
            continuations = state.pool.get(draft[-1])
            if not continuations:
                break
            draft.extend(continuations[-1])
        return draft

    def observe(self, request_id: str, draft: Sequence[int], choices: Sequence[int], num_accepted: int) -> None:
        state = self._states.get(request_id)
        if state is None or len(choices) != len(draft) + 1 or not 0 <= num_accepted <= len(draft):
            return
        rows = [state.last_token, *draft]  # rows[i]: the token before row i's choice
        n = self.ngram_size
        for i in range(n - 2, len(draft) + 1):
            self._add(state, rows[i - n + 2 : i + 1] + [choices[i]])
        state.guess = list(choices[num_accepted + 1 :])
        state.guess_at = state.drafted_at + num_accepted + 1

    def _add(self, state: _State, ngram: list[int]) -> None:
        key, continuation = ngram[0], tuple(ngram[1:])
        kept = state.pool.setdefault(key, [])
        if continuation in kept:
            kept.remove(continuation)
        kept.append(continuation)  # the latest last
        del kept[: -self.pool_size]

    def drop(self, request_id: str) -> None:
        self._states.pop(request_id, None)
