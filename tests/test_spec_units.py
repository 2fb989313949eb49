"""Speculative decoding's pure parts: the n-gram proposer, adaptive draft lengths, the verifier's rejection rule
(chi-square against the target distribution) and the scheduler's 1 + k rule with exact block ids through rollback."""

from __future__ import annotations

import math

import pytest
import torch

from tokenmill.kv.manager import KVCacheManager
from tokenmill.request import Request, RequestStatus
from tokenmill.sampler.sampler import Sampler, SamplingRow
from tokenmill.sampling_params import SamplingParams
from tokenmill.scheduler.plan import ScheduledSeq, SeqSamples, StepPlan, StepResult
from tokenmill.scheduler.scheduler import Scheduler, SchedulerConfig
from tokenmill.spec.adaptive import DRAFT_MARGIN, Acceptance, StepCostModel, choose_draft_lengths
from tokenmill.spec.ngram import NgramProposer
from tokenmill.spec.proposer import Proposer
from tokenmill.spec.speculator import PROBE_EVERY, PROBE_TOKENS, Speculator
from tokenmill.spec.verifier import verify

# ---- n-gram proposer --------------------------------------------------------------------------------------------


def test_ngram_copies_what_followed_the_latest_longest_match() -> None:
    proposer = NgramProposer(min_n=1, max_n=3)
    #        0  1  2  3  4  5  6  7  8  9
    prompt = [5, 6, 7, 8, 9, 5, 6, 7, 1, 2]
    # suffix (6, 7) matches ending at 2 and at 7; the latest (7) wins: guesses 1, 2
    assert proposer.propose("r", prompt, [5, 6, 7], 4) == [1, 2, 5, 6]
    # the longest n wins over a more recent shorter match: (9, 5) → 6 at positions 4-5, although 5 recurs later
    assert proposer.propose("s", [9, 5, 6, 0, 5, 3, 9, 5], [], 2) == [6, 0]


def test_ngram_respects_limits_and_min_n() -> None:
    proposer = NgramProposer(min_n=2, max_n=2)
    assert proposer.propose("r", [1, 2, 3, 1, 2], [], 0) == []
    assert proposer.propose("r", [1, 2, 3, 1, 2], [], 1) == [3]
    assert proposer.propose("t", [1, 2, 3, 4, 2], [], 5) == []  # only a 1-gram matches, below min_n
    with pytest.raises(ValueError):
        NgramProposer(min_n=3, max_n=2)


def test_ngram_index_grows_with_the_output_and_drop_forgets() -> None:
    proposer = NgramProposer(min_n=1, max_n=2)
    prompt, output = [1, 2, 3], []
    assert proposer.propose("r", prompt, output, 3) == []
    output += [4, 1, 2]
    assert proposer.propose("r", prompt, output, 3) == [3, 4, 1]
    output += [9]
    assert proposer.propose("r", prompt, output, 3) == []
    proposer.drop("r")
    assert proposer.propose("r", [7, 7], [], 2) == [7]  # a fresh index for a reused id


def test_ngram_matches_a_brute_force_search() -> None:
    rng = torch.Generator().manual_seed(0)
    proposer = NgramProposer(min_n=1, max_n=3)
    tokens: list[int] = []
    for step in range(300):
        tokens.append(int(torch.randint(0, 6, (), generator=rng)))
        got = proposer.propose("r", tokens[:5], tokens[5:], 4) if len(tokens) > 5 else []
        if len(tokens) <= 5:
            continue
        want: list[int] = []
        for n in range(3, 0, -1):
            suffix = tokens[-n:]
            ends = [e for e in range(n - 1, len(tokens) - 1) if tokens[e - n + 1 : e + 1] == suffix]
            if ends:
                want = tokens[ends[-1] + 1 : ends[-1] + 5]
                break
        assert got == want, step


# ---- adaptive lengths -------------------------------------------------------------------------------------------


def test_acceptance_moves_towards_what_is_observed() -> None:
    a = Acceptance()
    assert a.rate == 0.5
    for _ in range(10):
        a.observe(4, 4)
    assert a.rate > 0.95
    for _ in range(10):
        a.observe(4, 0)
    assert a.rate < 0.15
    for _ in range(30):  # steps without drafts drift back to the prior, so the request tries again
        a.forget()
    assert 0.4 < a.rate < 0.5


