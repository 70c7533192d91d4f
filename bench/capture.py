"""Scenario `capture`: what capturing every call to an S3-compatible store costs on the request
path, and how many bytes per second the capture pipeline sustains.

Two Headrace processes serve the same `identity` model: one with capture off, one capturing
every call to a real SeaweedFS (S3 API) that this process runs on loopback ports. Trials
alternate (off, on, on, off, ...) with the same client, request and concurrency; the report
gives medians, the ratios against capture off (goal: >= 0.9x throughput, <= 1.2x p99), and,
from the capturing server's own metrics, the bytes per second it spooled and the records per
second it stored during its trials, with the upload lag left at the end of each.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench import h2load
from bench.frontend import HOST, identity_load, identity_request
from bench.gpu_sim import METRICS_ENVIRONMENT
from bench.loadgen import run_load
from bench.machine import one_line
from bench.options import add_options, check_load, options_of
from bench.server_process import CAPTURE_OFF, ServerProcess
from bench.sweep import number
from headrace.config import CaptureSettings
from headrace.launchers.seaweedfs import SeaweedFS

SUMMARY = "capture off / capture on (every call to SeaweedFS over S3), same load"
OFF = "off"
ON = "on"
SIDES = (OFF, ON)
LABELS = {OFF: "capture off", ON: "capture on (S3, SeaweedFS)"}
GOAL_THROUGHPUT_RATIO = 0.9
GOAL_P99_RATIO = 1.2
METRICS_PATTERN = re.compile(r"metrics on (http://\S+/metrics)")
PREFIX = "bench"


@dataclass(frozen=True, slots=True)
class CaptureOptions:
    """The scenario's knobs; the defaults are the standard run."""

    trials: int = 3
    duration_s: float = 5.0
    warmup_s: float = 2.0
    concurrency: int = 16
    clients: int = 2
    elements: int = 16
    """FP32 elements in INPUT0 (batch 1); raise it (e.g. 262144 = 1 MiB) to measure MB/s."""
    segment_max_age_s: float = CaptureSettings.model_fields["segment_max_age_s"].default
    """`capture.segment_max_age_s` of the capture side: Headrace's default (a segment, hence a
    Parquet file and an upload, every 5 s at this load), so the cost measured is the one a
    deployment pays. Lower it to watch storage follow spooling within a short window, at the
    price of one file (Parquet footer, PUT) per interval."""
    client: str = h2load.PYTHON
    """Load generator: python (bench.loadgen's grpc.aio clients, as in every earlier run and
    the `telemetry` scenario: about 220 us of CPU per call, 0.7 of a core at this load, on the
    cores the capture pipeline and SeaweedFS need too), h2load (C++: about 45 us per call, so
    the server itself is the bottleneck), or auto (h2load when installed)."""


