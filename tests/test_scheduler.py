"""Scheduler behaviour with exact block ids, budgets and preemption order (no model involved)."""

from __future__ import annotations

from tokenmill.kv.manager import KVCacheManager
from tokenmill.request import Request, RequestStatus
from tokenmill.sampling_params import SamplingParams
from tokenmill.scheduler.scheduler import Scheduler, SchedulerConfig


def make_scheduler(num_blocks: int = 16, block_size: int = 4, **cfg: int | bool) -> Scheduler:
    config = SchedulerConfig(**{"max_num_seqs": 8, "max_num_batched_tokens": 16, "max_model_len": 64, **cfg})
    return Scheduler(config, KVCacheManager(num_blocks, block_size))


def req(rid: str, prompt_len: int) -> Request:
    return Request(rid, list(range(100, 100 + prompt_len)), SamplingParams(max_tokens=100))


def run_step(sched: Scheduler) -> dict[str, int]:
    """Schedule, mark computed, and append a dummy token to every request that caught up."""
    plan = sched.schedule()
    sched.update(plan)
    for s in plan.seqs:
        if s.num_samples:
            sched.get(s.request_id).output_token_ids.append(7)
    return {s.request_id: s.num_tokens for s in plan.seqs}


def test_prefill_then_decode_with_one_budget() -> None:
    sched = make_scheduler()
    a, b = req("a", 6), req("b", 5)
    sched.add_request(a)
    sched.add_request(b)
    assert run_step(sched) == {"a": 6, "b": 5}
    assert sched.kv_cache.block_table("a") == [0, 1]
    assert sched.kv_cache.block_table("b") == [2, 3]
    assert a.output_token_ids == [7] and b.output_token_ids == [7]
    assert run_step(sched) == {"a": 1, "b": 1}
    assert a.num_computed_tokens == 7 and a.num_tokens == 8


def test_long_prompt_is_chunked_and_rides_along_with_decodes() -> None:
    sched = make_scheduler(max_num_batched_tokens=8)
    a = req("a", 3)
    sched.add_request(a)
    assert run_step(sched) == {"a": 3}
    b = req("b", 20)
    sched.add_request(b)
    # decode of a (1 token) + the first 7-token chunk of b
    assert run_step(sched) == {"a": 1, "b": 7}
    assert b.output_token_ids == []  # not caught up: no token sampled
    assert run_step(sched) == {"a": 1, "b": 7}
    assert run_step(sched) == {"a": 1, "b": 6}
    assert b.output_token_ids == [7]  # caught up in the step that computed its last prompt token
    assert run_step(sched) == {"a": 1, "b": 1}


def test_without_chunking_a_prompt_waits_for_a_whole_budget() -> None:
    sched = make_scheduler(max_num_batched_tokens=64, enable_chunked_prefill=False)
    a = req("a", 3)
    sched.add_request(a)
    run_step(sched)
    sched.add_request(req("b", 63))
    assert run_step(sched) == {"a": 1}  # 63 tokens do not fit beside the decode
    assert next(iter(sched.waiting)).request_id == "b"


def test_max_num_seqs_limits_admission() -> None:
    sched = make_scheduler(max_num_seqs=2)
    for rid in "abc":
        sched.add_request(req(rid, 2))
    assert run_step(sched) == {"a": 2, "b": 2}
    assert [r.request_id for r in sched.waiting] == ["c"]


def test_admission_waits_for_free_blocks() -> None:
    sched = make_scheduler(num_blocks=3, block_size=4)
    sched.add_request(req("a", 8))  # 2 blocks
    sched.add_request(req("b", 8))  # 2 blocks: does not fit
    assert run_step(sched) == {"a": 8}
    assert sched.kv_cache.num_free_blocks == 1
    sched.finish("a", RequestStatus.FINISHED_STOPPED)
    assert sched.kv_cache.num_free_blocks == 3
    assert run_step(sched) == {"b": 8}
    # the freed blocks come back tail first: a's [0, 1] were returned as 1 then 0 behind the never-used 2
    assert sched.kv_cache.block_table("b") == [2, 1]


def test_preemption_recomputes_the_latest_arrival() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4)
    a, b = req("a", 8), req("b", 8)
    sched.add_request(a)
    sched.add_request(b)
    assert run_step(sched) == {"a": 8, "b": 8}
    assert sched.kv_cache.num_free_blocks == 0
    # a's 9th token needs a third block: b (the later arrival) is preempted and its blocks freed
    plan = sched.schedule()
    assert [(s.request_id, s.num_tokens) for s in plan.seqs] == [("a", 1)]
    assert plan.preempted_request_ids == ("b",)
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert sched.kv_cache.block_table("a") == [0, 1, 3]
    assert list(sched.waiting) == [b]
    sched.update(plan)
    # b comes back when a finishes, and recomputes prompt + its generated token
    sched.finish("a", RequestStatus.FINISHED_LENGTH)
    assert sched.kv_cache.num_free_blocks == 4
    assert run_step(sched) == {"b": 9}
    assert b.output_token_ids == [7, 7]


