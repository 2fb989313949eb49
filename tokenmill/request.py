"""A generation request as the scheduler sees it: tokens so far and how many of them have KV computed."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from tokenmill.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    PAUSED = "paused"  # out of the batch but holding its KV: back in the policy's queue, resumed without recompute
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # failed on its own (a step that ran it alone raised); other requests go on

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED,
                        RequestStatus.FINISHED_ERROR)


@dataclass(eq=False)  # identity: queues find and drop requests by object, never by comparing their token lists
class Request:
    """`num_tokens` grows as tokens are sampled; `num_computed_tokens` catches up step by step.

    A request gets a new token whenever a step brings `num_computed_tokens` up to `num_tokens`: that is the one rule
    behind prefill (many tokens to catch up), chunked prefill (caught up over several steps), decode (one token behind)
    and recompute after preemption (computed count reset to zero).
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache or a fork at admission
    fork_of: str | None = None  # a sibling (n > 1) whose prompt KV this request may share
    cache_salt: str | None = None  # prefix-cache partition: only requests with the same salt share cached blocks
    priority: int = 0  # lower first, under the priority policy (vLLM's meaning)
    client_id: str | None = None  # whose service this is, for the fair policy and per-client accounting
    arrival_step: int = 0  # the scheduler step it arrived at (the clock of SJF aging)
    # Prompt tokens already counted as service to the client: recomputing them after a preemption is not service.
    num_prompt_tokens_charged: int = 0
    # Prompt tokens after the first already scored for prompt_logprobs (a recompute does not score them again).
    num_prompt_logprobs: int = 0
    # Guessed next tokens (speculative decoding), scheduled after the real ones and verified by the step; they are
    # consumed when scheduled, and never part of `num_tokens`, the token lists or the prefix cache.
    draft_token_ids: list[int] = field(default_factory=list)
    # With a token tree (spec/tree.py): the row each draft follows; empty for a chain. Read only with the drafts it
    # came with (set together), as far as they are kept.
    draft_parents: list[int] = field(default_factory=list)
    # Where the request is in its structured-output grammar (tokenmill.structured.grammar.Matcher), or None.
    grammar: Any = None
    # The output side's bookkeeping (tokenmill.output.processor.RequestState: stop checks, text so far), kept on the
    # request so that the scheduler's registry is the one table of live requests.
    output_state: Any = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Token ids in [start, end) of prompt + output without building the concatenation."""
        prompt_len = len(self.prompt_token_ids)
        if end <= prompt_len:
            return self.prompt_token_ids[start:end]
        if start >= prompt_len:
            return self.output_token_ids[start - prompt_len : end - prompt_len]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - prompt_len]

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None
