"""Scenario `gpu_sim`: what dynamic batching buys when the model's cost is per execution.

One Headrace process serves configs/gpu_sim.yaml: `gpu_sim` (5 ms per execution plus 20 us
per item, one execution at a time) behind the batcher, `gpu_sim_unbatched` (the same model,
one request per execution: no batching) and `identity` (no model cost: Headrace's own
ceiling). At each concurrency the three are measured back to back with the same client and
request, in an order that alternates between trials.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.frontend import HOST, METHOD, check_identity_reply, identity_request
from bench.loadgen import LoadSpec, run_load
from bench.machine import one_line
from bench.server_process import ServerProcess

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


@dataclass(frozen=True, slots=True)
class GpuSimOptions:
    """The scenario's knobs; the defaults are the standard run."""

    concurrencies: tuple[int, ...] = (1, 16, 64, 256)
    trials: int = 2
    """Trials per model and concurrency."""
    duration_s: float = 3.0
    warmup_s: float = 1.0
    clients: int = 2
    elements: int = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The scenario's command-line options, defaulting to `GpuSimOptions()`."""
    defaults = GpuSimOptions()
    parser.add_argument(
        "--concurrencies",
        type=lambda text: tuple(int(part) for part in text.split(",")),
        default=defaults.concurrencies,
        help="comma-separated concurrency levels",
    )
    parser.add_argument("--trials", type=int, default=defaults.trials, help="trials per point")
    parser.add_argument("--duration-s", type=float, default=defaults.duration_s)
    parser.add_argument("--warmup-s", type=float, default=defaults.warmup_s)
    parser.add_argument("--clients", type=int, default=defaults.clients)
    parser.add_argument("--elements", type=int, default=defaults.elements)


def options_from(arguments: argparse.Namespace) -> GpuSimOptions:
    """The options `add_arguments` parsed.

    Raises:
        ValueError: a count below 1, a negative warm-up or an empty window.
    """
    options = GpuSimOptions(
        concurrencies=arguments.concurrencies,
        trials=arguments.trials,
        duration_s=arguments.duration_s,
        warmup_s=arguments.warmup_s,
        clients=arguments.clients,
        elements=arguments.elements,
    )
    if min(options.trials, options.clients, options.elements, *options.concurrencies) < 1:
        raise ValueError("counts and concurrencies must be >= 1")
    if options.warmup_s < 0 or options.duration_s <= 0:
        raise ValueError("--warmup-s must be >= 0 and --duration-s > 0")
    return options


def run(options: GpuSimOptions, results_dir: Path, stamp: str) -> dict[str, Any]:
    """Run the scenario; returns every number, JSON-ready. The server is stopped on return,
    on errors and on KeyboardInterrupt.

    Raises:
        RuntimeError: the server did not start.
        LoadError: a client failed (a wrong reply included).
    """
    argv = [sys.executable, "-m", "headrace", "serve", "--config", str(CONFIG)]
    argv += ["--host", HOST, "--port", "0"]
    server = ServerProcess("headrace", argv, results_dir / f"gpu_sim-{stamp}-headrace.log")
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
                    )
                    load = run_load(spec, meter=server.cpu_seconds)
                    points.append(
                        {"model": model, "concurrency": concurrency, "trial": trial, **asdict(load)}
                    )
                    print(
                        f"{model} c={concurrency} trial {trial + 1}: "
                        f"{load.requests_per_s:,.0f} requests/s, p99 {load.p99_ms:.2f} ms",
                        file=sys.stderr,
                        flush=True,
                    )
    summary = _summary(points, options.concurrencies)
    top = str(max(options.concurrencies))
    at_top = summary[top]
    return {
        "options": asdict(options),
        "config": str(CONFIG.relative_to(CONFIG.parents[1])),
        "note": "client processes and the server share the machine's cores",
        "points": points,
        "summary": summary,
        "speedup_at_top": _divide(
            at_top[BATCHED]["requests_per_s"], at_top[UNBATCHED]["requests_per_s"]
        ),
        "ceiling_ratio_at_top": _divide(
            at_top[BATCHED]["requests_per_s"], at_top[CEILING]["requests_per_s"]
        ),
        "goal_speedup": GOAL_SPEEDUP,
        "goal_ceiling_ratio": GOAL_CEILING_RATIO,
    }


def _divide(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def _summary(points: list[dict[str, Any]], concurrencies: tuple[int, ...]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for concurrency in concurrencies:
        summary[str(concurrency)] = {}
        for model in MODELS:
            mine = [p for p in points if p["model"] == model and p["concurrency"] == concurrency]
            errors: dict[str, int] = {}
            for point in mine:
                for code, count in point["errors"].items():
                    errors[code] = errors.get(code, 0) + count
            summary[str(concurrency)][model] = {
                "requests_per_s": statistics.median(p["requests_per_s"] for p in mine),
                "p50_ms": statistics.median(p["p50_ms"] for p in mine),
                "p99_ms": statistics.median(p["p99_ms"] for p in mine),
                "errors": errors,
            }
    return summary


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


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
        "| concurrency | model | requests/s | p50 ms | p99 ms | errors |",
        "|--:|---|--:|--:|--:|--:|",
    ]
    for concurrency, models in report["summary"].items():
        for model in MODELS:
            point = models[model]
            errors = ", ".join(f"{code} {n}" for code, n in point["errors"].items()) or "0"
            lines.append(
                f"| {concurrency} | {LABELS[model]} | {_number(point['requests_per_s'], 0)} "
                f"| {_number(point['p50_ms'], 2)} | {_number(point['p99_ms'], 2)} | {errors} |"
            )
    top = max(int(c) for c in report["summary"])
    speedup, ceiling = report["speedup_at_top"], report["ceiling_ratio_at_top"]
    lines += [
        "",
        f"**At concurrency {top}: batching on / off {_number(speedup, 1)}x** (goal >= "
        f"{report['goal_speedup']:g}x); **batching on / identity ceiling "
        f"{_number(ceiling, 2)}** (goal >= {report['goal_ceiling_ratio']:g}).",
    ]
    return "\n".join(lines)
