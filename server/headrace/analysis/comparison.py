"""Comparing a candidate's outputs with captured ones, accumulated call by call.

Everything is kept as running sums, maxima and bounded reservoir samples (for plots and
percentiles), so a comparison of any number of calls takes constant memory.

Per output tensor:
- numeric: mean and max absolute error `|candidate - captured|`, mean and max relative error
  `|candidate - captured| / max(|captured|, REL_ERROR_FLOOR)`, share of elements equal;
- classifier (a 2-D floating-point output with more than one column): share of rows whose
  argmax (label) agrees;
- BYTES: share of calls whose output is exactly equal;
- a candidate output of another shape, or a missing one, counts as a shape mismatch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from headrace.analysis.sampling import Reservoir

REL_ERROR_FLOOR = 1e-6
"""Denominator floor of the relative error, so a captured 0 does not divide by zero."""
SAMPLE_SIZE = 5000
"""(captured, candidate) element pairs kept per output for plots."""
LATENCY_SAMPLE_SIZE = 10_000


class OutputComparison:
    """Running comparison of one output tensor."""

    def __init__(self, name: str, seed: int = 0) -> None:
        self.name = name
        self.calls = 0
        self.shape_mismatches = 0
        self.kind = ""
        """`numeric` or `bytes`, from the first call compared."""
        self.elements = 0
        self.equal_elements = 0
        self.sum_abs = 0.0
        self.max_abs = 0.0
        self.sum_rel = 0.0
        self.max_rel = 0.0
        self.rows = 0
        """Classifier rows compared (0: not a classifier output)."""
        self.agreeing_rows = 0
        self.equal_calls = 0
        self.pairs = Reservoir(SAMPLE_SIZE, seed)
        """(captured, candidate) element pairs."""

    def add(self, captured: np.ndarray, candidate: np.ndarray | None, calls: int = 1) -> None:
        """Compare `calls` calls' worth of one output (concatenated along the first dim)."""
        self.calls += calls
        if candidate is None or candidate.shape != captured.shape:
            self.shape_mismatches += calls
            return
        if captured.dtype == object or candidate.dtype == object:
            self.kind = "bytes"
            # Compared call by call (Comparison.add never joins BYTES outputs).
            self.equal_calls += int(np.array_equal(captured, candidate))
            return
        self.kind = "numeric"
        expected = captured.astype(np.float64, copy=False).ravel()
        actual = candidate.astype(np.float64, copy=False).ravel()
        absolute = np.abs(actual - expected)
        relative = absolute / np.maximum(np.abs(expected), REL_ERROR_FLOOR)
        self.elements += len(expected)
        self.equal_elements += int(np.count_nonzero(absolute == 0))
        if len(absolute):
            self.sum_abs += float(absolute.sum())
            self.max_abs = max(self.max_abs, float(absolute.max()))
            self.sum_rel += float(relative.sum())
            self.max_rel = max(self.max_rel, float(relative.max()))
        if captured.ndim == 2 and captured.shape[1] > 1 and captured.dtype.kind == "f":
            self.rows += captured.shape[0]
            agree = np.argmax(captured, axis=1) == np.argmax(candidate, axis=1)
            self.agreeing_rows += int(agree.sum())
        self.pairs.add(np.stack([expected, actual], axis=1))

    @property
    def agreement(self) -> float | None:
        """Label agreement (classifiers) or exact-match share (BYTES); None otherwise."""
        if self.kind == "bytes":
            compared = self.calls - self.shape_mismatches
            return self.equal_calls / compared if compared else None
        if self.rows:
            return self.agreeing_rows / self.rows
        return None

    def summary(self) -> dict[str, Any]:
        elements = self.elements
        return {
            "kind": self.kind or "unknown",
            "calls": self.calls,
            "shape_mismatches": self.shape_mismatches,
            "elements": elements,
            "mean_abs_error": self.sum_abs / elements if elements else None,
            "max_abs_error": self.max_abs if elements else None,
            "mean_rel_error": self.sum_rel / elements if elements else None,
            "max_rel_error": self.max_rel if elements else None,
            "equal_share": self.equal_elements / elements if elements else None,
            "agreement": self.agreement,
        }


