"""The speculation guard (spec/guard.py): exact allow/hold sequences for hand-timed steps, and the speculator
holding drafts back where steps with them were timed slower."""

from __future__ import annotations

import pytest

from tokenmill.request import Request, RequestStatus
from tokenmill.sampling_params import SamplingParams
from tokenmill.scheduler.plan import ScheduledSeq, SeqSamples, StepPlan, StepResult
from tokenmill.spec.guard import SpeculationGuard
from tokenmill.spec.ngram import NgramProposer
from tokenmill.spec.proposer import Proposer
from tokenmill.spec.speculator import Speculator


def drive(guard: SpeculationGuard, steps: int, open_rate: float, closed_rate: float, batch: int = 4) -> str:
    """`steps` steps of `batch` requests, each giving `batch` tokens per step at the arm's rate (tokens/s); the
    guard's choices as a string: o = drafts allowed, c = held."""
    trace = ""
    for _ in range(steps):
        allowed = guard.allow(batch)
        rate = open_rate if allowed else closed_rate
        guard.record(batch, allowed, allowed, batch, batch / rate)
        trace += "o" if allowed else "c"
    return trace


def test_learns_the_open_arm_then_tries_the_closed_one_and_keeps_the_faster() -> None:
    guard = SpeculationGuard(min_trial=2, max_trial=8, period=4, max_period=16)
    # drafts lose: 2 steps measure them, 2 the steps without, then held; every period a trial of drafts (2 steps:
    # steady times are known at once), the period doubling each time a trial confirms by more than the margin
    # (not the first: it changed the choice)
    assert drive(guard, 60, open_rate=90, closed_rate=100) == (
        "oo" + "cc" + "c" * 4 + "oo" + "c" * 8 + "oo" + "c" * 16 + "oo" + "c" * 16 + "oo" + "cccc")
    assert guard.state()[4][0] is False
    # drafts win: the first trial of the closed arm confirms, so the next waits 8 steps, then 16
    guard = SpeculationGuard(min_trial=2, max_trial=8, period=4, max_period=16)
    assert drive(guard, 60, open_rate=130, closed_rate=100) == (
        "oo" + "cc" + "o" * 8 + "cc" + "o" * 16 + "cc" + "o" * 16 + "cc" + "o" * 10)
    prefer, open_rate, closed_rate = guard.state()[4]
    assert prefer and open_rate == pytest.approx(130) and closed_rate == pytest.approx(100)


def test_a_close_call_is_tried_again_at_the_base_period() -> None:
    guard = SpeculationGuard(min_trial=2, max_trial=8, period=4, max_period=16, tolerance=0.03, margin=0.05)
    # drafts 4% slower, past the tolerance: held, but no trial confirms by the margin, so the period stays 4
    assert drive(guard, 26, open_rate=96, closed_rate=100) == "oo" + "cc" + ("cccc" + "oo") * 3 + "cccc"
    # drafts 2% slower, within the tolerance: they stay, and the steps without them are checked as often
    guard = SpeculationGuard(min_trial=2, max_trial=8, period=4, max_period=16, tolerance=0.03, margin=0.05)
    assert drive(guard, 26, open_rate=98, closed_rate=100) == "oo" + "cc" + ("oooo" + "cc") * 3 + "oooo"


def test_a_noisy_arm_is_measured_until_its_rate_is_known() -> None:
    guard = SpeculationGuard(min_trial=2, max_trial=12, precision=0.04, period=64)
    # steps with drafts give 1 or 5 tokens in the same time: their rate is known only after many steps, so the
    # measurement runs to max_trial; steady steps without drafts are known after min_trial
    trace = ""
    for i in range(20):
        allowed = guard.allow(1)
        tokens = (1 if i % 2 else 5) if allowed else 1
        guard.record(1, allowed, allowed, tokens, 0.01)
        trace += "o" if allowed else "c"
    assert trace == "o" * 12 + "cc" + "o" * 6
    assert guard.state()[1] == (True, pytest.approx(300), pytest.approx(100))