def test_cost_model_interpolates_and_is_monotonic() -> None:
    model = StepCostModel.measure(lambda n: {1: 1.0, 2: 0.9, 4: 1.2, 8: 2.0}[n], [1, 2, 4, 8], repeats=1)
    assert model.seconds == [1.0, 1.0, 1.2, 2.0]  # noise never makes more rows cheaper
    assert model(3) == pytest.approx(1.1)
    assert model(16) == pytest.approx(3.6)  # linear past the last point
    with pytest.raises(ValueError):
        StepCostModel([1], [1.0])


def test_cost_model_follows_the_real_steps_of_its_row_counts() -> None:
    model = StepCostModel([1, 2, 4], [0.010, 0.012, 0.016])
    for _ in range(100):  # the machine is now twice as slow, and the batch runs only 4-row steps
        model.observe(4, 0.032)
    # The drift moves the row counts the batch never ran too: a speculative step's 5 rows are not priced at the
    # start-up speed while the 4-row steps they are weighed against are priced at today's.
    assert model.speed == pytest.approx(2.0, rel=1e-3)
    assert model.seconds == pytest.approx([0.020, 0.024, 0.032], rel=1e-3)
    for _ in range(100):  # 2-row steps cost more than the start-up shape says: that row count alone is corrected
        model.observe(1, 0.020)
        model.observe(2, 0.030)
    assert model(1) == pytest.approx(0.020, rel=0.05) and model(2) == pytest.approx(0.030, rel=0.05)
    assert model(4) == pytest.approx(0.032 * model.speed / 2.0, rel=1e-3)
    before = list(model.seconds)
    model.observe(8, 1.0)  # past the measured counts: ignored
    assert model.seconds == before
    for _ in range(100):  # now one row costs more than two did: the envelope keeps more rows from costing less
        model.observe(1, 0.040)
        model.observe(2, 0.030)
    assert model.seconds[0] == model.seconds[1] == pytest.approx(0.040, rel=0.05)


def test_cost_model_shares_a_step_between_its_two_measured_neighbours() -> None:
    model = StepCostModel([1, 2, 4], [0.010, 0.020, 0.040])
    model.observe(3, 0.045, weight=0.5)
    # Start-up model at 3 rows: 0.030, so speed 1 -> 1.25; at that speed the step is 0.036 of start-up time, a
    # 0.006 error, shared half and half between 2 and 4 rows at weight 0.5.
    assert model.speed == pytest.approx(1.25)
    assert model.seconds == pytest.approx([0.0125, 1.25 * 0.0215, 1.25 * 0.0415])
    assert model(3) == pytest.approx(1.25 * 0.0315)


def test_only_steps_of_decodes_and_drafts_move_the_speculators_cost_model() -> None:
    spec = Speculator(NgramProposer(2, 4), max_draft_tokens=4, max_model_len=1000, max_step_tokens=64,
                      cost=StepCostModel([1, 4, 8], [0.01, 0.02, 0.03]))
    verify_a = ScheduledSeq("a", 0, 3, 50, (0,), 3)  # a decode with 2 drafts
    decode_b = ScheduledSeq("b", 3, 1, 20, (1,), 1)
    prefill_c = ScheduledSeq("c", 4, 4, 4, (2,), 0)  # a prefill chunk: rows of another cost
    spec.observe(StepPlan((decode_b, verify_a), (0,) * 4, (0,) * 4, (0,) * 4), StepResult(), seconds=0.1)
    # 5x the start-up 4-row time: speed 1 -> 1.4 at the default weight 0.1, and the 4-row time moves a tenth of the
    # way from 0.02 to 0.1 / 1.4
    after = [0.014, 1.4 * (0.02 + 0.1 * (0.1 / 1.4 - 0.02)), 0.042]
    assert spec.cost.speed == pytest.approx(1.4) and spec.cost.seconds == pytest.approx(after)
    spec.observe(StepPlan((decode_b, verify_a, prefill_c), (0,) * 8, (0,) * 8, (0,) * 8), StepResult(),
                 seconds=1.0)
    spec.observe(StepPlan((decode_b,), (0,), (0,), (0,)), StepResult())  # no time given
    assert spec.cost.seconds == pytest.approx(after)


