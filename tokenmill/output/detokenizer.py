"""Streaming token ids -> text without re-decoding the whole output at every step.

Byte-level BPE tokens are byte strings, so one character (an emoji, a CJK ideograph) can be split over
several tokens. Decoding only the tokens seen so far would produce U+FFFD for the partial character, and
that must never reach the user. We keep two offsets into the id list (the vLLM scheme):

* `prefix_offset`: start of a short window of already-emitted tokens decoded again for context, so that
  the decoder sees the same neighbours it would see when decoding the full sequence;
* `read_offset`: end of the emitted part; tokens after it are pending.

Each step decodes only `ids[prefix_offset:]`, which stays a handful of tokens long.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = ["IncrementalDetokenizer"]

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded along with the first outputs, as context for decoders that treat a leading token
# specially (e.g. stripping a sentencepiece space).
_PROMPT_CONTEXT_TOKENS = 5
# BPE tokens may straddle character boundaries, so a few consecutive tokens can all end mid-character. A run
# far longer than that means the model emits genuinely invalid bytes (or a real U+FFFD): emit them rather than
# buffering forever and re-decoding an ever longer window.
_MAX_PENDING_TOKENS = 16


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas that never end inside a character."""

    def __init__(self, tokenizer: _Decoder, prompt_token_ids: Sequence[int], skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids = self._prompt_context(list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:]))
        self._num_context = len(self._ids)
        self._prefix_offset = 0
        self._read_offset = self._num_context
        self._text = ""

    def _prompt_context(self, tail: list[int]) -> list[int]:
        # A prompt cut inside a character would make the context itself end in U+FFFD, and the first
        # output token completing it would then be mis-sliced; without context we stay exact.
        return [] if self._decode(tail).endswith(_REPLACEMENT) else tail

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    @property
    def text(self) -> str:
        """All text emitted so far (the full output once `flush()` has been called)."""
        return self._text

    @property
    def output_token_ids(self) -> list[int]:
        return self._ids[self._num_context:]

    def add_tokens(self, new_ids: Sequence[int]) -> str:
        """Record new output tokens; return the text they complete (possibly empty)."""
        # One at a time, so a batch is held back exactly as much as the same tokens streamed singly.
        return "".join([self._add_token(token_id) for token_id in new_ids])

    def _add_token(self, token_id: int) -> str:
        self._ids.append(token_id)
        delta = self._pending_text()
        pending = len(self._ids) - self._read_offset
        if delta.endswith(_REPLACEMENT) and pending <= _MAX_PENDING_TOKENS:
            return ""
        return self._emit(delta)

    def flush(self) -> str:
        """Emit whatever is still held back (e.g. a trailing partial character) and return it."""
        if self._read_offset == len(self._ids):
            return ""
        return self._emit(self._pending_text())

    def _pending_text(self) -> str:
        # Decoding the context window with and without the pending tokens and taking the difference gives the
        # pending tokens' text exactly as a full decode would render it.
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset:])
        return full_text[len(prefix_text):]

    def _emit(self, delta: str) -> str:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._text += delta
        return delta
