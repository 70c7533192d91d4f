"""Comparing outputs: error sizes, label agreement, BYTES equality, thresholds."""

from __future__ import annotations

import numpy as np
import pytest

from headrace.analysis.comparison import REL_ERROR_FLOOR, Comparison, Thresholds


def _latency(count: int) -> np.ndarray:
    return np.full(count, 0.002)


def test_numeric_errors_are_exact_and_batched_like_single_calls() -> None:
    captured = [{"Y": np.array([[1.0], [2.0]], np.float32)}, {"Y": np.array([[4.0]], np.float32)}]
    candidate = [{"Y": np.array([[1.5], [2.0]], np.float32)}, {"Y": np.array([[3.0]], np.float32)}]
    batched, single = Comparison(), Comparison()
    batched.add(captured, candidate, _latency(2), _latency(2))
    for one_captured, one_candidate in zip(captured, candidate, strict=True):
        single.add([one_captured], [one_candidate], _latency(1), _latency(1))
    for comparison in (batched, single):
        summary = comparison.summary(Thresholds())["outputs"]["Y"]
        assert summary["calls"] == 2
        assert summary["elements"] == 3
        assert summary["mean_abs_error"] == pytest.approx(1.5 / 3)
        assert summary["max_abs_error"] == pytest.approx(1.0)
        assert summary["max_rel_error"] == pytest.approx(0.5)
        assert summary["mean_rel_error"] == pytest.approx((0.5 + 0 + 0.25) / 3)
        assert summary["equal_share"] == pytest.approx(1 / 3)
        assert summary["agreement"] is None


def test_relative_error_of_a_captured_zero_uses_the_floor() -> None:
    comparison = Comparison()
    comparison.add([{"Y": np.zeros(1)}], [{"Y": np.full(1, 1e-6)}], _latency(1), _latency(1))
    assert comparison.outputs["Y"].max_rel == pytest.approx(1e-6 / REL_ERROR_FLOOR)


def test_classifier_agreement_counts_rows_whose_label_agrees() -> None:
    captured = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]], np.float32)
    candidate = np.array([[0.8, 0.2], [0.7, 0.3], [0.55, 0.45], [0.1, 0.9]], np.float32)
    comparison = Comparison()
    comparison.add([{"P": captured}], [{"P": candidate}], _latency(1), _latency(1))
    assert comparison.outputs["P"].agreement == pytest.approx(0.75)
    assert comparison.violations(Thresholds(min_agreement=0.8)) == ["P: agreement 0.7500 < 0.8"]
    assert comparison.violations(Thresholds(min_agreement=0.75)) == []


def test_bytes_outputs_are_compared_exactly() -> None:
    def labels(*values: bytes) -> dict[str, np.ndarray]:
        return {"L": np.array(values, dtype=object)}

    comparison = Comparison()
    comparison.add(
        [labels(b"cat"), labels(b"dog"), labels(b"cat", b"cow")],
        [labels(b"cat"), labels(b"cow"), labels(b"cat", b"cow")],
        _latency(3),
        _latency(3),
    )
    output = comparison.outputs["L"]
    assert output.kind == "bytes"
    assert output.agreement == pytest.approx(2 / 3)


def test_failures_shape_mismatches_and_bounds_break_the_thresholds() -> None:
    comparison = Comparison()
    comparison.add(
        [{"Y": np.ones((2, 1))}, {"Y": np.ones((1, 1))}],
        [{"Y": np.ones((2, 1)) * 1.1}, {"Y": np.ones((1, 2))}],
        _latency(2),
        _latency(2),
    )
    comparison.add_failure("UNAVAILABLE", 3)
    assert comparison.calls == 5
    violations = comparison.violations(Thresholds(max_abs_error=0.05, max_rel_error=0.2))
    assert violations == [
        "3 candidate calls failed with UNAVAILABLE",
        "Y: 1 calls had another shape",
        "Y: max absolute error 0.1 > 0.05",
    ]
    summary = comparison.summary(Thresholds())
    assert summary["passed"] is False
    assert summary["failures"] == {"UNAVAILABLE": 3}
    assert summary["latency"]["captured"]["p50_ms"] == pytest.approx(2)