def test_a_model_drafter_drafts_only_for_a_gain_beyond_the_margin() -> None:
    flat = lambda rows: 1.0  # noqa: E731
    # One draft at acceptance 0.5 emits 1.5 tokens per (1 + d) seconds against 1 per second without.
    assert DRAFT_MARGIN == 0.05
    assert choose_draft_lengths([0.5], [1], 1, flat, lambda seqs, depth: 0.45 * depth) == [0]  # +3.4%
    assert choose_draft_lengths([0.5], [1], 1, flat, lambda seqs, depth: 0.35 * depth) == [1]  # +11%
    assert choose_draft_lengths([0.5], [1], 1, flat) == [1]  # a free drafter takes any gain


def test_draft_lengths_follow_acceptance_and_step_cost() -> None:
    flat = lambda rows: 1.0  # noqa: E731 - a memory-bound step: rows are free
    assert choose_draft_lengths([0.9, 0.1], [5, 5], 2, flat) == [5, 5]
    linear = lambda rows: float(rows)  # noqa: E731 - a compute-bound step: every row costs the same
    assert choose_draft_lengths([0.9, 0.9], [5, 5], 2, linear) == [0, 0]
    # one row costs a tenth more per row: only drafts likely enough to be accepted are worth it
    mild = lambda rows: 1.0 + 0.1 * rows  # noqa: E731
    lengths = choose_draft_lengths([0.9, 0.2], [8, 8], 2, mild)
    assert lengths[0] > 0 and lengths[1] == 0
    assert choose_draft_lengths([0.9], [0], 1, flat) == [0]  # nothing to draft from


def test_a_prefill_chunk_in_the_step_does_not_make_drafts_look_cheap() -> None:
    cost = lambda rows: 0.010 + 0.0002 * rows  # noqa: E731 - 10 ms a step and 0.2 ms a row
    dear = lambda seqs, depth: 0.010 * depth  # noqa: E731
    # Two decodes alone emit 2 tokens per 10.4 ms; one draft each at acceptance 0.9 gives 3.8 per 20.8 ms: no depth
    # pays. Beside a 2,048-row prefill chunk the step takes 420 ms whatever is drafted, and the drafts' 9.4 tokens
    # per 52 ms more would beat the step's own rate: still no drafts, since the chunk's time is spent either way.
    assert choose_draft_lengths([0.9, 0.9], [5, 5], 2, cost, dear) == [0, 0]
    assert choose_draft_lengths([0.9, 0.9], [5, 5], 2050, cost, dear) == [0, 0]
    cheap = lambda seqs, depth: 0.002 * depth  # noqa: E731 - here drafts pay with the chunk or without
    assert choose_draft_lengths([0.9, 0.9], [5, 5], 2, cost, cheap) == [5, 5]
    assert choose_draft_lengths([0.9, 0.9], [5, 5], 2050, cost, cheap) == [5, 5]
    # A free drafter's token at acceptance 0.02 adds 0.02 tokens per 0.2 ms row, below the decodes' own rate.
    assert choose_draft_lengths([0.02, 0.5], [3, 3], 2050, cost) == choose_draft_lengths([0.02, 0.5], [3, 3], 2, cost)
    assert choose_draft_lengths([0.02, 0.5], [3, 3], 2, cost) == [0, 3]


# ---- verifier ---------------------------------------------------------------------------------------------------


def _row(seed: int | None = None, **params: object) -> SamplingRow:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(SamplingParams(seed=seed, **params), (), (), gen)  # type: ignore[arg-type]


def test_greedy_verification_accepts_the_matching_prefix() -> None:
    logits = torch.full((4, 10), -5.0)
    for r, t in enumerate([3, 4, 9, 1]):
        logits[r, t] = 5.0
    rows = [_row(temperature=0.0) for _ in range(4)]
    [v] = verify(Sampler(), logits, rows, [[3, 4, 2]])
    assert v.token_ids == [3, 4, 9] and v.num_accepted == 2
    [v] = verify(Sampler(), logits, rows, [[3, 4, 9]])
    assert v.token_ids == [3, 4, 9, 1]  # all accepted: the bonus token
    [v] = verify(Sampler(), logits[:2], rows[:2], [[0]])
    assert v.token_ids == [3]


