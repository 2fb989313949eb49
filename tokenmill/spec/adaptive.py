"""How many draft tokens each request gets this step (SmartSpec-style: the most expected tokens per second).

A request whose drafts are accepted with probability α per token emits 1 + α + α² + ... + α^k tokens from a step
that verifies k of them. The step's time grows with its rows: `StepCostModel` holds the forward time per row count,
measured when the engine starts. `choose_draft_lengths` hands out draft tokens one at a time to the request whose
next one is most likely accepted, and stops when one more would lower the batch's expected tokens per second, which
at large batches (compute-bound steps) means k = 0.
"""

from __future__ import annotations

import bisect
import functools
import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# How far one real step moves the step-time model toward its own time: the last ten or so steps of a row count
# carry most of the weight.
ONLINE_WEIGHT = 0.1
# A model drafter drafts only where the expected rate beats no drafts by this much: its predicted gain rests on two
# step-time models and an acceptance estimate, each off by some percent, and a marginal draft that does not pay costs
# a whole draft step.
DRAFT_MARGIN = 0.05


# The prior weighs as much as this many trials.
PRIOR_TRIALS = 2.0


@dataclass
class Acceptance:
    """A request's per-token acceptance rate, a moving average over its recent verify steps.

    Each step adds its accepted drafts as successes and, when one was rejected, that one as a failure (a run of
    accepts ended by a reject is a geometric draw); older steps weigh `decay` less per step. It starts at, and
    without drafts drifts back to, a prior rate: 0.5 by default; under a model drafter, that drafter's rate over all
    requests (`Speculator.prior`).
    """

    decay: float = 0.7
    accepted: float = 1.0  # the prior: one success in two trials
    trials: float = 2.0

    @classmethod
    def at(cls, prior: float, decay: float = 0.7) -> Acceptance:
        return cls(decay, prior * PRIOR_TRIALS, PRIOR_TRIALS)

    @property
    def rate(self) -> float:
        return min(0.99, max(0.01, self.accepted / self.trials))

    def observe(self, num_drafts: int, num_accepted: int) -> None:
        self.accepted = self.decay * self.accepted + num_accepted
        self.trials = self.decay * self.trials + num_accepted + (num_accepted < num_drafts)

    def forget(self, keep: float = 0.9, prior: float = 0.5) -> None:
        """A step without drafts: drift back towards the prior. A request whose rate fell too low to draft would
        otherwise never draft again, and never learn that its output has started to copy its prompt."""
        self.accepted = keep * self.accepted + (1 - keep) * prior * PRIOR_TRIALS
        self.trials = keep * self.trials + (1 - keep) * PRIOR_TRIALS


@dataclass
class StepCostModel:
    """Seconds per step by its number of rows, interpolated linearly between measured row counts (and extended
    linearly past the last two).

    Measured once at start-up on synthetic steps, then moved by the real steps within its measured range
    (`observe`): a start-up measurement is a few samples on a machine whose speed drifts, and a real step carries
    work the synthetic one lacks (its context, the verifier), so the model follows the steps it prices. It does
    so at two levels: `speed`, the real steps' time over the start-up model's (one factor for every row count:
    the machine's drift, which moves the row counts a batch never runs as much as those it does), and per measured
    row count a correction of the start-up time itself (a shape the synthetic steps got wrong).
    """

    rows: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.rows) != len(self.seconds) or len(self.rows) < 2 or self.rows != sorted(set(self.rows)):
            raise ValueError("need at least two distinct row counts in increasing order, one time each")
        self._start = list(self.seconds)  # the start-up times, which `speed` is relative to
        self._times = list(self.seconds)  # per row count at the start-up speed, before the envelope
        self.speed = 1.0
        self.seconds = list(itertools.accumulate(self._times, max))

    def observe(self, rows: int, seconds: float, weight: float = ONLINE_WEIGHT) -> None:
        """A real step of `rows` rows took `seconds`. Both levels move `weight` of the way (exponential moving
        averages): `speed` toward the step's time over the start-up model's, then the row count's own time, at that
        speed, toward the step's (a measured row count directly, a count between two measured ones through both,
        each by its share of the interpolation). Steps outside the measured range leave the model as it is."""
        i = bisect.bisect_left(self.rows, rows)
        if i == len(self.rows) or (i == 0 and self.rows[0] != rows):
            return
        exact = self.rows[i] == rows
        share = 1.0 if exact else (rows - self.rows[i - 1]) / (self.rows[i] - self.rows[i - 1])
        lo = i if exact else i - 1
        start = (1 - share) * self._start[lo] + share * self._start[i]
        self.speed += weight * (seconds / start - self.speed)
        error = seconds / self.speed - ((1 - share) * self._times[lo] + share * self._times[i])
        if exact:
            self._times[i] += weight * error
        else:
            self._times[lo] += weight * (1 - share) * error
            self._times[i] += weight * share * error
        # more rows never cost less
        self.seconds = list(itertools.accumulate((self.speed * t for t in self._times), max))

    @classmethod
    def measure(cls, time_rows: Callable[[int], float], row_counts: Sequence[int], repeats: int = 3) -> StepCostModel:
        """`time_rows(n)`: one timed forward of n rows; the fastest of `repeats` counts (noise only adds time)."""
        time_rows(row_counts[0])  # warm-up: first calls pay for allocations
        # A step never gets cheaper with more rows; timing noise must not make the model say so (the constructor
        # keeps the running maximum).
        return cls(list(row_counts), [min(time_rows(n) for _ in range(repeats)) for n in row_counts])

    def __call__(self, rows: int) -> float:
        i = min(max(bisect.bisect_left(self.rows, rows), 1), len(self.rows) - 1)
        r0, r1, t0, t1 = self.rows[i - 1], self.rows[i], self.seconds[i - 1], self.seconds[i]
        return max(t0 + (t1 - t0) * (rows - r0) / (r1 - r0), 1e-9)


