"""The statistics every scenario reports, computed one way: nearest-rank percentiles of latency
samples, rates over a window, CPU seconds per request, and the Poisson arrival schedule of the
open-loop load."""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence

PERCENTILES = {"p50_ms": 0.50, "p90_ms": 0.90, "p99_ms": 0.99, "p999_ms": 0.999}
"""The latency percentiles every load point reports, by their key in the JSON."""
_NS_PER_MS = 1_000_000


def percentile(sorted_values: Sequence[int], fraction: float) -> int:
    """The nearest-rank percentile of a non-empty ascending sequence (0 < fraction <= 1): the
    smallest sample with at least `fraction` of the samples at or below it. Always one of the
    samples, never an interpolation, so p99.9 of 1,000 samples is the largest.

    Raises:
        ValueError: an empty sequence or a fraction outside (0, 1].
    """
    if not sorted_values:
        raise ValueError("no samples")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    # round() first: 0.999 * 1000 is 998.9999999999999 in floating point.
    rank = math.ceil(round(fraction * len(sorted_values), 9))
    return sorted_values[max(1, rank) - 1]


def latency_summary(latencies_ns: Sequence[int]) -> dict[str, float | None]:
    """p50, p90, p99, p99.9 and the mean of `latencies_ns` (any order), in milliseconds; all
    None when there are no samples."""
    ordered = sorted(latencies_ns)
    summary: dict[str, float | None] = {
        key: percentile(ordered, fraction) / _NS_PER_MS if ordered else None
        for key, fraction in PERCENTILES.items()
    }
    summary["mean_ms"] = sum(ordered) / len(ordered) / _NS_PER_MS if ordered else None
    return summary


def rate(count: int, duration_s: float) -> float:
    """Events per second over a window.

    Raises:
        ValueError: a window that is not positive.
    """
    if duration_s <= 0:
        raise ValueError(f"window must be > 0 s, got {duration_s}")
    return count / duration_s


def cpu_ms_per_request(cpu_s: float, requests: int) -> float | None:
    """CPU milliseconds per request, None when no request completed."""
    return cpu_s * 1000 / requests if requests else None


def median(values: Sequence[float | None]) -> float | None:
    """The median of the values present (None where there are none): trials whose window
    saw no completed request report no latency."""
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def poisson_arrivals(rate_per_s: float, duration_s: float, seed: int) -> list[float]:
    """Send times (seconds from 0, ascending, all < `duration_s`) of a Poisson process with
    mean `rate_per_s`: exponential gaps, drawn from a generator seeded with `seed`, so a
    trial's schedule is reproducible.

    Raises:
        ValueError: a rate or duration that is not positive.
    """
    if rate_per_s <= 0 or duration_s <= 0:
        raise ValueError("rate and duration must be > 0")
    generator = random.Random(seed)
    arrivals: list[float] = []
    now = generator.expovariate(rate_per_s)
    while now < duration_s:
        arrivals.append(now)
        now += generator.expovariate(rate_per_s)
    return arrivals