def _chi_square_p(counts: list[int], probs: list[float]) -> float:
    n = sum(counts)
    stat = sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs, strict=True) if p > 0)
    dof = sum(1 for p in probs if p > 0) - 1
    # Wilson-Hilferty: the chi-square upper tail through a normal approximation (no scipy needed).
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("draft", [0, 2])  # the most likely token and a likely-rejected one
def test_rejection_sampling_emits_the_target_distribution(draft: int) -> None:
    """One position: the first emitted token (accepted draft or resampled) must follow p whatever the draft."""
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = probs.log().expand(2, -1).contiguous()
    sampler = Sampler(generator=torch.Generator().manual_seed(0))
    counts = [0] * 4
    trials = 4000
    for _ in range(trials):
        [v] = verify(sampler, logits, [_row(temperature=1.0), _row(temperature=1.0)], [[draft]])
        counts[v.token_ids[0]] += 1
    assert _chi_square_p(counts, probs.tolist()) > 0.001


def test_rejection_sampling_keeps_top_k_and_temperature() -> None:
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log().expand(2, -1).contiguous()
    # top_k=2 at temperature 0.5: p ∝ (0.4², 0.3²) on tokens 0 and 1
    target = [0.16 / 0.25, 0.09 / 0.25, 0.0, 0.0]
    sampler = Sampler(generator=torch.Generator().manual_seed(1))
    counts = [0] * 4
    for _ in range(3000):
        [v] = verify(sampler, logits, [_row(temperature=0.5, top_k=2)] * 2, [[3]])
        counts[v.token_ids[0]] += 1
    assert counts[2] == counts[3] == 0
    assert _chi_square_p(counts, target) > 0.001


def test_seeded_verification_does_not_depend_on_the_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 20)
    alone = verify(Sampler(), logits[:3], [_row(seed=7, temperature=1.0) for _ in range(3)], [[1, 2]])
    batched = verify(Sampler(), logits, [_row(seed=7, temperature=1.0) for _ in range(3)]
                     + [_row(temperature=1.0) for _ in range(3)], [[1, 2], [4, 5]])
    assert alone[0].token_ids == batched[0].token_ids


def test_seeded_verification_draws_as_decoding_without_drafts() -> None:
    """Each reached row draws its token as a row without drafts would (one uniform from the request's generator);
    a draft is accepted when it is that token. So the drafts change how many rows one step emits, never which."""
    torch.manual_seed(0)
    logits = torch.randn(4, 20)

    def rows() -> list[SamplingRow]:  # one request: its rows share its generator
        gen = torch.Generator().manual_seed(11)
        return [SamplingRow(SamplingParams(seed=11, temperature=1.0), (), (), gen) for _ in range(4)]

    one_at_a_time = rows()
    plain = [Sampler()(logits[r : r + 1], one_at_a_time[r : r + 1]).token_ids[0] for r in range(4)]
    [v] = verify(Sampler(), logits, rows(), [plain[:3]])
    assert (v.token_ids, v.path) == (plain, [1, 2, 3])  # every draft accepted, the bonus as the fourth draw
    [v] = verify(Sampler(), logits, rows(), [[plain[0], (plain[1] + 1) % 20, plain[2]]])
    assert (v.token_ids, v.path) == (plain[:2], [1])  # rejected at row 1: its own draw is the token


# ---- the scheduler's 1 + k rule ---------------------------------------------------------------------------------


def _scheduler(num_blocks: int = 16, block_size: int = 4, budget: int = 16, prefix: bool = False) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=64),
                     KVCacheManager(num_blocks, block_size, enable_prefix_caching=prefix))


def _emit(sched: Scheduler, emitted: dict[str, list[int]]) -> dict[str, tuple[int, int]]:
    """Schedule and update with the given emitted tokens per request; returns (rows, samples) per request."""
    plan = sched.schedule()
    result = StepResult([SeqSamples(rid, toks, [None] * len(toks)) for rid, toks in emitted.items()])
    sched.update(plan, result)
    for rid, toks in emitted.items():
        sched.get(rid).output_token_ids.extend(toks)
    return {s.request_id: (s.num_tokens, s.num_samples) for s in plan.seqs}


