"""Whether drafting pays at a batch size, measured: steps with and without drafts timed end to end.

The adaptive lengths (adaptive.py) price a step from models: the forward pass by its rows, a draft model's steps by
their depth, acceptance by a moving average. What the models leave out (the drafter's work around its forward
passes, the verifier, the bookkeeping, a shape they got wrong) can make drafts they call paying lose: at a few
sequences a draft step costs most of a target step, and there the adaptive lengths still drafted some and lost a few
percent (docs/benchmarks.md, "The self-draft on Zen 4"). The guard checks the models against the clock.

Per number of decoding requests (exact up to `EXACT_BATCHES`, then by power-of-two ranges) it keeps two measured rates,
output tokens per second over whole steps, the speculator's own work included: "open", the steps it let through that
carried drafts, and "closed", the steps it held (no drafts, no choosing). A step it let through without drafts (the
adaptive lengths chose none) counts for neither: holding it would have changed little, and counting it would let a
drafter that has not yet learned its requests' acceptance (and so drafts nothing) look like one that loses. Drafts go
through unless the open rate is more than `tolerance` below the closed one: where the two are about even, drafting stays
on, since a request's acceptance comes and goes with its text and a held arm would miss the good stretches. The arm not
in use is measured again in a trial once `period` steps have passed without a sample of it, or at once when the
preferred arm's own steps fall behind the other's last rate; only a trial changes the choice, comparing its own fresh
rate with the preferred arm's. A step with drafts varies far more than one without (1 to k + 1 tokens, a draft pass or
not), so a trial lasts until the arm's rate over it is known to `precision` (its relative standard error), at least
`min_trial` and at most `max_trial` steps. A trial that confirms the choice by `margin` doubles the period (up to
`max_period`), any other sets it back: a clear choice costs ever fewer trial steps and a close one is checked often.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

EXACT_BATCHES = 8


@dataclass
class _Rate:
    """An arm's output tokens and seconds per step as moving averages (their ratio is its rate), and the plain sums
    of its samples since the current measurement began, for the spread of that measurement."""

    tokens: float = 0.0
    seconds: float = 0.0
    samples: int = 0
    _sums: list[float] = field(default_factory=lambda: [0.0] * 6)  # n, t, s, t², s², t·s

    def add(self, tokens: int, seconds: float, weight: float) -> None:
        # The first samples average evenly, later ones move the averages by `weight`.
        w = max(weight, 1.0 / (self.samples + 1))
        self.tokens += w * (tokens - self.tokens)
        self.seconds += w * (seconds - self.seconds)
        self.samples += 1
        for i, v in enumerate((1.0, tokens, seconds, tokens * tokens, seconds * seconds, tokens * seconds)):
            self._sums[i] += v

    def restart(self) -> None:
        self._sums = [0.0] * 6

    @property
    def measured(self) -> int:
        return int(self._sums[0])

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def spread(self) -> float:
        """The relative standard error of tokens / seconds over the samples since the restart (the ratio
        estimator's delta-method variance); infinite below two samples."""
        n, t, s, tt, ss, ts = self._sums
        if n < 2 or t <= 0 or s <= 0:
            return math.inf
        r = t / s
        residual = max(tt - 2 * r * ts + r * r * ss, 0.0)  # Σ (t_i − r s_i)²
        return math.sqrt(residual * n / (n - 1)) / t


@dataclass
class _Batch:
    period: int
    open: _Rate = field(default_factory=_Rate)
    closed: _Rate = field(default_factory=_Rate)
    prefer_open: bool = True
    measuring: bool | None = True  # the arm being measured (True: open), None between measurements
    handed: int = 0  # steps handed to the measurement so far
    since: int = 0  # steps since the arm not preferred last had a sample
    inherited: bool = False  # the choice follows from another batch size's: the other arm waits a period

    def arm(self, is_open: bool) -> _Rate:
        return self.open if is_open else self.closed


@dataclass
class SpeculationGuard:
    """`allow(n)` before a step with n decoding requests: may they draft? `record(n, allowed, drafted, tokens,
    seconds)` after it, for a step whose rows were all decodes and drafts of those n requests: whether drafts were
    allowed and whether there were any, the output tokens it gave and its seconds, the speculator's work included.
    An allowed step without drafts is no evidence either way (holding would have changed little) and is left out."""

    min_trial: int = 6
    max_trial: int = 32
    precision: float = 0.04
    period: int = 64
    max_period: int = 256
    weight: float = 0.05
    tolerance: float = 0.03
    margin: float = 0.05
    _batches: dict[int, _Batch] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not (1 <= self.min_trial <= self.max_trial and 1 <= self.period <= self.max_period
                and self.precision > 0 and 0 < self.weight <= 1 and 0 <= self.tolerance < 1 and self.margin >= 0):
            raise ValueError(f"invalid guard settings: {self}")

    @staticmethod
    def key(num_decoding: int) -> int:
        """Batch sizes up to EXACT_BATCHES each on their own, larger ones by power-of-two ranges (9-16 as 16)."""
        return num_decoding if num_decoding <= EXACT_BATCHES else 1 << (num_decoding - 1).bit_length()

    def _batch(self, num_decoding: int) -> _Batch:
        """The batch size's state. Drafts pay less the more sequences share a step, so a new batch size starts held
        when a smaller one measured holds, and drafting when a larger one measured drafts; it then measures that
        arm and tries the other only after a period. Otherwise it learns both arms from scratch (drafts first)."""
        key = self.key(num_decoding)
        if key not in self._batches:
            known = {k: b.prefer_open for k, b in self._batches.items() if b.open.samples or b.closed.samples}
            b = self._batches[key] = _Batch(self.period)
            if any(not drafts for k, drafts in known.items() if k <= key):
                b.prefer_open, b.measuring, b.inherited = False, False, True
            elif any(drafts for k, drafts in known.items() if k >= key):
                b.inherited = True
        return self._batches[key]

    def allow(self, num_decoding: int) -> bool:
        b = self._batch(num_decoding)
        if b.measuring is not None:
            arm = b.arm(b.measuring)
            if b.handed < self.max_trial and (arm.measured < self.min_trial or arm.spread() > self.precision):
                b.handed += 1
                return b.measuring
            self._conclude(b)
        if (not b.arm(not b.prefer_open).samples and not b.inherited) or b.since >= b.period:
            b.measuring, b.handed, b.since = not b.prefer_open, 1, 0
            b.arm(b.measuring).restart()
            return b.measuring
        b.since += 1
        return b.prefer_open

    def _conclude(self, b: _Batch) -> None:
        tried, b.measuring = b.measuring, None
        if not (b.open.samples and b.closed.samples):
            return
        prefer_open = self._open_pays(b)
        if tried != b.prefer_open:  # a trial of the arm not preferred
            kept, other = b.arm(b.prefer_open), b.arm(tried)
            clear = prefer_open == b.prefer_open and other.rate < kept.rate * (1 - self.margin)
            b.period = min(2 * b.period, self.max_period) if clear else self.period
        b.prefer_open = prefer_open

    def record(self, num_decoding: int, allowed: bool, drafted: bool, tokens: int, seconds: float) -> None:
        if seconds <= 0 or tokens <= 0 or (allowed and not drafted):
            return
        b = self._batch(num_decoding)
        b.arm(allowed).add(tokens, seconds, self.weight)
        if allowed != b.prefer_open:  # the arm not preferred has a fresh sample
            b.since = 0
        elif b.measuring is None and b.open.samples and b.closed.samples and self._open_pays(b) != b.prefer_open:
            # The preferred arm's own steps show it falling behind the other's last rate, which was measured on
            # other contexts and text (and, with no choice changed on its account, may be noise): a trial
            # measures the other arm again before anything changes.
            b.since = b.period

    def _open_pays(self, b: _Batch) -> bool:
        return b.open.rate >= b.closed.rate * (1 - self.tolerance)

    def state(self) -> dict[int, tuple[bool, float, float]]:
        """Per batch key: (drafts allowed, open rate, closed rate), for inspection and tests."""
        return {k: (b.prefer_open, b.open.rate, b.closed.rate) for k, b in sorted(self._batches.items())}
