"""tokenmill on Ray Serve, on a simulated multi-node cluster (a head with no CPUs and two 1-CPU nodes, one engine
replica each) with the real model: the OpenAI SDK unchanged, spreading, prefix affinity, backpressure, a replica
killed mid-stream, and autoscaling 1 -> 2 -> 1. One cluster for the module: starting Ray is most of the cost."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytest.importorskip("ray.serve")
import ray  # noqa: E402
from ray import serve  # noqa: E402

from tokenmill.cluster.deploy import (  # noqa: E402
    REPLICA_DEPLOYMENT,
    ClusterConfig,
    build_app,
    replica_ids,
    replica_stats,
)
from tokenmill.config import EngineConfig  # noqa: E402
from tokenmill.ports import free_port  # noqa: E402
from tokenmill.server.config import ServerConfig  # noqa: E402

pytestmark = pytest.mark.cluster

APP = "tokenmill"
ENGINE = EngineConfig(enforce_eager=True, num_kv_blocks=256, max_model_len=1024, dtype="float32")
PREFIX = "You are a careful assistant who answers questions about the history of bread baking. " * 6
COLOCATED_TEXTS: list[str] = []  # greedy answers of the co-located deployment, for the P/D one to match


@pytest.fixture(scope="module")
def cluster(model_path) -> Iterator[SimpleNamespace]:
    from ray.cluster_utils import Cluster

    sim = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        sim.add_node(num_cpus=1)
    ray.init(address=sim.address, logging_level=logging.WARNING, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}")
    finally:
        serve.shutdown()
        ray.shutdown()
        sim.shutdown()


def deploy(config: ClusterConfig) -> None:
    serve.run(build_app(ENGINE, ServerConfig(), config), name=APP, route_prefix="/")


def running_replicas() -> int:
    states = serve.status().applications[APP].deployments[REPLICA_DEPLOYMENT].replica_states
    return states.get("RUNNING", 0)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.25)


@pytest.fixture(scope="module")
def two_replicas(cluster) -> str:
    deploy(ClusterConfig(replicas=2, max_ongoing_requests=4, max_queued_requests=8, routing_stats_period_s=0.5,
                         health_check_period_s=1.0))
    return cluster.url


def complete(url: str, prompt: str, max_tokens: int = 4) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=120,
                      json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})


def test_openai_sdk_works_unchanged(two_replicas) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{two_replicas}/v1", api_key="unused")
    model = client.models.list().data[0].id
    assert model == "smollm2-135m-instruct"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    chunks = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    text = client.completions.create(model=model, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert text.usage.completion_tokens == 4
    with pytest.raises(Exception, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=messages, max_tokens=2)


def test_requests_spread_over_replicas_and_nodes(two_replicas) -> None:
    """Four requests at once, up to three rounds: Serve's queue-length cache, which the least-loaded choice reads, can
    lag a burst that arrives before any of it is sent, so one round alone may land on one replica."""
    replicas, nodes = set(), set()
    for round_ in range(3):
        prompts = [f"Story number {i}: once upon a time a {word} lived (round {round_})" for i, word in
                   enumerate(["fox", "baker", "river", "sailor"])]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda p: complete(two_replicas, p, 24), prompts))
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
        replicas |= {r.headers["x-tokenmill-replica"] for r in replies}
        nodes |= {r.headers["x-tokenmill-node"] for r in replies}
        if len(replicas) == 2 and len(nodes) == 2:
            break
    assert len(replicas) == 2 and len(nodes) == 2, (replicas, nodes)


def test_cluster_metrics_label_every_replica(two_replicas) -> None:
    complete(two_replicas, "Count to three:", 3)
    scrape = httpx.get(f"{two_replicas}/metrics", timeout=60)
    assert scrape.status_code == 200 and scrape.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(scrape.text)}
    running = families["tokenmill:num_requests_running"].samples
    assert sorted(s.labels["replica"] for s in running) == sorted(replica_ids(APP))
    finished = sum(s.value for s in families["tokenmill:e2e_request_latency_seconds"].samples
                   if s.name.endswith("_count"))
    assert finished >= 1


def test_requests_sharing_a_prefix_stick_to_one_replica(two_replicas) -> None:
    # Idle replicas tie, and a tie goes to the same replica every time; so the prefix is first sent while that
    # replica is busy, to the other one. Later requests follow the prefix there only if affinity works.
    time.sleep(1.0)  # reports of the earlier tests' requests arrive first
    replicas = []
    with httpx.Client(timeout=120) as client:
        busy = _open_stream(client, two_replicas, "Keep the tie-winner busy:", 600)
        try:
            assert busy.status_code == 200
            replicas.append(_prefix_request(two_replicas, 0))
        finally:
            busy.close()
    assert replicas[0] != busy.headers["x-tokenmill-replica"]
    for i in range(1, 6):
        time.sleep(0.6 if i % 2 else 0.0)  # some before, some after the replica's next report
        replicas.append(_prefix_request(two_replicas, i))
    assert len(set(replicas)) == 1, replicas
    hits = {s["x-tokenmill-replica"]: s["prefix_cache_hits"] for s in replica_stats(APP)}
    assert len(hits) == 2 and hits[replicas[0]] >= 5 * 16 * 4  # five later requests reused the prefix's blocks


def _prefix_request(url: str, i: int) -> str:
    reply = complete(url, PREFIX + f"Question {i}: who baked the first loaf?")
    assert reply.status_code == 200
    COLOCATED_TEXTS.append(reply.json()["choices"][0]["text"])
    return reply.headers["x-tokenmill-replica"]


def _open_stream(client: httpx.Client, url: str, prompt: str, max_tokens: int) -> httpx.Response:
    request = client.build_request("POST", f"{url}/v1/completions", json={
        "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True})
    return client.send(request, stream=True)


def test_overload_answers_503_with_retry_after(two_replicas) -> None:
    # 2 replicas x max_ongoing_requests 4 run 8 streams; 8 more may wait in the ingress's queue; a burst of 40
    # leaves the rest refused at once (Serve counts requests being routed as queued, so how many exactly varies).
    # The queued ones answer only once a running stream ends, which closing the running ones does.
    with httpx.Client(timeout=60) as client, concurrent.futures.ThreadPoolExecutor(40) as pool:
        starts = [pool.submit(_open_stream, client, two_replicas, f"Count to a thousand, attempt {i}:", 400)
                  for i in range(40)]

        def answered() -> list[httpx.Response]:
            return [f.result() for f in starts if f.done() and f.exception() is None]

        wait_for(lambda: sum(s.status_code == 503 for s in answered()) >= 1, 50, "a refusal")
        streams = answered()
        try:
            refused = [s for s in streams if s.status_code == 503]
            assert sum(s.status_code == 200 for s in streams) <= 8, [s.status_code for s in streams]
            assert all(s.headers["retry-after"] == "1" for s in refused)
            assert json.loads(refused[0].read())["error"]["code"] == "server_overloaded"
        finally:
            for s in streams:
                s.close()
        pending = [f for f in starts if not (f.done() and f.exception() is None and f.result() in streams)]
        while pending:  # the queued ones start as running streams are cut off: cut them off in turn
            for f in [f for f in pending if f.done()]:
                if f.exception() is None:
                    f.result().close()
                pending.remove(f)
            time.sleep(0.1)


def test_killed_replica_fails_only_its_running_requests(two_replicas) -> None:
    with httpx.Client(timeout=120) as client:
        victim_stream = _open_stream(client, two_replicas, "Write a very long essay about rivers:", 600)
        try:
            assert victim_stream.status_code == 200
            lines = victim_stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            victim = victim_stream.headers["x-tokenmill-replica"]
            ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#{REPLICA_DEPLOYMENT}#{victim}", namespace="serve"),
                     no_restart=True)
            events = [line for line in lines if line.startswith("data: ")]
        finally:
            victim_stream.close()
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: "):])["error"]["code"] == "replica_failed"
    # Requests sent after the failure are served, by the survivor or by the replica Serve starts in its place
    # (one at a time: with one replica left, this deployment's small limits would refuse a burst).
    replies = [complete(two_replicas, f"After the failure, request {i}:") for i in range(4)]
    assert [r.status_code for r in replies] == [200] * 4, [r.text for r in replies]
    assert victim not in {r.headers["x-tokenmill-replica"] for r in replies}
    wait_for(lambda: running_replicas() == 2, 120, "Serve to replace the killed replica")


def test_autoscaling_goes_from_one_replica_to_two_and_back(cluster) -> None:
    deploy(ClusterConfig(replicas=1, min_replicas=1, max_replicas=2, target_ongoing_requests=1, upscale_delay_s=0,
                         downscale_delay_s=1, look_back_period_s=1, max_ongoing_requests=4))
    wait_for(lambda: running_replicas() == 1, 60, "one replica")
    with httpx.Client(timeout=120) as client:
        streams = [_open_stream(client, cluster.url, f"Load {i}: list every prime number:", 800) for i in range(3)]
        try:
            assert [s.status_code for s in streams] == [200] * 3
            wait_for(lambda: running_replicas() == 2, 120, "a second replica under load")
        finally:
            for s in streams:
                s.close()
    wait_for(lambda: running_replicas() == 1, 120, "scaling back to one replica when idle")


def test_prefill_decode_disaggregation_is_lossless(cluster) -> None:
    if not COLOCATED_TEXTS:
        pytest.skip("compares with test_requests_sharing_a_prefix_stick_to_one_replica's answers")
    deploy(ClusterConfig(replicas=1, prefill_replicas=1, pd_min_prompt_tokens=64))
    wait_for(lambda: len(replica_ids(APP)) == 1, 60, "the previous deployment's replicas to stop")
    for i in range(2):
        reply = complete(cluster.url, PREFIX + f"Question {i}: who baked the first loaf?")
        assert reply.status_code == 200
        assert reply.json()["choices"][0]["text"] == COLOCATED_TEXTS[i]
    [decode] = replica_stats(APP)
    prompt_blocks = (reply.json()["usage"]["prompt_tokens"] - 1) // 16
    assert decode["fallbacks"] == 0 and decode["imported_blocks"] >= prompt_blocks
    assert decode["prefix_cache_hits"] >= 2 * prompt_blocks * 16  # the decode replica computed only the tails
    short = complete(cluster.url, "Hi")  # under pd_min_prompt_tokens: prefilled where it is decoded
    assert short.status_code == 200 and replica_stats(APP)[0]["imported_blocks"] == decode["imported_blocks"]

