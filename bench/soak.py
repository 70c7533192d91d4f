"""Scenario `soak`: steady load on one Headrace process for a long time (`make soak`: 30
minutes by default, SOAK_SECONDS to change), watching for leaks and errors.

The server serves `identity` (no batcher) and `batched` (a gpu_sim of 1 ms per execution
behind the batcher); `concurrency` coroutines in this process send requests to both in turn,
back to back, over one channel, and check every reply. Every `window_s` the scenario records
the window's completed requests, errors by status code and the server's RSS. The report gives
throughput and RSS over time and the growth from the first window to the last.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml

from bench.frontend import HOST, METHOD, check_identity_reply, identity_request
from bench.machine import one_line
from bench.options import add_options, options_of
from bench.overload import rss_kib
from bench.server_process import SINGLE_PROCESS, ServerProcess

SUMMARY = "steady load for a long time: throughput, errors and server RSS over time"
MODELS = ("identity", "batched")
CALL_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class SoakOptions:
    """The scenario's knobs; the defaults are `make soak`'s."""

    duration_s: float = 1800.0
    window_s: float = 60.0
    warmup_s: float = 5.0
    """Load before the first window: RSS growth is counted from the first window."""
    concurrency: int = 16
    elements: int = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The scenario's command-line options, defaulting to `SoakOptions()`."""
    add_options(parser, SoakOptions())


def options_from(arguments: argparse.Namespace) -> SoakOptions:
    """The options `add_arguments` parsed.

    Raises:
        ValueError: no whole window in the duration, or a concurrency below 1.
    """
    options = options_of(SoakOptions, arguments)
    if options.window_s <= 0 or options.duration_s < options.window_s:
        raise ValueError("--window-s must be > 0 and --duration-s at least one window")
    if min(options.concurrency, options.elements) < 1 or options.warmup_s < 0:
        raise ValueError("--concurrency and --elements must be >= 1, --warmup-s >= 0")
    return options


CONFIG: dict[str, Any] = {
    "models": [
        {
            "name": "identity",
            "max_batch_size": 1024,
            "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1]}],
            "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [-1]}],
            "entrypoint": "headrace.examples.identity:Identity",
            "execution": "inline",
            "batching": {"enabled": False},
        },
        {
            "name": "batched",
            "max_batch_size": 64,
            "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1]}],
            "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [-1]}],
            "entrypoint": "headrace.examples.gpu_sim:GpuSim",
            "init_args": {"execution_s": 0.001, "per_item_s": 0.0},
            "execution": "thread",
        },
    ]
}


@dataclass(slots=True)
class _Window:
    """What the current window has seen so far."""

    completed: int = 0
    errors: Counter[str] = field(default_factory=Counter)


async def _load(
    address: str, options: SoakOptions, pid: int, windows: list[dict[str, Any]]
) -> None:
    requests = [identity_request(options.elements, model) for model in MODELS]
    current = _Window()
    stop = asyncio.Event()

    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)

        async def worker(index: int) -> None:
            turn = index
            while not stop.is_set():
                request = requests[turn % len(requests)]
                turn += 1
                try:
                    reply = await call(request, timeout=CALL_TIMEOUT_S)
                    check_identity_reply(request, reply)
                except grpc.aio.AioRpcError as exc:
                    current.errors[exc.code().name] += 1
                except ValueError:
                    current.errors["WRONG_REPLY"] += 1
                else:
                    current.completed += 1

        workers = [asyncio.create_task(worker(index)) for index in range(options.concurrency)]
        try:
            await asyncio.sleep(options.warmup_s)
            started = time.monotonic()
            count = int(options.duration_s // options.window_s)
            for index in range(count):
                current.completed, current.errors = 0, Counter()
                await asyncio.sleep(started + (index + 1) * options.window_s - time.monotonic())
                rss = rss_kib(pid)
                windows.append(
                    {
                        "end_s": round(time.monotonic() - started, 3),
                        "completed": current.completed,
                        "requests_per_s": current.completed / options.window_s,
                        "errors": dict(current.errors),
                        "rss_kib": rss["VmRSS"],
                    }
                )
                print(
                    f"window {index + 1}/{count}: {current.completed / options.window_s:,.0f} "
                    f"requests/s, {sum(current.errors.values())} errors, RSS "
                    f"{rss['VmRSS'] / 1024:,.1f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            stop.set()
            await asyncio.gather(*workers, return_exceptions=True)


def run(options: SoakOptions, results_dir: Path, stamp: str) -> dict[str, Any]:
    """Run the scenario; returns every number, JSON-ready. The server is stopped on return,
    on errors and on KeyboardInterrupt.

    Raises:
        RuntimeError: the server did not start.
    """
    results_dir.mkdir(parents=True, exist_ok=True)
    config_path = results_dir / f"soak-{stamp}.yaml"
    config_path.write_text(yaml.safe_dump(CONFIG, sort_keys=False))
    argv = [sys.executable, "-m", "headrace", "serve", "--config", str(config_path)]
    argv += ["--host", HOST, "--port", "0"]
    server = ServerProcess(
        "headrace", argv, results_dir / f"soak-{stamp}-headrace.log", SINGLE_PROCESS
    )
    windows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(server)
        rss_start = rss_kib(server.pid)["VmRSS"]
        asyncio.run(_load(f"{HOST}:{server.port}", options, server.pid, windows))
        peak = rss_kib(server.pid)["VmHWM"]
    errors: Counter[str] = Counter()
    for window in windows:
        errors.update(window["errors"])
    return {
        "options": asdict(options),
        "note": "the load runs in the benchmark process; server and client share the cores",
        "windows": windows,
        "rss_kib_at_start": rss_start,
        "rss_kib_first_window": windows[0]["rss_kib"],
        "rss_kib_last_window": windows[-1]["rss_kib"],
        "rss_growth_kib": windows[-1]["rss_kib"] - windows[0]["rss_kib"],
        "rss_kib_peak": peak,
        "completed": sum(window["completed"] for window in windows),
        "errors": dict(errors),
    }


def render(report: dict[str, Any]) -> str:
    """The report as Markdown: a summary line and one row per window."""
    options = report["options"]
    lines = [
        f"## soak: {SUMMARY}",
        "",
        f"{options['duration_s']:g} s in {options['window_s']:g} s windows after "
        f"{options['warmup_s']:g} s warm-up; concurrency {options['concurrency']}, 1x"
        f"{options['elements']} FP32 to {' and '.join(MODELS)} in turn.",
        f"Machine: {one_line(report['machine'])}.",
        "",
        f"Completed {report['completed']:,} requests; errors: "
        f"{report['errors'] or 'none'}; server RSS {report['rss_kib_first_window'] / 1024:,.1f}"
        f" MiB (first window) -> {report['rss_kib_last_window'] / 1024:,.1f} MiB (last), "
        f"growth {report['rss_growth_kib'] / 1024:+,.1f} MiB, peak "
        f"{report['rss_kib_peak'] / 1024:,.1f} MiB.",
        "",
        "| window end s | requests/s | errors | RSS MiB |",
        "|--:|--:|--:|--:|",
    ]
    for window in report["windows"]:
        lines.append(
            f"| {window['end_s']:,.0f} | {window['requests_per_s']:,.0f} "
            f"| {sum(window['errors'].values())} | {window['rss_kib'] / 1024:,.1f} |"
        )
    return "\n".join(lines)
