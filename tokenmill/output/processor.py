"""Per-request output bookkeeping: stop conditions, incremental text, stop strings, logprobs."""

from __future__ import annotations

import re

from tokenmill.output.detokenizer import IncrementalDetokenizer
from tokenmill.output.types import RequestOutput
from tokenmill.request import Request, RequestStatus
from tokenmill.sampler.sampler import TokenLogprobs
from tokenmill.tokenizer import Tokenizer


class RequestState:
    """Turns a request's sampled tokens into text, finishing it on stop tokens, stop strings or length.

    Text is kept as the part already handed out plus a pending tail; the tail is searched for stop strings, so the
    work per token does not grow with the length of the output. In "delta" output mode nothing cumulative is kept
    for the outputs: each one carries only what is new.
    """

    def __init__(self, request: Request, prompt: str | None, tokenizer: Tokenizer, max_model_len: int) -> None:
        self.request = request
        self.max_model_len = max_model_len
        params = request.params
        self.cumulative = params.output_kind == "cumulative"
        self.detokenizer = IncrementalDetokenizer(tokenizer, request.prompt_token_ids, params.skip_special_tokens)
        self.prompt = prompt
        self.text = ""  # handed out so far (cumulative mode only)
        self.pending = ""  # decoded, not handed out yet: could still be the start of a stop string
        self.token_ids: list[int] = []  # cumulative mode only
        self.logprobs: list[TokenLogprobs] | None = [] if params.logprobs is not None and self.cumulative else None
        self.new_token_ids: list[int] = []
        # [None] + one per scored prompt token, complete by the first sampled token; None when not asked for.
        self.prompt_logprobs: list[TokenLogprobs | None] | None = None if params.prompt_logprobs is None else [None]
        self.prompt_logprobs_sent = False
        self.new_logprobs: list[TokenLogprobs] = []
        self.stop_reason: str | int | None = None
        # Text this long at the end could still be the start of a stop string, so streaming holds it back.
        self.holdback = max((len(s) for s in params.stop), default=1) - 1
        # One search per token for all stop strings; the leftmost match wins.
        self.stop_pattern = re.compile("|".join(map(re.escape, params.stop))) if params.stop else None
        self.stop_token_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            self.stop_token_ids |= request.eos_token_ids

    def add_prompt_logprobs(self, scored: list[TokenLogprobs]) -> None:
        if self.prompt_logprobs is not None:
            self.prompt_logprobs.extend(scored)

    def append_token(self, token_id: int, logprobs: TokenLogprobs | None) -> RequestStatus | None:
        """Record a sampled token; return the finishing status if the request is now done."""
        request, params = self.request, self.request.params
        request.output_token_ids.append(token_id)
        self.new_token_ids.append(token_id)
        if self.cumulative:
            self.token_ids.append(token_id)
        if params.logprobs is not None and logprobs is not None:
            self.new_logprobs.append(logprobs)
            if self.logprobs is not None:
                self.logprobs.append(logprobs)
        if token_id in self.stop_token_ids:  # the sampler blocks them while min_tokens is unmet
            self.stop_reason = token_id if token_id in params.stop_token_ids else None
            return RequestStatus.FINISHED_STOPPED
        status = self._append_text(token_id)
        if status is not None:
            return status
        if request.num_output_tokens >= params.max_tokens or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _append_text(self, token_id: int) -> RequestStatus | None:
        search_from = max(0, len(self.pending) - self.holdback)
        self.pending += self.detokenizer.add_tokens([token_id])
        if self.stop_pattern is None or self.request.num_output_tokens < self.request.params.min_tokens:
            return None
        match = self.stop_pattern.search(self.pending, search_from)
        if match is None:
            return None
        self.pending = self.pending[:match.start()]
        self.stop_reason = match.group()
        return RequestStatus.FINISHED_STOPPED

    def take_output(self, finish_reason: str | None) -> RequestOutput:
        """This step's output (cumulative or delta, per the request's output kind); resets what is new."""
        if finish_reason is not None:
            if self.stop_reason is None:
                self.pending += self.detokenizer.flush()
            visible = len(self.pending)
        else:
            visible = max(0, len(self.pending) - self.holdback)
        delta_text, self.pending = self.pending[:visible], self.pending[visible:]
        delta_ids, self.new_token_ids = self.new_token_ids, []
        delta_logprobs, self.new_logprobs = self.new_logprobs, []
        request = self.request
        want_logprobs = request.params.logprobs is not None
        if self.cumulative:
            self.text += delta_text
            text, token_ids = self.text, list(self.token_ids)
            logprobs = list(self.logprobs) if self.logprobs is not None else None
        else:
            text, token_ids, logprobs = delta_text, delta_ids, delta_logprobs if want_logprobs else None
        prompt_logprobs = self.prompt_logprobs if self.cumulative or not self.prompt_logprobs_sent else None
        self.prompt_logprobs_sent = True
        return RequestOutput(request.request_id, self.prompt, request.prompt_token_ids, text, token_ids, logprobs,
                             finish_reason, self.stop_reason, delta_text, delta_ids, request.num_cached_tokens,
                             request.num_output_tokens, delta_logprobs if want_logprobs else None,
                             prompt_logprobs)
