"""The OpenAI-compatible server, driven over real loopback HTTP with the official `openai` SDK and httpx.

One engine (loaded once) backs an in-process uvicorn server; a second app on the same engine checks API keys; a
`tokenmill serve` subprocess checks a tiny KV cache (queueing, preemption) and the SIGTERM drain.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import uvicorn

from tokenmill import SamplingParams
from tokenmill.config import EngineConfig
from tokenmill.model.gguf_file import ModelLoadError
from tokenmill.server.app import create_app
from tokenmill.server.async_engine import AsyncEngine

MODEL = "smollm2-135m-instruct"
PROMPT = "The capital of France is"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MAX_REQUEST_BYTES = 64 * 1024


def _bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class ServerThread:
    """uvicorn serving `app` on a free loopback port from a background thread."""

    def __init__(self, app) -> None:
        self.app = app
        self.sock = _bound_socket()
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()


@pytest.fixture(scope="module")
def engine(model_path) -> Iterator[AsyncEngine]:
    config = EngineConfig(model=str(model_path), dtype="float32", device="cpu", num_kv_blocks=128, max_num_seqs=32)
    async_engine = AsyncEngine.from_config(config)
    yield async_engine
    async_engine.shutdown()


@pytest.fixture(scope="module")
def server(engine) -> Iterator[ServerThread]:
    with ServerThread(create_app(engine, max_request_bytes=MAX_REQUEST_BYTES)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def wait_idle(engine: AsyncEngine, timeout: float = 30.0) -> None:
    """Every request finished and every KV block back in the free pool."""
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if stats.num_running == stats.num_waiting == 0 and stats.num_free_blocks == stats.num_total_blocks:
            return
        assert time.monotonic() < deadline, f"engine not idle: {stats}"
        time.sleep(0.02)


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(url + "/metrics").text
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{.*\}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


# ---- OpenAI SDK: completions and chat ------------------------------------------------------------------------


def test_engine_is_built_and_stepped_on_one_thread(engine, server, client) -> None:
    # OpenMP pools on two threads made every decode step ~2x slower (AsyncEngine.from_config).
    steppers: set[threading.Thread] = set()
    step = engine.engine.step

    def recording_step():  # type: ignore[no-untyped-def]
        steppers.add(threading.current_thread())
        return step()

    engine.engine.step = recording_step  # type: ignore[method-assign]
    try:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
    finally:
        del engine.engine.step
    assert steppers == {engine._home_thread}
    assert engine._home_thread is not threading.main_thread()


def test_from_config_raises_the_load_error_in_the_caller(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="model file not found"):
        AsyncEngine.from_config(EngineConfig(model=str(tmp_path / "missing.gguf")))


def test_shutdown_before_start_ends_the_engine_thread(model_path) -> None:
    async_engine = AsyncEngine.from_config(EngineConfig(model=str(model_path), dtype="float32", num_kv_blocks=16))
    home = async_engine._home_thread
    assert home is not None and home.is_alive() and not async_engine.is_running
    async_engine.shutdown()
    home.join(10)
    assert not home.is_alive()


def test_health_and_models(server, client) -> None:
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_greedy_completion_matches_offline_llm(engine, client, llm_fp32) -> None:
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    expected = llm_fp32.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    choice = reply.choices[0]
    assert choice.text == expected.text
    assert choice.finish_reason == expected.outputs[0].finish_reason
    assert reply.usage.prompt_tokens == len(engine.tokenizer.encode(PROMPT))
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # the GGUF file name is accepted as the model name too
    by_file = client.completions.create(model=engine.engine.model_path.name, prompt=PROMPT, max_tokens=4,
                                        temperature=0)
    assert expected.text.startswith(by_file.choices[0].text)


def test_greedy_chat_matches_offline_llm(engine, client, llm_fp32) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_completion_tokens=12, temperature=0)
    expected = llm_fp32.chat(QUESTION, SamplingParams(temperature=0, max_tokens=12))[0]
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.text
    prompt = engine.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert reply.usage.prompt_tokens == len(engine.tokenizer.encode(prompt))
    assert reply.usage.completion_tokens == len(expected.token_ids)


def test_streaming_completion_matches_non_streaming(client) -> None:
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    chunks = list(client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    per_chunk = [c.usage.completion_tokens for c in chunks]  # per-chunk usage lets clients count exactly
    assert per_chunk == sorted(per_chunk) and per_chunk[-1] == full.usage.completion_tokens


def test_streaming_chat(client) -> None:
    full = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage == full.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_n_choices(client) -> None:
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7, n=3,
                                      logprobs=0)
    assert sorted(c.index for c in reply.choices) == [0, 1, 2]
    assert reply.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in reply.choices)
    again = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7, n=3)
    assert [c.text for c in again.choices] == [c.text for c in reply.choices]

    texts: dict[int, str] = {}
    finished = set()
    for chunk in client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=6, n=2, stream=True,
                                                seed=3):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1} and all(texts.values())


def test_stop_strings(client) -> None:
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    stop = full.strip()[2:4]  # two characters from inside the greedy continuation
    assert stop and stop in full
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=stop)
    assert reply.choices[0].text == full[: full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    listed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                       stop=["never appears", stop])
    assert listed.choices[0].text == reply.choices[0].text
    streamed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop],
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text


def test_completion_logprobs(client) -> None:
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3)
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs)
    assert len(logprobs.tokens) == reply.usage.completion_tokens
    assert "".join(logprobs.tokens) == reply.choices[0].text
    assert logprobs.text_offset[0] == 0
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert logprob <= 0 and token in top and 3 <= len(top) <= 4
        assert logprob == pytest.approx(max(top.values()))  # greedy picks the most likely token


def test_echo_with_logprobs_scores_the_prompt(engine, client, llm_fp32) -> None:
    """lm-evaluation-harness's log-likelihood request: echo, logprobs, one generated token."""
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0, echo=True,
                                      logprobs=1)
    logprobs = reply.choices[0].logprobs
    num_prompt = reply.usage.prompt_tokens
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == num_prompt + 1
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert "".join(logprobs.tokens) == reply.choices[0].text
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    expected = llm_fp32.generate(PROMPT, SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    assert expected.prompt_logprobs is not None
    for got, want in zip(logprobs.token_logprobs[1:num_prompt], expected.prompt_logprobs[1:], strict=True):
        assert got == pytest.approx(want.logprob, abs=1e-3)
    streamed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, echo=True,
                                         logprobs=1, stream=True)
    chunks = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    tokens = [t for chunk in chunks for t in chunk.token_logprobs]
    assert tokens[0] is None and len(tokens) == num_prompt + 3
    assert tokens[1:num_prompt] == pytest.approx(logprobs.token_logprobs[1:num_prompt], abs=1e-5)


