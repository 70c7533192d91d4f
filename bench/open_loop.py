"""Scenario `open_loop`: latency at fixed offered rates, Headrace vs the bare grpc.aio server.

Closed-loop load measures throughput but hides queueing: a slow server slows its clients
down, and fewer requests are sent exactly when the server is behind. Here clients send at
Poisson-distributed times at a target rate (a seeded schedule, the same for both servers),
whether or not earlier replies are back, and latency runs from each request's scheduled send
time. At each rate the two servers (as in `frontend`) are measured back to back, in an order
that reverses from trial to trial. Reported per rate and server: offered and achieved
requests/s, p50/p90/p99/p99.9, server CPU per request and errors.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.frontend import (
    BARE,
    HEADRACE,
    HOST,
    METHOD,
    SIDE_LABELS,
    check_identity_reply,
    identity_request,
    server_processes,
)
from bench.loadgen import LoadSpec, run_load
from bench.machine import one_line
from bench.options import add_options, check_clients, check_window, options_of
from bench.stats import median
from bench.sweep import number

SUMMARY = (
    "Poisson arrivals at fixed rates: Headrace vs a bare grpc.aio server, latency from schedule"
)
SIDES = (HEADRACE, BARE)
METRICS = ("offered_per_s", "requests_per_s", "p50_ms", "p90_ms", "p99_ms", "p999_ms")


@dataclass(frozen=True, slots=True)
class OpenLoopOptions:
    """The scenario's knobs; the defaults are the standard run."""

    rates: tuple[float, ...] = (500.0, 1000.0, 2000.0, 3000.0)
    """Offered requests/s, over all client processes."""
    trials: int = 2
    """Trials per server and rate; the order of the servers reverses between trials."""
    duration_s: float = 4.0
    warmup_s: float = 1.0
    clients: int = 2
    max_in_flight: int = 512
    """Cap on requests in flight over all clients; a send held back by it keeps its
    scheduled time, so the wait counts as latency."""
    elements: int = 16
    seed: int = 1
    """Seeds the arrival schedule; trial t at rate r uses the same schedule on both servers."""


_HELP = {
    "rates": "comma-separated offered rates, requests/s over all clients",
    "trials": "trials per point",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The scenario's command-line options, defaulting to `OpenLoopOptions()`."""
    add_options(parser, OpenLoopOptions(), _HELP)


def options_from(arguments: argparse.Namespace) -> OpenLoopOptions:
    """The options `add_arguments` parsed.

    Raises:
        ValueError: a count below 1, a rate that is not positive, more clients than the
            in-flight cap, a negative warm-up or an empty window.
    """
    options = options_of(OpenLoopOptions, arguments)
    if min(options.trials, options.clients, options.elements) < 1 or min(options.rates) <= 0:
        raise ValueError("counts must be >= 1 and rates > 0")
    check_clients(options.clients, options.max_in_flight, "--max-in-flight")
    check_window(options.warmup_s, options.duration_s)
    return options


def run(options: OpenLoopOptions, results_dir: Path, stamp: str) -> dict[str, Any]:
    """Run the scenario; returns every number, JSON-ready. Servers are stopped on return, on
    errors and on KeyboardInterrupt.

    Raises:
        RuntimeError: a server did not start.
        LoadError: a client failed (a wrong reply included).
    """
    request = identity_request(options.elements)
    servers = server_processes(results_dir, stamp, "open_loop")
    points: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        for server in servers.values():
            stack.enter_context(server)
        for rate in options.rates:
            for trial in range(options.trials):
                for side in SIDES if trial % 2 == 0 else SIDES[::-1]:
                    server = servers[side]
                    spec = LoadSpec(
                        target=f"{HOST}:{server.port}",
                        method=METHOD,
                        request=request,
                        check=check_identity_reply,
                        concurrency=options.max_in_flight,
                        clients=options.clients,
                        warmup_s=options.warmup_s,
                        duration_s=options.duration_s,
                        arrival_rate_per_s=rate,
                        seed=options.seed + trial,
                    )
                    load = run_load(spec, meter=server.cpu_seconds)
                    points.append({"side": side, "rate": rate, "trial": trial, **asdict(load)})
                    print(
                        f"{side} {rate:g}/s trial {trial + 1}: achieved "
                        f"{load.requests_per_s:,.0f}/s, p99 {number(load.p99_ms, 2)} ms",
                        file=sys.stderr,
                        flush=True,
                    )
    summary: dict[str, dict[str, Any]] = {}
    for rate in options.rates:
        summary[f"{rate:g}"] = {}
        for side in SIDES:
            mine = [p for p in points if p["side"] == side and p["rate"] == rate]
            row: dict[str, Any] = {key: median([p[key] for p in mine]) for key in METRICS}
            row["server_cpu_ms_per_request"] = median(
                [p["server_cpu_ms_per_request"] for p in mine]
            )
            errors: dict[str, int] = {}
            for point in mine:
                for code, count in point["errors"].items():
                    errors[code] = errors.get(code, 0) + count
            row["errors"] = errors
            summary[f"{rate:g}"][side] = row
    return {
        "options": asdict(options),
        "request_bytes": len(request),
        "note": "client processes and both servers share the machine's cores; latency is "
        "from each request's scheduled send time",
        "points": points,
        "summary": summary,
    }


def render(report: dict[str, Any]) -> str:
    """The report as Markdown: one row per rate and server."""
    options = report["options"]
    lines = [
        f"## open_loop: {SUMMARY}",
        "",
        f"1x{options['elements']} FP32 ({report['request_bytes']} B request), Poisson arrivals "
        f"over {options['clients']} client processes (at most {options['max_in_flight']} in "
        f"flight), {options['trials']} trials per point, {options['warmup_s']:g} s warm-up + "
        f"{options['duration_s']:g} s window; medians over trials. Latency is measured from "
        "each request's scheduled send time.",
        f"Machine: {one_line(report['machine'])}; clients and servers share its cores.",
        "",
        "| offered/s | server | scheduled/s | achieved/s | p50 ms | p90 ms | p99 ms | p99.9 ms "
        "| server CPU ms/request | errors |",
        "|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for rate, by_side in report["summary"].items():
        for side in SIDES:
            row = by_side[side]
            errors = ", ".join(f"{code} {n}" for code, n in row["errors"].items()) or "0"
            lines.append(
                f"| {rate} | {SIDE_LABELS[side]} | {number(row['offered_per_s'], 0)} "
                f"| {number(row['requests_per_s'], 0)} "
                f"| {number(row['p50_ms'], 2)} | {number(row['p90_ms'], 2)} "
                f"| {number(row['p99_ms'], 2)} | {number(row['p999_ms'], 2)} "
                f"| {number(row['server_cpu_ms_per_request'], 3)} | {errors} |"
            )
    return "\n".join(lines)