class LatencySample:
    """Running mean and max of latencies, and a reservoir for percentiles and plots."""

    def __init__(self, seed: int = 0) -> None:
        self.count = 0
        self.sum = 0.0
        self.max = 0.0
        self.reservoir = Reservoir(LATENCY_SAMPLE_SIZE, seed)

    def add(self, latencies_s: np.ndarray) -> None:
        if len(latencies_s) == 0:
            return
        self.count += len(latencies_s)
        self.sum += float(latencies_s.sum())
        self.max = max(self.max, float(latencies_s.max()))
        self.reservoir.add(latencies_s)

    def summary(self) -> dict[str, float | None]:
        if not self.count:
            return {"mean_ms": None, "p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None}
        sample = self.reservoir.items
        p50, p90, p99 = np.percentile(sample, [50, 90, 99]) * 1e3
        return {
            "mean_ms": self.sum / self.count * 1e3,
            "p50_ms": float(p50),
            "p90_ms": float(p90),
            "p99_ms": float(p99),
            "max_ms": self.max * 1e3,
        }


@dataclass(frozen=True, slots=True)
class Thresholds:
    """What a comparison must hold to pass; None: not checked."""

    max_abs_error: float | None = None
    """Bound on every numeric output's maximum absolute error."""
    max_rel_error: float | None = None
    """Bound on every numeric output's maximum relative error."""
    min_agreement: float | None = None
    """Least label agreement (classifier outputs) and exact-match share (BYTES outputs)."""


class Comparison:
    """The whole comparison: every output, both latencies, failed calls."""

    def __init__(self, seed: int = 0) -> None:
        self._seed = seed
        self.outputs: dict[str, OutputComparison] = {}
        self.calls = 0
        self.failures: dict[str, int] = {}
        """Candidate calls that failed, by gRPC status code name (counted per captured call)."""
        self.captured_latency = LatencySample(seed)
        self.candidate_latency = LatencySample(seed + 1)

    def output(self, name: str) -> OutputComparison:
        comparison = self.outputs.get(name)
        if comparison is None:
            comparison = self.outputs[name] = OutputComparison(name, self._seed)
        return comparison

    def add_failure(self, code: str, calls: int) -> None:
        self.calls += calls
        self.failures[code] = self.failures.get(code, 0) + calls

    def add(
        self,
        captured: Sequence[Mapping[str, np.ndarray]],
        candidate: Sequence[Mapping[str, np.ndarray]],
        captured_latency_s: np.ndarray,
        candidate_latency_s: np.ndarray,
    ) -> None:
        """Compare several calls' outputs, pairwise."""
        self.calls += len(captured)
        self.captured_latency.add(captured_latency_s)
        self.candidate_latency.add(candidate_latency_s)
        names = dict.fromkeys(name for outputs in captured for name in outputs)
        for name in names:
            expected = [outputs.get(name) for outputs in captured]
            actual = [outputs.get(name) for outputs in candidate]
            comparison = self.output(name)
            if _stackable(expected) and _stackable(actual):
                # One vectorised comparison for the whole batch (the usual case).
                comparison.add(
                    np.concatenate(expected),  # type: ignore[arg-type]
                    np.concatenate(actual),  # type: ignore[arg-type]
                    calls=len(expected),
                )
                continue
            for one_expected, one_actual in zip(expected, actual, strict=True):
                if one_expected is not None:
                    comparison.add(one_expected, one_actual)

    def violations(self, thresholds: Thresholds) -> list[str]:
        """What breaks the thresholds (failed calls and shape mismatches always do)."""
        problems = []
        for code, count in sorted(self.failures.items()):
            problems.append(f"{count} candidate calls failed with {code}")
        if self.calls == 0:
            problems.append("no calls were compared")
        for name, output in self.outputs.items():
            if output.shape_mismatches:
                problems.append(f"{name}: {output.shape_mismatches} calls had another shape")
            if output.elements:
                if thresholds.max_abs_error is not None and output.max_abs > (
                    thresholds.max_abs_error
                ):
                    problems.append(
                        f"{name}: max absolute error {output.max_abs:.6g} > "
                        f"{thresholds.max_abs_error:g}"
                    )
                if thresholds.max_rel_error is not None and output.max_rel > (
                    thresholds.max_rel_error
                ):
                    problems.append(
                        f"{name}: max relative error {output.max_rel:.6g} > "
                        f"{thresholds.max_rel_error:g}"
                    )
            agreement = output.agreement
            if (
                thresholds.min_agreement is not None
                and agreement is not None
                and agreement < thresholds.min_agreement
            ):
                problems.append(f"{name}: agreement {agreement:.4f} < {thresholds.min_agreement:g}")
        return problems

    def summary(self, thresholds: Thresholds) -> dict[str, Any]:
        violations = self.violations(thresholds)
        return {
            "calls": self.calls,
            "failures": dict(sorted(self.failures.items())),
            "outputs": {name: output.summary() for name, output in self.outputs.items()},
            "latency": {
                "captured": self.captured_latency.summary(),
                "candidate": self.candidate_latency.summary(),
            },
            "thresholds": {
                "max_abs_error": thresholds.max_abs_error,
                "max_rel_error": thresholds.max_rel_error,
                "min_agreement": thresholds.min_agreement,
            },
            "violations": violations,
            "passed": not violations,
        }


def _stackable(arrays: Sequence[np.ndarray | None]) -> bool:
    first = arrays[0]
    if first is None or first.ndim == 0 or first.dtype == object or len(arrays) == 1:
        return False
    return all(
        array is not None and array.dtype == first.dtype and array.shape[1:] == first.shape[1:]
        for array in arrays
    )
