"""`tokenmill bench`: metric definitions on hand-made timelines, percentiles, goodput, arrival processes, the SLO
search, the HTTP stream parser, workloads, and short real runs in-process and against `tokenmill serve`.

Nothing here asserts speed: only counts, definitions and consistency.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics

import numpy as np
import pytest

from tokenmill.bench import workloads as wl
from tokenmill.bench.backends import InProcessBackend, OpenAIHTTPBackend, _StreamState
from tokenmill.bench.metrics import (
    SLO,
    RequestRecord,
    compute_metrics,
    e2e_latency,
    inter_token_latencies,
    passes_slo,
    percentile,
    summarize,
    tpot,
    ttft,
)
from tokenmill.bench.roofline import MemoryModel, decode_bandwidth_gb_s
from tokenmill.bench.scenarios import RunSpec, arrival_offsets, run_once, search_max_rate


def record(send: float, chunks: list[tuple[float, int]], end: float | None = None, prompt: int = 10,
           output: int | None = None, success: bool = True) -> RequestRecord:
    r = RequestRecord(send_time=send, prompt_tokens=prompt, success=success)
    for when, count in chunks:
        r.add_chunk(when, count)
    r.output_tokens = sum(c for _, c in chunks) if output is None else output
    r.end_time = end if end is not None else (chunks[-1][0] if chunks else send)
    return r


# ---- metrics on hand-made timelines ----------------------------------------------------------------------------


def test_one_token_per_chunk_timeline() -> None:
    r = record(10.0, [(10.5, 1), (10.6, 1), (10.8, 1), (11.1, 1)], end=11.2)
    assert ttft(r) == pytest.approx(0.5)
    assert e2e_latency(r) == pytest.approx(1.1)  # to the last token, not to the end of the response
    assert tpot(r) == pytest.approx(0.6 / 3)
    assert inter_token_latencies(r) == pytest.approx([0.1, 0.2, 0.3])


def test_multi_token_chunks_attribute_the_gap_to_the_first_token() -> None:
    # The first chunk carries 3 tokens, then a 2-token chunk 0.4 s later, then 1 token 0.1 s after that.
    r = record(0.0, [(1.0, 3), (1.4, 2), (1.5, 1)])
    assert ttft(r) == pytest.approx(1.0)
    assert inter_token_latencies(r) == pytest.approx([0.0, 0.0, 0.4, 0.0, 0.1])
    assert len(inter_token_latencies(r)) == r.output_tokens - 1
    assert sum(inter_token_latencies(r)) == pytest.approx(e2e_latency(r) - ttft(r))
    assert statistics.fmean(inter_token_latencies(r)) == pytest.approx(tpot(r))  # = 0.5 / 5


def test_zero_token_chunks_are_ignored_and_single_token_outputs_have_no_tpot() -> None:
    r = record(0.0, [(0.3, 1), (0.9, 0)])
    assert r.chunk_times == [0.3]
    assert ttft(r) == e2e_latency(r) == pytest.approx(0.3)
    assert tpot(r) is None and inter_token_latencies(r) == []
    empty = record(0.0, [], success=False)
    assert ttft(empty) is None and tpot(empty) is None


def test_percentile_is_numpy_linear() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(3.7)
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0], 0) == 1.0 and percentile([1.0, 2.0], 100) == 2.0
    values = np.random.default_rng(1).exponential(size=101).tolist()
    for q in (1, 50, 90, 99, 99.9):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    with pytest.raises(ValueError):
        percentile([], 50)
    s = summarize([0.001, 0.002, None, 0.003, 0.004], scale=1000)
    assert s["count"] == 4 and s["mean"] == pytest.approx(2.5) and s["median"] == pytest.approx(2.5)
    assert s["p90"] == pytest.approx(3.7) and s["p99"] == pytest.approx(3.97)
    assert summarize([])["mean"] is None


def test_run_metrics_throughput_goodput_and_latency_summaries() -> None:
    # Three requests: A meets both SLOs, B misses TTFT, C misses TPOT; D failed.
    a = record(0.0, [(0.2, 1), (0.3, 1), (0.4, 1)], end=0.45, prompt=10)  # ttft .2, tpot .1
    b = record(0.5, [(2.0, 1), (2.05, 1)], end=2.1, prompt=20)  # ttft 1.5, tpot .05
    c = record(1.0, [(1.1, 1), (1.6, 1), (2.1, 1), (2.6, 1)], end=4.0, prompt=30)  # ttft .1, tpot .5
    d = record(1.5, [], end=1.7, prompt=5, success=False)
    d.error = "HTTP 503"
    m = compute_metrics([a, b, c, d], SLO(ttft_s=1.0, tpot_s=0.2))
    assert m["num_requests"] == 4 and m["completed"] == 3 and m["failed"] == 1
    assert m["duration_s"] == pytest.approx(4.0)  # first send (0.0) → last completion (4.0)
    assert m["input_tokens"] == 60 and m["output_tokens"] == 9
    assert m["request_throughput"] == pytest.approx(3 / 4)
    assert m["output_throughput"] == pytest.approx(9 / 4)
    assert m["total_token_throughput"] == pytest.approx(69 / 4)
    assert m["goodput"] == pytest.approx(1 / 4)  # only A
    assert m["slo_attainment"] == pytest.approx(1 / 4)
    assert m["ttft_ms"]["median"] == pytest.approx(200) and m["ttft_ms"]["max"] == pytest.approx(1500)
    assert m["tpot_ms"]["mean"] == pytest.approx((100 + 50 + 500) / 3)
    assert m["e2e_ms"]["max"] == pytest.approx(1600)  # C: sent at 1.0, last token at 2.6 (not its end, 4.0)
    assert m["itl_ms"]["count"] == 2 + 1 + 3
    assert m["first_errors"] == ["HTTP 503"]
    assert not passes_slo(m, 0.9)
    assert "goodput" not in compute_metrics([a, b, c])


def test_slo_rules() -> None:
    one_token = record(0.0, [(0.5, 1)])
    assert SLO(ttft_s=1.0, tpot_s=0.01).met_by(one_token)  # no TPOT: the TPOT objective does not apply
    assert not SLO(ttft_s=0.4).met_by(one_token)
    assert SLO(e2e_s=0.5).met_by(one_token)  # ≤ is a pass
    assert not SLO(ttft_s=10).met_by(record(0.0, [(0.1, 1)], success=False))
    ok = compute_metrics([record(0.0, [(0.1, 1), (0.2, 1)])] * 100, SLO(ttft_s=1))
    assert passes_slo(ok, 0.99)


def test_decode_bandwidth_from_tpot() -> None:
    r = record(0.0, [(0.1, 1), (0.2, 1), (0.3, 1)], prompt=100)  # tpot 0.1 s, mean decode context 101.5
    memory = MemoryModel(weight_bytes=1_000_000_000, kv_bytes_per_token=1_000_000, source="test")
    assert decode_bandwidth_gb_s(r, memory) == pytest.approx((1e9 + 101.5e6) / 0.1 / 1e9)


# ---- arrival processes and the SLO search -------------------------------------------------------------------------


def test_poisson_and_gamma_arrivals() -> None:
    offsets = arrival_offsets(20_000, rate=4.0, seed=0)
    assert offsets[0] == 0.0 and offsets == sorted(offsets)
    gaps = np.diff(offsets)
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV 1
    bursty = np.diff(arrival_offsets(20_000, rate=4.0, burstiness=0.25, seed=0))
    assert bursty.mean() == pytest.approx(0.25, rel=0.05)
    assert (bursty.std() / bursty.mean()) ** 2 == pytest.approx(4.0, rel=0.15)  # gamma: CV² = 1/shape
    assert arrival_offsets(3, math.inf) == [0.0, 0.0, 0.0]
    assert arrival_offsets(5, 2.0, seed=7) == arrival_offsets(5, 2.0, seed=7)
    with pytest.raises(ValueError):
        arrival_offsets(3, 0.0)


def test_max_rate_search_bisects_between_pass_and_fail() -> None:
    evaluated: list[float] = []

    async def passes(rate: float) -> bool:
        evaluated.append(rate)
        return rate <= 3.0

    found = asyncio.run(search_max_rate(passes, {1.0: True, 2.0: True, 4.0: False}, iterations=3))
    assert evaluated == pytest.approx([math.sqrt(8), math.sqrt(math.sqrt(8) * 4),
                                       math.sqrt(math.sqrt(8) * math.sqrt(math.sqrt(8) * 4))])
    assert found["max_rate"] == pytest.approx(math.sqrt(8)) and 3.0 < found["first_failing"] < 4.0
    assert set(found["evaluated"]) == {1.0, 2.0, 4.0, *evaluated}

    doubled = asyncio.run(search_max_rate(passes, {1.0: True}, iterations=0))
    assert doubled["max_rate"] == 2.0 and doubled["first_failing"] == 4.0
    none = asyncio.run(search_max_rate(passes, {8.0: False}, iterations=2))
    assert none["max_rate"] is None and none["first_failing"] == 8.0


# ---- the HTTP stream parser -------------------------------------------------------------------------------------


def _feed(chunks: list[tuple[float, dict]], max_tokens: int) -> RequestRecord:
    r = RequestRecord(send_time=0.0, prompt_tokens=3)
    state = _StreamState()
    for when, chunk in chunks:
        state.feed(chunk, when, r)
    r.end_time = chunks[-1][0]
    state.finish(r, max_tokens)
    return r


def test_stream_tokens_come_from_continuous_usage() -> None:
    def chunk(text: str, completion: int, finish: str | None = None) -> dict:
        return {"choices": [{"index": 0, "text": text, "finish_reason": finish}],
                "usage": {"prompt_tokens": 7, "completion_tokens": completion}}

    r = _feed([(0.1, chunk(" a", 1)), (0.2, chunk(" bc", 3)), (0.3, chunk("", 3, "length")),
               (0.31, {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}})], 3)
    assert r.chunk_tokens == [1, 2] and r.chunk_times == [0.1, 0.2]  # 2 tokens in one chunk, text not re-tokenized
    assert r.output_tokens == 3 and r.prompt_tokens == 7 and r.token_counting == "usage"
    assert r.generated_text == " a bc"


def test_stream_without_usage_counts_one_token_per_content_chunk() -> None:
    def chunk(text: str, finish: str | None = None) -> dict:  # llama-cpp-python's shape: no usage at all
        return {"choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

    r = _feed([(0.1, chunk(" Paris")), (0.2, chunk(".")), (0.3, chunk("", "length"))], 2)
    assert r.chunk_tokens == [1, 1] and r.output_tokens == 2 and r.token_counting == "chunks+length"
    stopped = _feed([(0.1, chunk(" Hi")), (0.2, chunk("", "stop"))], 5)
    assert stopped.output_tokens == 1 and stopped.token_counting == "chunks"
    final = _feed([(0.1, chunk(" a")), (0.2, {"choices": [], "usage": {"completion_tokens": 2}})], 9)
    assert final.output_tokens == 2 and final.token_counting == "chunks+final-usage"


def test_request_bodies_per_eos_mode() -> None:
    request = wl.BenchRequest("hi", 1, 5)
    assert OpenAIHTTPBackend("http://x/v1", eos_mode="ignore_eos").body(request, True)["ignore_eos"] is True
    body = OpenAIHTTPBackend("http://x", eos_mode="min_tokens", stop_token_ids=[0, 2]).body(request, True)
    assert body["min_tokens"] == 5 and body["logit_bias"] == {"0": -100.0, "2": -100.0} and "ignore_eos" not in body
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert "ignore_eos" not in OpenAIHTTPBackend("http://x").body(request, False)


# ---- workloads ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(model_path):
    from tokenmill.bench.cli import load_tokenizer

    return load_tokenizer(model_path)


def test_parse_range() -> None:
    assert wl.parse_range("8") == (8, 8) and wl.parse_range("4,16") == (4, 16)
    for bad in ("0", "5,4", "x"):
        with pytest.raises(ValueError):
            wl.parse_range(bad)


def test_synthetic_prompts_have_exact_token_counts(tokenizer) -> None:
    w = wl.synthetic(tokenizer, 6, (5, 40), (3, 9), seed=3)
    again = wl.synthetic(tokenizer, 6, (5, 40), (3, 9), seed=3)
    assert [s.turns[0].prompt for s in w.sessions] == [s.turns[0].prompt for s in again.sessions]  # seeded
    for s in w.sessions:
        r = s.turns[0]
        assert 5 <= r.prompt_len <= 40 and 3 <= r.output_len <= 9
        assert len(tokenizer.encode(r.prompt)) == r.prompt_len
    lengths = [s.turns[0].prompt_len for s in wl.synthetic(tokenizer, 3, (17, 17), (1, 1)).sessions]
    assert lengths == [17, 17, 17]
    longer = wl.synthetic(tokenizer, 9, (5, 40), (3, 9), seed=3)  # the first requests do not depend on the count
    assert [(s.turns[0].prompt, s.turns[0].output_len) for s in longer.sessions[:6]] == [
        (s.turns[0].prompt, s.turns[0].output_len) for s in w.sessions]


def test_sharegpt_filter_and_formats(tokenizer, tmp_path) -> None:
    long_prompt = "word " * 1100
    rows = [{"human": "Hi", "gpt": "Hello there, how can I help you today?"},  # prompt < 4 tokens
            {"human": long_prompt, "gpt": "ok ok ok ok ok"},  # prompt > 1024 tokens
            {"human": "Tell me a long story about dragons please.", "gpt": "Yes"},  # reply < 4 tokens
            {"human": "What is the capital city of France?", "gpt": "The capital of France is Paris, a city."}]
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    w = wl.sharegpt(tokenizer, path, 1)
    (only,) = w.sessions
    assert only.turns[0].prompt == rows[3]["human"]
    assert only.turns[0].output_len == len(tokenizer.encode(rows[3]["gpt"]))
    with pytest.raises(ValueError, match="pass the ShareGPT filter"):
        wl.sharegpt(tokenizer, path, 2)
    original = tmp_path / "sharegpt.json"  # the original ShareGPT JSON layout
    original.write_text(json.dumps([{"id": "x", "conversations": [
        {"from": "human", "value": rows[3]["human"]}, {"from": "gpt", "value": rows[3]["gpt"]}]}]))
    assert wl.sharegpt(tokenizer, original, 1, output_len=7).sessions[0].turns[0].output_len == 7


def test_jsonl_shared_prefix_and_multi_turn(tokenizer, tmp_path) -> None:
    path = tmp_path / "mt.jsonl"
    path.write_text("\n".join(json.dumps({"turns": [f"Question {i}?", f"Follow-up {i}?"]}) for i in range(3)))
    prompts = wl.jsonl_prompts(tokenizer, path, 5, (4, 4))
    assert [s.turns[0].prompt for s in prompts.sessions] == ["Question 0?", "Question 1?", "Question 2?",
                                                             "Question 0?", "Question 1?"]
    shared = wl.shared_prefix(tokenizer, 4, prefix_len=50, input_len=(8, 8), output_len=(4, 4), num_prefixes=2)
    texts = [s.turns[0].prompt for s in shared.sessions]
    assert texts[0][:100] == texts[2][:100] and texts[0][:100] != texts[1][:100]
    assert all(57 <= s.turns[0].prompt_len <= 59 for s in shared.sessions)
    conv = wl.multi_turn(tokenizer, 2, 2, (4, 4), (5, 5), path=path)
    first = conv.sessions[0].request(0, [])
    second = conv.sessions[0].request(1, ["REPLY-ONE"])
    assert "Question 0?" in first.prompt and "REPLY-ONE" not in first.prompt
    assert second.prompt.index("Question 0?") < second.prompt.index("REPLY-ONE") < second.prompt.index("Follow-up 0")
    assert second.output_len == 5 and conv.num_requests == 4


# ---- short real runs ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def in_process(model_path):
    from tokenmill.config import EngineConfig

    config = EngineConfig(model=str(model_path), dtype="float32", device="cpu", num_kv_blocks=64, max_num_seqs=8)
    backend = InProcessBackend(config)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(backend.start())
    yield backend, loop
    loop.run_until_complete(backend.stop())
    loop.close()


def _check_run(result, n: int, out: int) -> None:
    m = result.metrics
    assert m["completed"] == n and m["failed"] == 0 and m["output_tokens"] == n * out
    assert m["output_length_mismatches"] == 0
    for r in result.records:
        assert sum(r.chunk_tokens) == r.output_tokens == out
        assert 0 < ttft(r) <= e2e_latency(r) and r.end_time >= r.chunk_times[-1]
        assert len(inter_token_latencies(r)) == out - 1
    assert m["ttft_ms"]["count"] == n and m["tpot_ms"]["count"] == n and m["itl_ms"]["count"] == n * (out - 1)
    assert m["output_throughput"] > 0 and m["duration_s"] > 0


def test_in_process_offline_and_closed_loop(in_process, tokenizer) -> None:
    backend, loop = in_process
    workload = wl.synthetic(tokenizer, 4, (16, 16), (8, 8))
    offline = loop.run_until_complete(run_once(backend, workload, RunSpec("offline"), progress=False))
    _check_run(offline, 4, 8)
    assert {r.token_counting for r in offline.records} == {"engine"}
    assert offline.extra["engine"]["steps"] >= 8 and offline.metrics["weights_gb_per_s"] > 0
    # All four sent at t=0 are batched: they run together, so their first tokens arrive in the same step.
    assert len({r.chunk_times[0] for r in offline.records}) < 4
    single = loop.run_until_complete(run_once(backend, workload, RunSpec("latency"), progress=False))
    _check_run(single, 4, 8)
    ordered = sorted(single.records, key=lambda r: r.send_time)
    assert all(a.end_time <= b.send_time for a, b in zip(ordered, ordered[1:], strict=False))  # one at a time
    assert single.metrics["decode_gb_per_s"]["median"] > 0


def test_in_process_pause_ends_the_worker_and_resume_serves_again(in_process, tokenizer) -> None:
    backend, loop = in_process
    engine, before = backend.engine, backend._thread
    loop.run_until_complete(backend.pause())
    assert backend._thread is None and before is not None and not before.is_alive()
    loop.run_until_complete(backend.resume())
    assert backend._thread is not None and backend._thread.is_alive() and backend.engine is engine  # not reloaded
    workload = wl.synthetic(tokenizer, 2, (16, 16), (4, 4))
    _check_run(loop.run_until_complete(run_once(backend, workload, RunSpec("offline"), progress=False)), 2, 4)


def test_in_process_multi_turn_sends_follow_ups_after_replies(in_process, tokenizer) -> None:
    backend, loop = in_process
    workload = wl.multi_turn(tokenizer, 2, 2, (6, 6), (4, 4), seed=1)
    result = loop.run_until_complete(run_once(backend, workload, RunSpec("concurrency", concurrency=2),
                                              progress=False))
    _check_run(result, 4, 4)
    by_turn = {(r.session, r.turn): r for r in result.records}
    for session in (0, 1):
        first, second = by_turn[(session, 0)], by_turn[(session, 1)]
        assert second.send_time >= first.end_time
        assert second.prompt_tokens > first.prompt_tokens + first.output_tokens  # history + reply + new turn


def test_transformers_peer_batches_offline_requests(model_path, hf_model, tokenizer) -> None:
    from tokenmill.bench.peers import TransformersBackend

    backend = TransformersBackend(model_path, dtype="float32", batch_size=2, threads=None, model=hf_model)
    workload = wl.synthetic(tokenizer, 3, (6, 12), (3, 6), seed=2)

    async def go():
        await backend.start()
        try:
            return await run_once(backend, workload, RunSpec("offline"), progress=False)
        finally:
            await backend.stop()

    result = asyncio.run(go())
    m = result.metrics
    assert m["completed"] == 3 and m["output_length_mismatches"] == 0 and m["token_counting"] == ["streamer"]
    expected = [s.turns[0].output_len for s in workload.sessions]
    assert [r.output_tokens for r in result.records] == expected
    first, second, third = result.records
    assert first.chunk_times[0] == second.chunk_times[0]  # one padded batch of two, then a batch of one
    assert third.chunk_times[0] > max(first.chunk_times[-1], second.chunk_times[-1])


def test_cli_serve_against_tokenmill_server(model_path, tmp_path) -> None:
    """`tokenmill serve` started by the peer helper on a free loopback port, driven over HTTP by the same client."""
    from tokenmill.bench.cli import main

    out = tmp_path / "results"
    code = main(["--scenario", "serve", "--backend", "tokenmill-server", "--request-rate", "8,inf",
                 "--num-requests", "4", "--input-len", "12", "--output-len", "8", "--slo-ttft-ms", "60000",
                 "--slo-tpot-ms", "60000", "--model", str(model_path), "--dtype", "float32", "--device", "cpu",
                 "--num-kv-blocks", "64", "--max-num-seqs", "8", "--no-ceilings", "--no-progress",
                 "--output-dir", str(out), "--name", "smoke"])
    assert code == 0
    report = json.loads((out / "smoke.json").read_text())
    assert [run["label"] for run in report["runs"]] == ["rate 8/s", "rate inf/s"]
    for run in report["runs"]:
        m = run["metrics"]
        assert m["completed"] == 4 and m["output_tokens"] == 32 and m["token_counting"] == ["usage"]
        assert m["slo_attainment"] == 1.0 and m["goodput"] > 0
        assert all(r["output_tokens"] == sum(r["chunk_tokens"]) == 8 for r in run["requests"])
    assert report["backends"]["tokenmill-server"]["server_reports_chunk_usage"] is True
    table = (out / "smoke.md").read_text()
    assert "| tokenmill-server | rate 8/s | 4/0 |" in table and "TTFT" in table
    pytest.importorskip("matplotlib")
    assert (out / "smoke_latency_cdf.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(not __import__("tokenmill.bench.peers", fromlist=["x"]).llama_cpp_available(),
                    reason="llama-cpp-python[server] not installed (optional extra `peers`)")
def test_llama_cpp_server_smoke(model_path, tmp_path) -> None:
    from tokenmill.bench.cli import main

    out = tmp_path / "results"
    code = main(["--scenario", "serve", "--backend", "llama.cpp", "--request-rate", "inf", "--num-requests", "2",
                 "--input-len", "12", "--output-len", "8", "--model", str(model_path), "--llama-cpp-threads", "1",
                 "--no-ceilings", "--no-progress", "--no-plots", "--output-dir", str(out), "--name", "llama"])
    assert code == 0
    (run,) = json.loads((out / "llama.json").read_text())["runs"]
    assert run["metrics"]["completed"] == 2 and run["metrics"]["output_tokens"] == 16
    assert run["metrics"]["token_counting"] == ["chunks+length"]  # llama-cpp-python streams no usage
