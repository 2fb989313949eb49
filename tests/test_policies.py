"""Scheduling policies (priority, fair/VTC, SJF): exact admission and preemption orders on hand-made arrivals, VTC
counter arithmetic with the lift, SJF aging, every policy with chunked prefill, prefix hits and preemption (pure
Python); and on a small random model, greedy outputs that no policy or preemption changes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from conftest import write_tiny_gguf

from tokenmill.config import EngineConfig
from tokenmill.engine import LLMEngine
from tokenmill.kv.manager import KVCacheManager
from tokenmill.request import Request, RequestStatus
from tokenmill.sampling_params import InvalidRequestError, SamplingParams
from tokenmill.scheduler.fair import FairPolicy
from tokenmill.scheduler.plan import StepPlan
from tokenmill.scheduler.scheduler import Scheduler, SchedulerConfig

_arrivals = iter(range(10**6))


def make(policy: str, num_blocks: int = 16, block_size: int = 4, prefix: bool = False, **cfg) -> Scheduler:
    config = SchedulerConfig(**{"max_num_seqs": 8, "max_num_batched_tokens": 16, "max_model_len": 64,
                                "policy": policy, **cfg})
    return Scheduler(config, KVCacheManager(num_blocks, block_size, enable_prefix_caching=prefix))


def req(rid: str, prompt_len: int = 2, priority: int = 0, client: str | None = None, max_tokens: int = 100,
        first_token: int = 100) -> Request:
    request = Request(rid, list(range(first_token, first_token + prompt_len)), SamplingParams(max_tokens=max_tokens),
                      priority=priority, client_id=client)
    request.arrival_time = float(next(_arrivals))  # distinct and increasing, whatever the clock's resolution
    return request


def step(sched: Scheduler) -> dict[str, int]:
    """One step: schedule, then `complete` it."""
    return complete(sched, sched.schedule())


def complete(sched: Scheduler, plan: StepPlan) -> dict[str, int]:
    """Mark the plan computed, give each request that caught up a token, finish those at max_tokens."""
    sched.update(plan)
    for s in plan.seqs:
        request = sched.get(s.request_id)
        if s.num_samples:
            request.output_token_ids.append(7)
            if request.num_output_tokens >= request.params.max_tokens:
                sched.finish(s.request_id, RequestStatus.FINISHED_LENGTH)
    return {s.request_id: s.num_tokens for s in plan.seqs}


def admission_order(sched: Scheduler, max_steps: int = 500) -> list[str]:
    """Run to the end; ids in the order they were first scheduled."""
    order: list[str] = []
    for _ in range(max_steps):
        if not sched.has_unfinished:
            return order
        order += [rid for rid in step(sched) if rid not in order]
    raise AssertionError("did not finish")


# ---- priority ------------------------------------------------------------------------------------------------


def test_priority_admits_lower_values_first_then_by_arrival() -> None:
    sched = make("priority", max_num_seqs=2)
    for rid, priority in [("a", 1), ("b", 0), ("c", 2), ("d", 0)]:
        sched.add_request(req(rid, priority=priority, max_tokens=2))
    assert step(sched) == {"b": 2, "d": 2}  # a (priority 1) may not displace d (0): no preemption
    assert admission_order(sched) == ["b", "d", "a", "c"]
    assert sched.num_preemptions == 0


def test_priority_preempts_the_lowest_priority_for_a_seat_and_refunds_its_budget() -> None:
    sched = make("priority", max_num_seqs=2)
    a, b = req("a", priority=1), req("b", priority=2)
    sched.add_request(a)
    sched.add_request(b)
    assert step(sched) == {"a": 2, "b": 2}
    c = req("c", prompt_len=15, priority=0)
    sched.add_request(c)
    plan = sched.schedule()
    # b's decode was planned, then taken back: its token of budget went to c, which gets 16 - 1 (a's decode).
    assert [(s.request_id, s.num_tokens) for s in plan.seqs] == [("a", 1), ("c", 15)]
    assert plan.preempted_request_ids == ("b",)
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert sched.kv_cache.block_table("b") == []
    complete(sched, plan)
    assert list(sched.waiting) == [b]
    # a (1) and c (0) both outrank b: b waits, nobody else is preempted.
    assert step(sched) == {"a": 1, "c": 1}
    assert sched.num_preemptions == 1


def test_priority_equal_values_never_preempt_for_admission() -> None:
    sched = make("priority", max_num_seqs=1)
    sched.add_request(req("a", priority=3))
    step(sched)
    sched.add_request(req("b", priority=3))
    assert step(sched) == {"a": 1}
    assert sched.num_preemptions == 0


def test_priority_kv_victim_is_the_lowest_priority_not_the_latest_admitted() -> None:
    sched = make("priority", num_blocks=4, block_size=4)
    a = req("a", prompt_len=7, priority=2)
    sched.add_request(a)
    assert step(sched) == {"a": 7}  # blocks [0, 1]
    b = req("b", prompt_len=8, priority=0)
    sched.add_request(b)
    assert step(sched) == {"a": 1, "b": 8}  # b: blocks [2, 3]; the cache is full
    plan = sched.schedule()  # b's 9th token needs a block: a yields although it was admitted first
    assert plan.preempted_request_ids == ("a",)
    assert [(s.request_id, s.num_tokens) for s in plan.seqs] == [("b", 1)]
    assert sched.kv_cache.block_table("b") == [2, 3, 1]
    # Under FCFS the same arrivals preempt the latest admitted (b) instead.
    fcfs = make("fcfs", num_blocks=4, block_size=4)
    fcfs.add_request(req("a", prompt_len=7))
    step(fcfs)
    fcfs.add_request(req("b", prompt_len=8))
    step(fcfs)
    assert fcfs.schedule().preempted_request_ids == ("b",)


# ---- fair (VTC) ----------------------------------------------------------------------------------------------


def test_vtc_counters_lift_and_least_served_first() -> None:
    policy = FairPolicy(input_weight=1.0, output_weight=2.0)
    a1, a2, b1 = req("a1", client="A"), req("a2", client="A"), req("b1", client="B")
    policy.add(a1)
    policy.add(a2)
    assert policy.counters == {"A": 0.0}  # nobody to be lifted to
    policy.charge(a1, 100, 0)
    policy.add(b1)  # B becomes backlogged while A is: lifted to A's 100, so its idle past earns no credit
    assert policy.counters == {"A": 100.0, "B": 100.0}
    policy.charge(b1, 0, 10)  # 10 output tokens at weight 2
    assert policy.counters["B"] == 120.0
    assert [policy.pop().request_id for _ in range(3)] == ["a1", "a2", "b1"]  # A (100) before B (120)
    assert not policy
    c1 = req("c1", client="C")
    policy.add(c1)  # nothing is backlogged: lifted to the last client that left the queue (B)
    assert policy.counters["C"] == 120.0
    d1 = req("d1", client="D")
    policy.charge(d1, 500, 0)  # a client already served more keeps its own counter
    policy.add(d1)
    assert policy.counters["D"] == 500.0
    assert policy.head() is c1
    policy.remove(c1)
    assert policy.head() is d1 and len(policy) == 1


def test_vtc_charges_computed_prompt_tokens_once_and_outputs_as_emitted() -> None:
    sched = make("fair", num_blocks=4, block_size=4, max_num_batched_tokens=16)
    a, b = req("a", prompt_len=8, client="x"), req("b", prompt_len=8, client="y", first_token=200)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)
    assert sched.policy.client_counters() == {"x": 10.0, "y": 10.0}  # 8 prompt tokens + 1 output at weight 2
    plan = sched.schedule()  # a's 9th token needs a block: y's request yields (equal counters: the later one)
    assert plan.preempted_request_ids == ("b",)
    complete(sched, plan)
    assert sched.policy.client_counters() == {"x": 12.0, "y": 10.0}
    sched.finish("a", RequestStatus.FINISHED_STOPPED)
    assert step(sched) == {"b": 9}  # recomputes its prompt and its token
    assert sched.policy.client_counters() == {"x": 12.0, "y": 12.0}  # the recompute is not charged
    usage = sched.client_usage()
    assert (usage["y"].prompt_tokens, usage["y"].generation_tokens, usage["y"].counter) == (8, 2, 12.0)


def test_vtc_chunked_prefill_is_charged_per_chunk_and_prefix_hits_are_free() -> None:
    sched = make("fair", prefix=True, max_num_batched_tokens=8, num_blocks=32)
    a = req("a", prompt_len=20, client="x", max_tokens=1)
    sched.add_request(a)
    counters = []
    while sched.has_unfinished:
        step(sched)
        counters.append(sched.policy.client_counters()["x"])
    assert counters == [8.0, 16.0, 22.0]  # chunks of 8, 8, 4, then the token at weight 2
    b = req("b", prompt_len=20, client="y", max_tokens=1)  # the same prompt: 4 blocks of it are cached
    sched.add_request(b)
    step(sched)
    assert b.num_cached_tokens == 16
    assert sched.client_usage()["y"].prompt_tokens == 4
    # y joined with nobody waiting: lifted to x's 22 (the last to leave the queue), then charged 4 + 2.
    assert sched.policy.client_counters()["y"] == 22 + 4 + 2


def test_vtc_admits_from_the_least_served_backlogged_client() -> None:
    sched = make("fair", max_num_seqs=1)
    for i in range(3):
        sched.add_request(req(f"heavy{i}", prompt_len=8, client="heavy", max_tokens=4))
    sched.add_request(req("light0", client="light", max_tokens=2))
    sched.add_request(req("light1", client="light", max_tokens=2))
    # heavy0 first (the oldest of two clients at 0), then light twice (heavy is ahead by 8 + 4 * 2) before heavy1.
    assert admission_order(sched) == ["heavy0", "light0", "light1", "heavy1", "heavy2"]


# ---- shortest job first --------------------------------------------------------------------------------------


def test_sjf_runs_the_shortest_predicted_work_first() -> None:
    def order(**cfg: float) -> list[str]:
        sched = make("sjf", max_num_seqs=1, **cfg)
        for rid, max_tokens in [("long", 40), ("short", 3), ("mid", 10)]:
            sched.add_request(req(rid, max_tokens=max_tokens))
        return admission_order(sched)

    assert order(sjf_wait_bound=0.0) == ["short", "mid", "long"]
    # The default wait bound (2): "long" found the queue empty, so FCFS's next seat is its due point.
    assert order() == ["long", "short", "mid"]
    assert make("sjf").policy.predicted_work(req("p", prompt_len=8, max_tokens=5)) == pytest.approx(8 / 16 + 5)


def test_sjf_kv_victim_is_the_request_with_the_most_work_left() -> None:
    sched = make("sjf", num_blocks=4, block_size=4)
    long, short = req("long", prompt_len=7, max_tokens=50), req("short", prompt_len=8, max_tokens=3)
    sched.add_request(long)
    assert step(sched) == {"long": 7}
    sched.add_request(short)
    assert step(sched) == {"short": 8, "long": 1}  # the cache is full
    plan = sched.schedule()  # both need a block: the long one yields, although the short one came later
    assert plan.preempted_request_ids == ("long",)
    assert [(s.request_id, s.num_tokens) for s in plan.seqs] == [("short", 1)]


def test_sjf_aging_bounds_the_wait_of_a_long_request() -> None:
    def long_request_start(aging: float, bound: float = 0.0, ahead: int = 0) -> int | None:
        """`ahead` short requests and a long one at step 0, then a short one every step: the step the long one is
        first scheduled."""
        sched = make("sjf", max_num_seqs=1, sjf_aging=aging, sjf_wait_bound=bound)
        for i in range(ahead):
            sched.add_request(req(f"ahead{i}", max_tokens=1))
        sched.add_request(req("long", max_tokens=30))
        for t in range(200):
            sched.add_request(req(f"s{t}", max_tokens=1))
            if "long" in step(sched):
                return t
        return None

    assert long_request_start(0.0) is None  # without aging or a wait bound, a steady stream of short work starves it
    # Work 30 + 2/16 against 1 + 2/16 for each short one: shorts that arrive less than 29 steps after it go first
    # (at 29 the keys tie, and the earlier push wins).
    assert long_request_start(1.0) == 29
    assert long_request_start(2.0) == 15
    # The default wait bound (2) without aging: with two short requests (2 x 1.125 of work) queued ahead, the long one
    # is due once 4.5 more work has been admitted: after the two and two of the later shorts.
    assert long_request_start(0.0, bound=2.0, ahead=2) == 4
    assert long_request_start(0.0, bound=2.0, ahead=0) == 0  # an empty queue: due at once


def test_sjf_wait_bound_lets_shorter_requests_pass_only_so_far() -> None:
    def order(bound: float) -> list[str]:
        sched = make("sjf", max_num_seqs=1, sjf_wait_bound=bound)
        sched.add_request(req("a", max_tokens=5))
        step(sched)  # a holds the only seat: admitted work 5 + 2/16
        for rid, max_tokens in [("m", 4), ("l", 20), ("s1", 2), ("s2", 2), ("s3", 2)]:
            sched.add_request(req(rid, max_tokens=max_tokens))
        return admission_order(sched)

    assert order(0.0) == ["a", "s1", "s2", "s3", "m", "l"]  # off: shortest first
    # m found the queue empty: due at once. l found m's 4.125 ahead: due once 2 x 4.125 more work is admitted
    # (m, s1 and s2 add 8.375), so s3 no longer passes it.
    assert order(2.0) == ["a", "m", "s1", "s2", "l", "s3"]
    assert order(1.0) == ["a", "m", "l", "s1", "s2", "s3"]  # b = 1: FCFS


def test_sjf_wait_bound_requeues_a_preempted_request_as_due() -> None:
    sched = make("sjf", num_blocks=4, block_size=4, sjf_wait_bound=2.0)
    long, short = req("long", prompt_len=7, max_tokens=50), req("short", prompt_len=8, max_tokens=3)
    sched.add_request(long)
    step(sched)
    sched.add_request(short)
    step(sched)
    plan = sched.schedule()
    assert plan.preempted_request_ids == ("long",)
    sched.add_request(req("later", max_tokens=1))  # shorter, but the preempted request is due first
    assert sched.policy.head() is long and [r.request_id for r in sched.policy] == ["later", "long"]


def test_sjf_pause_gives_the_seat_to_a_short_request_and_resumes_without_recompute() -> None:
    sched = make("sjf", max_num_seqs=1, sjf_pause_ratio=4.0)
    long = req("long", max_tokens=40)
    sched.add_request(long)
    assert step(sched) == {"long": 2}
    assert step(sched) == {"long": 1}
    sched.add_request(req("mid", max_tokens=12))  # 38 outputs left are under 4 x 12.125: no pause
    assert step(sched) == {"long": 1}
    sched.finish("mid", RequestStatus.FINISHED_ABORTED)
    table = list(sched.kv_cache.block_table("long"))
    sched.add_request(req("short", max_tokens=3))  # 37 outputs left against 4 x 3.125
    plan = sched.schedule()
    assert [(s.request_id, s.num_tokens) for s in plan.seqs] == [("short", 2)] and plan.preempted_request_ids == ()
    assert long.status is RequestStatus.PAUSED and sched.num_pauses == 1 and sched.paused == [long]
    # Its KV stays: the entries computed, and the block its next token goes to (allocated before it was paused).
    assert sched.kv_cache.block_table("long")[:1] == table and len(sched.kv_cache.block_table("long")) == 2
    assert sched.kv_cache.num_entries("long") == long.num_computed_tokens == long.num_tokens - 1 == 4
    complete(sched, plan)
    assert [step(sched) for _ in range(3)] == [{"short": 1}, {"short": 1}, {"long": 1}]  # one token: no recompute
    assert long.status is RequestStatus.RUNNING and sched.num_preemptions == 0 and not sched.paused
    sched.add_request(req("short2", max_tokens=3))
    assert step(sched) == {"short2": 2}  # paused again: 1.5 x 40.125 steps allowed, 3 used
    sched.finish("long", RequestStatus.FINISHED_ABORTED)  # an abort while paused frees its blocks
    assert not sched.paused and len(sched.policy) == 0 and sched.kv_cache.num_free_blocks == 15



def test_sjf_does_not_pause_over_a_quantized_cache() -> None:
    # Its residual slots hold the open blocks of max_num_seqs requests: a paused request would keep one.
    config = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=16, max_model_len=64, policy="sjf")
    sched = Scheduler(config, KVCacheManager(16, 4, seals_blocks=True))
    sched.add_request(req("long", max_tokens=40))
    step(sched)
    sched.add_request(req("short", max_tokens=3))
    assert step(sched) == {"long": 1} and sched.num_pauses == 0

def test_sjf_pause_allowance_runs_out_then_the_paused_request_goes_first() -> None:
    # Allowance 0.3 x (2/16 + 10) = 3.04 steps: paused at step 2, it goes first at step 6 (2 + 3.04 <= 6), before
    # shorter requests, and is not paused again.
    sched = make("sjf", max_num_seqs=1, sjf_wait_bound=0.0, sjf_pause_ratio=4.0, sjf_pause_budget=0.3)
    sched.add_request(req("long", max_tokens=10))
    steps = [step(sched)]
    for t in range(8):
        sched.add_request(req(f"s{t}", max_tokens=1))
        steps.append(step(sched))
    assert steps == [{"long": 2}, {"s0": 2}, {"s1": 2}, {"s2": 2}, {"s3": 2}, {"long": 1}, {"long": 1},
                     {"long": 1}, {"long": 1}]
    assert sched.num_pauses == 1 and sched.policy.pause_allowance(sched.get("long")) < 1


def test_paused_kv_is_taken_back_before_anything_else_waits_or_is_preempted() -> None:
    sched = make("sjf", num_blocks=4, block_size=4, max_num_seqs=1, sjf_pause_ratio=2.0)
    long = req("long", prompt_len=6, max_tokens=9)
    sched.add_request(long)
    assert step(sched) == {"long": 6}  # 2 blocks
    sched.add_request(req("s1", prompt_len=3, max_tokens=2))
    assert [step(sched) for _ in range(2)] == [{"s1": 3}, {"s1": 1}]  # long paused, holding its 2 blocks
    # s2 finds the seat free but needs 3 blocks of the 2 free: the paused request's KV is taken back (recompute),
    # and it keeps its place in the queue (behind s2, which it does not displace).
    sched.add_request(req("s2", prompt_len=12, max_tokens=2))
    plan = sched.schedule()
    assert plan.preempted_request_ids == ("long",) and [s.request_id for s in plan.seqs] == ["s2"]
    assert long.status is RequestStatus.PREEMPTED and long.num_computed_tokens == 0 and not sched.paused
    complete(sched, plan)
    admission_order(sched)
    assert long.num_output_tokens == 9 and sched.kv_cache.num_free_blocks == 4
    assert (sched.num_pauses, sched.num_preemptions) == (1, 1)


def test_a_running_request_short_of_kv_takes_it_from_a_paused_one_first() -> None:
    sched = make("sjf", num_blocks=4, block_size=4, max_num_seqs=1, sjf_pause_ratio=2.0)
    sched.add_request(req("long", prompt_len=6, max_tokens=9))
    step(sched)
    sched.add_request(req("short", prompt_len=8, max_tokens=3))
    assert step(sched) == {"short": 8}  # its 2 blocks are the last free ones
    plan = sched.schedule()  # its next token needs a third
    assert plan.preempted_request_ids == ("long",) and [(s.request_id, s.num_tokens) for s in plan.seqs] == [
        ("short", 1)]


@pytest.mark.parametrize("seed", range(4))
def test_sjf_pausing_under_random_arrivals_and_kv_pressure_loses_nothing(seed: int) -> None:
    rng = random.Random(seed)
    sched = make("sjf", num_blocks=24, block_size=4, prefix=True, max_num_batched_tokens=8, max_num_seqs=3,
                 sjf_pause_ratio=2.0, sjf_pause_budget=rng.choice([0.5, 1.5, 4.0]))
    requests = [req(f"r{i}", prompt_len=rng.randint(1, 12), max_tokens=rng.choice([1, 2, 3, 20, 40]),
                    first_token=100 + rng.randint(0, 3)) for i in range(30)]
    pending = list(requests)
    for _ in range(2000):
        for _ in range(rng.choice([0, 0, 1, 2])):
            if pending:
                sched.add_request(pending.pop(0))
        if not pending and not sched.has_unfinished:
            break
        step(sched)
        assert not set(sched.paused) & set(sched.running)
        assert all(r.status is RequestStatus.PAUSED for r in sched.paused)
        assert len(sched.running) <= 3
    assert all(r.num_output_tokens == r.params.max_tokens for r in requests)
    assert sched.num_pauses > 0 and sched.kv_cache.num_free_blocks == 24 and not sched.paused


# ---- every policy: chunked prefill, prefix hits, preemption, nothing leaks -------------------------------------


@pytest.mark.parametrize("policy", ["fcfs", "priority", "fair", "sjf"])
def test_every_policy_finishes_everything_under_kv_pressure(policy: str) -> None:
    sched = make(policy, num_blocks=12, block_size=4, prefix=True, max_num_batched_tokens=8, max_num_seqs=4)
    lengths = [9, 3, 14, 5, 9, 7, 12, 2]
    requests = [req(f"r{i}", prompt_len=n, priority=i % 3 if policy == "priority" else 0, client=f"c{i % 2}",
                    max_tokens=8 + i, first_token=100 + 5 * (i % 2)) for i, n in enumerate(lengths)]
    for r in requests:
        sched.add_request(r)
    admission_order(sched)
    assert all(r.num_output_tokens == r.params.max_tokens for r in requests)
    assert sched.num_preemptions > 0  # the point of the small cache
    assert sched.kv_cache.num_free_blocks == 12  # nothing leaked (cached blocks are free and evictable)
    usage = sched.client_usage()
    assert sum(u.generation_tokens for u in usage.values()) == sum(r.params.max_tokens for r in requests)
    assert sum(u.prompt_tokens for u in usage.values()) <= sum(lengths)


# ---- on a model: the policy changes the order, never the tokens ----------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    return write_tiny_gguf(path, metadata={"tokenizer.ggml.merges": [], "tokenizer.ggml.eos_token_id": 0})


def generate(path: Path, policy: str, num_kv_blocks: int) -> tuple[dict[str, list[int]], int]:
    engine = LLMEngine(EngineConfig(model=str(path), dtype="float32", num_kv_blocks=num_kv_blocks, block_size=4,
                                    max_num_batched_tokens=16, scheduling_policy=policy))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[5 + i, 6, 7 + i, 8, 9 + i, 10][: 3 + i % 4] for i in range(8)]
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, params, request_id=f"r{i}", priority=(i * 5) % 3 if policy == "priority" else 0,
                           client_id=f"client{i % 3}")
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.delta_token_ids
    return tokens, engine.stats().num_preemptions


def test_policies_and_preemption_leave_greedy_tokens_unchanged(tiny_model: Path) -> None:
    reference, preemptions = generate(tiny_model, "fcfs", num_kv_blocks=64)
    assert preemptions == 0
    for policy in ("fcfs", "priority", "fair", "sjf"):
        tokens, preemptions = generate(tiny_model, policy, num_kv_blocks=9)
        assert preemptions > 0, policy
        assert tokens == reference, policy



def test_pausing_leaves_greedy_tokens_unchanged(tiny_model: Path) -> None:
    def run(**cfg: float | str) -> tuple[dict[str, list[int]], int]:
        engine = LLMEngine(EngineConfig(model=str(tiny_model), dtype="float32", num_kv_blocks=64, block_size=4,
                                        max_num_seqs=2, max_num_batched_tokens=16, **cfg))
        tokens: dict[str, list[int]] = {}
        arrivals = {0: [0, 1], 3: [2], 5: [3], 7: [4], 9: [5]}  # two long requests, then short ones
        for t in range(200):
            for i in arrivals.get(t, []):
                engine.add_request([5 + i, 6, 7 + i], SamplingParams(temperature=0, max_tokens=24 if i < 2 else 3,
                                                                      ignore_eos=True), request_id=f"r{i}")
            if t > 9 and not engine.has_unfinished_requests():
                break
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.delta_token_ids)
        return tokens, engine.stats().num_pauses

    reference, pauses = run()
    assert pauses == 0 and len(reference) == 6
    tokens, pauses = run(scheduling_policy="sjf", sjf_pause_ratio=2.0)
    assert pauses > 0 and tokens == reference

def test_priority_needs_the_priority_policy(tiny_model: Path) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_model), dtype="float32", num_kv_blocks=8, block_size=4))
    with pytest.raises(InvalidRequestError, match="priority"):
        engine.add_request([5, 6], priority=1)
    with pytest.raises(InvalidRequestError, match="client_id"):
        engine.add_request([5, 6], client_id=7)  # type: ignore[arg-type]
    engine.add_request([5, 6], client_id="alice")
    while engine.has_unfinished_requests():
        engine.step()
    usage = engine.stats().clients["alice"]
    assert (usage.prompt_tokens, usage.generation_tokens, usage.counter) == (2, 16, None)


def test_cli_flags_and_config_validation() -> None:
    import argparse

    from tokenmill.entrypoints.args import add_engine_args, engine_config

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    config = engine_config(parser.parse_args(["--scheduling-policy", "sjf", "--sjf-aging", "0.5",
                                              "--sjf-wait-bound", "3", "--fair-input-weight", "2",
                                              "--fair-output-weight", "3", "--sjf-pause-ratio", "4",
                                              "--sjf-pause-budget", "2"]))
    assert (config.scheduling_policy, config.sjf_aging, config.sjf_wait_bound, config.fair_input_weight,
            config.fair_output_weight, config.sjf_pause_ratio, config.sjf_pause_budget) == (
        "sjf", 0.5, 3.0, 2.0, 3.0, 4.0, 2.0)
    for bad in ({"scheduling_policy": "lifo"}, {"sjf_aging": -1.0}, {"sjf_wait_bound": 0.5},
                {"fair_input_weight": 0.0, "fair_output_weight": 0.0}, {"sjf_pause_ratio": 0.5},
                {"sjf_pause_budget": 0.0}):
        with pytest.raises(ValueError):
            EngineConfig(**bad)
