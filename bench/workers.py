"""Scenario `workers`: `headrace serve --workers N` against one worker, same load.

Two Headrace processes run side by side on the embedded default config, metrics on: one with
one worker (a single process, no supervisor), one with N workers behind a supervisor on one
SO_REUSEPORT port. Trials alternate between them in ABBA order with the same clients, request
and concurrency, unary ModelInfer on `identity` (the model costs nothing, so requests/s is
Headrace's own ceiling). The kernel spreads connections, not calls, over the workers, so the
load comes over several connections; each trial reports the requests each worker answered
(`headrace_worker_requests`, from the server's /metrics).

The load generator: h2load (`bench.h2load`, C++, about a tenth of the server's CPU per call)
when installed, else the grpc.aio clients of `bench.loadgen` (`--client python`), which take
about 0.7 of a core at this load: on a machine of C cores with no pinning, the clients share
the cores with the server, and N workers can get at most what the clients leave; the
requests/s ratio then understates what N workers give a server-bound host. The report also
gives the server's CPU use (cores busy during the window, all its processes together) and its
CPU per request: the first shows how many cores the server actually got, the second whether
more processes cost more per request. `--server-cpus`/`--client-cpus` pin both servers and the
clients to disjoint CPUs on a machine with more cores than the server should use (e.g.
`--server-cpus 0,1 --client-cpus 2-15`): then the ratio is the scale-out on exactly those
cores.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import h2load, server_metrics
from bench.frontend import HOST, identity_load, identity_request
from bench.gpu_sim import METRICS_ENVIRONMENT
from bench.loadgen import LoadSpec, run_load
from bench.machine import one_line
from bench.options import add_options, check_clients, check_window, options_of
from bench.server_process import CAPTURE_OFF, WORKERS_VARIABLE, ServerProcess
from bench.sweep import number

SUMMARY = "`serve --workers N` vs one worker: unary ModelInfer on `identity`, same load"
SINGLE = "single"
MULTI = "multi"
SIDES = (SINGLE, MULTI)
GOAL_RATIO = 1.6
"""Requests/s of 2 workers over 1 on 2 cores (issue #11)."""
AUTO, H2LOAD, PYTHON, CLIENTS = h2load.AUTO, h2load.H2LOAD, h2load.PYTHON, h2load.CLIENTS
load_generator = h2load.load_generator


def cpu_list(text: str) -> tuple[int, ...]:
    """`0,1` or `2-15` or `0,2-3` -> CPU numbers; empty text -> ()."""
    cpus: list[int] = []
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        cpus += range(int(first), int(last or first) + 1)
    return tuple(cpus)


@dataclass(frozen=True, slots=True)
class WorkersOptions:
    """The scenario's knobs; the defaults are the standard run."""

    workers: int = 2
    client: str = AUTO
    """Load generator: h2load, python (bench.loadgen's grpc.aio clients), or auto (h2load
    when installed, else python)."""
    trials: int = 3
    """Trials per side (ABBA)."""
    duration_s: float = 5.0
    warmup_s: float = 2.0
    concurrency: int = 64
    """Requests in flight over all client processes: enough to keep every worker busy."""
    clients: int = 2
    """Client processes (h2load: threads)."""
    connections: int = 8
    """Connections per client process or thread (the kernel hashes each to a worker)."""
    elements: int = 16
    server_cpus: tuple[int, ...] = ()
    """CPUs both servers are pinned to (empty: none)."""
    client_cpus: tuple[int, ...] = ()
    """CPUs the client processes are pinned to (empty: none)."""


_HELP = {
    "workers": "workers of the multi side",
    "client": "load generator: auto (h2load when installed), h2load or python",
    "trials": "trials per side",
    "connections": "connections per client process",
    "server_cpus": "e.g. 0,1",
    "client_cpus": "e.g. 2-15",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The scenario's command-line options, defaulting to `WorkersOptions()`."""
    add_options(parser, WorkersOptions(), _HELP, {"server_cpus": cpu_list, "client_cpus": cpu_list})


def options_from(arguments: argparse.Namespace) -> WorkersOptions:
    """The options `add_arguments` parsed.

    Raises:
        ValueError: a count below 1 (workers below 2), a negative warm-up, an empty window.
    """
    options = options_of(WorkersOptions, arguments)
    counts = (options.trials, options.concurrency, options.clients, options.connections)
    if min(*counts, options.elements) < 1 or options.workers < 2:
        raise ValueError("counts must be >= 1 and --workers >= 2")
    check_clients(options.clients, options.concurrency)
    check_window(options.warmup_s, options.duration_s)
    if options.client not in CLIENTS:
        raise ValueError(f"--client must be one of {', '.join(CLIENTS)}, got {options.client!r}")
    if options.client == H2LOAD:
        h2load.layout(_spec(options, "", b""))
    return options


def _spec(options: WorkersOptions, target: str, request: bytes) -> LoadSpec:
    return identity_load(
        options,
        target,
        request,
        connections=options.connections,
        client_cpus=options.client_cpus,
    )


def trial_order(trials: int) -> list[str]:
    """single, multi, multi, single, ... (ABBA), `trials` of each."""
    order: list[str] = []
    for pair in range(trials):
        order += list(SIDES) if pair % 2 == 0 else list(SIDES[::-1])
    return order


def _median(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def run(options: WorkersOptions, results_dir: Path, stamp: str) -> dict[str, Any]:
    """Run the scenario; returns every number, JSON-ready. Servers are stopped on return,
    on errors and on KeyboardInterrupt.

    Raises:
        RuntimeError: a server did not start.
        LoadError: a client failed (a wrong reply included); h2load asked for and missing.
        ValueError: a concurrency h2load cannot spread (see `bench.h2load.layout`).
    """
    client = load_generator(options.client)
    if client == H2LOAD:
        h2load.layout(_spec(options, "", b""))
    else:
        print(
            "workers: load from the Python clients, which take about 0.7 of a core at this "
            "load; `make bench-tools` installs h2load, about a fifth of their CPU per call",
            file=sys.stderr,
        )
    request = identity_request(options.elements)
    argv = [sys.executable, "-m", "headrace", "serve", "--host", HOST, "--port", "0"]
    workers = {SINGLE: 1, MULTI: options.workers}
    trials: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        servers = {
            side: stack.enter_context(
                ServerProcess(
                    side,
                    argv,
                    results_dir / f"workers-{stamp}-{side}.log",
                    # Capture is measured by its own scenario (bench/capture.py); metrics give
                    # the requests per worker and check h2load's calls.
                    {WORKERS_VARIABLE: str(workers[side]), **CAPTURE_OFF, **METRICS_ENVIRONMENT},
                    cpus=options.server_cpus,
                )
            )
            for side in SIDES
        }
        for index, side in enumerate(trial_order(options.trials)):
            server = servers[side]
            spec = _spec(options, f"{HOST}:{server.port}", request)
            metrics_url = server.metrics_url()
            before = server_metrics.request_counts(server_metrics.read(metrics_url))
            if client == H2LOAD:
                load = h2load.run_h2load(spec, server.cpu_seconds, metrics_url)
            else:
                load = run_load(spec, server.cpu_seconds, metrics_url)
            answered = server_metrics.request_counts(server_metrics.read(metrics_url))
            trial = {
                "index": index,
                "side": side,
                "workers": workers[side],
                "load": asdict(load),
                "worker_requests": answered.since(before).by_worker,
                "server_cores_busy": load.metered / load.duration_s,
                "server_cpu_ms_per_request": (
                    load.metered * 1000 / load.completed if load.completed else None
                ),
                "client_cores_busy": load.client_cpu_s / load.duration_s,
            }
            trials.append(trial)
            print(_trial_row(trial), file=sys.stderr, flush=True)
    summary: dict[str, dict[str, Any]] = {}
    for side in SIDES:
        mine = [trial for trial in trials if trial["side"] == side]
        summary[side] = {
            "workers": workers[side],
            "requests_per_s": _median([t["load"]["requests_per_s"] for t in mine]),
            "p50_ms": _median([t["load"]["p50_ms"] for t in mine]),
            "p99_ms": _median([t["load"]["p99_ms"] for t in mine]),
            "server_cores_busy": _median([t["server_cores_busy"] for t in mine]),
            "server_cpu_ms_per_request": _median([t["server_cpu_ms_per_request"] for t in mine]),
            "client_cores_busy": _median([t["client_cores_busy"] for t in mine]),
            "errors": sum(sum(t["load"]["errors"].values()) for t in mine),
        }
    single, multi = summary[SINGLE], summary[MULTI]
    pinned = bool(options.server_cpus and options.client_cpus)
    return {
        "options": asdict(options),
        "client": client,
        "request_bytes": len(request),
        "note": (
            "servers and clients pinned to disjoint CPUs"
            if pinned
            else "client processes and both servers share the machine's cores"
        ),
        "trials": trials,
        "summary": summary,
        "ratio": _ratio(multi["requests_per_s"], single["requests_per_s"]),
        "server_cores_ratio": _ratio(multi["server_cores_busy"], single["server_cores_busy"]),
        "cpu_per_request_ratio": _ratio(
            multi["server_cpu_ms_per_request"], single["server_cpu_ms_per_request"]
        ),
        "goal_ratio": GOAL_RATIO,
    }


def _clients(client: str) -> str:
    return "h2load threads" if client == H2LOAD else "Python client processes"


def _label(workers: int) -> str:
    return "1 worker (single process)" if workers == 1 else f"{workers} workers"


def _spread(worker_requests: dict[str, int]) -> str:
    """Each worker's share of the requests of a trial (its whole run, warm-up included)."""
    total = sum(worker_requests.values())
    return (
        " / ".join(f"{count * 100 / total:.0f}%" for _, count in sorted(worker_requests.items()))
        if total
        else "-"
    )


def _trial_row(trial: dict[str, Any]) -> str:
    load = trial["load"]
    return (
        f"| {trial['index'] + 1} | {_label(trial['workers'])} "
        f"| {number(load['requests_per_s'], 0)} | {number(load['p99_ms'], 2)} "
        f"| {number(trial['server_cores_busy'], 2)} "
        f"| {number(trial['server_cpu_ms_per_request'], 3)} "
        f"| {number(trial['client_cores_busy'], 2)} | {sum(load['errors'].values())} "
        f"| {_spread(trial['worker_requests'])} |"
    )


def render(report: dict[str, Any]) -> str:
    """The report as Markdown: medians per side, the ratios, then every trial."""
    options = report["options"]
    summary = report["summary"]
    lines = [
        f"## workers: {SUMMARY}",
        "",
        f"1x{options['elements']} FP32 ({report['request_bytes']} B request), concurrency "
        f"{options['concurrency']} over {options['clients']} {_clients(report['client'])} x "
        f"{options['connections']} connections, {options['trials']} trials per side (ABBA), "
        f"{options['warmup_s']:g} s warm-up + {options['duration_s']:g} s window; medians.",
        f"Machine: {one_line(report['machine'])}; {report['note']}.",
        "",
        "| server | requests/s | p50 ms | p99 ms | server cores busy | server CPU ms/request "
        "| client cores busy | errors |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for side in SIDES:
        row = summary[side]
        lines.append(
            f"| {_label(row['workers'])} | {number(row['requests_per_s'], 0)} "
            f"| {number(row['p50_ms'], 2)} | {number(row['p99_ms'], 2)} "
            f"| {number(row['server_cores_busy'], 2)} "
            f"| {number(row['server_cpu_ms_per_request'], 3)} "
            f"| {number(row['client_cores_busy'], 2)} | {row['errors']} |"
        )
    verdict = "meets" if (report["ratio"] or 0) >= report["goal_ratio"] else "below"
    lines += [
        "",
        f"**{options['workers']} workers / 1 worker requests/s: {number(report['ratio'], 2)}** "
        f"({verdict} the goal of >= {report['goal_ratio']:g}); server cores busy "
        f"{number(report['server_cores_ratio'], 2)}x, server CPU per request "
        f"{number(report['cpu_per_request_ratio'], 2)}x.",
        "",
        "| trial | server | requests/s | p99 ms | server cores busy | server CPU ms/request "
        "| client cores busy | errors | requests per worker |",
        "|--:|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    lines += [_trial_row(trial) for trial in report["trials"]]
    return "\n".join(lines)