def test_drafts_are_scheduled_as_one_plus_k_and_rejected_ones_roll_back() -> None:
    sched = _scheduler()
    a = Request("a", [10, 11, 12, 13, 14, 15], SamplingParams(max_tokens=50))
    sched.add_request(a)
    assert _emit(sched, {"a": [20]}) == {"a": (6, 1)}
    assert sched.kv_cache.block_table("a") == [0, 1]
    a.draft_token_ids = [21, 22, 23, 24]
    plan = sched.schedule()
    [seq] = plan.seqs
    assert (seq.num_tokens, seq.num_samples, seq.draft_token_ids) == (5, 5, (21, 22, 23, 24))
    assert plan.token_ids == (20, 21, 22, 23, 24) and plan.positions == (6, 7, 8, 9, 10)
    assert a.draft_token_ids == []  # consumed
    assert sched.kv_cache.block_table("a") == [0, 1, 2]  # entries 0..10
    # one draft accepted, then the target's own token: entries 9 and 10 roll back, block 2 is released
    sched.update(plan, StepResult([SeqSamples("a", [21, 30], [None, None])]))
    a.output_token_ids.extend([21, 30])
    assert a.num_computed_tokens == 8 and a.num_tokens == 9
    assert sched.kv_cache.num_entries("a") == 8
    assert sched.kv_cache.block_table("a") == [0, 1]
    assert sched.kv_cache.num_free_blocks == 14
    # the next step starts at the target's token, at the entry the rejected draft had; the released block went to
    # the back of the free queue, so the next free one (3) is taken
    a.draft_token_ids = [31]
    plan = sched.schedule()
    assert plan.token_ids == (30, 31) and plan.positions == (8, 9)
    assert sched.kv_cache.block_table("a") == [0, 1, 3]
    assert plan.slot_mapping == (3 * 4 + 0, 3 * 4 + 1)
    sched.update(plan, StepResult([SeqSamples("a", [31, 32], [None, None])]))  # all accepted + bonus
    assert a.num_computed_tokens == 10 and sched.kv_cache.num_entries("a") == 10


def test_budget_trims_drafts_and_full_allocation_drops_them_before_preempting() -> None:
    sched = _scheduler(budget=4)
    a = Request("a", [1, 2, 3], SamplingParams(max_tokens=50))
    sched.add_request(a)
    _emit(sched, {"a": [4]})
    a.draft_token_ids = [5, 6, 7, 8, 9]
    plan = sched.schedule()
    assert plan.seqs[0].draft_token_ids == (5, 6, 7) and plan.seqs[0].num_samples == 4
    sched.update(plan, StepResult([SeqSamples("a", [5], [None])]))
    a.output_token_ids.append(5)
    # two blocks in all: a holds one; its drafts would need a second and a third, so they go, and nobody is preempted
    small = _scheduler(num_blocks=2, budget=16)
    b = Request("b", [1, 2, 3], SamplingParams(max_tokens=50))
    small.add_request(b)
    _emit(small, {"b": [4]})
    b.draft_token_ids = [5, 6, 7, 8, 9, 10]
    plan = small.schedule()
    assert plan.seqs[0].num_tokens == 1 and plan.seqs[0].draft_token_ids == () and not plan.preempted_request_ids


def test_drafts_never_enter_the_prefix_cache() -> None:
    sched = _scheduler(prefix=True)
    a = Request("a", [1, 2, 3], SamplingParams(max_tokens=50))
    sched.add_request(a)
    _emit(sched, {"a": [4]})
    a.draft_token_ids = [5, 6, 7, 8]
    plan = sched.schedule()
    # block 0 (entries 0-3: 1 2 3 4) is full with real tokens; block 1 would be full of drafts 5 6 7 8 (entries 4-7)
    sched.update(plan, StepResult([SeqSamples("a", [5, 6, 7, 8, 9], [None] * 5)]))
    assert sched.kv_cache.pool.cached_block(sched.kv_cache.block_hashes(a, 1)[0]) == 0
    assert sched.kv_cache._num_registered["a"] == 1  # the accepted drafts' block waits until they are tokens
    a.output_token_ids.extend([5, 6, 7, 8, 9])
    _emit(sched, {"a": [10]})
    assert sched.kv_cache._num_registered["a"] == 2  # now known tokens, hashed from them
    assert sched.kv_cache.pool.cached_block(sched.kv_cache.block_hashes(a, 2)[1]) == 1


