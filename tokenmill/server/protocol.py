"""OpenAI request bodies as pydantic models, and their translation into SamplingParams.

Unknown fields are ignored (clients send vendor extras); known fields are type-checked, and every problem becomes a
400 whose `param` names the offending field.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tokenmill.sampling_params import MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, InvalidRequestError, SamplingParams
from tokenmill.server.errors import APIError, bad_request, invalid_request
from tokenmill.structured.params import StructuredOutputs

MAX_N = 128  # choices per request: each is a separate engine request
MAX_LOGPROBS = 20
MAX_CACHE_SALT_CHARS = 256
MAX_USER_CHARS = 256
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


def _documented(default: Any, **constraints: Any) -> Any:
    """A field whose bounds appear in the OpenAPI document (clients and the schema fuzzer read them) but are checked
    by `check` and SamplingParams, which name the field in their 400s the way OpenAI's API does."""
    return Field(default, json_schema_extra=constraints)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # vLLM's name: usage in every chunk


class _GenerationRequest(BaseModel):
    """Fields shared by completions and chat completions (OpenAI's, plus vLLM's sampling extras)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = _documented(None, minimum=1)
    temperature: float | None = _documented(None, minimum=0)
    top_p: float | None = _documented(None, exclusiveMinimum=0, maximum=1)
    top_k: int | None = _documented(None, minimum=-1)
    min_p: float | None = _documented(None, minimum=0, maximum=1)
    presence_penalty: float | None = _documented(None, minimum=-2, maximum=2)
    frequency_penalty: float | None = _documented(None, minimum=-2, maximum=2)
    repetition_penalty: float | None = _documented(None, exclusiveMinimum=0)
    seed: int | None = None
    stop: str | list[str] | None = _documented(None, maxItems=MAX_STOP_STRINGS)
    stop_token_ids: list[int] | None = _documented(None, maxItems=MAX_STOP_TOKEN_IDS)
    n: int | None = _documented(1, minimum=1, maximum=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = False
    min_tokens: int | None = 0
    skip_special_tokens: bool | None = True
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # the client, for fair scheduling and per-client metrics (unless API keys name it)
    cache_salt: str | None = None  # vLLM's extension: only requests with the same salt share prefix-cache blocks
    priority: int | None = 0  # vLLM's extension: lower is served first (needs --scheduling-policy priority)
    # vLLM's structured-output extensions: the older guided_* fields, or structured_outputs {"json": ..., "regex":
    # ..., "choice": [...], "grammar": ..., "json_object": true}.
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def check_common(self) -> None:
        n = self.n if self.n is not None else 1
        if not 1 <= n <= MAX_N:
            raise bad_request(f"n must be between 1 and {MAX_N}, got {n}", "n")
        if self.cache_salt is not None and not 0 < len(self.cache_salt) <= MAX_CACHE_SALT_CHARS:
            raise bad_request(f"cache_salt must be 1 to {MAX_CACHE_SALT_CHARS} characters", "cache_salt")
        if self.user is not None and not 0 < len(self.user) <= MAX_USER_CHARS:
            raise bad_request(f"user must be 1 to {MAX_USER_CHARS} characters", "user")

    def extension_constraint(self) -> StructuredOutputs | None:
        """The constraint of vLLM's extension fields (at most one of them), or None."""
        given = {name: getattr(self, name) for name in ("guided_json", "guided_regex", "guided_choice",
                                                        "guided_grammar", "structured_outputs")
                 if getattr(self, name) is not None}
        if not given:
            return None
        if len(given) > 1:
            raise bad_request(f"at most one of {sorted(given)} may be given", sorted(given)[1])
        (name, value), = given.items()
        try:
            if name == "structured_outputs":
                unknown = set(value) - {"json", "regex", "choice", "grammar", "json_object"}
                if unknown:
                    raise bad_request(f"structured_outputs: unknown keys {sorted(unknown)}", name)
                return StructuredOutputs(**value, field_name=name)
            kind = name.removeprefix("guided_")
            return StructuredOutputs(**{kind: value}, field_name=name)  # type: ignore[arg-type]
        except InvalidRequestError as exc:
            raise invalid_request(exc) from None

    def _logit_bias(self) -> dict[int, float] | None:
        """OpenAI's JSON object keys token ids as strings; ranges are SamplingParams' and the vocabulary the engine's
        to check."""
        if not self.logit_bias:
            return None
        try:
            return {int(token): bias for token, bias in self.logit_bias.items()}
        except ValueError:
            raise bad_request("logit_bias: keys must be token ids (integers, as strings)", "logit_bias") from None

    def sampling_params(self, max_tokens: int, logprobs: int | None, renames: dict[str, str] | None = None,
                        structured: StructuredOutputs | None = None, prompt_logprobs: int | None = None
                        ) -> SamplingParams:
        """SamplingParams of the request (n included); a bad value becomes a 400 naming it. Stop token ids outside
        the vocabulary are the engine's to reject; a top_k beyond it means no top_k, as in the sampler."""
        try:
            return SamplingParams(
                n=self.n or 1,
                temperature=_default(self.temperature, 1.0),
                top_p=_default(self.top_p, 1.0),
                top_k=_default(self.top_k, 0),
                min_p=_default(self.min_p, 0.0),
                presence_penalty=_default(self.presence_penalty, 0.0),
                frequency_penalty=_default(self.frequency_penalty, 0.0),
                repetition_penalty=_default(self.repetition_penalty, 1.0),
                seed=self.seed,
                max_tokens=max_tokens,
                min_tokens=_default(self.min_tokens, 0),
                stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
                stop_token_ids=list(self.stop_token_ids or []),
                ignore_eos=bool(self.ignore_eos),
                logit_bias=self._logit_bias(),
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                skip_special_tokens=_default(self.skip_special_tokens, True),
                structured_outputs=structured,
            )
        except InvalidRequestError as exc:
            raise invalid_request(exc, (renames or {}).get(exc.field)) from None


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = _documented(None, minimum=0, maximum=MAX_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = None

    def check(self) -> None:
        self.check_common()
        if self.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise bad_request("best_of other than n is not supported", "best_of")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise bad_request(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}", "logprobs")

    def prompts(self) -> list[str | list[int]]:
        """The prompts of a (possibly batched) completion request."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise bad_request("prompt must not be empty", "prompt")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message answers this call


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = _documented(None, minimum=0, maximum=MAX_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None

    def check(self) -> None:
        self.check_common()
        if not self.messages:
            raise bad_request("messages must be a non-empty list", "messages")
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise bad_request(f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {self.top_logprobs}",
                                  "top_logprobs")
            if not self.logprobs:
                raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")

    def response_constraint(self) -> StructuredOutputs | None:
        """The constraint of `response_format` (text: none) or of the extension fields; not both."""
        fmt = self.response_format
        kind = fmt.get("type", "text") if fmt else "text"
        extension = self.extension_constraint()
        if kind == "text":
            return extension
        if extension is not None:
            raise bad_request("response_format and a structured-output extension field cannot both be given",
                              "response_format")
        assert fmt is not None
        if kind == "json_object":
            return StructuredOutputs(json_object=True, field_name="response_format")
        if kind != "json_schema":
            raise bad_request(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                              "response_format.type")
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad_request("response_format.json_schema.schema must be a JSON schema object",
                              "response_format.json_schema.schema")
        return StructuredOutputs(json=schema, field_name="response_format")

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def conversation(self) -> list[dict[str, Any]]:
        """Messages as the chat template expects them: `{"role": str, "content": str}`, text parts joined (plus
        `tool_calls` of an assistant's calls and `tool_call_id` of a tool's answer, where given)."""
        conversation = []
        for i, message in enumerate(self.messages):
            if message.role not in CHAT_ROLES:
                raise bad_request(f"messages[{i}].role must be one of {sorted(CHAT_ROLES)}, got {message.role!r}",
                                  f"messages[{i}].role")
            content = message.content
            if content is None:
                if message.role != "assistant":
                    raise bad_request(f"messages[{i}].content is required", f"messages[{i}].content")
                content = ""
            elif isinstance(content, list):
                texts = []
                for j, part in enumerate(content):
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise bad_request(f"messages[{i}].content[{j}]: only text content parts are supported",
                                          f"messages[{i}].content")
                    texts.append(part["text"])
                content = "\n".join(texts)
            role = "system" if message.role == "developer" else message.role
            entry: dict[str, Any] = {"role": role, "content": content}
            if message.tool_calls and role == "assistant":
                for j, call in enumerate(message.tool_calls):
                    function = call.get("function")
                    if not (isinstance(function, dict) and isinstance(function.get("name"), str)
                            and isinstance(function.get("arguments", "{}"), str | dict)):
                        raise bad_request(f"messages[{i}].tool_calls[{j}] must be {{'function': {{'name': str, "
                                          "'arguments': str}}}}", f"messages[{i}].tool_calls[{j}]")
                entry["tool_calls"] = message.tool_calls
            if message.tool_call_id is not None:
                entry["tool_call_id"] = message.tool_call_id
            conversation.append(entry)
        return conversation


RequestT = TypeVar("RequestT", bound=_GenerationRequest)


def parse_request(model: type[RequestT], data: Any) -> RequestT:
    """Validate a decoded JSON body; the first problem becomes a 400 naming its field."""
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        request = model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None
    request.check()  # type: ignore[attr-defined]
    return request


def validation_error(exc: ValidationError) -> APIError:
    first = exc.errors()[0]
    param = _param_name(first.get("loc", ()))
    got = first.get("input")
    detail = first.get("msg", "invalid value")
    if first.get("type") != "missing" and not isinstance(got, dict | list):
        detail += f", got {got!r}"
    return bad_request(f"{param}: {detail}" if param else detail, param or None)


def _param_name(loc: tuple[Any, ...]) -> str:
    """`('messages', 0, 'content', 'str')` -> `messages[0].content` (pydantic's union-member tags dropped)."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part not in _TYPE_TAGS:
            name += f".{part}" if name else part
    return name


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-before"})


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value
