"""The telemetry scenario's report: rotation order and round-by-round ratios."""

from __future__ import annotations

from typing import Any

from bench.telemetry import METRICS, OFF, SIDES, TRACING, _by_round, side_order


def _trial(side: str, rate: float) -> dict[str, Any]:
    return {"side": side, "load": {"requests_per_s": rate}}


def test_sides_rotate_forward_then_backward() -> None:
    assert side_order(2) == [*SIDES, *SIDES[::-1]]


def test_each_round_compares_a_side_with_off_from_the_same_rotation() -> None:
    trials = [
        _trial(OFF, 100.0),
        _trial(TRACING, 90.0),
        _trial(METRICS, 110.0),
        _trial(METRICS, 200.0),  # a faster moment: the ratios stay those of the round
        _trial(TRACING, 190.0),
        _trial(OFF, 200.0),
        _trial(OFF, 50.0),  # a round cut short: no tracing trial
    ]
    assert _by_round(trials, TRACING) == [0.9, 0.95, None]
    assert _by_round(trials, METRICS) == [1.1, 1.0, None]
