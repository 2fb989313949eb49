"""Per-request sampling parameters, validated when the request is made."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from tokenmill.errors import InvalidRequestError
from tokenmill.structured.params import StructuredOutputs

__all__ = ["InvalidRequestError", "SamplingParams", "StructuredOutputs", "fan_out"]

_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts
# Stop strings are searched at every token of the request, on the engine thread that serves everyone: bounded.
MAX_STOP_STRINGS = 32
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS_TOKENS = 1024  # added to every step's logits of the request, on the engine thread: bounded too
OUTPUT_KINDS = ("cumulative", "delta")


@dataclass
class SamplingParams:
    """How to pick tokens for one request. `temperature == 0` (anything below 1e-5) means greedy.

    Penalties follow the OpenAI/vLLM conventions: `repetition_penalty` divides positive logits (multiplies negative
    ones) of tokens seen in the prompt or output; `presence_penalty` subtracts once per seen output token;
    `frequency_penalty` subtracts per occurrence in the output. `logit_bias` (OpenAI's) adds a value in [-100, 100]
    to a token's logit after the penalties, before temperature and the filters; -100 all but bans a token, 100 all
    but forces it. Logprobs stay those of the raw logits.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logit_bias: dict[int, float] | None = None  # token id -> bias in [-100, 100]
    logprobs: int | None = None  # None: no logprobs; k >= 0: chosen token's logprob plus the top-k
    # vLLM's meaning: the log-probability of every prompt token after the first given the ones before it, plus the
    # top-k at each position, from the raw logits (no temperature or penalties). Such a request skips prefix-cache
    # hits: a cached block's logits were never computed.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # "cumulative": every output holds all text, tokens and logprobs so far; "delta": only what is new since the
    # previous output (what a stream sends: O(1) per token instead of O(length)).
    output_kind: str = "cumulative"
    # A grammar the output must match (JSON schema, regex, choice...), enforced by masking each step's logits.
    structured_outputs: StructuredOutputs | None = None
    # logit_bias as (token ids, values) tensors, built once: the sampler adds them to every step's row.
    bias_tensors: tuple[torch.Tensor, torch.Tensor] | None = field(init=False, default=None, repr=False,
                                                                   compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is None:
            self.stop = []
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        self._validate()
        if self.logit_bias:
            self.bias_tensors = (torch.tensor(list(self.logit_bias), dtype=torch.long),
                                 torch.tensor(list(self.logit_bias.values()), dtype=torch.float32))

    def _validate(self) -> None:
        def check(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise InvalidRequestError(name, message)

        def is_number(value: object) -> bool:  # finite: inf or nan would turn whole logit rows into nan
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        def is_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        check(is_int(self.n) and self.n >= 1, "n", f"must be an integer >= 1, got {self.n!r}")
        check(is_number(self.temperature) and self.temperature >= 0, "temperature",
              f"must be a number >= 0, got {self.temperature!r}")
        check(is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p!r}")
        check(is_int(self.top_k) and self.top_k >= -1, "top_k",
              f"must be an integer, -1 or 0 to disable, got {self.top_k!r}")
        check(is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p!r}")
        check(is_number(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
              f"must be > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            check(is_number(value) and -2 <= value <= 2, name, f"must be in [-2, 2], got {value!r}")
        # n > 1 fans out to seeds seed .. seed + n - 1, all of which torch.Generator.manual_seed must accept.
        check(self.seed is None or (is_int(self.seed) and is_int(self.n) and self.seed >= _SEED_MIN
                                    and self.seed + self.n - 1 <= _SEED_MAX), "seed",
              f"must be a 64-bit integer (seed + n - 1 included), got {self.seed!r}")
        check(is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens",
              f"must be an integer >= 1, got {self.max_tokens!r}")
        check(is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens",
              f"must be an integer in [0, max_tokens], got {self.min_tokens!r}")
        check(isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop), "stop",
              f"must be a non-empty string or a list of non-empty strings, got {_short(self.stop)}")
        check(len(self.stop) <= MAX_STOP_STRINGS, "stop",
              f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        check(all(len(s) <= MAX_STOP_STRING_CHARS for s in self.stop), "stop",
              f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters long")
        check(isinstance(self.stop_token_ids, list) and all(is_int(t) and t >= 0 for t in self.stop_token_ids),
              "stop_token_ids", f"must be a list of non-negative integers, got {_short(self.stop_token_ids)}")
        check(len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS, "stop_token_ids",
              f"at most {MAX_STOP_TOKEN_IDS} stop token ids, got {len(self.stop_token_ids)}")
        check(isinstance(self.ignore_eos, bool), "ignore_eos", "must be a boolean")
        check(self.logit_bias is None or (isinstance(self.logit_bias, dict) and all(
            is_int(t) and t >= 0 and is_number(b) and -100 <= b <= 100 for t, b in self.logit_bias.items())),
            "logit_bias", f"must map token ids >= 0 to numbers in [-100, 100], got {_short(self.logit_bias)}")
        check(self.logit_bias is None or len(self.logit_bias) <= MAX_LOGIT_BIAS_TOKENS, "logit_bias",
              f"at most {MAX_LOGIT_BIAS_TOKENS} tokens, got {len(self.logit_bias or {})}")
        check(self.logprobs is None or (is_int(self.logprobs) and 0 <= self.logprobs <= 20), "logprobs",
              f"must be an integer in [0, 20], got {self.logprobs!r}")
        check(self.prompt_logprobs is None or (is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= 20),
              "prompt_logprobs", f"must be an integer in [0, 20], got {self.prompt_logprobs!r}")
        check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputs),
              "structured_outputs", "must be a tokenmill.structured.params.StructuredOutputs")
        check(self.output_kind in OUTPUT_KINDS, "output_kind",
              f"must be one of {OUTPUT_KINDS}, got {self.output_kind!r}")

    @property
    def greedy(self) -> bool:
        # Dividing logits by a temperature this small overflows; it means "greedy" in practice (vLLM does the same).
        return self.temperature < 1e-5


def _short(value: object) -> str:
    """A repr for an error message that stays short whatever the client sent."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def fan_out(params: SamplingParams) -> list[SamplingParams]:
    """The n single-sample requests of an n>1 request; seeded ones get distinct, reproducible seeds."""
    if params.n == 1:
        return [params]
    return [dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + i)
            for i in range(params.n)]