_HELP = {
    "trials": "trials per side",
    "client": "load generator: python, h2load or auto (h2load when installed)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The scenario's command-line options, defaulting to `CaptureOptions()`."""
    add_options(parser, CaptureOptions(), _HELP)


def options_from(arguments: argparse.Namespace) -> CaptureOptions:
    """The options `add_arguments` parsed.

    Raises:
        ValueError: a count below 1, a negative warm-up or an empty window.
    """
    options = check_load(options_of(CaptureOptions, arguments))
    if options.client not in h2load.CLIENTS:
        raise ValueError(
            f"--client must be one of {', '.join(h2load.CLIENTS)}, got {options.client!r}"
        )
    return options


def side_order(trials: int) -> list[str]:
    """off, on, then on, off, ... `trials` of each."""
    order: list[str] = []
    for trial in range(trials):
        order += list(SIDES) if trial % 2 == 0 else list(SIDES[::-1])
    return order


def _capture_environment(store: SeaweedFS, spool: Path, segment_max_age_s: float) -> dict[str, str]:
    # The whole store section in one variable (a YAML mapping): the embedded default's local
    # store has fields an S3 store has not.
    s3 = {
        "kind": "s3",
        "endpoint": store.endpoint,
        "scheme": "http",
        "region": store.region,
        "bucket": store.bucket,
        "prefix": PREFIX,
    }
    return {
        "HEADRACE_CAPTURE__ENABLED": "true",
        "HEADRACE_CAPTURE__SPOOL_DIR": str(spool),
        "HEADRACE_CAPTURE__SEGMENT_MAX_AGE_S": str(segment_max_age_s),
        "HEADRACE_CAPTURE__STORE": json.dumps(s3),
        **METRICS_ENVIRONMENT,
        **store.environ(),  # credentials through the AWS chain, never in settings
    }


def scrape(url: str) -> dict[str, float]:
    """The capture counters of a server's /metrics, summed over labels, by sample name."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("headrace_capture_"):
                key = sample.name
                if "outcome" in sample.labels:
                    key += f"{{{sample.labels['outcome']}}}"
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def _metrics_url(server: ServerProcess) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        match = METRICS_PATTERN.search(server.log_path.read_text(errors="replace"))
        if match:
            return match.group(1)
        time.sleep(0.05)
    raise RuntimeError(f"{server.name} logged no metrics address; see {server.log_path}")


def run(options: CaptureOptions, results_dir: Path, stamp: str) -> dict[str, Any]:
    """Run the scenario; returns every number, JSON-ready. Servers and SeaweedFS are stopped
    on return, on errors and on KeyboardInterrupt.

    Raises:
        RuntimeError: a server or the store did not start.
        LoadError: a client failed (a wrong reply included).
    """
    client = h2load.load_generator(options.client)
    request = identity_request(options.elements)
    if client == h2load.H2LOAD:
        h2load.layout(identity_load(options, "", request))
    argv = [sys.executable, "-m", "headrace", "serve", "--host", HOST, "--port", "0"]
    trials: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        spool = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="headrace-spool-")))
        store = stack.enter_context(SeaweedFS())
        environments = {
            # Both sides serve /metrics (the capture side's counters give the pipeline's
            # rates; h2load's calls are checked against them), so they differ in capture alone.
            OFF: {**CAPTURE_OFF, **METRICS_ENVIRONMENT},
            ON: _capture_environment(store, spool, options.segment_max_age_s),
        }
        servers = {
            side: ServerProcess(
                side, argv, results_dir / f"capture-{stamp}-{side}.log", environments[side]
            )
            for side in SIDES
        }
        for server in servers.values():
            stack.enter_context(server)
        metrics_urls = {side: _metrics_url(server) for side, server in servers.items()}
        metrics_url = metrics_urls[ON]
        for index, side in enumerate(side_order(options.trials)):
            server = servers[side]
            spec = identity_load(options, f"{HOST}:{server.port}", request)
            before = scrape(metrics_url) if side == ON else {}
            started = time.monotonic()
            if client == h2load.H2LOAD:
                load = h2load.run_h2load(spec, server.cpu_seconds, metrics_urls[side])
            else:
                load = run_load(spec, meter=server.cpu_seconds)
            elapsed = time.monotonic() - started
            trial: dict[str, Any] = {"index": index, "side": side, "load": asdict(load)}
            trial["server_cpu_ms"] = (
                load.metered * 1000 / load.completed if load.completed else None
            )
            if side == ON:
                after = scrape(metrics_url)
                trial["capture"] = _capture_rates(before, after, elapsed)
            trials.append(trial)
            print(
                f"{LABELS[side]}: {load.requests_per_s:,.0f} requests/s, "
                f"p99 {number(load.p99_ms, 2)} ms"
                + (
                    f", spooled {trial['capture']['spooled_mb_per_s']:.2f} MB/s, stored "
                    f"{trial['capture']['stored_records_per_s']:,.0f} records/s"
                    if side == ON
                    else ""
                ),
                file=sys.stderr,
                flush=True,
            )
        # A graceful stop stores what is spooled: the final counts show nothing was lost.
        servers[ON].stop()
        store_objects = sum(1 for _ in store.store(PREFIX).list())
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
    on, off = summary[ON], summary[OFF]
    on["requests_per_s_vs_off"] = _ratio(on["requests_per_s"], off["requests_per_s"])
    on["p99_vs_off"] = _ratio(on["p99_ms"], off["p99_ms"])
    on_trials = [t for t in trials if t["side"] == ON]
    on["spooled_mb_per_s"] = _median([t["capture"]["spooled_mb_per_s"] for t in on_trials])
    on["stored_records_per_s"] = _median([t["capture"]["stored_records_per_s"] for t in on_trials])
    on["stored_mb_per_s"] = _median([t["capture"]["stored_mb_per_s"] for t in on_trials])
    return {
        "options": asdict(options),
        "load_generator": client,
        "request_bytes": len(request),
        "note": "client processes, both servers and SeaweedFS share the cores",
        "trials": trials,
        "summary": summary,
        "objects_stored": store_objects,
    }


def _capture_rates(
    before: dict[str, float], after: dict[str, float], elapsed_s: float
) -> dict[str, float]:
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    spooled_bytes = delta("headrace_capture_bytes_total")
    spooled = delta("headrace_capture_records_total{spooled}")
    stored = delta("headrace_capture_records_total{written}")
    average = spooled_bytes / spooled if spooled else 0.0
    return {
        "spooled_mb_per_s": spooled_bytes / elapsed_s / 1e6,
        "stored_records_per_s": stored / elapsed_s,
        "stored_mb_per_s": stored * average / elapsed_s / 1e6,
        "dropped": delta("headrace_capture_records_total{dropped}"),
        "upload_errors": delta("headrace_capture_upload_errors_total"),
        "upload_lag_s_at_end": after.get("headrace_capture_upload_lag_seconds", 0.0),
    }


def _median(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


_LOAD_GENERATORS = {
    h2load.H2LOAD: "h2load (threads as clients)",
    h2load.PYTHON: "the grpc.aio client processes of bench.loadgen",
}


def render(report: dict[str, Any]) -> str:
    """The report as Markdown: medians per side, capture against off, and the pipeline's
    rates."""
    options = report["options"]
    summary = report["summary"]
    on = summary[ON]
    lines = [
        f"## capture: {SUMMARY}",
        "",
        f"`identity` (no batcher), 1x{options['elements']} FP32 ({report['request_bytes']} B "
        f"request), concurrency {options['concurrency']} over {options['clients']} client "
        f"processes, {options['trials']} trials per side (alternating), "
        f"{options['warmup_s']:g} s warm-up + {options['duration_s']:g} s window; medians. "
        f"Load from {_LOAD_GENERATORS.get(report.get('load_generator', ''), 'Python clients')}.",
        f"Machine: {one_line(report['machine'])}; clients, servers and SeaweedFS share its cores.",
        "",
        "| side | requests/s | p50 ms | p99 ms | server CPU ms/request | errors |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for side in SIDES:
        row = summary[side]
        lines.append(
            f"| {LABELS[side]} | {number(row['requests_per_s'], 0)} "
            f"| {number(row['p50_ms'], 2)} | {number(row['p99_ms'], 2)} "
            f"| {number(row['server_cpu_ms_per_request'], 3)} | {row['errors']} |"
        )
    lines += [
        "",
        f"Capture on / off: throughput {number(on['requests_per_s_vs_off'], 2)}x "
        f"(goal >= {GOAL_THROUGHPUT_RATIO}), p99 {number(on['p99_vs_off'], 2)}x "
        f"(goal <= {GOAL_P99_RATIO}).",
        f"Capture pipeline: spooled {number(on['spooled_mb_per_s'], 2)} MB/s, stored "
        f"{number(on['stored_records_per_s'], 0)} records/s "
        f"({number(on['stored_mb_per_s'], 2)} MB/s) during the trials; "
        f"{report['objects_stored']} Parquet objects in the bucket after shutdown.",
    ]
    return "\n".join(lines)