def test_chat_logprobs(client) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        if not entry.token.startswith("bytes:"):
            assert bytes(entry.bytes).decode() == entry.token
    plain = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_seed_reproducible(client) -> None:
    def sample(seed: int) -> str:
        return client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0,
                                         top_p=0.95, seed=seed, extra_body={"top_k": 50}).choices[0].text

    assert sample(1234) == sample(1234)


def test_sampling_extras_and_batched_prompts(client, engine) -> None:
    reply = client.completions.create(model=MODEL, prompt=[PROMPT, "1, 2, 3,"], max_tokens=4, temperature=0.7,
                                      presence_penalty=0.5, frequency_penalty=0.5, n=2,
                                      extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1})
    assert sorted(c.index for c in reply.choices) == [0, 1, 2, 3]
    token_prompt = client.completions.create(model=MODEL, prompt=[504, 3575, 282], max_tokens=3, temperature=0)
    assert token_prompt.usage.prompt_tokens == 3
    huge_top_k = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, extra_body={"top_k": 10**30})
    assert huge_top_k.usage.completion_tokens == 2  # beyond the vocabulary: no top-k filter, not a failure
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith(PROMPT) and len(echoed.choices[0].text) > len(PROMPT)
    # logit_bias (OpenAI's): +100 all but forces a token, -100 all but bans one
    forced_id = engine.tokenizer.encode(" Paris")[-1]
    forced = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0,
                                       logit_bias={str(forced_id): 100})
    assert forced.choices[0].text == engine.tokenizer.decode([forced_id] * 3)
    chosen = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1, temperature=0)
    chosen_ids = engine.tokenizer.encode(chosen.choices[0].message.content)
    assert len(chosen_ids) == 1
    banned = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1, temperature=0,
                                            logit_bias={str(chosen_ids[0]): -100})
    assert banned.choices[0].message.content not in ("", chosen.choices[0].message.content)
    # min_tokens above 1 (checked against the request's own max_tokens, or the context when it has none)
    at_least = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                         extra_body={"min_tokens": 6, "stop_token_ids": [0, 1, 2]})
    assert at_least.usage.completion_tokens >= 6
    chat = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_completion_tokens=6,
                                          extra_body={"min_tokens": 6})
    assert chat.usage.completion_tokens == 6
    unbounded = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, extra_body={"min_tokens": 3},
                                          stop=["\n", " "])
    assert unbounded.usage.completion_tokens >= 3


