"""The statistics on known samples: nearest-rank percentiles, rates, CPU per request, and the
seeded Poisson schedule of the open-loop load."""

from __future__ import annotations

import itertools
import math

import pytest

from bench.stats import (
    cpu_ms_per_request,
    latency_summary,
    median,
    percentile,
    poisson_arrivals,
    rate,
)

MS = 1_000_000


def test_percentiles_of_one_to_one_hundred() -> None:
    samples = list(range(1, 101))
    assert percentile(samples, 0.50) == 50
    assert percentile(samples, 0.90) == 90
    assert percentile(samples, 0.99) == 99
    assert percentile(samples, 0.999) == 100
    assert percentile(samples, 1.0) == 100
    assert percentile(samples, 0.001) == 1


def test_nearest_rank_is_always_a_sample_never_an_interpolation() -> None:
    samples = [10, 20, 30, 40]
    assert percentile(samples, 0.50) == 20  # rank ceil(2.0) = 2
    assert percentile(samples, 0.51) == 30  # rank ceil(2.04) = 3
    assert percentile(samples, 0.90) == 40
    assert percentile([7], 0.999) == 7


def test_p999_of_a_thousand_samples_is_not_thrown_off_by_float_rounding() -> None:
    # 0.999 * 1000 is 998.9999999999999 in floating point: rank 999, not 1000.
    samples = list(range(1, 1001))
    assert percentile(samples, 0.999) == 999
    assert percentile(list(range(1, 10_001)), 0.999) == 9_990


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_percentile_refuses_a_fraction_outside_zero_one(fraction: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        percentile([1, 2, 3], fraction)


def test_percentile_refuses_no_samples() -> None:
    with pytest.raises(ValueError, match="no samples"):
        percentile([], 0.5)


def test_latency_summary_sorts_and_converts_to_milliseconds() -> None:
    # 1..100 ms, shuffled deterministically.
    samples = [((index * 37) % 100 + 1) * MS for index in range(100)]
    assert sorted(samples) == [value * MS for value in range(1, 101)]
    summary = latency_summary(samples)
    assert summary == {
        "p50_ms": 50.0,
        "p90_ms": 90.0,
        "p99_ms": 99.0,
        "p999_ms": 100.0,
        "mean_ms": 50.5,
    }


def test_latency_summary_of_nothing_is_none() -> None:
    assert set(latency_summary([]).values()) == {None}


def test_rate_and_cpu_per_request() -> None:
    assert rate(3_000, 2.0) == 1_500.0
    assert cpu_ms_per_request(0.75, 2_500) == pytest.approx(0.3)
    assert cpu_ms_per_request(0.75, 0) is None
    with pytest.raises(ValueError, match="window"):
        rate(1, 0.0)


def test_median_ignores_trials_without_a_value() -> None:
    assert median([3.0, None, 1.0, 2.0]) == 2.0
    assert median([None, None]) is None


def test_poisson_schedule_is_reproducible_and_has_the_rate_it_was_asked_for() -> None:
    rate_per_s, duration_s = 2_000.0, 10.0
    arrivals = poisson_arrivals(rate_per_s, duration_s, seed=7)
    assert arrivals == poisson_arrivals(rate_per_s, duration_s, seed=7)
    assert arrivals != poisson_arrivals(rate_per_s, duration_s, seed=8)
    assert arrivals == sorted(arrivals)
    assert arrivals[0] > 0
    assert arrivals[-1] < duration_s
    # A Poisson count has mean and variance rate * duration (20,000): within 4 standard
    # deviations (566) unless the generator is wrong.
    expected = rate_per_s * duration_s
    assert abs(len(arrivals) - expected) < 4 * math.sqrt(expected)
    # Exponential gaps: their mean is 1/rate and their standard deviation equals it.
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    mean_gap = sum(gaps) / len(gaps)
    deviation = math.sqrt(sum((gap - mean_gap) ** 2 for gap in gaps) / len(gaps))
    assert mean_gap == pytest.approx(1 / rate_per_s, rel=0.05)
    assert deviation == pytest.approx(mean_gap, rel=0.05)


def test_poisson_schedule_refuses_a_rate_that_is_not_positive() -> None:
    with pytest.raises(ValueError, match="rate"):
        poisson_arrivals(0.0, 1.0, seed=1)
