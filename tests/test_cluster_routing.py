"""The cluster's routing, without Ray: policies with exact orders, the prefix index, route hints that hash exactly
as the engine's prefix cache does, and the replica's request protocol on a tiny model."""

from __future__ import annotations

import asyncio

import pytest

from tokenmill.cluster.hints import MAX_HINT_TOKENS, RouteHint, route_hint, worth_prefilling
from tokenmill.cluster.routing import (
    PowerOfTwo,
    PrefixAffinity,
    PrefixIndex,
    ReplicaState,
    RoundRobin,
    make_policy,
)
from tokenmill.kv.hashing import digest
from tokenmill.kv.manager import KVCacheManager
from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.protocol import ChatCompletionRequest, CompletionRequest


def states(*specs: tuple[str, int, int, int]) -> list[ReplicaState]:
    return [ReplicaState(rid, ongoing, free, matched) for rid, ongoing, free, matched in specs]


def test_round_robin_turns_through_replicas_by_id() -> None:
    policy = RoundRobin()
    replicas = states(("b", 0, 0, 0), ("a", 5, 0, 9), ("c", 0, 0, 0))
    assert [policy.rank(replicas, 4) for _ in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_power_of_two_puts_the_less_loaded_of_its_draw_first() -> None:
    replicas = states(("a", 3, 0, 0), ("b", 1, 0, 0), ("c", 2, 0, 0))
    seen = set()
    for seed in range(20):
        order = PowerOfTwo(seed).rank(replicas, 0)
        assert sorted(order) == ["a", "b", "c"]
        drawn = sorted(order[:2], key=lambda rid: {"a": 3, "b": 1, "c": 2}[rid])
        assert order[:2] == drawn  # within the draw, by load
        seen.add(order[0])
    assert seen == {"b", "c"}  # "a", the most loaded, is never first: it loses to whichever it is drawn with


def test_affinity_takes_the_longest_cached_prefix_above_the_threshold() -> None:
    policy = PrefixAffinity(cache_threshold=0.5)
    replicas = states(("a", 0, 10, 1), ("b", 3, 10, 6), ("c", 1, 99, 0))
    assert policy.rank(replicas, 10) == ["b", "a", "c"]  # 6/10 held by b; then the rest by load
    assert policy.rank(replicas, 13) == ["a", "c", "b"]  # 6/13 < 0.5: least loaded first
    assert policy.rank(replicas, 0) == ["a", "c", "b"]  # no prompt blocks: by load


def test_affinity_ties_go_to_the_least_loaded_then_the_freest() -> None:
    policy = PrefixAffinity()
    assert policy.rank(states(("a", 2, 0, 4), ("b", 1, 0, 4), ("c", 0, 0, 3)), 4) == ["b", "c", "a"]
    assert policy.rank(states(("a", 0, 5, 0), ("b", 0, 9, 0)), 4) == ["b", "a"]


def test_affinity_load_guard_overrides_the_cache() -> None:
    policy = PrefixAffinity(cache_threshold=0.1, balance_abs_threshold=4, balance_rel_threshold=1.5)
    assert not policy.imbalanced(states(("a", 10, 0, 8), ("b", 7, 0, 0)))  # 3 apart: not more than 4
    assert not policy.imbalanced(states(("a", 20, 0, 8), ("b", 15, 0, 0)))  # 5 apart, but 20 < 1.5 x 15
    assert policy.imbalanced(states(("a", 10, 0, 8), ("b", 4, 0, 0)))
    assert policy.rank(states(("a", 10, 0, 8), ("b", 4, 0, 0)), 8) == ["b", "a"]
    assert policy.rank(states(("a", 8, 0, 8), ("b", 4, 0, 0)), 8) == ["a", "b"]  # 8 - 4 = 4: not more than 4


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_policy("random")
    with pytest.raises(ValueError, match="cache_threshold"):
        PrefixAffinity(cache_threshold=1.5)
    assert isinstance(make_policy("affinity", cache_threshold=0.9), PrefixAffinity)


def test_prefix_index_matches_leading_blocks_from_reports_and_routing() -> None:
    now = [0.0]
    index = PrefixIndex(ttl_s=5.0, clock=lambda: now[0])
    index.report("a", [1, 2, 3, 9])
    assert index.matched_blocks("a", [1, 2, 3, 4]) == 3
    assert index.matched_blocks("a", [7, 2, 3]) == 0  # a chain is matched from its start only
    index.routed("b", [1, 2])
    now[0] = 4.0
    index.routed("b", [5])
    assert index.matched_blocks("b", [1, 2, 5]) == 3
    now[0] = 5.5  # the first routing is older than ttl_s: forgotten; the report did not confirm it
    assert index.matched_blocks("b", [1, 2, 5]) == 0
    assert index.matched_blocks("b", [5]) == 1
    index.report("a", [1])  # a report replaces the last one
    assert index.matched_blocks("a", [1, 2]) == 1
    index.forget("a")
    assert index.matched_blocks("a", [1]) == 0


def test_route_hint_digests_are_the_engine_prefix_cache_hashes() -> None:
    bs = 4
    kv = KVCacheManager(8, bs, enable_prefix_caching=True, cache_salt="model|bf16")
    tokens = list(range(100, 114))  # 14 tokens: 3 full blocks
    for salt in (None, "tenant-1"):
        request = Request(f"r-{salt}", tokens, SamplingParams(max_tokens=1), cache_salt=salt)
        engine_side = [digest(h) for h in kv.block_hashes(request, 3)]
        assert RouteHint(tuple(tokens), salt).digests(kv.hash_root, bs) == engine_side
    assert RouteHint(tuple(tokens), "tenant-2").digests(kv.hash_root, bs)[0] != engine_side[0]
    # 12 tokens end on a block boundary: the last one is always computed, so only 2 blocks can be hits
    assert len(RouteHint(tuple(tokens[:12])).digests(kv.hash_root, bs)) == 2
    assert len(RouteHint(tuple(range(MAX_HINT_TOKENS + 100))).digests(kv.hash_root, 16)) == MAX_HINT_TOKENS // 16


def test_route_hint_renders_the_prompt_as_the_replica_does(llm_fp32) -> None:
    tokenizer = llm_fp32.engine.tokenizer
    chat = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "Hello there"}]})
    hint = route_hint(tokenizer, chat, "salt")
    expected = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}],
                                                              add_generation_prompt=True))
    assert hint == RouteHint(tuple(expected), "salt")
    completion = CompletionRequest.model_validate({"prompt": [[5, 6, 7], [8]]})
    assert route_hint(tokenizer, completion, None) == RouteHint((5, 6, 7), None)
    long_prompt = [7] * (MAX_HINT_TOKENS + 5)  # hashed only so far, but a prefill replica gets all of it
    assert route_hint(tokenizer, CompletionRequest.model_validate({"prompt": long_prompt}), None) == \
        RouteHint(tuple(long_prompt), None)
    bad_tools = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}],
                                                      "tool_choice": "required"})
    assert route_hint(tokenizer, bad_tools, None) is None  # the replica answers it with the 400


def test_only_requests_the_decode_replica_takes_are_prefilled_elsewhere() -> None:
    card = {"id": "smol", "max_model_len": 300}
    hint = RouteHint(tuple(range(1, 257)))

    def completion(**body: object) -> CompletionRequest:
        return CompletionRequest.model_validate({"prompt": list(hint.token_ids)} | body)

    assert worth_prefilling(completion(), hint, card, 256)
    assert worth_prefilling(completion(model="smol", max_tokens=44), hint, card, 256)
    assert not worth_prefilling(completion(), RouteHint(hint.token_ids[:255]), card, 256)  # short: decoded there
    assert not worth_prefilling(completion(model="other"), hint, card, 256)  # a 404 from the decode replica
    assert not worth_prefilling(completion(max_tokens=45), hint, card, 256)  # past the context: a 400
    assert not worth_prefilling(completion(), None, card, 256)
    chat = {"messages": [{"role": "user", "content": "x"}]}
    assert worth_prefilling(ChatCompletionRequest.model_validate(chat | {"max_completion_tokens": 44}), hint, card, 256)
    assert not worth_prefilling(ChatCompletionRequest.model_validate(chat | {"max_completion_tokens": 45}), hint,
                                card, 256)
    assert not worth_prefilling(completion(), hint, {"id": "smol"}, 256)  # no context length known


def test_replica_metrics_merge_with_a_replica_label() -> None:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from tokenmill.cluster.metrics import merge_expositions

    texts = {}
    for replica, n in (("r2", 2), ("r1", 1)):
        registry = CollectorRegistry()
        Counter("tokenmill:request_success", "Finished.", ["finished_reason"], registry=registry).labels("stop").inc(n)
        Gauge("tokenmill:num_requests_running", "Running.", registry=registry).set(10 * n)
        Histogram("tokenmill:e2e", "Latency.", buckets=(1.0,), registry=registry).observe(0.75 * n)
        texts[replica] = generate_latest(registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(merge_expositions(texts).decode())}
    assert families["tokenmill:num_requests_running"].type == "gauge"
    assert [(s.labels, s.value) for s in families["tokenmill:num_requests_running"].samples] == \
        [({"replica": "r1"}, 10.0), ({"replica": "r2"}, 20.0)]
    success = [(s.labels, s.value) for s in families["tokenmill:request_success"].samples if s.name.endswith("_total")]
    assert success == [({"finished_reason": "stop", "replica": "r1"}, 1.0),
                       ({"finished_reason": "stop", "replica": "r2"}, 2.0)]
    buckets = [(s.labels["replica"], s.labels["le"], s.value) for s in families["tokenmill:e2e"].samples
               if s.name.endswith("_bucket")]
    assert buckets == [("r1", "1.0", 1.0), ("r1", "+Inf", 1.0), ("r2", "1.0", 0.0), ("r2", "+Inf", 1.0)]
    assert merge_expositions({}) == b""


def test_replica_protocol_outside_serve(tmp_path) -> None:
    pytest.importorskip("ray.serve")  # the replica asks Serve for its id, and is told it runs outside Serve
    from tests.conftest import write_tiny_gguf
    from tokenmill.cluster.replica import STARTED, EngineReplica, Reply
    from tokenmill.config import EngineConfig
    from tokenmill.server.async_engine import Origin
    from tokenmill.server.config import ServerConfig

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    replica = EngineReplica(EngineConfig(model=str(path), enforce_eager=True, num_kv_blocks=32, num_threads=1),
                            ServerConfig())

    async def run(body: dict, stream: bool) -> list:
        return [item async for item in replica.generate("completions", body, Origin(), stream)]

    try:
        body = {"prompt": list(range(1, 40)), "max_tokens": 4, "temperature": 0}
        whole = asyncio.run(run(body, False))
        assert [type(i) for i in whole] == [Reply, Reply] and whole[0].status == STARTED
        assert whole[1].status == 200 and whole[1].body["usage"]["completion_tokens"] == 4
        assert whole[1].headers["x-tokenmill-replica"] == "local"
        streamed = asyncio.run(run(body, True))
        assert streamed[0].status == STARTED and streamed[1] == Reply(200, None, replica.identity)
        assert streamed[-1] == "data: [DONE]\n\n" and all(isinstance(c, str) for c in streamed[2:])
        refused = asyncio.run(run({"prompt": list(range(1, 40)), "max_tokens": 10_000}, False))
        assert refused[1].status == 400 and refused[1].body["error"]["param"] == "max_tokens"
        async def failed_transfer() -> None:
            raise ConnectionError("the prefill replica died")

        async def with_lost_kv() -> list:
            return [i async for i in replica.generate("completions", body, Origin(), False,
                                                      kv=[failed_transfer()])]

        fallback = asyncio.run(with_lost_kv())  # the prompt is computed here instead: same answer
        assert fallback[1].body["choices"] == whole[1].body["choices"]
        assert replica.transfer_stats["fallbacks"] == 1
        stats = asyncio.run(replica.record_routing_stats())
        assert stats["block_size"] == 16 and len(stats["digests"]) == 2  # 39 prompt tokens: 2 full blocks cached
        hint = RouteHint(tuple(range(1, 40)))
        assert hint.digests(stats["hash_root"], 16) == stats["digests"]
        replica.check_health()
    finally:
        replica.engine.shutdown()
