"""One request cannot slow or fail everyone: bounded inputs, O(1) aborts, delta outputs, failures kept to the
request that caused them, plans checked before the step. A small random model of the real architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import write_tiny_gguf

from tokenmill.config import EngineConfig
from tokenmill.engine import LLMEngine
from tokenmill.kv.manager import KVCacheManager
from tokenmill.request import Request, RequestStatus
from tokenmill.runner.checks import InvalidPlanError, check_plan
from tokenmill.sampling_params import MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, InvalidRequestError, SamplingParams
from tokenmill.scheduler.plan import ScheduledSeq, StepPlan
from tokenmill.scheduler.queue import WaitingQueue

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    return write_tiny_gguf(path, metadata={"tokenizer.ggml.merges": [], "tokenizer.ggml.eos_token_id": 0})


def make_engine(path: Path, **overrides) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), dtype="float32", num_kv_blocks=64, block_size=4, **overrides))


def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams = GREEDY) -> dict[str, tuple[str, list]]:
    """request id -> (finish reason, tokens) after running every prompt to the end."""
    ids = [engine.add_request(p, params, request_id=f"r{i}") for i, p in enumerate(prompts)]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    reasons: dict[str, str] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.delta_token_ids
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    return {i: (reasons[i], tokens[i]) for i in ids}


# ---- the waiting queue ----

def test_waiting_queue_removes_in_place_and_keeps_order() -> None:
    reqs = [Request(f"r{i}", [1], GREEDY) for i in range(5)]
    queue = WaitingQueue()
    for r in reqs[1:]:
        queue.append(r)
    queue.appendleft(reqs[0])
    queue.remove(reqs[0])
    queue.remove(reqs[2])
    assert [r.request_id for r in queue] == ["r1", "r3", "r4"] and len(queue) == 3
    assert queue.head() is reqs[1] and queue.popleft() is reqs[1]
    assert queue.popleft() is reqs[3]  # the removed r2 was dropped on the way
    queue.remove(reqs[4])
    assert not queue and queue.head() is None


def test_aborting_waiting_requests_never_compares_requests(tiny_model, monkeypatch) -> None:
    engine = make_engine(tiny_model)
    for i in range(300):
        engine.add_request([5, 6], GREEDY, request_id=f"w{i}")

    def no_equality(self, other):  # list.remove / `in` on a dataclass compare every field: quadratic aborts
        raise AssertionError("requests compared by value")

    monkeypatch.setattr(Request, "__eq__", no_equality)
    for i in reversed(range(0, 300, 2)):
        engine.abort(f"w{i}")
    assert engine.stats().num_waiting == 150
    assert [r.request_id for r in engine.scheduler.waiting][:3] == ["w1", "w3", "w5"]


# ---- bounded, finite parameters ----

@pytest.mark.parametrize("name", ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                                  "frequency_penalty"])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), float("-inf")])
def test_non_finite_sampling_values_are_rejected(name: str, value: float) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**{name: value})
    assert info.value.field == name


def test_stop_lists_are_bounded() -> None:
    with pytest.raises(InvalidRequestError, match="at most"):
        SamplingParams(stop=[f"s{i}" for i in range(MAX_STOP_STRINGS + 1)])
    with pytest.raises(InvalidRequestError, match="characters"):
        SamplingParams(stop=["x" * 10_000])
    with pytest.raises(InvalidRequestError, match="at most"):
        SamplingParams(stop_token_ids=list(range(MAX_STOP_TOKEN_IDS + 1)))
    message = str(pytest.raises(InvalidRequestError, SamplingParams, stop=[""] * 5000).value)
    assert len(message) < 200  # an error never echoes a huge input back


# ---- outputs: deltas, stop strings ----

def test_delta_outputs_add_up_to_the_cumulative_ones(tiny_model) -> None:
    engine = make_engine(tiny_model)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    engine.add_request(PROMPTS[0], params, request_id="cumulative")
    engine.add_request(PROMPTS[0], SamplingParams(**{**params.__dict__, "output_kind": "delta"}), request_id="delta")
    outs: dict[str, list] = {"cumulative": [], "delta": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs[out.request_id].append(out)
    full, deltas = outs["cumulative"][-1], outs["delta"]
    assert all(len(d.token_ids) == 1 and len(d.logprobs) == 1 for d in deltas)  # O(1) per step, not O(length)
    assert "".join(d.text for d in deltas) == full.text
    assert [t for d in deltas for t in d.token_ids] == full.token_ids
    assert [lp for d in deltas for lp in d.logprobs] == full.logprobs
    assert deltas[-1].num_output_tokens == len(full.token_ids) == 12


def test_stop_strings_end_the_text_where_the_first_one_appears(tiny_model) -> None:
    free = run(make_engine(tiny_model), [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    text = "".join(f"t{t}" for t in free["r0"][1])
    first = text[5:9]
    later = next(text[j:j + 4] for j in range(12, len(text) - 4) if text.find(text[j:j + 4]) > text.find(first))
    engine = make_engine(tiny_model)
    engine.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[later, first]))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_reason == first
    assert outs[-1].text == text[:text.find(first)]


# ---- failures stay with their request ----

def test_a_request_that_breaks_the_batch_fails_alone(tiny_model, monkeypatch) -> None:
    clean = run(make_engine(tiny_model), PROMPTS)
    engine = make_engine(tiny_model)
    poison = 14  # only request r3's prompt holds it
    forward = engine.runner.backend.forward

    def failing_forward(input_ids, positions, metadata):
        if bool(((input_ids == poison) & (positions == 0)).any()):  # r3's prompt, never a sampled token
            raise RuntimeError("kernel fault")
        return forward(input_ids, positions, metadata)

    monkeypatch.setattr(engine.runner.backend, "forward", failing_forward)
    results = run(engine, PROMPTS)
    assert results["r3"][0] == "error"
    assert {k: v for k, v in results.items() if k != "r3"} == {k: v for k, v in clean.items() if k != "r3"}
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks


def test_a_request_whose_output_handling_fails_fails_alone(tiny_model) -> None:
    clean = run(make_engine(tiny_model), PROMPTS)
    engine = make_engine(tiny_model)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(prompt, GREEDY, request_id=f"r{i}")
    state = engine.scheduler.get("r1").output_state

    def broken(token_id, logprobs):
        raise UnicodeError("detokenizer fault")

    state.append_token = broken
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(PROMPTS))}
    reasons = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.delta_token_ids
            reasons[out.request_id] = out.finish_reason
    assert reasons.pop("r1") == "error"
    assert {k: (reasons[k], tokens[k]) for k in reasons} == {k: v for k, v in clean.items() if k != "r1"}


# ---- plans are checked before they touch memory ----

def test_check_plan_refuses_out_of_range_addresses() -> None:
    seq = ScheduledSeq("a", 0, 2, 2, (1,), 1)
    good = StepPlan((seq,), (3, 4), (0, 1), (4, 5))
    check_plan(good, num_blocks=2, block_size=4, max_positions=8, vocab_size=10)
    bad = {
        "slot": StepPlan((seq,), (3, 4), (0, 1), (4, 8)),
        "position": StepPlan((seq,), (3, 4), (0, 8), (4, 5)),
        "token id": StepPlan((seq,), (3, 10), (0, 1), (4, 5)),
        "block": StepPlan((ScheduledSeq("a", 0, 2, 2, (2,), 1),), (3, 4), (0, 1), (4, 5)),
        "context": StepPlan((ScheduledSeq("a", 0, 2, 5, (1,), 1),), (3, 4), (0, 1), (4, 5)),
        "copied block": StepPlan((seq,), (3, 4), (0, 1), (4, 5), block_copies=((0, 2),)),
        "rows": StepPlan((ScheduledSeq("a", 1, 2, 2, (1,), 1),), (3, 4), (0, 1), (4, 5)),
    }
    for what, plan in bad.items():
        with pytest.raises(InvalidPlanError):
            check_plan(plan, num_blocks=2, block_size=4, max_positions=8, vocab_size=10)
        assert what


@pytest.fixture(scope="module")
def tiny_fused_model(tmp_path_factory) -> Path:
    """Head size 64, so that the fused C++ step (which indexes the cache with the plan's raw slots) runs it."""
    path = tmp_path_factory.mktemp("tiny") / "tiny64.gguf"
    return write_tiny_gguf(path, hidden=256, heads=4, kv_heads=2, ff=256,
                           metadata={"tokenizer.ggml.merges": [], "tokenizer.ggml.eos_token_id": 0})


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_a_corrupt_plan_fails_its_request_without_writing(fused, tiny_model, tiny_fused_model, monkeypatch) -> None:
    engine = make_engine(tiny_fused_model if fused else tiny_model)
    if fused and type(engine.runner.backend).__name__ != "FusedCPUBackend":
        pytest.skip("the fused CPU step is not available here")
    schedule = engine.scheduler.schedule

    def corrupt() -> StepPlan:
        plan = schedule()
        if not plan.seqs:
            return plan
        slots = (10**9,) + plan.slot_mapping[1:]  # past the end of the cache
        return StepPlan(plan.seqs, plan.token_ids, plan.positions, slots, plan.block_copies,
                        plan.finished_request_ids, plan.preempted_request_ids)

    monkeypatch.setattr(engine.scheduler, "schedule", corrupt)
    before = engine.kv_cache.k.clone()
    results = run(engine, [PROMPTS[0]])
    assert results["r0"][0] == "error"
    assert torch.equal(engine.kv_cache.k, before)


# ---- tenants ----

def test_requests_with_different_cache_salts_share_no_blocks() -> None:
    manager = KVCacheManager(16, 4, enable_prefix_caching=True)
    tokens = list(range(9))

    def cached_after(first_salt: str | None, second_salt: str | None) -> int:
        first = Request("a", tokens, GREEDY, cache_salt=first_salt)
        manager.allocate_slots(first, len(tokens))
        manager.commit(first, len(tokens))
        manager.cache_full_blocks(first)
        second = Request("b", tokens, GREEDY, cache_salt=second_salt)
        hits = len(manager.find_cached_prefix(second))
        for request in (first, second):
            manager.free(request)
            manager.forget(request)
        manager.pool.reset_cache()
        return hits

    assert cached_after("tenant-1", "tenant-1") == 2
    assert cached_after(None, None) == 2
    assert cached_after("tenant-1", "tenant-2") == 0
    assert cached_after(None, "tenant-2") == 0


def test_finish_statuses_include_error() -> None:
    assert RequestStatus.FINISHED_ERROR.finished and RequestStatus.FINISHED_ERROR.value == "error"