class CostlyRepeat(Proposer):
    """Guesses the last token again; each draft step costs twice a target step."""

    free = False

    def propose(self, request_id: str, prompt_token_ids, output_token_ids, max_tokens: int) -> list[int]:
        return [(list(prompt_token_ids) + list(output_token_ids))[-1]] * max_tokens

    def drop(self, request_id: str) -> None:
        pass

    def draft_seconds(self, num_seqs: int, depth: int) -> float:
        return 0.2 * depth


class PerSeqRepeat(CostlyRepeat):
    """Each draft step costs a quarter of a target step per drafting sequence: with two decoding requests, drafts
    do not pay at the prior acceptance (0.5), and do for one request whose probe was accepted whole."""

    def draft_seconds(self, num_seqs: int, depth: int) -> float:
        return 0.026 * num_seqs * depth


def _two_decoding() -> tuple[Request, Request]:
    first, second = (Request(rid, [1, 2, 3], SamplingParams(max_tokens=100), status=RequestStatus.RUNNING,
                             num_computed_tokens=2) for rid in ("a", "b"))
    return first, second


def test_a_costly_drafter_probes_a_request_it_left_idle_so_its_acceptance_gets_measured() -> None:
    spec = Speculator(PerSeqRepeat(), max_draft_tokens=5, max_model_len=1000, max_step_tokens=64,
                      cost=lambda rows: 0.1 + 0.001 * rows)
    first, second = _two_decoding()
    drafted = []
    for _ in range(4 * PROBE_EVERY):
        spec.propose([first, second])
        drafted.append((len(first.draft_token_ids), len(second.draft_token_ids)))
    # At the prior no draft pays; after PROBE_EVERY idle steps one request (only one per step) gets a short probe.
    # Nothing was verified, so the cost model still declines: each request then waits twice as long for its next.
    a, b, idle = (PROBE_TOKENS, 0), (0, PROBE_TOKENS), [(0, 0)]
    assert drafted == idle * (PROBE_EVERY - 1) + [a, b] + idle * (2 * PROBE_EVERY - 2) + [a, b] + idle * 15
    assert spec._probe_wait == {"a": 4 * PROBE_EVERY, "b": 4 * PROBE_EVERY}
    spec.release("a")
    assert "a" not in spec._idle and "a" not in spec._probe_wait


def test_no_probe_where_even_a_fully_accepted_one_would_leave_the_cost_model_declining() -> None:
    # Four decoding requests: one request's drafts would not pay even at the rate a whole accepted probe gives it,
    # so no probe is sent and no wait grows; once the batch is down to two, each gets its probe.
    spec = Speculator(PerSeqRepeat(), max_draft_tokens=5, max_model_len=1000, max_step_tokens=64,
                      cost=lambda rows: 0.1 + 0.001 * rows)
    requests = [Request(rid, [1, 2, 3], SamplingParams(max_tokens=100), status=RequestStatus.RUNNING,
                        num_computed_tokens=2) for rid in "abcd"]
    for _ in range(4 * PROBE_EVERY):
        spec.propose(requests)
        assert not any(r.draft_token_ids for r in requests)
    assert spec._probe_wait == {}
    drafted = []
    for _ in range(PROBE_EVERY):
        spec.propose(requests[:2])
        drafted.append(tuple(len(r.draft_token_ids) for r in requests[:2]))
    assert sorted(drafted)[-2:] == [(0, PROBE_TOKENS), (PROBE_TOKENS, 0)] and sum(map(sum, drafted)) == 4
    assert spec._probe_wait == {"a": 2 * PROBE_EVERY, "b": 2 * PROBE_EVERY}


