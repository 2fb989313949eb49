"""What the engine hands back: per request, cumulative results plus what is new since the last step."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.sampler.sampler import TokenLogprobs


@dataclass
class RequestOutput:
    """With `output_kind="cumulative"` (the default) `text`, `token_ids` and `logprobs` hold everything so far;
    with "delta" they hold only what is new since the previous output, like the `delta_*` fields always do."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop", "length" or "abort" once finished
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it, if any
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    num_output_tokens: int = 0  # generated so far, whatever the output kind
    delta_logprobs: list[TokenLogprobs] | None = None
    # With prompt_logprobs: one entry per prompt token, None for the first (nothing predicts it). In every
    # cumulative output; in the first delta output only.
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def merge_delta(self, later: RequestOutput) -> None:
        """Fold the request's next delta output into this one (also a delta, or the sum of earlier ones), so that
        a consumer can take several steps' worth at once, or put a whole result together, in O(new tokens)."""
        self.text += later.text
        self.token_ids.extend(later.token_ids)
        if self.delta_token_ids is not self.token_ids:
            self.delta_token_ids.extend(later.delta_token_ids)
        self.delta_text += later.delta_text
        if self.logprobs is not None and later.logprobs is not None:
            self.logprobs.extend(later.logprobs)
        if self.delta_logprobs is not None and later.delta_logprobs is not None \
                and self.delta_logprobs is not self.logprobs:
            self.delta_logprobs.extend(later.delta_logprobs)
        self.prompt_logprobs = self.prompt_logprobs or later.prompt_logprobs
        self.finish_reason, self.stop_reason = later.finish_reason, later.stop_reason
        self.num_output_tokens, self.num_cached_tokens = later.num_output_tokens, later.num_cached_tokens


@dataclass
class CompletionOutput:
    """One sampled sequence of a prompt (there are `n` of them)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprobs] | None = None
    stop_reason: str | int | None = None


@dataclass
class GenerationResult:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # with SamplingParams.prompt_logprobs

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason
