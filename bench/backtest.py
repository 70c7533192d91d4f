"""Scenario `backtest`: how fast `headrace backtest` replays captures against a real Triton.

N captured calls of the example `sales_forecast` model (one row each, random plausible
features) are made up front, answered by the in-process model (the same float32 math as
Triton's twin in configs/triton/models/sales_forecast) and written as capture records. Then
one tritonserver (the project's launcher, the example repository) gets them replayed by the
backtest, with client-side batching and bounded concurrency, and the report is written.

Measured: wall time of the whole backtest (reading, replaying, comparing, writing the report
with its plots) and calls per second over it. The replayed outputs must agree with the captured
ones up to float32 rounding (a wrong answer fails the run, never counts as fast).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.machine import one_line
from headrace.analysis.backtest import run_backtest
from headrace.analysis.calls import CapturedCall
from headrace.analysis.comparison import Thresholds
from headrace.analysis.replay import Target
from headrace.examples.sales_forecast import SalesForecast, synthetic_sales
from headrace.launchers.triton import TritonServer, example_repository

SUMMARY = "headrace backtest: captured sales_forecast calls replayed against a local Triton"
MODEL = "sales_forecast"
GOAL_WALL_S = 60.0
"""100k captured calls replayed, compared and reported within this."""
MAX_REL_ERROR = 1e-4
"""Triton batches differently from the capture: float32 rounding, nothing more."""
GENERATE_CHUNK = 4096


@dataclass(frozen=True, slots=True)
class BacktestOptions:
    records: int
    batch_size: int
    concurrency: int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--records", type=int, default=100_000, help="captured calls")
    parser.add_argument("--batch-size", type=int, default=128, help="rows per replayed request")
    parser.add_argument("--concurrency", type=int, default=8, help="replayed requests in flight")


def options_from(arguments: argparse.Namespace) -> BacktestOptions:
    return BacktestOptions(arguments.records, arguments.batch_size, arguments.concurrency)


def captured_calls(count: int) -> list[CapturedCall]:
    """`count` one-row calls with the example model's answers, as captured."""
    model = SalesForecast()
    calls: list[CapturedCall] = []
    rng = np.random.default_rng(5)
    for start in range(0, count, GENERATE_CHUNK):
        size = min(GENERATE_CHUNK, count - start)
        features, _ = synthetic_sales(size, seed=start)
        forecasts = model({"FEATURES": features})["FORECAST"]
        latencies = rng.lognormal(np.log(0.002), 0.3, size)
        calls += [
            CapturedCall(
                request_id=f"bench-{start + index}",
                inputs={"FEATURES": features[index : index + 1]},
                outputs={"FORECAST": forecasts[index : index + 1]},
                latency_s=float(latencies[index]),
                model=MODEL,
                version="1",
            )
            for index in range(size)
        ]
    return calls


def _stream(calls: list[CapturedCall]) -> Iterator[CapturedCall]:
    yield from calls


def run(options: BacktestOptions, results_dir: Path, stamp: str) -> dict[str, Any]:
    """Raises TritonLaunchError (Triton did not start) or RuntimeError (wrong answers)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    calls = captured_calls(options.records)
    generate_s = time.perf_counter() - started
    print(f"{len(calls)} captured calls made in {generate_s:.1f} s", file=sys.stderr, flush=True)
    report_dir = results_dir / f"backtest-{stamp}-report"
    with TritonServer(
        example_repository(), log_path=results_dir / f"backtest-{stamp}-triton.log"
    ) as triton:
        began = time.perf_counter()
        outcome = run_backtest(
            _stream(calls),
            Target(triton.address, MODEL),
            report_dir,
            Thresholds(max_rel_error=MAX_REL_ERROR),
            concurrency=options.concurrency,
            batch_size=options.batch_size,
            progress=True,
        )
        wall_s = time.perf_counter() - began
    summary = outcome.summary
    if not outcome.passed or summary["calls"] != options.records:
        raise RuntimeError(f"backtest against Triton did not agree: {summary['violations']}")
    return {
        "options": asdict(options),
        "note": "the backtest client and Triton share the machine's cores",
        "generate_s": round(generate_s, 2),
        "wall_s": round(wall_s, 2),
        "calls_per_s": round(summary["calls"] / wall_s, 1),
        "replay_s": summary["wall_s"],
        "max_rel_error": summary["outputs"]["FORECAST"]["max_rel_error"],
        "candidate_latency": summary["latency"]["candidate"],
        "report": str(outcome.files["html"]),
        "goal_wall_s": GOAL_WALL_S,
    }


def render(report: dict[str, Any]) -> str:
    options = report["options"]
    scaled = report["wall_s"] * 100_000 / options["records"]
    return "\n".join(
        [
            f"## backtest: {SUMMARY}",
            "",
            f"{options['records']:,} one-row calls, batch size {options['batch_size']}, "
            f"concurrency {options['concurrency']}.",
            f"Machine: {one_line(report['machine'])}; the backtest and Triton share its cores.",
            "",
            f"**{report['calls_per_s']:,.0f} calls/s, wall {report['wall_s']:.1f} s** "
            f"(100k calls at this rate: {scaled:.1f} s; goal < {report['goal_wall_s']:g} s); "
            f"max relative error {report['max_rel_error']:.2g}; report {report['report']}",
        ]
    )