def test_a_new_or_idle_request_starts_from_the_drafters_own_acceptance() -> None:
    """At the prior of one half, drafts for two requests do not pay here; once request a's drafts have been accepted
    step after step, a new request starts at the drafter's rate and drafts at once, and an idle one drifts back
    to that rate rather than to one half."""
    spec = Speculator(PerSeqRepeat(), max_draft_tokens=5, max_model_len=1000, max_step_tokens=64,
                      cost=lambda rows: 0.1 + 0.001 * rows)
    first, second = _two_decoding()
    spec.propose([first, second])
    assert spec.prior == 0.5 and not first.draft_token_ids and not second.draft_token_ids
    for _ in range(20):  # request a: four drafts verified, all accepted
        seq = ScheduledSeq("a", 0, 5, 10, (0,), 5, draft_token_ids=(3, 3, 3, 3))
        spec.observe(StepPlan((seq,), (0,) * 5, (0,) * 5, (0,) * 5), StepResult([SeqSamples("a", [3] * 5, [None] * 5)]))
    assert spec.prior > 0.95
    newcomer = Request("c", [1, 2, 3], SamplingParams(max_tokens=100), status=RequestStatus.RUNNING,
                       num_computed_tokens=2)
    spec.propose([newcomer, second])  # both new to the speculator's rates (b's estimate began at one half)
    assert newcomer.draft_token_ids and spec._of("c").rate > 0.95
    spec._of("b").observe(4, 0)  # b's own drafts all rejected: its rate falls; idle steps bring it back up
    low = spec._of("b").rate
    for _ in range(40):
        spec._of("b").forget(prior=spec.prior)
    assert low < 0.5 and spec._of("b").rate > 0.9
    lookup = Speculator(NgramProposer(2, 4), max_draft_tokens=4, max_model_len=1000, max_step_tokens=64)
    lookup._overall.observe(4, 4)
    assert lookup.prior == 0.5  # a lookup's guesses come and go with each request's text: the fixed prior


class CheapRepeat(CostlyRepeat):
    def draft_seconds(self, num_seqs: int, depth: int) -> float:
        return 0.001 * depth


class LaggingRepeat(CheapRepeat):
    """Cheap draft steps, but a catch-up of 3.2 s before a request's first draft, until told it has caught up."""

    def __init__(self) -> None:
        self.caught_up: set[str] = set()

    def catch_up_seconds(self, request_id: str, num_tokens: int) -> float:
        return 0.0 if request_id in self.caught_up else 3.2


def test_a_drafters_catch_up_is_charged_over_the_steps_it_pays_for() -> None:
    proposer = LaggingRepeat()
    spec = Speculator(proposer, max_draft_tokens=5, max_model_len=1000, max_step_tokens=64,
                      cost=lambda rows: 0.1 + 0.001 * rows)
    long, short = (Request(rid, [1, 2, 3], SamplingParams(max_tokens=m), status=RequestStatus.RUNNING,
                           num_computed_tokens=2) for rid, m in (("long", 1000), ("short", 3)))
    # 1000 tokens left: the catch-up is spread over CATCH_UP_HORIZON (32) steps, 0.1 s each, which no draft at the
    # prior acceptance makes up for; 3 tokens left: over about 2 steps.
    assert spec._start_costs([long, short], [5, 2], [0.5, 0.5]) == pytest.approx([3.2 / 32, 3.2 / (3 / 1.75)])
    spec.propose([long])
    assert long.draft_token_ids == []
    proposer.caught_up.add("long")  # drafting now costs only its cheap steps, which pay at the prior
    spec.propose([long])
    assert len(long.draft_token_ids) > 0


def test_drafts_the_cost_model_chooses_again_reset_the_probe_interval() -> None:
    spec = Speculator(CheapRepeat(), max_draft_tokens=5, max_model_len=1000, max_step_tokens=64,
                      cost=lambda rows: 0.1 + 0.001 * rows)
    request = Request("a", [1, 2, 3], SamplingParams(max_tokens=100), status=RequestStatus.RUNNING,
                      num_computed_tokens=2)
    spec._probe_wait["a"] = 8 * PROBE_EVERY
    spec.propose([request])
    assert request.draft_token_ids and "a" not in spec._probe_wait and spec._idle["a"] == 0
