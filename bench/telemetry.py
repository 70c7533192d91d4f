"""Scenario `telemetry`: what tracing and metrics cost on the request path.

Three Headrace processes serve the same `identity` model: one with telemetry off (the
default), one tracing every request (sample ratio 1.0) and exporting over OTLP gRPC to a real
receiver that this process runs (opentelemetry-proto's TraceService; it decodes and counts
every span, as a collector would), and one with Prometheus metrics on. Trials rotate through
the three (forward, then backward) with the same client, request and concurrency; each round
of three starts its own three server processes (a process's speed differs from another's of
the same code by a few percent, layout and hash seeds: fresh ones per round keep that from
siding with one side for a whole run). The report gives medians, each side's cost against
telemetry off, and the ratios round by round.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from bench.frontend import HOST, identity_load, identity_request
from bench.loadgen import run_load
from bench.machine import one_line
from bench.options import add_options, check_load, options_of
from bench.server_process import CAPTURE_OFF, ServerProcess
from bench.sweep import number

SUMMARY = "tracing off / tracing on (OTLP to a local receiver) / metrics on, same load"
OFF = "off"
TRACING = "tracing"
METRICS = "metrics"
SIDES = (OFF, TRACING, METRICS)
LABELS = {
    OFF: "telemetry off",
    TRACING: "tracing on (ratio 1.0, OTLP gRPC)",
    METRICS: "metrics on",
}


@dataclass(frozen=True, slots=True)
class TelemetryOptions:
    """The scenario's knobs; the defaults are the standard run."""

    trials: int = 3
    duration_s: float = 5.0
    warmup_s: float = 2.0
    concurrency: int = 16
    clients: int = 2
    elements: int = 16
    batched: bool = False
    """Put `identity` behind a batcher on every side (adds the queue and batch spans)."""


