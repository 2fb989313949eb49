"""Prompt-lookup drafting replayed over recorded greedy outputs: verify steps counted, nothing timed.

Under greedy decoding a draft token is accepted exactly when it is the token the model wrote at that place, so the
number of verify steps a drafter needs for a recorded output depends on the output and the drafter alone. Replays
answer what timed runs answer only with noise: the tokens per step of a chain drafter and its settings, what a
drafter verifying W branches per step (a token tree) would accept, and how much of the output could be copied from
its context at all. A step-cost model (seconds per step by rows, as the engine measures it) turns steps and rows
into a projected decode speedup; the engine's own per-step work outside the forward pass is not in it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tokenmill.spec.adaptive import Acceptance, choose_draft_lengths

# (prompt + output so far, at most this many tokens) -> the guess
Guess = Callable[[Sequence[int], int], list[int]]


@dataclass
class Replay:
    """Totals over one or more replayed outputs. `tokens`: output tokens after the first (the prefill's), each
    emitted by a verify step; `rows`: rows verified (1 + drafts per step, shared tree prefixes counted once)."""

    tokens: int = 0
    steps: int = 0
    rows: int = 0
    drafted: int = 0
    accepted: int = 0
    seconds: float = 0.0  # the verify steps under the cost model
    plain_seconds: float = 0.0  # one 1-row step per token

    def __add__(self, other: Replay) -> Replay:
        return Replay(*(getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__))

    def add_step(self, rows: int, accepted: int, cost: Callable[[int], float]) -> None:
        """One verify step of `rows` rows (1 + draft tokens) that accepted `accepted` drafts."""
        self.steps += 1
        self.rows += rows
        self.drafted += rows - 1
        self.accepted += accepted
        self.tokens += accepted + 1
        self.seconds += cost(rows)

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def speedup(self) -> float:
        return self.plain_seconds / self.seconds if self.seconds else 0.0


def _matched(guess: Sequence[int], truth: Sequence[int]) -> int:
    n = 0
    while n < len(guess) and n < len(truth) and guess[n] == truth[n]:
        n += 1
    return n


def replay_chain(prompt: Sequence[int], output: Sequence[int], guess: Guess, max_draft: int,
                 cost: Callable[[int], float], adaptive: bool = True) -> Replay:
    """One chain per step, as the engine's speculator drafts for a request decoding alone: the guess (at most
    `max_draft` tokens, never past the output's end), cut by the adaptive choice from the request's acceptance
    rate and `cost` when `adaptive`."""
    rate = Acceptance()
    out = Replay(plain_seconds=(len(output) - 1) * cost(1))
    i = 1
    while i < len(output):
        draft = guess([*prompt, *output[:i]], min(max_draft, len(output) - i - 1))
        if adaptive and draft:
            draft = draft[: choose_draft_lengths([rate.rate], [len(draft)], 1, cost)[0]]
        if adaptive and not draft:
            rate.forget()
        accepted = _matched(draft, output[i:])
        if draft:
            rate.observe(len(draft), accepted)
        out.add_step(1 + len(draft), accepted, cost)
        i += accepted + 1
    return out


def lookup_branches(tokens: Sequence[int], width: int, length: int, min_n: int, max_n: int) -> list[list[int]]:
    """Up to `width` distinct continuations of `length` tokens: what followed the earlier occurrences of the
    sequence's last n tokens, longest n first (max_n down to min_n), most recent occurrence first."""
    branches: list[list[int]] = []
    end = len(tokens)
    for n in range(min(max_n, end - 1), min_n - 1, -1):
        suffix = list(tokens[end - n:])
        for start in range(end - 1, n - 1, -1):  # the continuation starts at `start`
            if list(tokens[start - n:start]) == suffix:
                branch = list(tokens[start:start + length])
                if branch not in branches:
                    branches.append(branch)
                    if len(branches) == width:
                        return branches
    return branches


def tree_rows(branches: Sequence[Sequence[int]]) -> int:
    """Rows of a token tree holding these branches: the root's row plus one per distinct prefix."""
    return 1 + len({tuple(b[:j]) for b in branches for j in range(1, len(b) + 1)})


def replay_tree(prompt: Sequence[int], output: Sequence[int], width: int, max_draft: int, min_n: int, max_n: int,
                cost: Callable[[int], float]) -> Replay:
    """`width` lookup branches per step, all verified at once; the step keeps the longest accepted one. Width 1 is
    the chain drafter without adaptive lengths."""
    out = Replay(plain_seconds=(len(output) - 1) * cost(1))
    i = 1
    while i < len(output):
        context = [*prompt, *output[:i]]
        branches = lookup_branches(context, width, min(max_draft, len(output) - i - 1), min_n, max_n)
        accepted = max((_matched(b, output[i:]) for b in branches), default=0)
        out.add_step(tree_rows(branches), accepted, cost)
        i += accepted + 1
    return out


def copy_bound(prompt: Sequence[int], output: Sequence[int], max_draft: int) -> Replay:
    """Tokens per step if every step's draft were the longest run (at most `max_draft`) of the coming output that
    occurs anywhere in the context: no lookup drafter, chain or tree, accepts more. Steps only (no rows, no cost)."""
    out = Replay()
    i = 1
    while i < len(output):
        context = [*prompt, *output[:i]]
        accepted = 0
        while accepted < min(max_draft, len(output) - i - 1) and _occurs(output[i:i + accepted + 1], context):
            accepted += 1
        out.steps += 1
        out.tokens += accepted + 1
        i += accepted + 1
    return out


def _occurs(run: Sequence[int], context: Sequence[int]) -> bool:
    n = len(run)
    run = list(run)
    return any(context[j] == run[0] and list(context[j:j + n]) == run for j in range(len(context) - n + 1))
