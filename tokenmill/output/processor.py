"""Per-request output bookkeeping: stop conditions, incremental text, stop strings, logprobs."""

from __future__ import annotations

from tokenmill.output.detokenizer import IncrementalDetokenizer
from tokenmill.output.types import RequestOutput
from tokenmill.request import Request, RequestStatus
from tokenmill.sampler.sampler import TokenLogprobs
from tokenmill.tokenizer import Tokenizer


class RequestState:
    """Turns a request's sampled tokens into text, finishing it on stop tokens, stop strings or length."""

    def __init__(self, request: Request, prompt: str | None, tokenizer: Tokenizer, max_model_len: int) -> None:
        self.request = request
        self.max_model_len = max_model_len
        params = request.params
        self.detokenizer = IncrementalDetokenizer(tokenizer, request.prompt_token_ids, params.skip_special_tokens)
        self.output = RequestOutput(request.request_id, prompt, request.prompt_token_ids,
                                    logprobs=[] if params.logprobs is not None else None)
        self.full_text = ""
        self.emitted_chars = 0
        # Text this long at the end could still be the start of a stop string, so streaming holds it back.
        self.holdback = max((len(s) for s in params.stop), default=1) - 1
        self.stop_token_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            self.stop_token_ids |= request.eos_token_ids

    def append_token(self, token_id: int, logprobs: TokenLogprobs | None) -> RequestStatus | None:
        """Record a sampled token; return the finishing status if the request is now done."""
        request, params, out = self.request, self.request.params, self.output
        request.output_token_ids.append(token_id)
        out.token_ids.append(token_id)
        out.delta_token_ids.append(token_id)
        if out.logprobs is not None and logprobs is not None:
            out.logprobs.append(logprobs)
        if token_id in self.stop_token_ids:  # the sampler blocks them while min_tokens is unmet
            out.stop_reason = token_id if token_id in params.stop_token_ids else None
            return RequestStatus.FINISHED_STOPPED
        status = self._append_text(token_id)
        if status is not None:
            return status
        if request.num_output_tokens >= params.max_tokens or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _append_text(self, token_id: int) -> RequestStatus | None:
        params = self.request.params
        previous_len = len(self.full_text)
        self.full_text += self.detokenizer.add_tokens([token_id])
        if not params.stop or self.request.num_output_tokens < params.min_tokens:
            return None
        search_from = max(0, previous_len - self.holdback)
        for stop in params.stop:
            index = self.full_text.find(stop, search_from)
            if index >= 0:
                self.full_text = self.full_text[:index]
                self.output.stop_reason = stop
                return RequestStatus.FINISHED_STOPPED
        return None

    def take_output(self, finish_reason: str | None) -> RequestOutput:
        """The cumulative output with this step's delta, then reset the delta for the next step."""
        out = self.output
        out.finish_reason = finish_reason
        if finish_reason is not None:
            self.full_text += self.detokenizer.flush() if out.stop_reason is None else ""
            visible = len(self.full_text)
        else:
            visible = max(self.emitted_chars, len(self.full_text) - self.holdback)
        out.text = self.full_text[:visible]
        out.delta_text = self.full_text[self.emitted_chars:visible]
        self.emitted_chars = visible
        snapshot = RequestOutput(**{**out.__dict__, "token_ids": list(out.token_ids),
                                    "delta_token_ids": list(out.delta_token_ids),
                                    "logprobs": None if out.logprobs is None else list(out.logprobs)})
        out.delta_token_ids.clear()
        return snapshot
