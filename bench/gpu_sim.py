"""Scenario `gpu_sim`: what dynamic batching buys when the model's cost is per execution.

One Headrace process serves configs/gpu_sim.yaml: `gpu_sim` (5 ms per execution plus 20 us
per item, one execution at a time) behind the batcher, `gpu_sim_unbatched` (the same model,
one request per execution: no batching) and `identity` (no model cost: Headrace's own
ceiling). At each concurrency the three are measured back to back with the same client and
request, in an order that alternates between trials.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.frontend import HOST, METHOD, check_identity_reply, identity_request
from bench.loadgen import LoadSpec, run_load
from bench.machine import one_line
from bench.server_process import WORKERS_VARIABLE, ServerProcess
from bench.sweep import SweepOptions, divide, number, summarize, table
from bench.sweep import add_arguments as add_arguments  # the scenario's options: a sweep's
from bench.sweep import options_from as options_from

SUMMARY = "gpu_sim model (5 ms per execution): batching off vs on, against Headrace's ceiling"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "gpu_sim.yaml"
UNBATCHED = "gpu_sim_unbatched"
BATCHED = "gpu_sim"
CEILING = "identity"
MODELS = (UNBATCHED, BATCHED, CEILING)
LABELS = {UNBATCHED: "batching off", BATCHED: "batching on", CEILING: "identity (ceiling)"}
GOAL_SPEEDUP = 10.0
"""Batched over unbatched requests/s at the highest concurrency."""
GOAL_CEILING_RATIO = 0.8
"""Batched requests/s over the identity model's at the highest concurrency."""
METRICS_ENVIRONMENT = {
    "HEADRACE_METRICS__ENABLED": "true",
    "HEADRACE_METRICS__HOST": HOST,
    "HEADRACE_METRICS__PORT": "0",
}
"""Headrace settings overrides that turn /metrics on, on a free port."""


def run(options: SweepOptions, results_dir: Path, stamp: str) -> dict[str, Any]:
    """Run the scenario; returns every number, JSON-ready. The server is stopped on return,
    on errors and on KeyboardInterrupt.

    Raises:
        RuntimeError: the server did not start.
        LoadError: a client failed (a wrong reply included).
    """
    argv = [sys.executable, "-m", "headrace", "serve", "--config", str(CONFIG)]
    argv += ["--host", HOST, "--port", "0"]
    # Metrics on (they cost nothing measurable, see the telemetry scenario): each window's
    # mean batch size and queue/backend time come from the server's own /metrics.
    server = ServerProcess(
        "headrace",
        argv,
        results_dir / f"gpu_sim-{stamp}-headrace.log",
        {**METRICS_ENVIRONMENT, WORKERS_VARIABLE: str(options.headrace_workers)},
    )
    points: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(server)
        for concurrency in options.concurrencies:
            for trial in range(options.trials):
                order = MODELS if trial % 2 == 0 else MODELS[::-1]
                for model in order:
                    spec = LoadSpec(
                        target=f"{HOST}:{server.port}",
                        method=METHOD,
                        request=identity_request(options.elements, model),
                        check=check_identity_reply,
                        concurrency=concurrency,
                        clients=min(options.clients, concurrency),
                        warmup_s=options.warmup_s,
                        duration_s=options.duration_s,
                        connections=options.connections,
                    )
                    load = run_load(
                        spec, meter=server.cpu_seconds, metrics_url=server.metrics_url()
                    )
                    points.append(
                        {"model": model, "concurrency": concurrency, "trial": trial, **asdict(load)}
                    )
                    print(
                        f"{model} c={concurrency} trial {trial + 1}: "
                        f"{load.requests_per_s:,.0f} requests/s, p99 {load.p99_ms:.2f} ms",
                        file=sys.stderr,
                        flush=True,
                    )
    summary = summarize(points, "model", MODELS, options.concurrencies)
    top = str(max(options.concurrencies))
    at_top = summary[top]
    return {
        "options": asdict(options),
        "config": str(CONFIG.relative_to(CONFIG.parents[1])),
        "note": "client processes and the server share the machine's cores",
        "points": points,
        "summary": summary,
        "speedup_at_top": divide(
            at_top[BATCHED]["requests_per_s"], at_top[UNBATCHED]["requests_per_s"]
        ),
        "ceiling_ratio_at_top": divide(
            at_top[BATCHED]["requests_per_s"], at_top[CEILING]["requests_per_s"]
        ),
        "goal_speedup": GOAL_SPEEDUP,
        "goal_ceiling_ratio": GOAL_CEILING_RATIO,
    }


def render(report: dict[str, Any]) -> str:
    """The report as Markdown: one row per concurrency and model, then the goals."""
    options = report["options"]
    lines = [
        f"## gpu_sim: {SUMMARY}",
        "",
        f"1x{options['elements']} FP32 requests, {options['clients']} client processes, "
        f"{options['trials']} trials per point, {options['warmup_s']:g} s warm-up + "
        f"{options['duration_s']:g} s window; medians over trials. Server: `{report['config']}`.",
        f"Machine: {one_line(report['machine'])}; clients and server share its cores.",
        "",
    ]
    lines += table(report["summary"], MODELS, LABELS, "model")
    top = max(int(c) for c in report["summary"])
    speedup, ceiling = report["speedup_at_top"], report["ceiling_ratio_at_top"]
    lines += [
        "",
        f"**At concurrency {top}: batching on / off {number(speedup, 1)}x** (goal >= "
        f"{report['goal_speedup']:g}x); **batching on / identity ceiling "
        f"{number(ceiling, 2)}** (goal >= {report['goal_ceiling_ratio']:g}).",
    ]
    return "\n".join(lines)
