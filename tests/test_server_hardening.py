"""The server under hostile input, overload and faults, on a small random model (fast steps, token-id prompts):
request fan-out limits, Host and Content-Type checks, /metrics behind the key, tenants' prefix caches, deadlines,
slow stream readers, failures kept to one request, a dead engine thread, and a schemathesis run."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import load_fuzz_script, write_tiny_gguf
from test_server import ServerThread, _bound_socket, wait_idle

from tokenmill.config import EngineConfig
from tokenmill.output.types import RequestOutput
from tokenmill.server.app import create_app
from tokenmill.server.async_engine import AsyncEngine, OutputStream, StreamBacklogError
from tokenmill.server.config import LOOPBACK_HOSTS
from tokenmill.server.defaults import MAX_PROMPTS_PER_REQUEST, MAX_SEQUENCES_PER_REQUEST

KEYS = ("key-alice", "key-bob")
LONG = {"prompt": [5, 6, 7], "max_tokens": 3000, "ignore_eos": True}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    return write_tiny_gguf(path, context=4096, metadata={"tokenizer.ggml.merges": [],
                                                         "tokenizer.ggml.eos_token_id": 0})


def engine_config(path: Path) -> EngineConfig:
    return EngineConfig(model=str(path), dtype="float32", num_kv_blocks=512, block_size=16, max_num_seqs=16)


@pytest.fixture(scope="module")
def engine(tiny_model) -> Iterator[AsyncEngine]:
    async_engine = AsyncEngine.from_config(engine_config(tiny_model))
    yield async_engine
    async_engine.shutdown()


@pytest.fixture(scope="module")
def server(engine) -> Iterator[ServerThread]:
    app = create_app(engine, api_key=KEYS, allowed_hosts=LOOPBACK_HOSTS, isolate_prefix_cache=True,
                     request_timeout=30.0)
    with ServerThread(app) as running:
        yield running


def post(server: ServerThread, path: str, body: object, key: str = KEYS[0], **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", **kwargs.pop("headers", {})}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60, **kwargs)


# ---- one HTTP request, many engine requests ----

def test_batched_prompts_are_capped_before_tokenizing(server) -> None:
    resp = post(server, "/v1/completions", {"prompt": ["a"] * (MAX_PROMPTS_PER_REQUEST + 1), "max_tokens": 1})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt"
    n = MAX_SEQUENCES_PER_REQUEST // 10 + 1
    resp = post(server, "/v1/completions", {"prompt": [[5]] * 10, "n": n, "max_tokens": 1})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "n"


def test_the_whole_group_counts_against_the_waiting_limit(server, engine) -> None:
    engine.max_waiting_requests = 4
    try:
        resp = post(server, "/v1/completions", {"prompt": [[5], [6], [7]], "n": 2, "max_tokens": 1})
    finally:
        engine.max_waiting_requests = None
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "server_overloaded"
    assert "adds 6" in resp.json()["error"]["message"]


@pytest.mark.parametrize("ids", [[5, -3], [5, 10**6]])
def test_echo_of_token_ids_outside_the_vocabulary_is_a_bad_request(server, ids: list[int]) -> None:
    # Found by schemathesis: the echo was decoded before the engine had checked the ids, and decoding raised.
    resp = post(server, "/v1/completions", {"prompt": ids, "echo": True, "max_tokens": 1})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt"


def test_non_finite_json_numbers_are_rejected(server) -> None:
    for field in ("temperature", "repetition_penalty", "top_p"):
        content = '{"prompt": [5], "max_tokens": 1, "' + field + '": Infinity}'
        resp = httpx.post(server.url + "/v1/completions", content=content, timeout=30,
                          headers={"Authorization": f"Bearer {KEYS[0]}", "Content-Type": "application/json"})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == field


# ---- exposure ----

@pytest.mark.parametrize(("host", "status"), [("evil.example", 400), ("evil.example:80", 400),
                                              ("localhost:8000", 200), ("127.0.0.1", 200), ("[::1]:8000", 200)])
def test_host_header_must_name_this_server(server, host: str, status: int) -> None:
    resp = httpx.get(server.url + "/health", headers={"Host": host}, timeout=30)
    assert resp.status_code == status
    if status == 400:
        assert resp.json()["error"]["code"] == "invalid_host"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_body_not_sent_as_json_is_refused(server, content_type: str | None) -> None:
    headers = {"Authorization": f"Bearer {KEYS[0]}"} | ({"Content-Type": content_type} if content_type else {})
    resp = httpx.post(server.url + "/v1/completions", content=json.dumps({"prompt": [5], "max_tokens": 1}),
                      headers=headers, timeout=30)
    assert resp.status_code == 415 and resp.json()["error"]["code"] == "unsupported_media_type"


def test_metrics_need_a_key_when_keys_are_set(server, engine) -> None:
    assert httpx.get(server.url + "/metrics", timeout=30).status_code == 401
    assert httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEYS[1]}"},
                     timeout=30).status_code == 200
    with ServerThread(create_app(engine, api_key=KEYS, public_metrics=True)) as public:
        assert httpx.get(public.url + "/metrics", timeout=30).status_code == 200


def test_tenants_do_not_share_prefix_cache_blocks(server, engine) -> None:
    prompt = list(range(10, 90))  # five full blocks
    body = {"prompt": prompt, "max_tokens": 1}
    assert post(server, "/v1/completions", body, KEYS[0]).status_code == 200
    hits = engine.stats().prefix_cache.hits
    assert post(server, "/v1/completions", body, KEYS[1]).status_code == 200
    assert engine.stats().prefix_cache.hits == hits  # another tenant: nothing reused
    assert post(server, "/v1/completions", body, KEYS[0]).status_code == 200
    assert engine.stats().prefix_cache.hits > hits  # the same tenant: its own blocks are reused
    salted = post(server, "/v1/completions", {**body, "cache_salt": "private"}, KEYS[0])
    assert salted.status_code == 200 and engine.stats().prefix_cache.hits > hits


# ---- who the client is: fair scheduling and per-client metrics ----

def test_the_client_is_the_key_when_keys_are_set_else_the_user_field(server, engine) -> None:
    body = {"prompt": [5, 6, 7], "max_tokens": 2, "ignore_eos": True, "user": "mallory"}
    tenants = {}
    for key in KEYS:
        before = dict(engine.stats().clients)
        assert post(server, "/v1/completions", body, key).status_code == 200
        grown = {c for c, u in engine.stats().clients.items() if c not in before or u != before[c]}
        assert len(grown) == 1 and "mallory" not in grown  # a key holder cannot pick its share by `user`
        tenants[key] = grown.pop()
    assert tenants[KEYS[0]] != tenants[KEYS[1]] and all(KEYS[0] not in t for t in tenants.values())
    metrics = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=30).text
    assert f'tokenmill:client_generation_tokens_total{{client="{tenants[KEYS[0]]}"' in metrics
    with ServerThread(create_app(engine)) as open_server:
        assert httpx.post(open_server.url + "/v1/completions", json=body, timeout=60).status_code == 200
        assert engine.stats().clients["mallory"].generation_tokens >= 2
        too_long = httpx.post(open_server.url + "/v1/completions", json={**body, "user": "x" * 257}, timeout=60)
        assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "user"
        # This engine runs FCFS: a priority would be ignored, so it is refused, as vLLM does.
        refused = httpx.post(open_server.url + "/v1/completions", json={**body, "priority": -1}, timeout=60)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "priority"


def test_priority_and_fair_policies_serve_over_http(tiny_model) -> None:
    for policy in ("priority", "fair"):
        config = dataclasses.replace(engine_config(tiny_model), scheduling_policy=policy)
        async_engine = AsyncEngine.from_config(config)
        try:
            with ServerThread(create_app(async_engine)) as running:
                body = {"prompt": [5, 6, 7], "max_tokens": 3, "ignore_eos": True, "user": "carol",
                        "priority": -5 if policy == "priority" else 0}
                resp = httpx.post(running.url + "/v1/completions", json=body, timeout=60)
                assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 3
                metrics = httpx.get(running.url + "/metrics", timeout=30).text
            counter = 'tokenmill:client_virtual_token_counter{client="carol",model_name="tiny"} 9.0'
            assert (counter in metrics) == (policy == "fair")  # 3 prompt tokens + 3 outputs at weight 2
        finally:
            async_engine.shutdown()


# ---- deadlines and slow readers ----

def test_a_request_past_its_deadline_is_aborted(engine) -> None:
    with ServerThread(create_app(engine, request_timeout=0.2)) as short:
        resp = httpx.post(short.url + "/v1/completions", json=LONG, timeout=60)
        assert resp.status_code == 504 and resp.json()["error"]["code"] == "request_timeout"
        with httpx.stream("POST", short.url + "/v1/completions", json={**LONG, "stream": True}, timeout=60) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        assert events[-1]["error"]["code"] == "request_timeout"
    wait_idle(engine)


def delta(request_id: str, tokens: list[int], finish: str | None = None) -> RequestOutput:
    return RequestOutput(request_id, None, [1], "".join(f"t{t}" for t in tokens), list(tokens),
                         finish_reason=finish, num_output_tokens=len(tokens))


def test_an_unread_stream_merges_its_outputs_then_cuts_the_reader_off() -> None:
    async def scenario() -> None:
        stream = OutputStream(["a", "b"], max_backlog=10)
        overflowed: list[bool] = []
        stream.on_overflow = lambda: overflowed.append(True)
        for step in range(4):
            stream._put(delta("a", [step]))
            stream._put(delta("b", [10 + step]))
        assert len(stream._pending) == 2  # one merged output per request, whatever the number of steps
        index, out = await stream.__anext__()
        assert (index, out.token_ids, out.text) == (0, [0, 1, 2, 3], "t0t1t2t3")
        for step in range(4, 12):
            stream._put(delta("a", [step]))
        assert overflowed == [True]
        with pytest.raises(StreamBacklogError):
            await stream.__anext__()

    asyncio.run(scenario())


def test_an_abandoned_stream_is_aborted_once_its_backlog_is_full(server, engine) -> None:
    async def scenario() -> None:
        from tokenmill.server.async_engine import EngineRequest
        from tokenmill.server.protocol import CompletionRequest

        engine.max_stream_backlog = 32
        try:
            params = CompletionRequest(prompt=[5], max_tokens=3000, ignore_eos=True).sampling_params(3000, None)
            before = engine.stats().generation_tokens
            stream = await engine.submit([EngineRequest("unread", [5, 6], params)])
            deadline = time.monotonic() + 30
            while True:  # nobody reads `stream`
                stats = engine.stats()
                if stats.generation_tokens > before and not (stats.num_running or stats.num_waiting):
                    break
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            with pytest.raises(StreamBacklogError):
                await stream.__anext__()
        finally:
            engine.max_stream_backlog = None

    before = engine.stats().generation_tokens
    asyncio.run(scenario())
    assert engine.stats().generation_tokens - before < 3000
    wait_idle(engine)


# ---- faults ----

def test_a_failing_request_fails_alone_and_its_error_says_nothing_internal(server, engine, monkeypatch) -> None:
    backend = engine.engine.runner.backend
    forward = backend.forward

    def failing_forward(input_ids, positions, metadata):
        if bool(((input_ids == 13) & (positions == 0)).any()):  # the bad prompt's first token, never a sample
            raise RuntimeError("secret internal detail")
        return forward(input_ids, positions, metadata)

    monkeypatch.setattr(backend, "forward", failing_forward)

    async def both() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                     headers={"Authorization": f"Bearer {KEYS[0]}"}) as http:
            return await asyncio.gather(
                http.post("/v1/completions", json={"prompt": [13, 14], "max_tokens": 8}),
                http.post("/v1/completions", json={"prompt": [21, 22], "max_tokens": 8, "ignore_eos": True}))

    bad, good = asyncio.run(both())
    assert bad.status_code == 500 and bad.json()["error"]["code"] == "internal_error"
    assert "secret" not in bad.text and "RuntimeError" not in bad.text
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 8
    wait_idle(engine)


def test_a_submit_cancelled_before_the_engine_takes_it_harms_nobody(server, engine) -> None:
    """A client gone while its requests wait for the engine thread: its command is skipped, the next one runs."""
    from tokenmill.server.async_engine import EngineRequest
    from tokenmill.server.protocol import CompletionRequest

    params = CompletionRequest(prompt=[5], max_tokens=4, ignore_eos=True).sampling_params(4, None)

    async def scenario() -> list[int]:
        with engine._cond:  # the engine thread cannot take commands until both are posted
            gone = asyncio.ensure_future(engine.submit([EngineRequest("gone", [5, 6], params)]))
            await asyncio.sleep(0.01)
            gone.cancel()
            await asyncio.sleep(0.01)
            kept = asyncio.ensure_future(engine.submit([EngineRequest("kept", [7, 8], params)]))
            await asyncio.sleep(0.01)
        stream = await asyncio.wait_for(kept, 30)  # without the fix the engine loop fails and drops it
        return [t for _, out in [item async for item in stream] for t in out.token_ids]

    assert len(asyncio.run(scenario())) == 4
    wait_idle(engine)


class _Die(BaseException):
    """Escapes every `except Exception`: the engine thread ends."""


def test_a_dead_engine_thread_turns_health_red_and_stops_the_server(tiny_model, monkeypatch) -> None:
    async_engine = AsyncEngine.from_config(engine_config(tiny_model))
    app = create_app(async_engine)
    stopped: list[bool] = []
    app.state.on_engine_failure = lambda: stopped.append(True)
    try:
        with ServerThread(app) as running:
            assert httpx.get(running.url + "/health", timeout=30).status_code == 200

            def die() -> list:
                raise _Die()

            monkeypatch.setattr(async_engine.engine, "step", die)
            resp = httpx.post(running.url + "/v1/completions", json={"prompt": [5], "max_tokens": 4}, timeout=30)
            assert resp.status_code == 503
            assert httpx.get(running.url + "/health", timeout=30).status_code == 503
            deadline = time.monotonic() + 10
            while not stopped:
                assert time.monotonic() < deadline, "the watchdog did not ask the server to stop"
                time.sleep(0.05)
            late = httpx.post(running.url + "/v1/completions", json={"prompt": [5], "max_tokens": 4}, timeout=30)
            assert late.status_code == 503
    finally:
        async_engine.shutdown()


def test_the_serve_process_exits_non_zero_when_its_engine_dies(tiny_model) -> None:
    sock = _bound_socket()
    port = sock.getsockname()[1]
    sock.close()
    script = textwrap.dedent(f"""
        import sys
        from tokenmill.config import EngineConfig
        from tokenmill.engine import LLMEngine
        from tokenmill.server.cli import run_server

        class Die(BaseException):
            pass

        def die(self):
            raise Die()

        LLMEngine.step = die
        config = EngineConfig(model={str(tiny_model)!r}, dtype="float32", num_kv_blocks=64)
        sys.exit(run_server(config, port={port}, log_level="warning"))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        httpx.post(url + "/v1/completions", json={"prompt": [5], "max_tokens": 4}, timeout=30)
        assert proc.wait(timeout=60) == 1
    finally:
        proc.kill()
        proc.wait()


