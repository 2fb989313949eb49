"""How sure an A/B speedup is: a confidence interval over paired ratios, and whether it settles a tolerance.

Each repeat of an A/B benchmark runs both arms close together in time, so the ratio within a repeat cancels the
machine's slow drift; what is left varies from pair to pair. Ratios multiply, so the interval is Student's t over
their logarithms: a geometric mean and its two-sided bounds, which a ratio of 0.5 and one of 2 move alike."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

# Student's t, two-sided 95% (the 0.975 quantile), by degrees of freedom; past the table the normal's.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
_Z975 = 1.960


def t975(degrees: int) -> float:
    """The 0.975 quantile of Student's t with `degrees` degrees of freedom (at least 1)."""
    if degrees < 1:
        raise ValueError("a t quantile needs at least one degree of freedom")
    return _T975[degrees - 1] if degrees <= len(_T975) else _Z975


def ratio_interval(ratios: Sequence[float]) -> tuple[float, float, float] | None:
    """(geometric mean, low, high) of positive paired ratios at 95%; None for fewer than two."""
    if len(ratios) < 2:
        return None
    if any(r <= 0 for r in ratios):
        raise ValueError("paired ratios must be positive")
    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    half = t975(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def verdict(interval: tuple[float, float, float] | None, floor: float) -> str:
    """Whether a speedup is below `floor` (0.97: "more than 3% slower"): "below" when the whole interval is,
    "not below" when none of it is, "open" when it straddles the floor or there is no interval."""
    if interval is None:
        return "open"
    _, low, high = interval
    if high < floor:
        return "below"
    if low >= floor:
        return "not below"
    return "open"
