"""Scenario `triton`: Headrace's batching in front of a real Triton, against Triton alone.

One tritonserver (the project's launcher, the example repository) serves `gpu_sim` (5 ms per
call plus 10 us per item, one instance, Triton's batcher off) and `gpu_sim_triton_batched`
(the same with Triton's own dynamic batcher). One Headrace process routes its `gpu_sim` to
Triton's and batches in front of it. At each concurrency the same lean client (pre-serialized
requests on a raw channel) measures, in an order that reverses from trial to trial:
Triton directly with batching off, Triton directly with its own batcher, and Headrace.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import yaml

from bench.frontend import HOST, METHOD, check_identity_reply, identity_request
from bench.gpu_sim import METRICS_ENVIRONMENT
from bench.loadgen import LoadSpec, run_load
from bench.machine import one_line
from bench.server_process import WORKERS_VARIABLE, ServerProcess
from bench.sweep import SweepOptions, divide, number, summarize, table
from bench.sweep import add_arguments as add_arguments  # the scenario's options: a sweep's
from bench.sweep import options_from as options_from
from headrace.launchers.triton import TritonServer, example_repository

SUMMARY = "gpu_sim on a real Triton: direct (batching off), Triton's batcher, through Headrace"
DIRECT = "direct"
TRITON_BATCHED = "triton_batched"
HEADRACE = "headrace"
SIDES = (DIRECT, TRITON_BATCHED, HEADRACE)
LABELS = {
    DIRECT: "Triton direct, batching off",
    TRITON_BATCHED: "Triton direct, its dynamic batcher",
    HEADRACE: "through Headrace, batching on",
}
MODEL_OF = {DIRECT: "gpu_sim", TRITON_BATCHED: "gpu_sim_triton_batched", HEADRACE: "gpu_sim"}
GOAL_SPEEDUP = 10.0
"""Headrace over direct unbatched requests/s at the highest concurrency."""
GOAL_VS_TRITON = 0.9
"""Headrace over Triton's own batcher, requests/s, at the highest concurrency..."""
GOAL_P99 = 1.2
"""...at no more than this multiple of its p99."""


def _headrace_config(path: Path, triton_address: str) -> Path:
    config = {
        "server": {"host": HOST, "port": 0},
        "models": [{"name": "gpu_sim", "backend": "triton", "endpoints": [triton_address]}],
    }
    path.write_text(yaml.safe_dump(config))
    return path


def run(options: SweepOptions, results_dir: Path, stamp: str) -> dict[str, Any]:
    """Run the scenario; returns every number, JSON-ready. Triton and Headrace are stopped on
    return, on errors and on KeyboardInterrupt.

    Raises:
        TritonLaunchError, RuntimeError: a server did not start.
        LoadError: a client failed (a wrong reply included).
    """
    results_dir.mkdir(parents=True, exist_ok=True)
    points: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        triton = stack.enter_context(
            TritonServer(example_repository(), log_path=results_dir / f"triton-{stamp}-triton.log")
        )
        config = _headrace_config(results_dir / f"triton-{stamp}-headrace.yaml", triton.address)
        argv = [sys.executable, "-m", "headrace", "serve", "--config", str(config)]
        headrace = stack.enter_context(
            ServerProcess(
                "headrace",
                argv,
                results_dir / f"triton-{stamp}-headrace.log",
                {**METRICS_ENVIRONMENT, WORKERS_VARIABLE: str(options.headrace_workers)},
            )
        )
        targets = {
            DIRECT: triton.address,
            TRITON_BATCHED: triton.address,
            HEADRACE: f"{HOST}:{headrace.port}",
        }
        for concurrency in options.concurrencies:
            for trial in range(options.trials):
                for side in SIDES if trial % 2 == 0 else SIDES[::-1]:
                    spec = LoadSpec(
                        target=targets[side],
                        method=METHOD,
                        request=identity_request(options.elements, MODEL_OF[side]),
                        check=check_identity_reply,
                        concurrency=concurrency,
                        clients=min(options.clients, concurrency),
                        warmup_s=options.warmup_s,
                        duration_s=options.duration_s,
                        connections=options.connections,
                    )
                    # Headrace's CPU and /metrics on its side; Triton's CPU is spread over its
                    # server and python-backend stub processes, so the direct sides report none.
                    if side == HEADRACE:
                        load = run_load(
                            spec, meter=headrace.cpu_seconds, metrics_url=headrace.metrics_url()
                        )
                    else:
                        load = replace(
                            run_load(spec, meter=lambda: 0.0), server_cpu_ms_per_request=None
                        )
                    points.append(
                        {"side": side, "concurrency": concurrency, "trial": trial, **asdict(load)}
                    )
                    print(
                        f"{side} c={concurrency} trial {trial + 1}: "
                        f"{load.requests_per_s:,.0f} requests/s, p99 {load.p99_ms:.2f} ms",
                        file=sys.stderr,
                        flush=True,
                    )
    summary = summarize(points, "side", SIDES, options.concurrencies)
    top = summary[str(max(options.concurrencies))]
    return {
        "options": asdict(options),
        "note": "client processes, Headrace and Triton share the machine's cores; Headrace "
        f"ran {options.headrace_workers} worker process(es)",
        "points": points,
        "summary": summary,
        "speedup_at_top": divide(top[HEADRACE]["requests_per_s"], top[DIRECT]["requests_per_s"]),
        "vs_triton_batcher_at_top": divide(
            top[HEADRACE]["requests_per_s"], top[TRITON_BATCHED]["requests_per_s"]
        ),
        "p99_vs_triton_batcher_at_top": divide(
            top[HEADRACE]["p99_ms"], top[TRITON_BATCHED]["p99_ms"]
        ),
        "goals": {"speedup": GOAL_SPEEDUP, "vs_triton": GOAL_VS_TRITON, "p99": GOAL_P99},
    }


def render(report: dict[str, Any]) -> str:
    """The report as Markdown: one row per concurrency and side, then the goals."""
    options = report["options"]
    goals = report["goals"]
    lines = [
        f"## triton: {SUMMARY}",
        "",
        f"1x{options['elements']} FP32 requests, {options['clients']} client processes, "
        f"{options['trials']} trials per point, {options['warmup_s']:g} s warm-up + "
        f"{options['duration_s']:g} s window; medians over trials; Headrace "
        f"{options.get('headrace_workers', 1)} worker(s), {options.get('connections', 1)} "
        "connection(s) per client.",
        f"Machine: {one_line(report['machine'])}; clients, Headrace and Triton share its cores.",
        "",
    ]
    lines += table(report["summary"], SIDES, LABELS, "path")
    top = max(int(c) for c in report["summary"])
    lines += [
        "",
        f"**At concurrency {top}: Headrace / direct unbatched "
        f"{number(report['speedup_at_top'], 1)}x** (goal >= {goals['speedup']:g}x); "
        f"**Headrace / Triton's batcher {number(report['vs_triton_batcher_at_top'], 2)}** "
        f"(goal >= {goals['vs_triton']:g}) at **p99 "
        f"{number(report['p99_vs_triton_batcher_at_top'], 2)}x** Triton's (goal <= "
        f"{goals['p99']:g}x).",
    ]
    return "\n".join(lines)