# ---- schema fuzzing ----

def test_schemathesis_finds_no_server_errors(engine) -> None:
    """A short seeded run over the server's own OpenAPI document (the long run's command is in docs/server.md)."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, settings

    app = create_app(engine, max_request_bytes=64 * 1024, request_timeout=30.0)
    with ServerThread(app) as running:
        schema = schemathesis.openapi.from_dict(httpx.get(running.url + "/openapi.json", timeout=30).json())
        failures: list[str] = []
        for result in schema.get_all_operations():
            operation = result.ok()

            @settings(max_examples=25, derandomize=True, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            def check(case) -> None:
                if isinstance(case.body, dict) and "max_tokens" in case.body:
                    case.body["max_tokens"] = min(case.body["max_tokens"] or 1, 16) if isinstance(
                        case.body["max_tokens"], int) else case.body["max_tokens"]
                response = case.call(base_url=running.url, timeout=60)
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.path} {case.body!r} -> {response.status_code} "
                                    f"{response.text[:300]}")

            operation.as_strategy()  # the operation must be generatable
            from hypothesis import given

            given(case=operation.as_strategy())(check)()
        assert not failures, failures[:3]
    wait_idle(engine)


def test_after_runs_right_after_the_step_that_finished_the_group(tiny_model) -> None:
    """`submit(after=fn)` sees the engine as the group's last step left it, whatever else keeps the engine busy:
    what a prefill replica needs to export a prompt's blocks before another request's allocation can evict them."""
    from tokenmill.server.async_engine import EngineRequest
    from tokenmill.server.protocol import CompletionRequest

    engine = AsyncEngine.from_config(engine_config(tiny_model))
    finished_at: dict[str, int] = {}
    step = engine.engine.step

    def recording_step() -> list[RequestOutput]:
        outputs = step()
        finished_at.update({o.request_id: engine.engine.stats().steps for o in outputs if o.finished})
        return outputs

    engine.engine.step = recording_step  # the engine thread is the only caller
    engine.start()
    long = CompletionRequest(prompt=[5], max_tokens=2000, ignore_eos=True).sampling_params(2000, None)
    short = CompletionRequest(prompt=[5], max_tokens=3, ignore_eos=True).sampling_params(3, None)
    prompt = list(range(3, 40))

    async def scenario() -> tuple[int, object]:
        hog = await engine.submit([EngineRequest("hog", [9, 8, 7], long)])  # keeps stepping meanwhile
        stream = await engine.submit([EngineRequest("a", prompt, short), EngineRequest("b", prompt[:20], short)],
                                     after=lambda e: (e.stats().steps, e.export_prefix(prompt)))
        async for _ in stream:
            pass
        result = await asyncio.wrap_future(stream.after)
        failing = await engine.submit([EngineRequest("c", prompt, short)], after=lambda e: 1 / 0)
        async for _ in failing:
            pass
        with pytest.raises(ZeroDivisionError):
            await asyncio.wrap_future(failing.after)
        engine.abort(hog.request_ids)
        return result

    try:
        steps, transfer = asyncio.run(scenario())
        assert steps == max(finished_at["a"], finished_at["b"])  # no step ran in between
        assert transfer.num_blocks == len(prompt) // 16  # every full block of the prompt, still cached
        assert "hog" not in finished_at  # it kept the engine stepping until it was aborted
    finally:
        engine.shutdown()


def test_the_consistency_check_catches_a_streamed_difference() -> None:
    harness = load_fuzz_script("server_consistency")
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    body = {"prompt": "hi", "max_tokens": 2, "logprobs": 0, "stop": ["x"]}

    def reply(text: str, tokens: list[tuple[str, float]], finish: str = "length") -> dict:
        return {"status": 200, "choices": {0: {"text": text, "finish": finish, "tokens": tokens}}, "usage": usage}

    same = reply("ab", [("a", -1.0), ("b", -2.0)])
    assert harness.problems(body, same, reply("ab", [("a", -1.0), ("b", -2.0)])) == []
    for other in (reply("ac", [("a", -1.0), ("c", -2.0)]), reply("ab", [("a", -1.0), ("b", -2.5)]),
                  reply("ab", [("a", -1.0), ("b", -2.0)], "stop")):
        assert harness.problems(body, same, other)
    assert harness.problems(body, reply("axb", [("ax", -1.0), ("b", -2.0)]), reply("axb", [("ax", -1.0), ("b", -2.0)]))
    assert harness.problems(body, {"status": 500, "body": ""}, {"status": 500, "body": ""})


def test_a_short_server_consistency_run(model_path) -> None:
    result = subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / "fuzz" /
                                                 "server_consistency.py"), "--seed", "3", "--requests", "4",
                             "--batch-invariant", "--model", str(model_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"0 of 4 rounds failed, [1-4] answered 200", result.stdout), result.stdout[-2000:]
