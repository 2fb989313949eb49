"""The OpenAI completions and chat completions endpoints, independent of the web framework.

A request with P prompts and `n` choices becomes P*n engine requests (siblings share their prompt's KV through
`fork_of`); choice `p*n + i` is sample `i` of prompt `p`. Replies are plain dicts, streams are SSE strings.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenmill.model.gguf_file import ModelLoadError, default_model_path
from tokenmill.output.types import RequestOutput
from tokenmill.sampler.sampler import TokenLogprobs
from tokenmill.sampling_params import InvalidRequestError, SamplingParams, fan_out
from tokenmill.server.async_engine import (
    AsyncEngine,
    EngineOverloadedError,
    EngineRequest,
    EngineStepError,
    EngineStoppedError,
    Origin,
    OutputStream,
    RequestTimeoutError,
    StreamBacklogError,
)
from tokenmill.server.defaults import MAX_PROMPTS_PER_REQUEST, MAX_SEQUENCES_PER_REQUEST
from tokenmill.server.errors import APIError, bad_request, error_body, invalid_request
from tokenmill.server.formatting import SSE_DONE, TokenTexts, sse, usage
from tokenmill.server.protocol import ChatCompletionRequest, CompletionRequest
from tokenmill.server.tools import ToolCallStream, ToolChoice, finish_reason_with_calls, parse_tool_choice
from tokenmill.structured.params import StructuredOutputs
from tokenmill.tokenizer import Tokenizer

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
_NO_ORIGIN = Origin()  # in-process callers: no tenant, no client


def model_names(engine: AsyncEngine, served_model_name: str | None) -> tuple[str, set[str]]:
    """The name /v1/models reports, and every name a request may use for it (served name, GGUF file name/path)."""
    path = Path(engine.engine.model_path)
    configured = engine.engine.config.model
    default = DEFAULT_MODEL_NAME if _is_default_model(path) else path.stem
    name = served_model_name or default
    aliases = {name, default, path.name, path.stem, str(path)}
    if configured:
        aliases.add(str(configured))
    return name, aliases


def _is_default_model(path: Path) -> bool:
    try:
        return path.resolve() == default_model_path().resolve()
    except ModelLoadError:
        return False


def model_not_found(model: str, served: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist; this server serves `{served}`", param="model",
                    code="model_not_found")


# Errors that end a request while it runs, as (status, code) for a reply or a stream's error event.
_RUN_ERRORS: dict[type[Exception], tuple[int, str]] = {
    EngineStepError: (500, "internal_error"),
    RequestTimeoutError: (504, "request_timeout"),
    StreamBacklogError: (429, "stream_backlog_exceeded"),
    EngineStoppedError: (503, "engine_stopped"),
}


def _run_error(exc: Exception) -> APIError:
    status, code = _RUN_ERRORS[type(exc)]
    return APIError(status, str(exc), code=code)


@dataclass
class _Prepared:
    """A validated request, ready to submit."""

    request_id: str
    prompt_ids: list[list[int]]
    requests: list[EngineRequest]
    n: int

    @property
    def prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.prompt_ids)


class OpenAIServing:
    """`request_timeout`: seconds after which a request still running is aborted (None: no deadline)."""

    def __init__(self, engine: AsyncEngine, served_model_name: str | None = None,
                 request_timeout: float | None = None) -> None:
        self.engine = engine
        self.request_timeout = request_timeout
        self.model_name, self.model_aliases = model_names(engine, served_model_name)
        self.texts = TokenTexts(engine.tokenizer)
        self.created = int(time.time())
        self.inflight = 0  # HTTP requests being generated; the app counts them (event loop thread only)
        self.draining = False

    # ---- shared steps -----------------------------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_aliases:
            raise model_not_found(model, self.model_name)

    def _check_accepting(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down", code="server_shutting_down",
                           headers={"Retry-After": "1"})

    def _max_tokens(self, prompt_len: int, requested: int | None, param: str, prompt_param: str) -> int:
        limit = self.engine.max_model_len
        if prompt_len >= limit:
            raise bad_request(f"{prompt_param}: the prompt has {prompt_len} tokens but the context length is {limit} "
                              f"(at most {limit - 1} prompt tokens, so that one token can be generated)",
                              prompt_param, "context_length_exceeded")
        remaining = limit - prompt_len
        if requested is None:
            return remaining
        if requested > remaining:
            raise bad_request(f"{param}: {requested} is too large: the prompt has {prompt_len} tokens and the context "
                              f"length is {limit}, so at most {remaining} tokens can be generated", param)
        return requested

    def _precheck_max_tokens(self, requested: int | None) -> int:
        """The max_tokens to check the other sampling values against before the prompt's length is known: the
        requested one, else the context length (min_tokens may be anything up to it; the real bound comes later)."""
        return self.engine.max_model_len if requested is None else requested

    def _encode(self, prompt: str | list[int], param: str) -> list[int]:
        ids = self.engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise bad_request(f"{param}: the prompt is empty", param)
        return ids

    @staticmethod
    def _check_size(num_prompts: int, n: int) -> None:
        """Before any tokenizing: one HTTP request adds at most so many engine requests."""
        if num_prompts > MAX_PROMPTS_PER_REQUEST:
            raise bad_request(f"prompt: at most {MAX_PROMPTS_PER_REQUEST} prompts per request, got {num_prompts}",
                              "prompt")
        if num_prompts * n > MAX_SEQUENCES_PER_REQUEST:
            raise bad_request(f"n: {num_prompts} prompts x n={n} would be {num_prompts * n} sequences; at most "
                              f"{MAX_SEQUENCES_PER_REQUEST} per request", "n")

    def _prepare(self, prefix: str, prompt_ids: list[list[int]], params: list[SamplingParams], n: int,
                 origin: Origin, priority: int | None) -> _Prepared:
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        requests = []
        for p, (ids, prompt_params) in enumerate(zip(prompt_ids, params, strict=True)):
            siblings = fan_out(prompt_params)
            for i, sample_params in enumerate(siblings):
                fork_of = f"{request_id}-{p}-0" if i else None
                requests.append(EngineRequest(f"{request_id}-{p}-{i}", ids, sample_params, fork_of,
                                              origin.cache_salt, priority or 0, origin.client_id))
        return _Prepared(request_id, prompt_ids, requests, n)

    async def _compile(self, constraint: StructuredOutputs | None) -> None:
        """A request's grammar compiled off the event loop and the engine thread; a bad one is a 400."""
        if constraint is None:
            return
        try:
            await asyncio.to_thread(self.engine.compile_grammar, constraint)
        except InvalidRequestError as exc:
            raise invalid_request(exc) from None

    async def _submit(self, prepared: _Prepared, prompt_param: str) -> OutputStream:
        try:
            return await self.engine.submit(prepared.requests, self.request_timeout)
        except InvalidRequestError as exc:
            raise invalid_request(exc, prompt_param if exc.field == "prompt" else None) from None
        except EngineOverloadedError as exc:
            raise APIError(503, str(exc), code="server_overloaded", headers={"Retry-After": "1"}) from None
        except EngineStoppedError as exc:
            raise APIError(503, str(exc), code="server_shutting_down", headers={"Retry-After": "1"}) from None

    async def drain(self, timeout: float) -> bool:
        """Refuse new requests, then wait (at most `timeout` seconds) for those in flight; True if all finished."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.inflight == 0

    async def _collect(self, stream: OutputStream) -> list[RequestOutput]:
        """Each request's delta outputs merged into its whole result."""
        results: dict[int, RequestOutput] = {}
        try:
            async for index, out in stream:
                if index in results:
                    results[index].merge_delta(out)
                else:
                    results[index] = out
        except tuple(_RUN_ERRORS) as exc:
            raise _run_error(exc) from None
        finally:
            if not stream.finished:  # cancelled (client gone) or failed: free the KV blocks now
                self.engine.abort(stream.request_ids)
        return [results[i] for i in range(len(results))]

    async def _sse(self, stream: OutputStream, chunks: Callable[[OutputStream], AsyncIterator[str]]
                   ) -> AsyncIterator[str]:
        try:
            async for chunk in chunks(stream):
                yield chunk
        except tuple(_RUN_ERRORS) as exc:
            error = _run_error(exc)
            yield sse(error_body(error.message, error.type, code=error.code))
        # An abandoned or failed stream's requests are aborted by the response's on_close, which also runs when
        # this generator never started.
        yield SSE_DONE

    # ---- /v1/completions --------------------------------------------------------------------------------------

    async def completions(self, req: CompletionRequest, origin: Origin = _NO_ORIGIN
                          ) -> tuple[dict[str, Any] | AsyncIterator[str], OutputStream]:
        """The reply (a dict, or SSE strings when streaming) and the stream of the engine requests it owns."""
        self._check_accepting()
        self.check_model(req.model)
        prompts = req.prompts()
        self._check_size(len(prompts), req.n or 1)
        req.sampling_params(self._precheck_max_tokens(req.max_tokens), req.logprobs)  # before tokenizing
        constraint = req.extension_constraint()
        await self._compile(constraint)
        prompt_ids = await asyncio.to_thread(lambda: [self._encode(p, "prompt") for p in prompts])
        # echo with logprobs scores the prompt too (what lm-evaluation-harness reads log-likelihoods from).
        scored = req.logprobs if req.echo else None
        params = [req.sampling_params(self._max_tokens(len(ids), req.max_tokens, "max_tokens", "prompt"),
                                      req.logprobs, structured=constraint, prompt_logprobs=scored)
                  for ids in prompt_ids]
        prepared = self._prepare("cmpl", prompt_ids, params, req.n or 1, origin, req.priority)
        stream = await self._submit(prepared, "prompt")
        # After the engine has checked the token ids: decoding an id outside the vocabulary would raise.
        echo = [self.engine.tokenizer.decode(ids) if not isinstance(p, str) else p for p, ids in
                zip(prompts, prompt_ids, strict=True)] if req.echo else None
        if req.stream:
            return self._sse(stream, lambda s: self._completion_chunks(s, req, prepared, echo)), stream
        finals = await self._collect(stream)
        choices = []
        for index, out in enumerate(finals):
            logprobs = None
            if req.logprobs is not None:
                logprobs = self._completion_logprobs(out.logprobs or [], prompt_ids[index // prepared.n],
                                                     out.prompt_logprobs if echo else None, 0)[0]
            text = (echo[index // prepared.n] if echo else "") + out.text
            choices.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": out.finish_reason,
                            "stop_reason": out.stop_reason})
        completion_tokens = sum(out.num_output_tokens for out in finals)
        return {"id": prepared.request_id, "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices,
                "usage": usage(prepared.prompt_tokens, completion_tokens)}, stream

    def _completion_logprobs(self, entries: list[TokenLogprobs], prompt_ids: list[int],
                             prompt_entries: list[TokenLogprobs | None] | None, text_offset: int
                             ) -> tuple[dict[str, Any], int]:
        """The legacy logprobs of generated tokens, after the echoed prompt's when `prompt_entries` are given."""
        if not prompt_entries:
            return self.texts.completion_logprobs(entries, text_offset)
        scored = [e for e in prompt_entries[1:] if e is not None]  # all but the first prompt token's are set
        return self.texts.completion_logprobs([*scored, *entries], text_offset, first_token=prompt_ids[0])

    def _chunk_builder(self, object_name: str, req: CompletionRequest | ChatCompletionRequest, prepared: _Prepared,
                       generated: list[int]) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        """Builds the SSE chunks of one stream; `generated` (per-choice token counts) is read at each call, so
        per-chunk usage is always current. The final chunk (no choices) carries usage when asked for."""
        created = int(time.time())

        def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
            body = {"id": prepared.request_id, "object": object_name, "created": created,
                    "model": self.model_name, "choices": choices}
            if req.continuous_usage or (req.include_usage and not choices):
                body["usage"] = usage(prepared.prompt_tokens, sum(generated))
            return body

        return chunk

    async def _completion_chunks(self, stream: OutputStream, req: CompletionRequest, prepared: _Prepared,
                                 echo: list[str] | None) -> AsyncIterator[str]:
        count = len(prepared.requests)
        generated, offsets, echoed = [0] * count, [0] * count, [False] * count
        chunk = self._chunk_builder("text_completion", req, prepared, generated)

        async for index, out in stream:
            generated[index] = out.num_output_tokens
            text = out.text
            echoing = bool(echo) and not echoed[index]
            if echo and echoing:
                text, echoed[index] = echo[index // prepared.n] + text, True
            new_logprobs = out.logprobs or []
            if not (text or out.finished or new_logprobs or req.continuous_usage):
                continue
            logprobs = None
            if req.logprobs is not None:
                logprobs, offsets[index] = self._completion_logprobs(
                    new_logprobs, prepared.prompt_ids[index // prepared.n],
                    out.prompt_logprobs if echoing else None, offsets[index])
            yield sse(chunk([{"index": index, "text": text, "logprobs": logprobs,
                              "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}]))
        if req.include_usage:
            yield sse(chunk([]))

    # ---- /v1/chat/completions ---------------------------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest, origin: Origin = _NO_ORIGIN
                   ) -> tuple[dict[str, Any] | AsyncIterator[str], OutputStream]:
        self._check_accepting()
        self.check_model(req.model)
        self._check_size(1, req.n or 1)
        renames = {"max_tokens": req.max_tokens_param, "logprobs": "top_logprobs"}
        req.sampling_params(self._precheck_max_tokens(req.requested_max_tokens), req.engine_logprobs, renames)
        tools, constraint = chat_tools(req)
        await self._compile(constraint)
        conversation = req.conversation()
        ids = await asyncio.to_thread(self._render_chat, conversation, tools)
        max_tokens = self._max_tokens(len(ids), req.requested_max_tokens, req.max_tokens_param, "messages")
        params = req.sampling_params(max_tokens, req.engine_logprobs, renames, structured=constraint)
        prepared = self._prepare("chatcmpl", [ids], [params], req.n or 1, origin, req.priority)
        stream = await self._submit(prepared, "messages")
        if req.stream:
            return self._sse(stream, lambda s: self._chat_chunks(s, req, prepared, tools)), stream
        finals = await self._collect(stream)
        choices = []
        for index, out in enumerate(finals):
            message: dict[str, Any] = {"role": "assistant", "content": out.text}
            finish_reason = out.finish_reason
            if tools is not None and (finish_reason == "stop" or tools.mode == "named"):
                content, calls = tools.split(out.text)
                if calls:
                    message = {"role": "assistant", "content": content, "tool_calls": calls}
                    finish_reason = finish_reason_with_calls(tools, finish_reason)
            choices.append({"index": index, "message": message,
                            "logprobs": self.texts.chat_logprobs(out.logprobs or []) if req.logprobs else None,
                            "finish_reason": finish_reason, "stop_reason": out.stop_reason})
        completion_tokens = sum(out.num_output_tokens for out in finals)
        return {"id": prepared.request_id, "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices,
                "usage": usage(prepared.prompt_tokens, completion_tokens)}, stream

    def _render_chat(self, conversation: list[dict[str, Any]], tools: ToolChoice | None) -> list[int]:
        return self._encode(render_chat(self.engine.tokenizer, conversation, tools), "messages")

    async def _chat_chunks(self, stream: OutputStream, req: ChatCompletionRequest, prepared: _Prepared,
                           tools: ToolChoice | None) -> AsyncIterator[str]:
        count = len(prepared.requests)
        generated = [0] * count
        chunk = self._chunk_builder("chat.completion.chunk", req, prepared, generated)
        if tools is not None:
            async for text in self._tool_chunks(stream, tools, chunk, generated):
                yield text
            if req.include_usage:
                yield sse(chunk([]))
            return

        for index in range(count):
            yield sse(chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]))
        async for index, out in stream:
            generated[index] = out.num_output_tokens
            new_logprobs = out.logprobs or []
            if not (out.text or out.finished or new_logprobs or req.continuous_usage):
                continue
            yield sse(chunk([{"index": index, "delta": {"content": out.text} if out.text else {},
                              "logprobs": self.texts.chat_logprobs(new_logprobs) if req.logprobs else None,
                              "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}]))
        if req.include_usage:
            yield sse(chunk([]))

    @staticmethod
    async def _tool_chunks(stream: OutputStream, tools: ToolChoice, chunk: Callable[[list[dict[str, Any]]],
                           dict[str, Any]], generated: list[int]) -> AsyncIterator[str]:
        """Chat chunks of a request that may call tools: text deltas pass through each choice's ToolCallStream."""
        streams = [ToolCallStream(tools) for _ in generated]
        for index in range(len(generated)):
            yield sse(chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]))
        async for index, out in stream:
            generated[index] = out.num_output_tokens
            deltas = streams[index].feed(out.text) if out.text else []
            finish_reason = out.finish_reason
            if out.finished:
                more, finish_reason = streams[index].finish(out.finish_reason)
                deltas += more
            for delta in deltas:
                yield sse(chunk([{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]))
            if out.finished:
                yield sse(chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": finish_reason,
                                  "stop_reason": out.stop_reason}]))


def chat_tools(req: ChatCompletionRequest) -> tuple[ToolChoice | None, StructuredOutputs | None]:
    """The tools a chat request may call and the constraint on its output (a response format, or the tools')."""
    tools = parse_tool_choice(req.tools, req.tool_choice, req.parallel_tool_calls is not False)
    try:
        constraint = req.response_constraint()
        if tools is not None and constraint is not None:
            if tools.mode != "auto":
                raise bad_request("tool_choice 'required' or a named function leaves no room for a "
                                  "response_format", "tool_choice")
            tools = None  # the output is held to the response format: no call can be written
        return tools, constraint or (tools.constraint() if tools is not None else None)
    except InvalidRequestError as exc:  # a constraint over the size limit
        raise invalid_request(exc) from None


def render_chat(tokenizer: Tokenizer, conversation: list[dict[str, Any]], tools: ToolChoice | None) -> str:
    """The prompt text of a conversation, with the tools described the way the model's template expects."""
    tool_list = None
    if tools is not None and tokenizer.renders_tools:
        tool_list = [{"type": "function", "function": f} for f in tools.tools.values()]
        conversation = [_with_parsed_calls(m) for m in conversation]
    elif tools is not None:
        conversation = with_tool_prompt(conversation, tools)
    try:
        return tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tools=tool_list)
    except ValueError as exc:
        raise bad_request(f"messages: {exc}", "messages") from None


def with_tool_prompt(conversation: list[dict[str, Any]], tools: ToolChoice) -> list[dict[str, Any]]:
    """The conversation for a template that does not render tools: the tools described in the system message, and
    earlier calls written into the assistant's text the way the model is asked to write them."""
    out = []
    for message in conversation:
        calls = message.get("tool_calls")
        if calls:
            written = "\n".join(f"<tool_call>\n{json.dumps(_call_text(c))}\n</tool_call>" for c in calls)
            message = {"role": message["role"], "content": (message["content"] + "\n" + written).strip()}
        out.append(message)
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + tools.system_prompt()}
    else:
        out.insert(0, {"role": "system", "content": tools.system_prompt()})
    return out


def _call_text(call: dict[str, Any]) -> dict[str, Any]:
    function = call["function"]  # the shape was checked with the request (ChatCompletionRequest.conversation)
    return {"name": function["name"], "arguments": _parsed_arguments(function.get("arguments", "{}"))}


def _with_parsed_calls(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant message whose calls' arguments are objects, as templates that render tools expect (OpenAI
    sends them as JSON text)."""
    if not message.get("tool_calls"):
        return message
    calls = [{**c, "function": {**c["function"], "arguments": _parsed_arguments(c["function"].get("arguments", "{}"))}}
             for c in message["tool_calls"]]
    return {**message, "tool_calls": calls}


def _parsed_arguments(arguments: Any) -> Any:
    try:
        return json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        return arguments