# ---- concurrency, disconnects, overload ----------------------------------------------------------------------


def test_64_concurrent_streams(server, engine) -> None:
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str | None, int]:
        text, finish, tokens = "", None, 0
        stream = await client.completions.create(model=MODEL, prompt=f"Fact number {i}:", max_tokens=8,
                                                 temperature=0.8, seed=i, stream=True,
                                                 stream_options={"include_usage": True})
        async for chunk in stream:
            for choice in chunk.choices:
                text += choice.text
                finish = choice.finish_reason or finish
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return text, finish, tokens

    async def run_all() -> list[tuple[str, str | None, int]]:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                                      timeout=300) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(64))), timeout=300)

    results = asyncio.run(run_all())
    assert len(results) == 64
    for _text, finish, tokens in results:
        assert finish in ("stop", "length")
        assert 1 <= tokens <= 8 and (finish == "stop" or tokens == 8)
    wait_idle(engine)


def next_event(lines: Iterator[str]) -> dict:
    """The next SSE event. Keep `lines` referenced: once httpx's line iterator is garbage-collected, httpx closes
    the connection, which the server rightly treats as a disconnect."""
    for line in lines:
        if line.startswith("data: "):
            return json.loads(line[len("data: "):])
    raise AssertionError("no event")


def test_disconnect_mid_stream_aborts(server, engine) -> None:
    aborted = metric(server.url, "tokenmill:request_success_total", finished_reason="abort")
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", server.url + "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        assert next_event(lines)["choices"][0]["text"] is not None
        assert engine.stats().num_running == 1
    wait_idle(engine, timeout=20)  # far sooner than 1500 tokens would take
    assert metric(server.url, "tokenmill:request_success_total", finished_reason="abort") == aborted + 1


def test_disconnect_while_waiting_for_non_streaming_reply(server, engine) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
    wait_idle(engine, timeout=20)


def test_waiting_limit_returns_503(server, engine) -> None:
    engine.max_waiting_requests = 32
    long = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True, "stream": True}
    try:
        with httpx.Client(timeout=60) as http, \
                http.stream("POST", server.url + "/v1/completions", json={**long, "n": 32}) as busy:
            busy_lines = busy.iter_lines()
            next_event(busy_lines)  # 32 requests now fill every running slot (max_num_seqs=32)
            with http.stream("POST", server.url + "/v1/completions", json=long) as queued:
                assert queued.status_code == 200
                deadline = time.monotonic() + 20
                while engine.stats().num_waiting < 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                engine.max_waiting_requests = 1
                rejected = http.post(server.url + "/v1/completions", json={**long, "stream": False})
    finally:
        engine.max_waiting_requests = None
    assert rejected.status_code == 503
    assert rejected.json()["error"]["code"] == "server_overloaded"
    assert "waiting" in rejected.json()["error"]["message"]
    wait_idle(engine)