def test_the_choice_follows_a_change_in_either_arm() -> None:
    guard = SpeculationGuard(min_trial=2, max_trial=8, period=4, max_period=4)
    assert drive(guard, 8, open_rate=150, closed_rate=100) == "oo" + "cc" + "oooo"
    # drafts stop paying (say the batch's text stopped repeating): a trial of the closed arm that was due, then the
    # open arm's own steps show its rate falling; once it is behind the closed arm's, a trial measures that again
    # at once (the first still finds the open arm's average within the tolerance, the second does not)
    assert drive(guard, 14, open_rate=70, closed_rate=100) == "cc" + "oooo" + "cc" + "oo" + "cccc"
    assert guard.state()[4][0] is False
    # drafts pay again: the next trial of them shows it, and they come back
    assert drive(guard, 8, open_rate=150, closed_rate=100) == "cc" + "oooooo"
    assert guard.state()[4][0] is True


def test_an_old_rate_is_measured_again_before_the_choice_changes() -> None:
    guard = SpeculationGuard(min_trial=2, max_trial=4, period=64, max_period=64)
    assert drive(guard, 30, open_rate=150, closed_rate=100) == "oo" + "cc" + "o" * 26
    # drafts slow down, but the closed arm's rate is old: once the open arm's average falls behind it, a trial of
    # the closed arm comes first; here the steps without drafts have slowed down as much, and the drafts stay
    assert drive(guard, 40, open_rate=90, closed_rate=60) == "o" * 34 + "cc" + "o" * 4
    assert guard.state()[4][0] is True
    guard = SpeculationGuard(min_trial=2, max_trial=4, period=64, max_period=64)
    drive(guard, 30, open_rate=150, closed_rate=100)
    # here they have not: the trial shows it, and drafts stop
    assert drive(guard, 40, open_rate=90, closed_rate=120) == "o" * 34 + "c" * 6
    assert guard.state()[4][0] is False


def test_steps_let_through_without_drafts_are_no_evidence() -> None:
    guard = SpeculationGuard(min_trial=2, max_trial=6, period=4)
    # the adaptive lengths choose no drafts (a drafter that has not learned its requests' acceptance yet): the open
    # arm learns nothing, the measurement of it runs out at max_trial, and nothing is held on that account (the
    # held steps' trials go on each period, costing nothing a step without drafts would not)
    trace = ""
    for _ in range(20):
        allowed = guard.allow(1)
        guard.record(1, allowed, False, 1, 0.011 if allowed else 0.010)
        trace += "o" if allowed else "c"
    assert trace == "o" * 6 + "cc" + ("oooo" + "cc") * 2
    assert guard.state()[1] == (True, 0.0, pytest.approx(100))


def test_batch_sizes_are_kept_apart_and_large_ones_share_power_of_two_ranges() -> None:
    assert [SpeculationGuard.key(n) for n in (1, 4, 8, 9, 16, 17, 33, 64, 65)] == [1, 4, 8, 16, 16, 32, 64, 64, 128]
    guard = SpeculationGuard(min_trial=2, max_trial=8, period=8)
    assert drive(guard, 6, open_rate=50, closed_rate=100, batch=4) == "oo" + "cc" + "cc"
    # nothing follows for a smaller batch from a larger one that holds: 3 learns both arms
    assert drive(guard, 6, open_rate=200, closed_rate=100, batch=3) == "oo" + "cc" + "oo"
    # a larger batch than one that holds starts held, measures that, and tries drafts after a period
    assert drive(guard, 14, open_rate=200, closed_rate=100, batch=6) == "cc" + "c" * 8 + "oo" + "oo"
    # a smaller batch than one that drafts starts drafting
    assert drive(guard, 12, open_rate=200, closed_rate=100, batch=2) == "oo" + "o" * 8 + "cc"
    assert drive(guard, 1, open_rate=200, closed_rate=100, batch=4) == "c"  # 4 keeps its own choice
    assert {k: v[0] for k, v in guard.state().items()} == {2: True, 3: True, 4: False, 6: True}
    assert drive(guard, 2, open_rate=50, closed_rate=100, batch=12) == "cc"  # held at 4 (12 is in 16's range)
    assert drive(guard, 1, open_rate=50, closed_rate=100, batch=16) == "c"  # the same state
    assert set(guard.state()) == {2, 3, 4, 6, 16}


def test_bad_settings_are_refused() -> None:
    for bad in ({"min_trial": 0}, {"min_trial": 9, "max_trial": 8}, {"period": 64, "max_period": 32},
                {"weight": 0}, {"precision": 0}, {"tolerance": 1}, {"margin": -0.1}):
        with pytest.raises(ValueError):
            SpeculationGuard(**bad)


