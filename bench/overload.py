"""Scenario `overload`: offered load far above capacity is refused fast, while the accepted
requests keep their latency and the server's memory stays put.

One Headrace process serves two slow models whose capacity is the model, not Headrace:
`batched` (a gpu_sim of 20 ms per execution, batches of up to 8, one at a time: about 400
requests/s) behind a batcher whose queue holds `queue_size` requests, and `unbatched` (5 ms
per request on the local backend's 4 threads: about 800 requests/s) bounded only by
`server.limits.max_inflight_requests`. For each model, three measurements with the same
client: one request at a time (unloaded latency), `capacity_concurrency` (its capacity), then
`overload_concurrency` requests in flight, where every refusal is sent again at once (a
closed loop whose refusals come back in microseconds offers many times the capacity). The
report gives the offered load against capacity, accepted throughput, accepted p99 against
unloaded p99, the refusals (RESOURCE_EXHAUSTED) and how fast they came, and the server's RSS
before and after.
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

SUMMARY = "offered load far above capacity: refusals, accepted latency, memory"
MODELS = ("batched", "unbatched")
REFUSED = "RESOURCE_EXHAUSTED"
GOAL_OFFERED_RATIO = 3.0
"""Offered load (accepted + refused) over capacity the overload phase must reach."""
GOAL_P99_SLACK = 1.5
"""Accepted p99 under overload may be at most this many times the wait the bound implies:
(requests the bound lets wait / requests served at once + 1) x unloaded p99."""
PARALLEL = {"batched": 8, "unbatched": 4}
"""Requests each model serves at once: one batch of 8; the local backend's 4 threads."""


@dataclass(frozen=True, slots=True)
class OverloadOptions:
    """The scenario's knobs; the defaults are the standard run."""

    duration_s: float = 5.0
    warmup_s: float = 1.0
    clients: int = 2
    elements: int = 16
    capacity_concurrency: int = 16
    overload_concurrency: int = 256
    queue_size: int = 32
    """`batching.max_queue_size` of `batched`."""
    max_inflight_requests: int = 32
    """`server.limits.max_inflight_requests`."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The scenario's command-line options, defaulting to `OverloadOptions()`."""
    add_options(parser, OverloadOptions())


def options_from(arguments: argparse.Namespace) -> OverloadOptions:
    """The options `add_arguments` parsed.

    Raises:
        ValueError: a count below 1, clients above a concurrency, or an empty window.
    """
    options = options_of(OverloadOptions, arguments)
    counts = (
        options.clients,
        options.elements,
        options.capacity_concurrency,
        options.overload_concurrency,
        options.queue_size,
        options.max_inflight_requests,
    )
    if min(counts) < 1:
        raise ValueError("counts and concurrencies must be >= 1")
    check_clients(options.clients, options.capacity_concurrency, "--capacity-concurrency")
    check_window(options.warmup_s, options.duration_s)
    return options


