"""Grammars compiled with llguidance (chosen over xgrammar by `benchmarks/grammar_engines.py`), cached per
constraint, and one matcher per request that follows the tokens it emits."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import llguidance

from tokenmill.errors import InvalidRequestError
from tokenmill.structured.number_bounds import bound_numbers
from tokenmill.structured.params import StructuredOutputs

# JSON as json.dumps writes it: one space after ',' and ':', no newlines. Flexible whitespace lets a small model
# spend its tokens on runs of blank lines; a schema's "x-guidance" options still override this.
_JSON_STYLE: llguidance.JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ", ",
                                              "key_separator": ": "}


# Stop reasons of a matcher whose grammar is satisfied: nothing more can follow, or end-of-sequence was taken.
_COMPLETE_STOPS = frozenset({"NoExtension", "EndOfSentence"})


class Grammar:
    """A compiled constraint: a matcher in its start state that every request's matcher is copied from."""

    def __init__(self, template: llguidance.LLMatcher) -> None:
        self._template = template

    def matcher(self) -> Matcher:
        return Matcher(self._template.deep_copy())


class Matcher:
    """Where one request is in its grammar. Advanced only by tokens the request really emits (`accept`); drafts are
    checked without advancing it (`num_valid`)."""

    def __init__(self, inner: llguidance.LLMatcher) -> None:
        self.inner = inner

    def accept(self, token_id: int) -> bool:
        """Advance by one emitted token; False when the grammar does not allow it (the matcher is then broken)."""
        return bool(self.inner.consume_token(token_id))

    def num_valid(self, token_ids: Sequence[int]) -> int:
        """How many of `token_ids`, in order, the grammar allows from here (the state is unchanged)."""
        return int(self.inner.validate_tokens(list(token_ids))) if token_ids else 0

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and allows nothing more but an end-of-sequence token."""
        return bool(self.inner.is_stopped())

    @property
    def failed(self) -> bool:
        """Stopped without completing its grammar (a parser limit hit, a dead end): the output is not valid."""
        return self.inner.is_error() or (self.inner.is_stopped()
                                         and self.inner.stop_reason() not in _COMPLETE_STOPS)

    @property
    def error(self) -> str:
        return self.inner.get_error() or f"the grammar stopped: {self.inner.stop_reason()}"


class GrammarCompiler:
    """Compiles constraints for one tokenizer (`tokenizer_json`: the HF `tokenizers` JSON) over a vocabulary of
    `vocab_size` ids (the logits' width) with `eos_ids` allowed where the grammar is complete.

    Compiled grammars, and constraints that failed to compile, are kept in an LRU of `cache_size`. A compilation
    runs on a worker thread and is given up after `timeout_s` (a 400 for the client; llguidance's parser limits
    bound the work the abandoned thread still does), so a pathological schema cannot hold up the engine loop."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids: Sequence[int], timeout_s: float = 10.0,
                 cache_size: int = 256) -> None:
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=sorted(eos_ids))
        self.vocab_size = vocab_size
        self.timeout_s = timeout_s
        self._cache: OrderedDict[tuple[str, str], Grammar | InvalidRequestError] = OrderedDict()
        self._cache_size = cache_size
        # One compilation per constraint at a time: callers asking for one being compiled wait on the same future.
        self._inflight: dict[tuple[str, str], Future[Grammar]] = {}
        self._lock = threading.RLock()  # a compilation that is done at once stores its result in the caller
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tokenmill-grammar")
        self.num_compiled = 0
        self.num_cache_hits = 0

    def compile(self, spec: StructuredOutputs) -> Grammar:
        """The grammar of `spec`; raises InvalidRequestError naming `spec.field_name` when it cannot be compiled or
        its compilation runs past `timeout_s` (a timeout is not cached: the compilation goes on, and a later
        request finds its result)."""
        key = spec.key()
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                self.num_cache_hits += 1
            else:
                future = self._inflight.get(key)
                if future is None:
                    future = self._inflight[key] = self._pool.submit(self._build, key)
                    future.add_done_callback(lambda done, key=key: self._store(key, done))
        if cached is None:
            try:
                cached = future.result(timeout=self.timeout_s)
            except FutureTimeout:
                raise InvalidRequestError(spec.field_name, f"the grammar did not compile within "
                                          f"{self.timeout_s:g} s") from None
            except InvalidRequestError as exc:
                cached = exc
        if isinstance(cached, InvalidRequestError):
            raise InvalidRequestError(spec.field_name, cached.message)
        return cached

    def _store(self, key: tuple[str, str], done: Future[Grammar]) -> None:
        error = done.exception()
        if error is not None and not isinstance(error, InvalidRequestError):
            error = InvalidRequestError("", f"the grammar compiler failed: {type(error).__name__}: {error}")
        with self._lock:
            self._inflight.pop(key, None)
            self._cache[key] = error if error is not None else done.result()
            self.num_compiled += 1
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _build(self, key: tuple[str, str]) -> Grammar:
        kind, text = key
        bounded = _bounded_schema(text) if kind == "json" else None
        if bounded is not None:
            try:
                return self._compile(kind, bounded)
            except InvalidRequestError:  # the bounds conflict with the schema: compile it as it came
                pass
        return self._compile(kind, text)

    def _compile(self, kind: str, text: str) -> Grammar:
        try:
            if kind == "json":
                source = llguidance.LLMatcher.grammar_from_json_schema(text, defaults=_JSON_STYLE)
            elif kind == "regex":
                source = llguidance.LLMatcher.grammar_from_regex(text)
            elif kind == "choice":
                source = _choice_grammar(text)
            else:
                source = llguidance.LLMatcher.grammar_from_lark(text)
        except ValueError as exc:  # the schema is not valid JSON
            raise InvalidRequestError("", f"invalid {kind}: {exc}") from None
        matcher = llguidance.LLMatcher(self.tokenizer, source, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError("", f"invalid {kind}: {_first_line(matcher.get_error())}")
        probe = Matcher(matcher.deep_copy())  # the first step's mask: can this vocabulary start the output at all?
        probe.inner.compute_bitmask()
        if probe.failed:
            raise InvalidRequestError("", f"no output this {kind} allows can be written with the model's "
                                      "vocabulary")
        return Grammar(matcher)


def _choice_grammar(choices_json: str) -> str:
    """A Lark grammar whose language is exactly the given strings (JSON string literals are Lark literals)."""
    choices = json.loads(choices_json)
    return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))


def _bounded_schema(text: str) -> str | None:
    """The schema with bounded numbers (`number_bounds`), or None where that changes nothing or it is not JSON."""
    try:
        schema = json.loads(text)
    except ValueError:
        return None
    bounded = bound_numbers(schema)
    return json.dumps(bounded) if bounded != schema else None


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "rejected by the grammar compiler"
