"""The paired-ratio interval and the tolerance verdict of A/B benchmarks (tokenmill/bench/paired.py)."""

from __future__ import annotations

import math

import pytest

from tokenmill.bench.paired import ratio_interval, t975, verdict


def test_t_quantiles_match_the_tables() -> None:
    assert t975(1) == 12.706
    assert t975(3) == 3.182
    assert t975(30) == 2.042
    assert t975(31) == 1.960
    with pytest.raises(ValueError):
        t975(0)


def test_interval_is_t_over_the_logarithms() -> None:
    # logs ±d: mean 0, sample standard deviation d·sqrt(2), half width t(1)·d·sqrt(2)/sqrt(2) = 12.706·d.
    d = math.log(1.02)
    mean, low, high = ratio_interval([1.02, 1 / 1.02])
    assert mean == pytest.approx(1.0)
    assert low == pytest.approx(math.exp(-12.706 * d))
    assert high == pytest.approx(math.exp(12.706 * d))


def test_interval_of_equal_ratios_is_a_point_and_symmetric_in_log() -> None:
    assert ratio_interval([0.9, 0.9, 0.9]) == pytest.approx((0.9, 0.9, 0.9))
    mean, low, high = ratio_interval([0.8, 1.0, 1.25])
    assert mean == pytest.approx(1.0)
    assert low * high == pytest.approx(1.0)


def test_interval_needs_two_positive_ratios() -> None:
    assert ratio_interval([1.1]) is None
    assert ratio_interval([]) is None
    with pytest.raises(ValueError):
        ratio_interval([1.0, 0.0])


@pytest.mark.parametrize(("interval", "expected"), [
    ((0.95, 0.94, 0.969), "below"),
    ((1.00, 0.97, 1.03), "not below"),
    ((0.98, 0.96, 1.00), "open"),
    (None, "open"),
])
def test_verdict(interval: tuple[float, float, float] | None, expected: str) -> None:
    assert verdict(interval, 0.97) == expected