def test_draining_server_refuses_new_requests(server) -> None:
    serving = server.app.state.serving
    serving.draining = True  # what SIGTERM sets (see the subprocess test for the real signal)
    try:
        resp = httpx.post(server.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    finally:
        serving.draining = False
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "server_shutting_down"


# ---- bad input -------------------------------------------------------------------------------------------------

LONG_PROMPT = "hello " * 2100  # the context is 2048 tokens

BAD_REQUESTS = [
    ("completions", b'{"model": "x", "prompt": ', 400, None, None),
    ("completions", b"[1, 2]", 400, None, None),
    ("completions", b"", 400, None, None),
    ("completions", {"prompt": PROMPT, "max_tokens": "many"}, 400, "max_tokens", None),
    ("completions", {"prompt": 42}, 400, "prompt", None),
    ("completions", {"max_tokens": 3}, 400, "prompt", None),
    ("completions", {"prompt": PROMPT, "model": "gpt-4"}, 404, "model", "model_not_found"),
    ("completions", {"prompt": LONG_PROMPT}, 400, "prompt", "context_length_exceeded"),
    ("completions", {"prompt": PROMPT, "max_tokens": 5000}, 400, "max_tokens", None),
    ("completions", {"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens", None),
    ("completions", {"prompt": PROMPT, "temperature": -1}, 400, "temperature", None),
    ("completions", {"prompt": PROMPT, "top_p": 1.5}, 400, "top_p", None),
    ("completions", {"prompt": PROMPT, "presence_penalty": 9}, 400, "presence_penalty", None),
    ("completions", {"prompt": PROMPT, "n": 0}, 400, "n", None),
    ("completions", {"prompt": PROMPT, "logprobs": 99}, 400, "logprobs", None),
    ("completions", {"prompt": PROMPT, "stop": [""]}, 400, "stop", None),
    ("completions", {"prompt": PROMPT, "seed": 2**70}, 400, "seed", None),
    ("completions", {"prompt": PROMPT, "seed": 2**64 - 1, "n": 2}, 400, "seed", None),  # seed + 1 overflows
    ("completions", {"prompt": ""}, 400, "prompt", None),
    ("completions", {"prompt": PROMPT, "stop_token_ids": [10**6], "min_tokens": 1}, 400, "stop_token_ids", None),
    ("completions", {"prompt": [1, 10**9]}, 400, "prompt", None),
    ("completions", {"prompt": PROMPT, "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens", None),
    ("completions", {"prompt": PROMPT, "logit_bias": {"abc": 1}}, 400, "logit_bias", None),
    ("completions", {"prompt": PROMPT, "logit_bias": {"5": 500}}, 400, "logit_bias", None),
    ("chat/completions", {"messages": QUESTION, "logit_bias": {"1000000": 1}}, 400, "logit_bias", None),
    ("chat/completions", {"messages": QUESTION, "max_completion_tokens": 2, "min_tokens": 3}, 400, "min_tokens", None),
    ("chat/completions", {"messages": []}, 400, "messages", None),
    ("chat/completions", {"messages": "hello"}, 400, "messages", None),
    ("chat/completions", {"messages": [{"role": "user"}]}, 400, "messages[0].content", None),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", None),
    ("chat/completions", {"messages": [{"role": "user", "content": LONG_PROMPT}]}, 400, "messages",
     "context_length_exceeded"),
    ("chat/completions", {"messages": QUESTION, "max_completion_tokens": 4000}, 400, "max_completion_tokens", None),
    ("chat/completions", {"messages": QUESTION, "top_logprobs": 2}, 400, "top_logprobs", None),
    ("chat/completions", {"messages": QUESTION, "model": "nope"}, 404, "model", "model_not_found"),
    ("completions", b"{" + b'"prompt": "' + b"a" * MAX_REQUEST_BYTES + b'"}', 413, None, "request_too_large"),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "code"), BAD_REQUESTS)
def test_bad_input_gets_openai_error(server, path, body, status, param, code) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = httpx.post(f"{server.url}/v1/{path}", content=content, headers={"Content-Type": "application/json"},
                      timeout=60)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["code"] == code


def test_bad_input_leaves_server_healthy(server, client, engine) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=-2)
    assert info.value.body["param"] == "temperature"
    chunked = httpx.post(server.url + "/v1/completions", headers={"Content-Type": "application/json"},
                         content=iter([b'{"prompt": "', b"a" * MAX_REQUEST_BYTES, b'"}']))  # no Content-Length
    assert chunked.status_code == 413
    assert httpx.get(server.url + "/v1/nothing-here").status_code == 404
    assert httpx.get(server.url + "/health").status_code == 200
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).usage.completion_tokens >= 1
    wait_idle(engine)


