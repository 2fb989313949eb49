"""The step plan and result as plain data, and the runner's handling of them (no real model involved)."""

from __future__ import annotations

import pickle

import pytest
import torch

from tokenmill.attention.backend import AttentionBackend
from tokenmill.kv.cache import KVCache
from tokenmill.kv.manager import KVCacheManager
from tokenmill.model.config import ModelConfig
from tokenmill.model.linear import FloatLinear
from tokenmill.request import Request, RequestStatus
from tokenmill.runner.model_runner import ModelRunner
from tokenmill.sampling_params import SamplingParams
from tokenmill.scheduler.plan import SamplingInputs, ScheduledSeq, StepPlan
from tokenmill.scheduler.scheduler import Scheduler, SchedulerConfig

BS = 4


def make_scheduler(num_blocks: int = 16, budget: int = 16) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=64)
    return Scheduler(config, KVCacheManager(num_blocks, BS))


def test_a_plan_holds_copies_and_pickles_to_an_equal_object() -> None:
    sched = make_scheduler(budget=9)
    penalised = SamplingParams(max_tokens=20, min_tokens=3, repetition_penalty=1.2, stop_token_ids=[5])
    sched.add_request(Request("a", [10, 11, 12], SamplingParams(max_tokens=20), frozenset({2})))
    sched.add_request(Request("b", list(range(20, 30)), penalised, frozenset({2})))
    first = sched.schedule()  # a's 3 tokens, then b's first 6-token chunk
    sched.update(first)
    sched.get("a").output_token_ids.append(99)
    plan = sched.schedule()  # a decodes, b's last 4 prompt tokens: the single-token sequence comes first
    assert [(s.request_id, s.query_start, s.num_tokens, s.context_len) for s in plan.seqs] == [
        ("a", 0, 1, 4), ("b", 1, 4, 10)]
    assert plan.token_ids == (99, 26, 27, 28, 29)
    assert plan.positions == (3, 6, 7, 8, 9)
    assert plan.slot_mapping == (3, 10, 11, 12, 13)  # a: block 0, offset 3; b: entries 6..9 in blocks 2 and 3
    assert [s.block_table for s in plan.seqs] == [(0,), (1, 2, 3)]
    assert plan.sample_indices() == [0, 4]
    b = plan.seqs[1].sampling
    # history for penalties, EOS blocked for the 3 sample rows still under min_tokens
    assert b == SamplingInputs(penalised, tuple(range(20, 30)), (), (5, 2), 3)
    assert plan.seqs[0].sampling == SamplingInputs(SamplingParams(max_tokens=20))  # no penalties: no history
    # A later change of the scheduler's own state does not reach the plan.
    sched.kv_cache.allocate_slots(sched.get("a"), 10)
    sched.get("a").output_token_ids.append(98)
    assert plan.seqs[0].block_table == (0,)
    assert pickle.loads(pickle.dumps(plan)) == plan


def test_finished_ids_reach_the_next_plan_once() -> None:
    sched = make_scheduler()
    for rid in "ab":
        sched.add_request(Request(rid, [1, 2, 3], SamplingParams(max_tokens=4)))
    sched.update(sched.schedule())
    sched.finish("a", RequestStatus.FINISHED_ABORTED)
    assert sched.get("a") is None
    assert sched.schedule().finished_request_ids == ("a",)
    assert sched.schedule().finished_request_ids == ()


class OneHotBackend(AttentionBackend):
    """Hidden state of row i = one-hot of the row's token id: with an identity LM head, greedy picks the input."""

    def __init__(self, hidden: int) -> None:
        self.hidden = hidden
        self.plans: list[StepPlan] = []

    def build_metadata(self, plan: StepPlan) -> StepPlan:
        self.plans.append(plan)
        return plan

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: StepPlan) -> torch.Tensor:
        assert input_ids.tolist() == list(metadata.token_ids) and positions.tolist() == list(metadata.positions)
        return torch.nn.functional.one_hot(input_ids, self.hidden).float()


def tiny_cache() -> KVCache:
    cfg = ModelConfig("llama", 1, 8, 16, 1, 1, 8, 32, 64, 10000.0, 1e-5, False, True)
    return KVCache(cfg, 4, BS, torch.float32, torch.device("cpu"))


def test_runner_samples_every_sample_row_of_a_sequence_in_row_order() -> None:
    vocab = 32
    runner = ModelRunner(OneHotBackend(vocab), FloatLinear(torch.eye(vocab)), tiny_cache(), torch.device("cpu"))
    greedy = SamplingInputs(SamplingParams(temperature=0, max_tokens=8))
    plan = StepPlan(
        seqs=(ScheduledSeq("one", 0, 1, 5, (0, 1), 1, greedy),
              # 1 + 2 drafted tokens checked in one step; the one-hot model predicts each row's own token, so both
              # drafts (12, 12) match and the last row adds the bonus token
              ScheduledSeq("verify", 1, 4, 8, (2, 3), 3, greedy, (12, 12)),
              ScheduledSeq("chunk", 5, 2, 2, (1,), 0)),  # mid-prefill: no token
        token_ids=(7, 11, 12, 12, 12, 20, 21), positions=(4, 5, 6, 7, 8, 0, 1), slot_mapping=(4, 9, 10, 11, 12, 4, 5),
        return_logits=True)
    result = runner.execute(plan)
    assert [(s.request_id, s.token_ids) for s in result.samples] == [("one", [7]), ("verify", [12, 12, 12])]
    assert result.logits is not None and result.logits.shape == (4, vocab)


def test_runner_keeps_a_seeded_requests_generator_until_it_finishes() -> None:
    vocab = 32
    runner = ModelRunner(OneHotBackend(vocab), FloatLinear(torch.zeros(vocab, vocab)), tiny_cache(),
                         torch.device("cpu"))
    seeded = SamplingInputs(SamplingParams(temperature=1.0, seed=3, max_tokens=8))

    def draw(finished: tuple[str, ...] = ()) -> list[int]:
        plan = StepPlan((ScheduledSeq("r", 0, 1, 1, (0,), 1, seeded),), (1,), (0,), (0,),
                        finished_request_ids=finished)
        return runner.execute(plan).samples[0].token_ids

    sequence = [draw()[0] for _ in range(6)]
    assert len(set(sequence)) > 1  # uniform logits: the generator advances from step to step
    assert draw(finished=("r",))[0] == sequence[0]  # finished, then seen anew: a fresh generator


def test_an_empty_plan_only_releases_state() -> None:
    runner = ModelRunner(OneHotBackend(8), FloatLinear(torch.eye(8)), tiny_cache(), torch.device("cpu"))
    assert runner.execute(StepPlan(finished_request_ids=("x",))).samples == []


@pytest.mark.parametrize("n", [2, 4])
def test_engine_rejects_n_above_one(n: int) -> None:
    from tokenmill.engine import LLMEngine
    from tokenmill.sampling_params import InvalidRequestError

    engine = LLMEngine.__new__(LLMEngine)  # add_request checks params before it touches the model
    with pytest.raises(InvalidRequestError, match="n"):
        engine.add_request("hi", SamplingParams(n=n))
