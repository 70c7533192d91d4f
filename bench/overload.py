"""Scenario `overload`: offered load far above capacity is refused fast, while the accepted
requests keep their latency and the server's memory stays put.

One Headrace process serves two slow models whose capacity is the model, not Headrace (and
low enough that many times it stays within what the front end can answer on a small host):
`batched` (a gpu_sim of 40 ms per execution, batches of up to 4, one at a time: about 100
requests/s) behind a batcher whose queue holds `queue_size` requests, and `unbatched` (40 ms
per request on the local backend's 4 threads: about 100 requests/s) bounded only by
`server.limits.max_inflight_requests`. For each model: one request at a time (unloaded
latency), `capacity_concurrency` in a closed loop (its capacity), then an open loop at each of
`overload_ratios` times that capacity: Poisson arrivals at a fixed rate, latency from each
request's scheduled send time, refusals not sent again (what "offered load" means: clients
that keep arriving whatever the server answers). Last, and reported apart, a "retry storm":
`storm_concurrency` requests in a closed loop that resends every refusal at once, which
measures a front end flooded by its own clients' instant retries rather than the offered load.
The report gives, per point, the offered load against capacity, accepted throughput against
capacity, accepted p99 against unloaded p99 and against the wait the bound implies, refusals
(RESOURCE_EXHAUSTED) with their p50 and p99, errors by code, and the server's RSS before and
after the overload.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.frontend import HOST, METHOD, check_identity_reply, identity_request
from bench.loadgen import LoadResult, LoadSpec, run_load
from bench.machine import one_line
from bench.options import add_options, check_clients, check_window, options_of
from bench.server_process import SINGLE_PROCESS, ServerProcess
from bench.sweep import number

SUMMARY = "offered load far above capacity (open loop): refusals, accepted latency, memory"
MODELS = ("batched", "unbatched")
REFUSED = "RESOURCE_EXHAUSTED"
GOAL_OFFERED_RATIO = 3.0
"""Offered load over capacity of the point the goals are judged on: the first ratio at or
above it."""
OFFERED_SLACK = 0.9
"""The scheduled rate must reach this share of the point's target (Poisson arrivals scatter
a few percent around it in a window of seconds; a client that fell far behind its schedule
did not offer the load)."""
GOAL_P99_SLACK = 1.5
"""Accepted p99 under overload may be at most this many times the wait the bound implies:
(requests the bound lets wait / requests served at once + 1) x unloaded p99."""
GOAL_ACCEPTED_RATIO = 0.8
"""Accepted requests/s under overload at least this share of capacity: refusing must not
starve the model."""
GOAL_RSS_GROWTH_MIB = 64.0
EXECUTION_S = 0.04
"""Both models' time per execution."""
BATCH_SIZE = 4
PARALLEL = {"batched": BATCH_SIZE, "unbatched": 4}
"""Requests each model serves at once: one batch; the local backend's 4 threads."""


@dataclass(frozen=True, slots=True)
class OverloadOptions:
    """The scenario's knobs; the defaults are the standard run."""

    duration_s: float = 5.0
    warmup_s: float = 1.0
    clients: int = 2
    elements: int = 16
    capacity_concurrency: int = 16
    overload_ratios: tuple[float, ...] = (3.0, 10.0)
    """Open-loop offered rates, as multiples of the capacity just measured."""
    max_in_flight: int = 4096
    """The open-loop clients' cap on requests in flight: far above what the server lets
    wait, so the server, not the client, decides what is refused."""
    storm_concurrency: int = 256
    """The retry storm's closed loop (every refusal resent at once); 0: no storm."""
    queue_size: int = 16
    """`batching.max_queue_size` of `batched`."""
    max_inflight_requests: int = 16
    """`server.limits.max_inflight_requests`."""