def preempt_the_later_of_two(readmit_whole: bool) -> tuple[Scheduler, Request, Request]:
    sched = make_scheduler(num_blocks=6, block_size=4, max_num_batched_tokens=8, readmit_whole=readmit_whole)
    a, b = req("a", 4), req("b", 4)
    sched.add_request(a)
    sched.add_request(b)
    assert run_step(sched) == {"a": 4, "b": 4}
    for _ in range(8):  # entries 5-12 of each: three blocks each, the cache full
        assert run_step(sched) == {"a": 1, "b": 1}
    assert sched.kv_cache.num_free_blocks == 0
    # a's 13th entry needs a fourth block: b, the later arrival, is preempted with 13 tokens to recompute
    assert run_step(sched) == {"a": 1}
    assert b.status is RequestStatus.PREEMPTED and b.num_tokens == 13
    assert sched.kv_cache.block_table("a") == [0, 2, 4, 5]
    assert sched.kv_cache.num_free_blocks == 2
    return sched, a, b


def test_a_preempted_request_comes_back_only_when_its_whole_recompute_fits_with_room_to_grow() -> None:
    sched, a, b = preempt_the_later_of_two(readmit_whole=True)
    # A first chunk of b (7 tokens, 2 blocks) would fit, but its 4 blocks plus one spare for a and for b do not:
    # let in, b would be the first victim of a's next block and recompute again. It waits.
    for _ in range(4):
        assert run_step(sched) == {"a": 1}
    assert list(sched.waiting) == [b]
    sched.finish("a", RequestStatus.FINISHED_LENGTH)
    # alone, it comes back chunk by chunk as any request does
    assert run_step(sched) == {"b": 8}
    assert run_step(sched) == {"b": 5}
    assert b.status is RequestStatus.RUNNING and b.num_preemptions == 1


def test_the_readmission_rule_holds_back_only_a_request_that_would_be_the_first_victim_again() -> None:
    """Under the priority policy: a preempted request that outranks the running one comes back a chunk at a time
    (the running one would be the victim of the next shortage, not it); one that ranks after it waits until its
    whole recompute fits; one never preempted is admitted in chunks whatever its rank."""
    for priority, preempted_before, want in ((0, 1, {"a": 1, "b": 7}), (2, 1, {"a": 1}), (2, 0, {"a": 1, "b": 7})):
        sched = make_scheduler(num_blocks=6, block_size=4, max_num_batched_tokens=8, policy="priority")
        a = req("a", 8)
        a.priority = 1
        sched.add_request(a)
        assert run_step(sched) == {"a": 8}
        b = req("b", 13)
        b.priority, b.num_preemptions = priority, preempted_before  # as if it had been preempted before
        sched.add_request(b)
        # a's 9th entry takes a third block; b's 13 entries (4 blocks) plus a spare for a and for b are not free
        assert run_step(sched) == want, (priority, preempted_before)
        assert sched.kv_cache.num_free_blocks == (3 if want == {"a": 1} else 1)


def test_can_allocate_counts_the_spare_blocks_and_allocates_nothing() -> None:
    kv = KVCacheManager(6, 4)
    x, y = req("x", 8), req("y", 13)
    assert kv.allocate_slots(x, 8)
    assert kv.can_allocate(y, 13) and kv.can_allocate(y, 13, spare=0)  # 4 blocks of the 4 free
    assert not kv.can_allocate(y, 13, spare=1)
    assert kv.can_allocate(y, 12, spare=1) and not kv.can_allocate(y, 12, spare=2)
    assert kv.num_free_blocks == 4 and kv.block_table("y") == []


def test_without_readmit_whole_a_preempted_request_comes_back_a_chunk_at_a_time_and_thrashes() -> None:
    sched, a, b = preempt_the_later_of_two(readmit_whole=False)
    assert run_step(sched) == {"a": 1, "b": 7}
    assert sched.kv_cache.block_table("b") == [3, 1]
    # b's next chunk needs two more blocks and none is free: b, the last, goes again, its 7 tokens lost
    assert run_step(sched) == {"a": 1}
    assert b.status is RequestStatus.PREEMPTED and b.num_preemptions == 2
    assert run_step(sched) == {"a": 1, "b": 7}  # and the cycle starts over


def test_request_preempting_itself_when_alone_in_front() -> None:
    sched = make_scheduler(num_blocks=2, block_size=4)
    a, b = req("a", 4), req("b", 4)
    sched.add_request(a)
    sched.add_request(b)
    run_step(sched)
    # both need a second block, only none is free: b goes, then a gets b's block
    plan = sched.schedule()
    assert plan.preempted_request_ids == ("b",)
    assert [s.request_id for s in plan.seqs] == ["a"]


def test_abort_waiting_and_running_frees_everything() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4)
    sched.add_request(req("a", 8))
    sched.add_request(req("b", 12))
    run_step(sched)
    assert sched.finish("b", RequestStatus.FINISHED_ABORTED) is not None
    assert sched.finish("a", RequestStatus.FINISHED_ABORTED) is not None
    assert sched.finish("zzz", RequestStatus.FINISHED_ABORTED) is None
    assert sched.kv_cache.num_free_blocks == 4
    assert not sched.has_unfinished