def config(options: OverloadOptions) -> dict[str, Any]:
    """The Headrace config both models are served with."""
    signature = {
        "max_batch_size": 8,
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [-1]}],
        "entrypoint": "headrace.examples.gpu_sim:GpuSim",
        "execution": "thread",
    }
    return {
        "server": {"limits": {"max_inflight_requests": options.max_inflight_requests}},
        "models": [
            {
                "name": "batched",
                **signature,
                "init_args": {"execution_s": 0.02, "per_item_s": 0.0},
                "batching": {"max_inflight_batches": 1, "max_queue_size": options.queue_size},
            },
            {
                "name": "unbatched",
                **signature,
                "init_args": {"execution_s": 0.005, "per_item_s": 0.0},
                "batching": {"enabled": False},
            },
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


def _phase(load: LoadResult) -> dict[str, Any]:
    refused = load.errors.get(REFUSED, 0)
    other = sum(count for code, count in load.errors.items() if code != REFUSED)
    return {
        "load": asdict(load),
        "offered_per_s": (load.completed + refused + other) / load.duration_s,
        "refused": refused,
        "other_errors": other,
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

            def measure(concurrency: int, request: bytes = request) -> LoadResult:
                spec = LoadSpec(
                    target=f"{HOST}:{server.port}",
                    method=METHOD,
                    request=request,
                    check=check_identity_reply,
                    concurrency=concurrency,
                    clients=min(options.clients, concurrency),
                    warmup_s=options.warmup_s,
                    duration_s=options.duration_s,
                )
                return run_load(spec, meter=server.cpu_seconds)

            unloaded = measure(1)
            capacity = measure(options.capacity_concurrency)
            rss_before = rss_kib(server.pid)
            overloaded = measure(options.overload_concurrency)
            rss_after = rss_kib(server.pid)
            row = {
                "unloaded": _phase(unloaded),
                "capacity": _phase(capacity),
                "overload": _phase(overloaded),
                "rss_kib_before": rss_before["VmRSS"],
                "rss_kib_after": rss_after["VmRSS"],
                "rss_kib_peak": rss_after["VmHWM"],
                "rss_growth_kib": rss_after["VmRSS"] - rss_before["VmRSS"],
            }
            row["offered_vs_capacity"] = _ratio(
                row["overload"]["offered_per_s"], capacity.requests_per_s
            )
            row["accepted_vs_capacity"] = _ratio(overloaded.requests_per_s, capacity.requests_per_s)
            row["accepted_p99_vs_unloaded"] = _ratio(overloaded.p99_ms, unloaded.p99_ms)
            bound = options.queue_size if model == "batched" else options.max_inflight_requests
            waves = bound / PARALLEL[model] + 1
            row["p99_goal_ms"] = (
                waves * unloaded.p99_ms * GOAL_P99_SLACK if unloaded.p99_ms is not None else None
            )
            row["goals_met"] = (
                (row["offered_vs_capacity"] or 0) >= GOAL_OFFERED_RATIO
                and overloaded.p99_ms is not None
                and row["p99_goal_ms"] is not None
                and overloaded.p99_ms <= row["p99_goal_ms"]
                and row["overload"]["other_errors"] == 0
            )
            models[model] = row
            print(
                f"{model}: offered {row['overload']['offered_per_s']:,.0f}/s "
                f"({number(row['offered_vs_capacity'], 1)}x capacity), accepted "
                f"{overloaded.requests_per_s:,.0f}/s, refused {row['overload']['refused']:,}",
                file=sys.stderr,
                flush=True,
            )
    return {
        "options": asdict(options),
        "config": config(options),
        "note": "client processes and the server share the cores",
        "models": models,
    }


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def render(report: dict[str, Any]) -> str:
    """The report as Markdown: one row per model."""
    options = report["options"]
    lines = [
        f"## overload: {SUMMARY}",
        "",
        f"1x{options['elements']} FP32 requests; capacity measured at concurrency "
        f"{options['capacity_concurrency']}, overload at {options['overload_concurrency']} (a "
        f"refused request is sent again at once); `batched`: max_queue_size "
        f"{options['queue_size']}; server.limits.max_inflight_requests "
        f"{options['max_inflight_requests']}; {options['warmup_s']:g} s warm-up + "
        f"{options['duration_s']:g} s windows, {options['clients']} client processes.",
        f"Machine: {one_line(report['machine'])}; clients and server share its cores.",
        "",
        "| model | capacity/s | offered/s | offered vs capacity | accepted/s | unloaded p99 ms "
        "| accepted p99 ms | p99 goal ms | p99 vs unloaded | refused | refusal p99 ms "
        "| other errors | RSS before MiB | RSS growth MiB | goals |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for model, row in report["models"].items():
        overload = row["overload"]
        lines.append(
            f"| {model} | {number(row['capacity']['load']['requests_per_s'], 0)} "
            f"| {number(overload['offered_per_s'], 0)} "
            f"| {number(row['offered_vs_capacity'], 1)}x "
            f"| {number(overload['load']['requests_per_s'], 0)} "
            f"| {number(row['unloaded']['load']['p99_ms'], 2)} "
            f"| {number(overload['load']['p99_ms'], 2)} "
            f"| {number(row['p99_goal_ms'], 2)} "
            f"| {number(row['accepted_p99_vs_unloaded'], 2)} "
            f"| {overload['refused']:,} | {number(overload['load']['error_p99_ms'], 2)} "
            f"| {overload['other_errors']} | {row['rss_kib_before'] / 1024:,.1f} "
            f"| {row['rss_growth_kib'] / 1024:+,.1f} "
            f"| {'met' if row['goals_met'] else 'NOT met'} |"
        )
    lines += [
        "",
        f"Goals: offered >= {GOAL_OFFERED_RATIO:g}x capacity; accepted p99 <= "
        f"{GOAL_P99_SLACK:g} x (bound / served at once + 1) x unloaded p99 (the queue's or "
        f"the in-flight limit's wait, no more); no error but {REFUSED}.",
    ]
    return "\n".join(lines)