_HELP = {
    "overload_ratios": "comma-separated open-loop offered rates, as multiples of capacity",
    "storm_concurrency": "closed-loop retry storm's requests in flight (0: none)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The scenario's command-line options, defaulting to `OverloadOptions()`."""
    add_options(parser, OverloadOptions(), _HELP)


def options_from(arguments: argparse.Namespace) -> OverloadOptions:
    """The options `add_arguments` parsed.

    Raises:
        ValueError: a count below 1 (the storm's 0 aside), a ratio that is not positive,
            clients above a concurrency, or an empty window.
    """
    options = options_of(OverloadOptions, arguments)
    counts = (
        options.clients,
        options.elements,
        options.capacity_concurrency,
        options.max_in_flight,
        options.queue_size,
        options.max_inflight_requests,
    )
    if min(counts) < 1 or options.storm_concurrency < 0:
        raise ValueError("counts and concurrencies must be >= 1 (the storm's >= 0)")
    if not options.overload_ratios or min(options.overload_ratios) <= 0:
        raise ValueError("overload ratios must be > 0")
    check_clients(options.clients, options.capacity_concurrency, "--capacity-concurrency")
    check_clients(options.clients, options.max_in_flight, "--max-in-flight")
    if options.storm_concurrency:
        check_clients(options.clients, options.storm_concurrency, "--storm-concurrency")
    check_window(options.warmup_s, options.duration_s)
    return options


def config(options: OverloadOptions) -> dict[str, Any]:
    """The Headrace config both models are served with."""
    signature = {
        "max_batch_size": BATCH_SIZE,
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [-1]}],
        "entrypoint": "headrace.examples.gpu_sim:GpuSim",
        "execution": "thread",
        "init_args": {"execution_s": EXECUTION_S, "per_item_s": 0.0},
    }
    return {
        "server": {"limits": {"max_inflight_requests": options.max_inflight_requests}},
        "local_backend": {"worker_threads": PARALLEL["unbatched"]},
        "models": [
            {
                "name": "batched",
                **signature,
                "batching": {"max_inflight_batches": 1, "max_queue_size": options.queue_size},
            },
            {"name": "unbatched", **signature, "batching": {"enabled": False}},
        ],
    }