# ---- API key, metrics ----------------------------------------------------------------------------------------


def test_api_key(engine, server) -> None:
    with ServerThread(create_app(engine, api_key="sekret")) as keyed:
        with pytest.raises(openai.AuthenticationError) as info:
            openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert info.value.body["code"] == "invalid_api_key"
        for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Basic sekret"},
                        {"Authorization": "Bearer sekret2"}):
            denied = httpx.post(keyed.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2},
                                headers=headers)
            assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=keyed.url + "/v1", api_key="sekret", max_retries=0, timeout=120)
        assert good.models.list().data[0].id == MODEL
        assert good.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).usage.completion_tokens >= 1
        assert httpx.get(keyed.url + "/health").status_code == 200  # only /v1 needs the key
    # the keyless server takes any (or no) key
    assert httpx.get(server.url + "/v1/models").status_code == 200


def test_metrics(server, client) -> None:
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
                 "generation_tokens_total", "num_preemptions_total", "num_pauses_total", "prefix_cache_queries_total",
                 "prefix_cache_hits_total", "time_to_first_token_seconds_bucket",
                 "inter_token_latency_seconds_bucket", "e2e_request_latency_seconds_bucket",
                 "request_success_total"):
        assert f"tokenmill:{name}" in text, name
    assert metric(server.url, "tokenmill:generation_tokens_total") >= 3
    assert metric(server.url, "tokenmill:time_to_first_token_seconds_count") >= 1
    assert metric(server.url, "tokenmill:request_success_total", finished_reason="length") >= 1


# ---- `tokenmill serve`: tiny KV cache, SIGTERM drain -------------------------------------------------------------


def test_serve_subprocess_small_kv_cache_and_sigterm_drain(model_path, tmp_path) -> None:
    sock = _bound_socket()
    port = sock.getsockname()[1]
    sock.close()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "TOKENMILL_API_KEY": "k"}
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 (closed in finally)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenmill.entrypoints.cli", "serve", str(model_path), "--port", str(port),
         "--dtype", "float32", "--device", "cpu", "--num-kv-blocks", "16", "--max-num-seqs", "8",
         "--served-model-name", "tiny", "--no-access-log", "--log-level", "warning", "--drain-timeout", "60"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        headers = {"Authorization": "Bearer k"}
        assert httpx.get(url + "/v1/models").status_code == 401  # key from the environment

        # 6 requests x 50 tokens need 24 blocks of 16 tokens; there are 16: they queue and get preempted, none fail.
        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as http:
                body = {"model": "tiny", "max_tokens": 40, "ignore_eos": True, "temperature": 0}
                return await asyncio.gather(*(http.post("/v1/completions", json={**body, "prompt": f"Item {i}: a"})
                                              for i in range(6)))

        for resp in asyncio.run(burst()):
            assert resp.status_code == 200, resp.text
            assert resp.json()["usage"]["completion_tokens"] == 40
            assert resp.json()["choices"][0]["finish_reason"] == "length"

        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 120, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        events = []
        with httpx.Client(headers=headers, timeout=120) as http, \
                http.stream("POST", url + "/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    events.append(line)
                    break
            proc.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            with pytest.raises(httpx.TransportError):  # no new connections while draining
                httpx.get(url + "/health", timeout=2)
            events += [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        usage = json.loads(events[-2][len("data: "):])["usage"]
        assert usage["completion_tokens"] == 120  # the in-flight stream ran to completion
        # uvicorn re-raises the SIGTERM it handled once shut down, so the exit is "terminated by SIGTERM"
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM), (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