_HELP = {
    "trials": "trials per side",
    "batched": "serve identity behind a batcher on every side",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The scenario's command-line options, defaulting to `TelemetryOptions()`."""
    add_options(parser, TelemetryOptions(), _HELP)


def options_from(arguments: argparse.Namespace) -> TelemetryOptions:
    """The options `add_arguments` parsed.

    Raises:
        ValueError: a count below 1, a negative warm-up or an empty window.
    """
    return check_load(options_of(TelemetryOptions, arguments))


class SpanCounter(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver that decodes every export and counts its spans."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.spans = 0
        self.exports = 0

    def Export(  # noqa: N802 (the OTLP method name)
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        spans = sum(
            len(scope.spans)
            for resource in request.resource_spans
            for scope in resource.scope_spans
        )
        with self._lock:
            self.spans += spans
            self.exports += 1
        return trace_service_pb2.ExportTraceServiceResponse()


@contextlib.contextmanager
def otlp_receiver() -> Iterator[tuple[SpanCounter, int]]:
    """A running receiver on a loopback port of its own: (counter, port)."""
    counter = SpanCounter()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(counter, server)
    port = server.add_insecure_port(f"{HOST}:0")
    server.start()
    try:
        yield counter, port
    finally:
        server.stop(0)


def side_order(trials: int) -> list[str]:
    """off, tracing, metrics, then metrics, tracing, off, ... `trials` of each."""
    order: list[str] = []
    for trial in range(trials):
        order += list(SIDES) if trial % 2 == 0 else list(SIDES[::-1])
    return order


def _environments(receiver_port: int, batched: bool) -> dict[str, dict[str, str]]:
    # Capture is measured by its own scenario (bench/capture.py).
    common = dict(CAPTURE_OFF)
    if batched:
        common["HEADRACE_MODELS__0__BATCHING__ENABLED"] = "true"
    return {
        OFF: common,
        TRACING: {
            **common,
            "HEADRACE_TRACING__EXPORTER": "otlp_grpc",
            "HEADRACE_TRACING__ENDPOINT": f"http://{HOST}:{receiver_port}",
            "HEADRACE_TRACING__SAMPLE_RATIO": "1.0",
        },
        METRICS: {
            **common,
            "HEADRACE_METRICS__ENABLED": "true",
            "HEADRACE_METRICS__HOST": HOST,
            "HEADRACE_METRICS__PORT": "0",
        },
    }


def _median(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def run(options: TelemetryOptions, results_dir: Path, stamp: str) -> dict[str, Any]:
    """Run the scenario; returns every number, JSON-ready. Servers and the receiver are
    stopped on return, on errors and on KeyboardInterrupt.

    Raises:
        RuntimeError: a server did not start.
        LoadError: a client failed (a wrong reply included).
    """
    request = identity_request(options.elements)
    argv = [sys.executable, "-m", "headrace", "serve", "--host", HOST, "--port", "0"]
    trials: list[dict[str, Any]] = []
    order = side_order(options.trials)
    with otlp_receiver() as (counter, receiver_port):
        environments = _environments(receiver_port, options.batched)
        for first in range(0, len(order), len(SIDES)):
            round_ = first // len(SIDES)
            with contextlib.ExitStack() as stack:
                servers = {
                    side: stack.enter_context(
                        ServerProcess(
                            side,
                            argv,
                            results_dir / f"telemetry-{stamp}-{side}-{round_}.log",
                            environments[side],
                        )
                    )
                    for side in SIDES
                }
                for index, side in enumerate(order[first : first + len(SIDES)], first):
                    server = servers[side]
                    spec = identity_load(options, f"{HOST}:{server.port}", request)
                    load = run_load(spec, meter=server.cpu_seconds)
                    cpu = load.metered * 1000 / load.completed if load.completed else None
                    trials.append(
                        {"index": index, "side": side, "load": asdict(load), "server_cpu_ms": cpu}
                    )
                    print(
                        f"{LABELS[side]}: {load.requests_per_s:,.0f} requests/s, "
                        f"p99 {number(load.p99_ms, 2)} ms, "
                        f"server CPU {number(cpu, 3)} ms/request",
                        file=sys.stderr,
                        flush=True,
                    )
            # The servers are stopped (shutdown flushes queued spans) before the counter is read.
        spans_received, exports = counter.spans, counter.exports
    summary: dict[str, dict[str, Any]] = {}
    for side in SIDES:
        mine = [trial for trial in trials if trial["side"] == side]
        summary[side] = {
            "requests_per_s": _median([t["load"]["requests_per_s"] for t in mine]),
            "p50_ms": _median([t["load"]["p50_ms"] for t in mine]),
            "p99_ms": _median([t["load"]["p99_ms"] for t in mine]),
            "server_cpu_ms_per_request": _median([t["server_cpu_ms"] for t in mine]),
            "errors": sum(sum(t["load"]["errors"].values()) for t in mine),
        }
    base = summary[OFF]
    for side in (TRACING, METRICS):
        summary[side]["requests_per_s_vs_off"] = _ratio(
            summary[side]["requests_per_s"], base["requests_per_s"]
        )
        summary[side]["requests_per_s_vs_off_by_round"] = _by_round(trials, side)
        summary[side]["server_cpu_vs_off"] = _ratio(
            summary[side]["server_cpu_ms_per_request"], base["server_cpu_ms_per_request"]
        )
        cpu, base_cpu = (
            summary[side]["server_cpu_ms_per_request"],
            base["server_cpu_ms_per_request"],
        )
        summary[side]["server_cpu_us_added_per_request"] = (
            (cpu - base_cpu) * 1000 if cpu is not None and base_cpu is not None else None
        )
    return {
        "options": asdict(options),
        "request_bytes": len(request),
        "note": "client processes, the three servers and the OTLP receiver share the cores",
        "trials": trials,
        "summary": summary,
        "spans_received": spans_received,
        "otlp_exports": exports,
    }


def _by_round(trials: list[dict[str, Any]], side: str) -> list[float | None]:
    """`side` / off requests/s within each rotation (a trial of every side, back to back):
    pairs close in time, which the machine's slower drifts affect alike."""
    rounds: list[float | None] = []
    for first in range(0, len(trials), len(SIDES)):
        rates = {
            trial["side"]: trial["load"]["requests_per_s"]
            for trial in trials[first : first + len(SIDES)]
        }
        rounds.append(_ratio(rates.get(side), rates.get(OFF)))
    return rounds


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def render(report: dict[str, Any]) -> str:
    """The report as Markdown: medians per side and each side against telemetry off."""
    options = report["options"]
    summary = report["summary"]
    lines = [
        f"## telemetry: {SUMMARY}",
        "",
        f"`identity`{' behind a batcher' if options['batched'] else ' (no batcher)'}, "
        f"1x{options['elements']} FP32 ({report['request_bytes']} B request), concurrency "
        f"{options['concurrency']} over {options['clients']} client processes, "
        f"{options['trials']} trials per side (rotating; new server processes each round), "
        f"{options['warmup_s']:g} s warm-up + "
        f"{options['duration_s']:g} s window; medians over trials.",
        f"Machine: {one_line(report['machine'])}; clients, servers and receiver share its cores.",
        "",
        "| side | requests/s | vs off | p50 ms | p99 ms | server CPU ms/request | vs off "
        "| CPU added us/request | errors |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for side in SIDES:
        row = summary[side]
        lines.append(
            f"| {LABELS[side]} | {number(row['requests_per_s'], 0)} "
            f"| {number(row.get('requests_per_s_vs_off'), 2)} "
            f"| {number(row['p50_ms'], 2)} | {number(row['p99_ms'], 2)} "
            f"| {number(row['server_cpu_ms_per_request'], 3)} "
            f"| {number(row.get('server_cpu_vs_off'), 2)} "
            f"| {number(row.get('server_cpu_us_added_per_request'), 0)} | {row['errors']} |"
        )
    lines.append("")
    for side in (TRACING, METRICS):
        rounds = summary[side].get("requests_per_s_vs_off_by_round") or []
        lines.append(
            f"{LABELS[side]} / off, round by round: "
            + ", ".join(number(ratio, 2) for ratio in rounds)
            + "."
        )
    lines += [
        "",
        f"Spans received by the OTLP receiver: {report['spans_received']:,} in "
        f"{report['otlp_exports']:,} exports.",
    ]
    return "\n".join(lines)