def rss_kib(pid: int) -> dict[str, int]:
    """The process's resident set now (VmRSS) and at its peak (VmHWM), in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def _phase(load: LoadResult, capacity_per_s: float | None = None) -> dict[str, Any]:
    refused = load.errors.get(REFUSED, 0)
    other = {code: count for code, count in load.errors.items() if code != REFUSED}
    offered = (
        load.offered_per_s
        if load.offered_per_s is not None
        else (load.completed + refused + sum(other.values())) / load.duration_s
    )
    return {
        "load": asdict(load),
        "offered_per_s": offered,
        "offered_vs_capacity": _ratio(offered, capacity_per_s),
        "accepted_vs_capacity": _ratio(load.requests_per_s, capacity_per_s),
        "refused": refused,
        "other_errors": sum(other.values()),
        "errors_by_code": load.errors,
    }


def run(options: OverloadOptions, results_dir: Path, stamp: str) -> dict[str, Any]:
    """Run the scenario; returns every number, JSON-ready. The server is stopped on return,
    on errors and on KeyboardInterrupt.

    Raises:
        RuntimeError: the server did not start.
        LoadError: a client failed (a wrong reply included).
    """
    results_dir.mkdir(parents=True, exist_ok=True)
    config_path = results_dir / f"overload-{stamp}.yaml"
    config_path.write_text(yaml.safe_dump(config(options), sort_keys=False))
    argv = [sys.executable, "-m", "headrace", "serve", "--config", str(config_path)]
    argv += ["--host", HOST, "--port", "0"]
    server = ServerProcess(
        "headrace", argv, results_dir / f"overload-{stamp}-headrace.log", SINGLE_PROCESS
    )
    models: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(server)
        for model in MODELS:
            request = identity_request(options.elements, model)

            def measure(
                concurrency: int, rate: float | None = None, request: bytes = request
            ) -> LoadResult:
                spec = LoadSpec(
                    target=f"{HOST}:{server.port}",
                    method=METHOD,
                    request=request,
                    check=check_identity_reply,
                    concurrency=concurrency,
                    clients=min(options.clients, concurrency),
                    warmup_s=options.warmup_s,
                    duration_s=options.duration_s,
                    arrival_rate_per_s=rate,
                )
                return run_load(spec, meter=server.cpu_seconds)

            unloaded = measure(1)
            capacity = measure(options.capacity_concurrency)
            rss_before = rss_kib(server.pid)
            bound = options.queue_size if model == "batched" else options.max_inflight_requests
            waves = bound / PARALLEL[model] + 1
            p99_goal_ms = (
                waves * unloaded.p99_ms * GOAL_P99_SLACK if unloaded.p99_ms is not None else None
            )
            points = []
            for ratio in options.overload_ratios:
                load = measure(options.max_in_flight, ratio * capacity.requests_per_s)
                point = {"ratio": ratio, **_phase(load, capacity.requests_per_s)}
                point["accepted_p99_vs_unloaded"] = _ratio(load.p99_ms, unloaded.p99_ms)
                point["goals_met"] = _goals_met(point, unloaded, p99_goal_ms)
                points.append(point)
                _progress(model, f"open loop {ratio:g}x", point)
            storm = None
            if options.storm_concurrency:
                load = measure(options.storm_concurrency)
                storm = _phase(load, capacity.requests_per_s)
                storm["accepted_p99_vs_unloaded"] = _ratio(load.p99_ms, unloaded.p99_ms)
                _progress(model, f"retry storm {options.storm_concurrency}", storm)
            rss_after = rss_kib(server.pid)
            judged = next((p for p in points if p["ratio"] >= GOAL_OFFERED_RATIO), None)
            growth_kib = rss_after["VmRSS"] - rss_before["VmRSS"]
            models[model] = {
                "unloaded": _phase(unloaded),
                "capacity": _phase(capacity),
                "open_loop": points,
                "retry_storm": storm,
                "rss_kib_before": rss_before["VmRSS"],
                "rss_kib_after": rss_after["VmRSS"],
                "rss_kib_peak": rss_after["VmHWM"],
                "rss_growth_kib": growth_kib,
                "p99_goal_ms": p99_goal_ms,
                "goals_met": judged is not None
                and judged["goals_met"]
                and growth_kib / 1024 <= GOAL_RSS_GROWTH_MIB,
            }
    return {
        "options": asdict(options),
        "config": config(options),
        "note": "client processes and the server share the cores; open-loop latency is from "
        "each request's scheduled send time",
        "models": models,
    }


def _goals_met(point: dict[str, Any], unloaded: LoadResult, p99_goal_ms: float | None) -> bool:
    load = point["load"]
    refusal_p99 = load["error_p99_ms"]
    return (
        point["ratio"] >= GOAL_OFFERED_RATIO
        and (point["offered_vs_capacity"] or 0) >= OFFERED_SLACK * point["ratio"]
        and (point["accepted_vs_capacity"] or 0) >= GOAL_ACCEPTED_RATIO
        and load["p99_ms"] is not None
        and p99_goal_ms is not None
        and load["p99_ms"] <= p99_goal_ms
        and unloaded.p99_ms is not None
        and (refusal_p99 is None or refusal_p99 <= unloaded.p99_ms)
        and point["other_errors"] == 0
    )


def _progress(model: str, label: str, point: dict[str, Any]) -> None:
    load = point["load"]
    print(
        f"{model} {label}: offered {point['offered_per_s']:,.0f}/s "
        f"({number(point['offered_vs_capacity'], 1)}x capacity), accepted "
        f"{load['requests_per_s']:,.0f}/s, p99 {number(load['p99_ms'], 1)} ms, refused "
        f"{point['refused']:,} (p99 {number(load['error_p99_ms'], 2)} ms), other errors "
        f"{point['other_errors']}",
        file=sys.stderr,
        flush=True,
    )


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def _errors(point: dict[str, Any]) -> str:
    return ", ".join(f"{code} {n:,}" for code, n in point["errors_by_code"].items()) or "0"


def render(report: dict[str, Any]) -> str:
    """The report as Markdown: per model, one row per open-loop point, then the retry storm."""
    options = report["options"]
    lines = [
        f"## overload: {SUMMARY}",
        "",
        f"1x{options['elements']} FP32 requests; both models {EXECUTION_S * 1000:g} ms per "
        f"execution (`batched`: batches of {BATCH_SIZE}, max_queue_size "
        f"{options['queue_size']}; `unbatched`: {PARALLEL['unbatched']} threads, "
        f"server.limits.max_inflight_requests {options['max_inflight_requests']}); capacity "
        f"measured at concurrency {options['capacity_concurrency']} (closed loop); overload: "
        f"Poisson arrivals at {', '.join(f'{r:g}x' for r in options['overload_ratios'])} "
        "capacity, latency from the scheduled send time, refusals not resent; "
        f"{options['warmup_s']:g} s warm-up + {options['duration_s']:g} s windows, "
        f"{options['clients']} client processes.",
        f"Machine: {one_line(report['machine'])}; clients and server share its cores.",
        "",
        "| model | load | capacity/s | offered/s | offered vs capacity | accepted/s "
        "| accepted vs capacity | unloaded p99 ms | accepted p99 ms | p99 goal ms "
        "| p99 vs unloaded | refused | refusal p50 ms | refusal p99 ms | errors by code "
        "| goals |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|---|",
    ]
    for model, row in report["models"].items():
        capacity = row["capacity"]["load"]["requests_per_s"]
        unloaded_p99 = row["unloaded"]["load"]["p99_ms"]
        points = [(f"open loop {p['ratio']:g}x", p) for p in row["open_loop"]]
        if row["retry_storm"] is not None:
            points.append(
                (f"retry storm ({options['storm_concurrency']} closed)", row["retry_storm"])
            )
        for label, point in points:
            load = point["load"]
            goals = point.get("goals_met")
            lines.append(
                f"| {model} | {label} | {number(capacity, 0)} "
                f"| {number(point['offered_per_s'], 0)} "
                f"| {number(point['offered_vs_capacity'], 1)}x "
                f"| {number(load['requests_per_s'], 0)} "
                f"| {number(point['accepted_vs_capacity'], 2)} "
                f"| {number(unloaded_p99, 2)} | {number(load['p99_ms'], 2)} "
                f"| {number(row['p99_goal_ms'], 2)} "
                f"| {number(point['accepted_p99_vs_unloaded'], 2)} "
                f"| {point['refused']:,} | {number(load['error_p50_ms'], 2)} "
                f"| {number(load['error_p99_ms'], 2)} | {_errors(point)} "
                f"| {'-' if goals is None else 'met' if goals else 'NOT met'} |"
            )
    lines += [
        "",
        "| model | RSS before MiB | RSS after MiB | RSS peak MiB | growth MiB | goals |",
        "|---|--:|--:|--:|--:|---|",
    ]
    for model, row in report["models"].items():
        lines.append(
            f"| {model} | {row['rss_kib_before'] / 1024:,.1f} "
            f"| {row['rss_kib_after'] / 1024:,.1f} | {row['rss_kib_peak'] / 1024:,.1f} "
            f"| {row['rss_growth_kib'] / 1024:+,.1f} "
            f"| {'met' if row['goals_met'] else 'NOT met'} |"
        )
    lines += [
        "",
        f"Goals, on the first open-loop point at >= {GOAL_OFFERED_RATIO:g}x capacity (its "
        f"scheduled rate within {OFFERED_SLACK:g}x of that, Poisson scatter aside): accepted "
        f">= {GOAL_ACCEPTED_RATIO:g}x capacity; accepted p99 <= {GOAL_P99_SLACK:g} x (bound / "
        "served at once + 1) x unloaded p99 (the queue's or the in-flight limit's wait, no "
        "more); refusal p99 <= unloaded p99 (a refusal is back before one served call would "
        f"be); no error but {REFUSED}; RSS growth <= {GOAL_RSS_GROWTH_MIB:g} MiB over all the "
        "overload. The retry storm is reported, not judged: there the clients' instant resends, "
        "on the same cores, are the load.",
    ]
    return "\n".join(lines)