def choose_draft_lengths(rates: Sequence[float], available: Sequence[int], base_rows: int,
                         cost: Callable[[int], float],
                         draft_cost: Callable[[int, int], float] | None = None,
                         start_costs: Sequence[float] | None = None) -> list[int]:
    """Draft tokens per request (at most `available[i]`) maximising expected tokens per second.

    `rates[i]`: request i's acceptance rate; `base_rows`: the step's rows without drafts (one per decode, plus
    prefill). Request i's j-th draft token adds rates[i]**j expected tokens, so handing them out in order of that
    gain is optimal for any step cost that grows with rows; it stops at the first that does not pay.

    Prefill rows in the step are paid for whatever is drafted, so their time is left out of every rate compared:
    drafts must pay at the rate of a step of the decodes alone, which is what the time they add would give in a
    later decode step. Counted in, a long prefill chunk would make any draft look cheap against the few tokens the
    step emits, and drafts would be bought at a worse rate than plain decoding gives.

    `draft_cost(num_seqs, depth)`: what guessing costs when a model drafts (`Proposer.draft_seconds`): its steps
    run one depth at a time for every drafting request at once, so the deepest draft sets the number of steps. Such
    a cost jumps with each new depth, which a one-token-at-a-time choice would never pay for; so each depth is
    tried with its draft steps paid up front, the tokens up to it handed out as above, and the best depth kept, if
    it beats drafting nothing by `DRAFT_MARGIN`. `start_costs[i]`: seconds this step is charged if request i drafts
    at all (the share of its drafter's catch-up that the speculator assigns to it), 0 for all when None.
    """
    # Each row count and draft shape is priced many times over the candidate lengths: once each is enough (the
    # models are interpolations in Python, and this runs before every step).
    cost = functools.cache(_without_prefill(cost, base_rows, len(rates)))
    if draft_cost is None:
        return _hand_out(rates, available, base_rows, [0.0] * len(rates), lambda rows, drafting: cost(rows))
    draft_cost = functools.cache(draft_cost)
    starts = list(start_costs) if start_costs is not None else [0.0] * len(rates)
    plain_rate = len(rates) / cost(base_rows)
    best, best_rate = [0] * len(rates), plain_rate
    for depth in range(1, max(available, default=0) + 1):
        capped = [min(a, depth) for a in available]
        lengths = _hand_out(rates, capped, base_rows, starts,
                            lambda rows, drafting, depth=depth: cost(rows) + draft_cost(max(drafting, 1), depth))
        drafting, deepest = sum(1 for k in lengths if k), max(lengths)
        if not deepest:
            continue
        seconds = (cost(base_rows + sum(lengths)) + draft_cost(drafting, deepest)
                   + sum(c for c, k in zip(starts, lengths, strict=True) if k))
        rate = sum(sum(r**j for j in range(k + 1)) for r, k in zip(rates, lengths, strict=True)) / seconds
        if rate > best_rate:
            best, best_rate = lengths, rate
    return best if best_rate > plain_rate * (1 + DRAFT_MARGIN) else [0] * len(rates)


def _without_prefill(cost: Callable[[int], float], base_rows: int, decodes: int) -> Callable[[int], float]:
    """`cost` less the time the step's prefill rows (those of `base_rows` past its `decodes`) add."""
    if base_rows <= decodes:
        return cost
    sunk = cost(base_rows) - cost(decodes)
    return lambda rows: cost(rows) - sunk


def _hand_out(rates: Sequence[float], available: Sequence[int], base_rows: int, starts: Sequence[float],
              seconds: Callable[[int, int], float]) -> list[int]:
    """Tokens in order of expected gain while each raises expected tokens per second; `seconds(rows, drafting)`
    is the step's time with `drafting` requests that have a draft, to which `starts[i]` adds once request i has."""
    lengths = [0] * len(rates)
    expected = float(len(rates))  # every decode emits one token without drafts
    rows, drafting, started = base_rows, 0, 0.0
    heap = [(-rate, i) for i, rate in enumerate(rates) if available[i] > 0]
    heapq.heapify(heap)
    while heap:
        gain, i = heapq.heappop(heap)
        first = lengths[i] == 0
        more, more_started = drafting + first, started + (starts[i] if first else 0.0)
        if ((expected - gain) / (seconds(rows + 1, more) + more_started)
                <= expected / (seconds(rows, drafting) + started)):
            if first and starts[i] > 0:  # its own start does not pay: others' tokens, less likely, still may
                continue
            break
        expected -= gain
        rows, drafting, started = rows + 1, more, more_started
        lengths[i] += 1
        if lengths[i] < available[i]:
            heapq.heappush(heap, (gain * rates[i], i))
    return lengths
