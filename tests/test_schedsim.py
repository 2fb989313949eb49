"""The scheduling simulator: exact simulated times on hand-made arrivals, the step-cost fit, and the same scheduling
decisions as the engine on a small random model."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
from conftest import write_tiny_gguf

from tokenmill.bench.schedsim import FEATURES, DeadlineSJF, SimRequest, SimRun, Simulation, StepCost, timed_steps
from tokenmill.config import EngineConfig
from tokenmill.engine import LLMEngine
from tokenmill.entrypoints.args import add_engine_args
from tokenmill.sampling_params import SamplingParams
from tokenmill.scheduler.plan import StepPlan
from tokenmill.scheduler.scheduler import SchedulerConfig
from tokenmill.scheduler.sjf import SJFPolicy

TEN_MS = StepCost((0.01, 0.0, 0.0, 0.0, 0.0))  # every step 10 ms, whatever it holds


def sim(policy: str = "fcfs", seats: int = 1, cost: StepCost = TEN_MS) -> Simulation:
    # SJF without a wait bound: plain shortest-first order.
    return Simulation(SchedulerConfig(max_num_seqs=seats, max_num_batched_tokens=8, max_model_len=64, policy=policy,
                                      sjf_wait_bound=0.0), cost, num_kv_blocks=16, block_size=4,
                      enable_prefix_caching=False)


def times(run: SimRun, attr: str) -> list[float]:
    return [round(getattr(t, attr), 6) for t in run.traces]


def test_one_seat_fcfs_serves_in_arrival_order_step_by_step() -> None:
    # One seat: r0 prefills (its first token at 10 ms) and decodes twice more; r1 gets the seat at step 4.
    run = sim().run([SimRequest(0.0, (1, 2, 3, 4), 3), SimRequest(0.0, (5, 6, 7, 8), 2)])
    assert times(run, "first_token") == [0.01, 0.04]
    assert times(run, "last_token") == [0.03, 0.05]
    assert times(run, "queued") == [0.0, 0.03]
    assert (run.steps, run.preemptions, round(run.seconds, 6)) == (5, 0, 0.05)


def test_sjf_admits_the_shorter_request_first() -> None:
    run = sim("sjf").run([SimRequest(0.0, (1, 2, 3, 4), 3), SimRequest(0.0, (5, 6, 7, 8), 2)])
    assert times(run, "first_token") == [0.03, 0.01]
    assert times(run, "last_token") == [0.05, 0.02]


def test_idle_time_until_an_arrival_is_skipped() -> None:
    run = sim().run([SimRequest(1.0, (1, 2, 3, 4), 2)])
    assert times(run, "first_token") == [1.01]
    assert times(run, "last_token") == [1.02]
    assert times(run, "wait") == [0.01]


def test_chunked_prefill_and_the_cost_model_count_the_plan() -> None:
    # A 12-token prompt with an 8-token budget: chunks of 8 and 4, then one decode. Cost: 1 ms per prefill token,
    # 2 ms per decoding sequence, 5 ms for a step with prefill.
    cost = StepCost((0.0, 0.002, 0.001, 0.0, 0.005))
    run = sim(cost=cost).run([SimRequest(0.0, tuple(range(1, 13)), 2)])
    assert times(run, "first_token") == [0.022]  # 8 + 5, then 4 + 5
    assert times(run, "last_token") == [0.024]


def test_two_seats_batch_and_share_the_steps() -> None:
    run = sim(seats=2).run([SimRequest(0.0, (1, 2), 2), SimRequest(0.0, (3, 4), 3)])
    assert times(run, "first_token") == [0.01, 0.01]
    assert times(run, "last_token") == [0.02, 0.03]
    assert times(run, "queued") == [0.0, 0.0]


def test_deadline_sjf_lets_a_due_request_go_first() -> None:
    requests = [SimRequest(0.0, (1, 2, 3, 4), 5), SimRequest(0.0, (5, 6, 7, 8), 2),
                SimRequest(0.0, (9, 10, 11, 12), 3)]
    plain = sim("sjf").run(requests)
    assert times(plain, "first_token") == [0.06, 0.01, 0.03]  # shortest first: 1, 2, 0
    simulation = sim("sjf")
    # Request 0 is due at once: it goes first, then SJF (1 before 2).
    due = simulation.run(requests, lambda: DeadlineSJF(8, 64, [0.0, math.inf, math.inf], simulation.clock))
    assert times(due, "first_token") == [0.01, 0.06, 0.08]


def test_fit_recovers_a_linear_cost() -> None:
    truth = (0.006, 0.0007, 0.0006, 0.000002, -0.002)
    rows = []
    for decode in range(0, 17, 4):
        for prefill in (0, 64, 512):
            for context in (100, 5000):
                features = (1.0, float(decode), float(prefill), float(context), float(prefill > 0))
                rows.append((features, sum(c * f for c, f in zip(truth, features, strict=True))))
    fitted = StepCost.fit(rows)
    assert fitted.coefficients == pytest.approx(truth, rel=1e-6, abs=1e-12)
    bias, rms = fitted.relative_error(rows)
    assert abs(bias) < 1e-9 and rms < 1e-9
    off = StepCost(tuple(c * 1.1 for c in truth))  # 10% high everywhere: a bias, not a spread
    assert off.relative_error(rows) == pytest.approx((0.1, 0.1))


def test_cost_model_checks_its_shape() -> None:
    with pytest.raises(ValueError, match="coefficients"):
        StepCost((1.0,))
    with pytest.raises(ValueError, match="timed steps"):
        StepCost.fit([((1.0,) * len(FEATURES), 0.1)])


def test_a_request_at_the_context_limit_stops_there() -> None:
    run = sim().run([SimRequest(0.0, tuple(range(1, 61)), 100)])  # max_model_len 64: 4 tokens fit
    assert times(run, "last_token") == [round(run.seconds, 6)] and run.steps == 8 + 3  # 60 in chunks of 8, 3 decodes


def test_a_prompt_the_cache_cannot_hold_raises_instead_of_spinning() -> None:
    simulation = Simulation(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=8, max_model_len=64), TEN_MS,
                            num_kv_blocks=2, block_size=4)
    with pytest.raises(RuntimeError, match="admitted"):
        simulation.run([SimRequest(0.0, tuple(range(1, 20)), 2)])


def test_sjf_defaults_agree_everywhere() -> None:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args([])
    policy = SJFPolicy(8, 64)
    engine, scheduler = EngineConfig(), SchedulerConfig()
    names = ("aging", "wait_bound", "pause_ratio", "pause_budget")
    assert [getattr(engine, f"sjf_{n}") for n in names] == [getattr(scheduler, f"sjf_{n}") for n in names] \
        == [getattr(policy, n) for n in names] == [getattr(args, f"sjf_{n}") for n in names] == [0.0, 2.0, 4.0, 1.5]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    return write_tiny_gguf(path, metadata={"tokenizer.ggml.merges": [], "tokenizer.ggml.eos_token_id": 0})


@pytest.mark.parametrize("policy", ["fcfs", "sjf"])
def test_the_simulation_schedules_as_the_engine_does(tiny_model: Path, policy: str) -> None:
    """Same requests at t = 0 on the engine and in the simulation: the same plans step by step, preemptions (a
    small cache) and prefix hits (shared prompt starts) included."""
    engine = LLMEngine(EngineConfig(model=str(tiny_model), dtype="float32", num_kv_blocks=7, block_size=4,
                                    max_num_seqs=4, max_num_batched_tokens=16, scheduling_policy=policy))
    requests = [SimRequest(0.0, (5, 6, 7, 8, 9 + i, 10, 11)[: 4 + i % 4], 3 + 2 * (i % 3)) for i in range(8)]
    for i, r in enumerate(requests):
        engine.add_request(list(r.prompt), SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True),
                           request_id=str(i))
    plans: list[StepPlan] = []
    rows = timed_steps(engine, plans)
    assert "schedule" not in vars(engine.scheduler)  # the recording wrapper is gone
    assert len(rows) == sum(not p.is_empty for p in plans) and all(seconds > 0 for _, seconds in rows)

    simulated: list[StepPlan] = []
    simulation = Simulation(engine.scheduler.config, TEN_MS, num_kv_blocks=7, block_size=4)
    cost = simulation.cost

    class Recording(StepCost):
        def seconds(self, plan: StepPlan) -> float:
            simulated.append(plan)
            return cost.seconds(plan)

    simulation.cost = Recording(cost.coefficients)
    run = simulation.run(requests)

    def shape(ps: list[StepPlan]) -> list[tuple[tuple[str, int, int], ...]]:
        return [tuple((s.request_id, s.num_tokens, s.context_len) for s in p.seqs) for p in ps if not p.is_empty]

    assert shape(simulated) == shape(plans)
    assert run.preemptions == engine.stats().num_preemptions > 0
    assert [p.preempted_request_ids for p in simulated] == [p.preempted_request_ids for p in plans if not p.is_empty]
