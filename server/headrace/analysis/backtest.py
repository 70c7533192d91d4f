"""Backtests: captured calls replayed against a candidate, or captured shadow calls, compared
with what the primary answered, and written up as a report."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from headrace.analysis.calls import CapturedCall
from headrace.analysis.comparison import Comparison, Thresholds
from headrace.analysis.replay import ReplayResult, Target, replay
from headrace.analysis.report import write_backtest_report

DEFAULT_MAX_PENDING_SHADOWS = 1_000_000
"""Shadow calls held while their primaries are looked for, at most."""


@dataclass(frozen=True, slots=True)
class BacktestOutcome:
    """The summary (as written to summary.json) and the report's files."""

    summary: dict[str, Any]
    files: dict[str, Path]

    @property
    def passed(self) -> bool:
        return bool(self.summary["passed"])


def _progress(enabled: bool, description: str) -> tqdm[Any]:
    return tqdm(
        desc=description, unit=" calls", file=sys.stderr, disable=not enabled, dynamic_ncols=True
    )


def run_backtest(
    calls: Iterable[CapturedCall],
    target: Target,
    output: Path,
    thresholds: Thresholds,
    *,
    concurrency: int = 8,
    batch_size: int = 1,
    progress: bool = False,
    captures: str = "",
) -> BacktestOutcome:
    """Replay `calls` against `target`, compare, and write the report to `output`.

    Raises:
        grpc.aio.AioRpcError: the candidate cannot be reached or does not serve the model.
    """
    comparison = Comparison()
    bar = _progress(progress, "backtest")

    def on_result(result: ReplayResult) -> None:
        count = len(result.calls)
        if result.outputs is None:
            comparison.add_failure(result.error_code, count)
        else:
            comparison.add(
                [call.outputs for call in result.calls],
                result.outputs,
                np.array([call.latency_s for call in result.calls]),
                np.full(count, result.latency_s),
            )
        bar.update(count)

    started = time.perf_counter()
    try:
        asyncio.run(
            replay(calls, target, on_result, concurrency=concurrency, batch_size=batch_size)
        )
    finally:
        bar.close()
    wall_s = time.perf_counter() - started
    summary = comparison.summary(thresholds)
    candidate = f"{target.address} {target.model}" + (
        f" version {target.version}" if target.version else ""
    )
    summary.update(
        model=target.model,
        captures=captures,
        candidate=candidate,
        wall_s=round(wall_s, 3),
        calls_per_s=round(comparison.calls / wall_s, 1) if wall_s > 0 else None,
        concurrency=concurrency,
        batch_size=batch_size,
    )
    files = write_backtest_report(summary, comparison, output)
    return BacktestOutcome(summary, files)


def run_shadow_backtest(
    calls: Callable[[], Iterable[CapturedCall]],
    model: str,
    output: Path,
    thresholds: Thresholds,
    *,
    progress: bool = False,
    captures: str = "",
    max_pending: int = DEFAULT_MAX_PENDING_SHADOWS,
) -> BacktestOutcome:
    """Compare captured shadow calls with their primaries (paired by request id).

    Two passes over the captures: the first keeps the shadow calls' outputs (at most
    `max_pending`; shadow traffic is a sample), the second compares each primary that has one.
    """
    started = time.perf_counter()
    # Only what the comparison needs: the shadow's inputs can be large and are the primary's.
    shadows: dict[str, tuple[Mapping[str, np.ndarray], float, str]] = {}
    skipped = 0
    for call in calls():
        if call.shadow:
            if len(shadows) < max_pending:
                shadows[call.request_id] = (call.outputs, call.latency_s, call.version)
            else:
                skipped += 1
    comparison = Comparison()
    bar = _progress(progress, "shadow")
    unmatched = 0
    candidate_versions: set[str] = set()
    try:
        for call in calls():
            if call.shadow:
                continue
            shadow = shadows.pop(call.request_id, None)
            if shadow is None:
                unmatched += 1
                continue
            outputs, latency_s, version = shadow
            candidate_versions.add(version)
            comparison.add(
                [call.outputs], [outputs], np.array([call.latency_s]), np.array([latency_s])
            )
            bar.update(1)
    finally:
        bar.close()
    wall_s = time.perf_counter() - started
    summary = comparison.summary(thresholds)
    summary.update(
        model=model,
        captures=captures,
        candidate="shadow version " + ", ".join(sorted(candidate_versions)),
        wall_s=round(wall_s, 3),
        calls_per_s=round(comparison.calls / wall_s, 1) if wall_s > 0 else None,
        primaries_without_shadow=unmatched,
        shadows_without_primary=len(shadows),
        shadows_not_held=skipped,
    )
    files = write_backtest_report(summary, comparison, output, ("primary", "shadow"))
    return BacktestOutcome(summary, files)