# ---- in the speculator ------------------------------------------------------------------------------------------


class Repeat(Proposer):
    """Guesses the last token again, as many as asked: free, so the speculator takes all that the lengths allow."""

    def propose(self, request_id, prompt_token_ids, output_token_ids, max_tokens):  # type: ignore[no-untyped-def]
        return [(list(prompt_token_ids) + list(output_token_ids))[-1]] * max_tokens

    def drop(self, request_id: str) -> None:
        return None


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def step(spec: Speculator, clock: Clock, requests: list[Request], seconds_plain: float,
         seconds_per_draft: float) -> tuple[int, ...]:
    """One step: propose, a plan of the requests' decode rows (and drafts), every draft rejected, timed by the
    fake clock; the draft lengths."""
    spec.propose(requests)
    seqs = tuple(ScheduledSeq(r.request_id, 0, 1 + len(r.draft_token_ids), r.num_tokens + len(r.draft_token_ids),
                              (0,), 1 + len(r.draft_token_ids), draft_token_ids=tuple(r.draft_token_ids))
                 for r in requests)
    drafts = sum(len(s.draft_token_ids) for s in seqs)
    clock.now += seconds_plain + seconds_per_draft * drafts
    n = sum(s.num_tokens for s in seqs)
    plan = StepPlan(seqs, (0,) * n, (0,) * n, (0,) * n)
    result = StepResult([SeqSamples(s.request_id, [7], [None]) for s in seqs])
    spec.observe(plan, result)
    spec.step_done(plan, result)
    return tuple(len(s.draft_token_ids) for s in seqs)


def test_the_speculator_holds_drafts_back_where_steps_with_them_are_timed_slower() -> None:
    clock = Clock()
    guard = SpeculationGuard(min_trial=2, max_trial=8, period=8)
    # the cost model says drafts are nearly free (so the adaptive lengths draft), the clock says each costs 10 ms
    spec = Speculator(Repeat(), max_draft_tokens=3, max_model_len=1000, max_step_tokens=64,
                      cost=lambda rows: 0.1 + 1e-6 * rows, guard=guard, clock=clock)
    requests = [Request(rid, [1, 2, 3, 3, 3], SamplingParams(max_tokens=100), status=RequestStatus.RUNNING,
                        num_computed_tokens=4) for rid in "ab"]
    lengths = [step(spec, clock, requests, 0.1, 0.01) for _ in range(11)]
    # two steps with drafts, a trial of two without, then held until the period (8 steps) has passed
    assert [sum(k) > 0 for k in lengths] == [True, True] + [False] * 9
    rates = [spec._of(r.request_id).rate for r in requests]
    assert sum(step(spec, clock, requests, 0.1, 0.01)) == 0
    assert spec.stats.num_held_steps == 10
    # the acceptance estimates did not drift while held: no step without drafts was counted against them
    assert [spec._of(r.request_id).rate for r in requests] == rates
    assert sum(step(spec, clock, requests, 0.1, 0.01)) > 0  # the open arm's trial


def test_without_a_guard_or_with_a_prefill_in_the_step_nothing_is_recorded() -> None:
    clock = Clock()
    guard = SpeculationGuard(min_trial=2, max_trial=8, period=8)
    spec = Speculator(NgramProposer(1, 2), max_draft_tokens=3, max_model_len=1000, max_step_tokens=64,
                      cost=lambda rows: 0.1, guard=guard, clock=clock)
    decoding = Request("a", [1, 2, 1, 2], SamplingParams(max_tokens=100), status=RequestStatus.RUNNING,
                       num_computed_tokens=3)
    spec.propose([decoding])
    prefill = ScheduledSeq("p", 0, 8, 8, (0,), 1)  # a prompt's last chunk: 8 rows, one sample
    clock.now += 1.0
    plan, result = StepPlan((prefill,), (0,) * 8, (0,) * 8, (0,) * 8), StepResult([SeqSamples("p", [5], [None])])
    spec.observe(plan, result)
    spec.step_done(plan, result)
    assert guard.state()[1][1:] == (0.0, 0.0)
    assert Speculator(Repeat(), 3, 1000, 64, cost=lambda rows: 0.1).guard is None
