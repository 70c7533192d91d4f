"""Scenario `backtest`: how fast `headrace backtest` replays captures against a real Triton.

N captured calls of the example `sales_forecast` model (one row each, plausible features),
answered by the in-process model (the same float32 math as Triton's twin in
configs/triton/models/sales_forecast), are written up front by the capture writer as
partitioned Parquet files in a local folder. Then the backtest reads them back through the
capture reader, replays them against one tritonserver (the project's launcher, the example
repository) with client-side batching and bounded concurrency, compares, and writes its report.

Measured: wall time of the whole backtest (reading, replaying, comparing, writing the report
with its plots) and calls per second over it. The replayed outputs must agree with the captured
ones up to float32 rounding (a wrong answer fails the run, never counts as fast).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.machine import one_line
from bench.options import add_options, options_of
from headrace.analysis.backtest import run_backtest
from headrace.analysis.calls import captured_calls
from headrace.analysis.comparison import Thresholds
from headrace.analysis.replay import Target
from headrace.capture.record import CaptureRecord
from headrace.capture.store import LocalStore
from headrace.capture.writer import CaptureFileWriter
from headrace.examples.sales_forecast import SalesForecast, synthetic_sales
from headrace.launchers.triton import TritonServer, example_repository
from headrace.protocol import grpc_service_pb2 as pb

SUMMARY = "headrace backtest: captured sales_forecast calls replayed against a local Triton"
MODEL = "sales_forecast"
GOAL_WALL_S = 60.0
"""100k captured calls replayed, compared and reported within this."""
MAX_REL_ERROR = 1e-4
"""Triton batches differently from the capture: float32 rounding, nothing more."""
GENERATE_CHUNK = 10_000
"""Records per capture segment written."""
FEATURES_TENSOR = pb.ModelInferRequest.InferInputTensor(
    name="FEATURES", datatype="FP32", shape=[1, 6]
)
FORECAST_TENSOR = pb.ModelInferResponse.InferOutputTensor(
    name="FORECAST", datatype="FP32", shape=[1, 1]
)


@dataclass(frozen=True, slots=True)
class BacktestOptions:
    records: int
    batch_size: int
    concurrency: int


_DEFAULTS = BacktestOptions(records=100_000, batch_size=128, concurrency=8)
_HELP = {
    "records": "captured calls",
    "batch_size": "rows per replayed request",
    "concurrency": "replayed requests in flight",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, _DEFAULTS, _HELP)


def options_from(arguments: argparse.Namespace) -> BacktestOptions:
    return options_of(BacktestOptions, arguments)


def write_captures(folder: Path, count: int) -> None:
    """`count` one-row calls with the example model's answers, written by the capture writer
    as partitioned Parquet files under `folder` (as the capture stage stores them)."""
    model = SalesForecast()
    writer = CaptureFileWriter(LocalStore(folder, fsync=False), "bench")
    rng = np.random.default_rng(5)
    now = time.time_ns()
    for segment, start in enumerate(range(0, count, GENERATE_CHUNK)):
        size = min(GENERATE_CHUNK, count - start)
        features, _ = synthetic_sales(size, seed=start)
        forecasts = model({"FEATURES": features})["FORECAST"]
        latencies = rng.lognormal(np.log(0.002), 0.3, size)
        records = []
        for index in range(size):
            request_id = f"bench-{start + index}"
            request = pb.ModelInferRequest(
                model_name=MODEL,
                id=request_id,
                inputs=[FEATURES_TENSOR],
                raw_input_contents=[features[index].tobytes()],
            )
            response = pb.ModelInferResponse(
                model_name=MODEL,
                model_version="1",
                id=request_id,
                outputs=[FORECAST_TENSOR],
                raw_output_contents=[forecasts[index].tobytes()],
            )
            latency_ns = int(latencies[index] * 1e9)
            received_ns = now + (start + index) * 1000
            records.append(
                CaptureRecord(
                    request_id=request_id,
                    model=MODEL,
                    version="1",
                    received_ns=received_ns,
                    responded_ns=received_ns + latency_ns,
                    latency_ns=latency_ns,
                    status_code=0,
                    status_message="",
                    request=request.SerializeToString(),
                    response=response.SerializeToString(),
                    batch_size=1,
                    endpoint="local",
                )
            )
        writer.write_segment(segment, records)


def run(options: BacktestOptions, results_dir: Path, stamp: str) -> dict[str, Any]:
    """Raises TritonLaunchError (Triton did not start) or RuntimeError (wrong answers)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    captures = results_dir / f"backtest-{stamp}-captures"
    started = time.perf_counter()
    write_captures(captures, options.records)
    generate_s = time.perf_counter() - started
    print(f"{options.records} calls captured in {generate_s:.1f} s", file=sys.stderr, flush=True)
    report_dir = results_dir / f"backtest-{stamp}-report"
    with TritonServer(
        example_repository(), log_path=results_dir / f"backtest-{stamp}-triton.log"
    ) as triton:
        began = time.perf_counter()
        outcome = run_backtest(
            captured_calls(str(captures), MODEL),
            Target(triton.address, MODEL),
            report_dir,
            Thresholds(max_rel_error=MAX_REL_ERROR),
            concurrency=options.concurrency,
            batch_size=options.batch_size,
            progress=True,
            captures=str(captures),
        )
        wall_s = time.perf_counter() - began
    shutil.rmtree(captures)
    summary = outcome.summary
    if not outcome.passed or summary["calls"] != options.records:
        raise RuntimeError(f"backtest against Triton did not agree: {summary['violations']}")
    return {
        "options": asdict(options),
        "note": "the backtest client and Triton share the machine's cores",
        "capture_write_s": round(generate_s, 2),
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
