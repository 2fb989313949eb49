"""The drafter interface: given a sequence's tokens, guess the tokens that follow."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence


class Proposer(ABC):
    """Guesses continuations of sequences; the target model verifies them, so a guess is never wrong, only wasted.

    Contract (every implementation):
    - `propose(request_id, prompt_token_ids, output_token_ids, max_tokens)` returns at most `max_tokens` token ids
      that could follow prompt + output. It may return fewer, or none when it has no guess. It only reads the lists
      (they belong to the request and grow between calls: tokens are only ever appended, never changed).
    - It may keep per-request state (an index over the tokens) keyed by `request_id`; `drop(request_id)` releases
      it, and a later call for the same id starts afresh. The same tokens give the same guesses.
    - It is cheap next to a model step for a whole batch: it runs for every decoding request every step.
    - Draft distributions: `one_hot` says the guesses are deterministic (q is one-hot), which the verifier's
      rejection rule relies on; a sampled drafter would hand back its probabilities instead.
    """

    one_hot: bool = True

    @abstractmethod
    def propose(self, request_id: str, prompt_token_ids: Sequence[int], output_token_ids: Sequence[int],
                max_tokens: int) -> list[int]: ...

    @abstractmethod
    def drop(self, request_id: str) -> None: ...
