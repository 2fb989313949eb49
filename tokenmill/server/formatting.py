"""Pieces of OpenAI response bodies: token texts and bytes, logprobs in both shapes, usage, SSE framing."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from tokenmill.sampler.sampler import TokenLogprobs
from tokenmill.tokenizer import Tokenizer

# JSON has no -Infinity: a logprob of a token the sampler had filtered out is reported as this instead.
MIN_LOGPROB = -9999.0
_REPLACEMENT = "\ufffd"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else MIN_LOGPROB


class TokenTexts:
    """Per-token text and exact bytes, cached. Byte-level BPE tokens can hold part of a UTF-8 character: their
    text is then written OpenAI's way, `bytes:\\xe2\\x80`, and `bytes` carries the real bytes."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}

    def get(self, token_id: int) -> tuple[str, bytes]:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._compute(token_id)
        return cached

    def text(self, token_id: int) -> str:
        return self.get(token_id)[0]

    def _compute(self, token_id: int) -> tuple[str, bytes]:
        decoded = self._tokenizer.decode([token_id])
        if _REPLACEMENT not in decoded:
            return decoded, decoded.encode("utf-8")
        raw = self._tokenizer.token_bytes(token_id)
        if raw is not None:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw
        return decoded, decoded.encode("utf-8")

    # ---- logprobs --------------------------------------------------------------------------------------------

    def completion_logprobs(self, entries: Sequence[TokenLogprobs], text_offset: int, first_token: int | None = None
                            ) -> tuple[dict[str, Any], int]:
        """The legacy completions shape for these tokens, and the text offset after them. `first_token` leads with
        an echoed prompt's first token, which nothing predicts: null logprob and top list, as in the OpenAI API."""
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top_logprobs: list[dict[str, float] | None] = []
        offsets: list[int] = []
        if first_token is not None:
            tokens.append(self.text(first_token))
            token_logprobs.append(None)
            top_logprobs.append(None)
            offsets.append(text_offset)
            text_offset += len(tokens[0])
        for entry in entries:
            text = self.text(entry.token_id)
            top = {self.text(token_id): _finite(logprob) for token_id, logprob in entry.top}
            top.setdefault(text, _finite(entry.logprob))  # the sampled token is always listed
            tokens.append(text)
            token_logprobs.append(_finite(entry.logprob))
            top_logprobs.append(top)
            offsets.append(text_offset)
            text_offset += len(text)
        shape = {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                 "text_offset": offsets}
        return shape, text_offset

    def chat_logprobs(self, entries: Sequence[TokenLogprobs]) -> dict[str, Any]:
        """The chat shape: `{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`."""
        return {"content": [{**self._chat_entry(entry.token_id, entry.logprob),
                             "top_logprobs": [self._chat_entry(t, lp) for t, lp in entry.top]}
                            for entry in entries]}

    def _chat_entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = self.get(token_id)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(raw)}
