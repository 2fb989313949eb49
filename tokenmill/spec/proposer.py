"""The drafter interface: given a sequence's tokens, guess the tokens that follow."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from tokenmill.spec.tree import DraftTree


@dataclass(frozen=True)
class DraftRequest:
    """One request's ask in a batched `propose_batch`: at most `max_tokens` guesses after prompt + output.
    `target_blocks`: the request's block table in the target's KV cache, whose first `target_entries` positions hold
    the target's K/V of the request's first tokens, for a drafter that may copy them (spec/target_kv.py); empty
    when the engine lends no cache."""

    request_id: str
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    max_tokens: int
    target_blocks: Sequence[int] = ()
    target_entries: int = 0


class Proposer(ABC):
    """Guesses continuations of sequences; the target model verifies them, so a guess is never wrong, only wasted.

    Contract (every implementation):
    - `propose(request_id, prompt_token_ids, output_token_ids, max_tokens)` returns at most `max_tokens` token ids
      that could follow prompt + output. It may return fewer, or none when it has no guess. It only reads the lists
      (they belong to the request and grow between calls: tokens are only ever appended, never changed).
      `propose_batch` does the same for several requests at once, in order; a drafter that runs a model batches
      them into its steps.
    - It may keep per-request state (an index over the tokens, a draft model's KV) keyed by `request_id`;
      `drop(request_id)` releases it, and a later call for the same id starts afresh. The same tokens give the same
      guesses. Drafts the target rejected are simply absent from the next call's tokens: the proposer must notice
      that its state ran ahead of the request and roll it back itself.
    - `free`: True when guessing costs next to nothing (a lookup), so the speculator asks for the most and trims.
      False when each guess costs a model step: the speculator then chooses every request's length first (from
      acceptance rates, the target's step cost and `draft_seconds`) and the proposer fills it whenever it can.
    - `draft_seconds(num_seqs, depth)`: the time to guess `depth` tokens for each of `num_seqs` requests (0 for a
      free proposer). `catch_up_seconds(request_id, num_tokens)`: what the first of those steps costs on top for
      this request, whose tokens number `num_tokens`, because the drafter's state lags it by more than the one
      token a draft step feeds (a draft model's KV after steps without drafts); 0 for a state that keeps up.
    - `propose_trees(requests, width)`: token trees (spec/tree.py) instead of chains, with up to `width` tokens
      per depth where the drafter has that many candidates; a chain is a tree of width 1, which every drafter
      returns by default. A tree keeps tree.py's shape (a chain with leaves off it) and at most `max_drafts` tokens.
    - Draft distributions: `one_hot` says the guesses are deterministic given the tokens (q is one-hot), which the
      verifier's rejection rule relies on; a sampled drafter would hand back its probabilities instead.
    - `observe(request_id, draft, choices, num_accepted)`: after a step verified a chain `draft` that this proposer
      gave the request, the target's choice at each of the k + 1 rows (row i: after the last token and draft[:i])
      and how many drafts were accepted. Only drafters that learn from the rows past the accepted ones (lookahead)
      use it; by default it does nothing.
    """

    one_hot: bool = True
    free: bool = True

    @abstractmethod
    def propose(self, request_id: str, prompt_token_ids: Sequence[int], output_token_ids: Sequence[int],
                max_tokens: int) -> list[int]: ...

    @abstractmethod
    def drop(self, request_id: str) -> None: ...

    def propose_batch(self, requests: Sequence[DraftRequest]) -> list[list[int]]:
        return [self.propose(r.request_id, r.prompt_token_ids, r.output_token_ids, r.max_tokens) for r in requests]

    def propose_trees(self, requests: Sequence[DraftRequest], width: int, max_drafts: int) -> list[DraftTree]:
        return [DraftTree(tuple(chain[:max_drafts])) for chain in self.propose_batch(requests)]

    def draft_seconds(self, num_seqs: int, depth: int) -> float:
        return 0.0

    def catch_up_seconds(self, request_id: str, num_tokens: int) -> float:
        return 0.0

    def observe(self, request_id: str, draft: Sequence[int], choices: Sequence[int], num_accepted: int) -> None:
        return None
