"""What the concurrency-sweep scenarios (`gpu_sim`, `triton`) share: their options, and the
medians per concurrency and side they report."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from bench.options import add_options, check_window, options_of
from bench.stats import median


@dataclass(frozen=True, slots=True)
class SweepOptions:
    """A sweep's knobs; the defaults are the standard run."""

    concurrencies: tuple[int, ...] = (1, 16, 64, 256)
    trials: int = 2
    """Trials per side and concurrency; the order of the sides reverses between trials."""
    duration_s: float = 3.0
    warmup_s: float = 1.0
    clients: int = 2
    """Client processes (at most the concurrency)."""
    elements: int = 16
    """FP32 values in INPUT0 (batch 1)."""
    headrace_workers: int = 1
    """Headrace worker processes (`headrace serve --workers N`)."""
    connections: int = 1
    """Connections per client process (several reach several Headrace workers)."""


_HELP = {
    "concurrencies": "comma-separated concurrency levels",
    "trials": "trials per point",
    "headrace_workers": "Headrace worker processes (serve --workers N); use with --connections",
    "connections": "connections per client process, the same on every side",
}


def add_arguments(parser: argparse.ArgumentParser, defaults: SweepOptions | None = None) -> None:
    """A sweep's command-line options, defaulting to `defaults` (else `SweepOptions()`)."""
    add_options(parser, defaults or SweepOptions(), _HELP)


def options_from(arguments: argparse.Namespace) -> SweepOptions:
    """The options `add_arguments` parsed.

    Raises:
        ValueError: a count below 1, a negative warm-up or an empty window.
    """
    options = options_of(SweepOptions, arguments)
    counts = (options.headrace_workers, options.connections, *options.concurrencies)
    if min(options.trials, options.clients, options.elements, *counts) < 1:
        raise ValueError("counts and concurrencies must be >= 1")
    check_window(options.warmup_s, options.duration_s)
    return options


MEDIAN_KEYS = (
    "requests_per_s",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "p999_ms",
    "server_cpu_ms_per_request",
    "client_cpu_ms_per_request",
)
BATCHING_KEYS = ("mean_batch_size", "mean_queue_ms", "mean_backend_ms")
"""From the server's /metrics (`LoadResult.batching`), where the side had it."""


def summarize(
    points: list[dict[str, Any]], key: str, sides: tuple[str, ...], concurrencies: tuple[int, ...]
) -> dict[str, Any]:
    """Medians over trials of requests/s, latency percentiles, CPU per request and (where
    read) batch size and queue/backend time, and summed errors, for each concurrency (as a
    string, for JSON) and side (`point[key]`)."""
    summary: dict[str, Any] = {}
    for concurrency in concurrencies:
        summary[str(concurrency)] = {}
        for side in sides:
            mine = [p for p in points if p[key] == side and p["concurrency"] == concurrency]
            errors: dict[str, int] = {}
            for point in mine:
                for code, count in point["errors"].items():
                    errors[code] = errors.get(code, 0) + count
            row: dict[str, Any] = {
                name: median([p.get(name) for p in mine]) for name in MEDIAN_KEYS
            }
            for name in BATCHING_KEYS:
                row[name] = median([(p.get("batching") or {}).get(name) for p in mine])
            row["errors"] = errors
            summary[str(concurrency)][side] = row
    return summary


def divide(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(
    summary: dict[str, Any], sides: tuple[str, ...], labels: dict[str, str], column: str
) -> list[str]:
    """The summary as Markdown table lines, one row per concurrency and side. Batch size,
    queue and backend time come from the server's /metrics ("-" where it was not read)."""
    lines = [
        f"| concurrency | {column} | requests/s | p50 ms | p99 ms | p99.9 ms "
        "| server CPU ms/request | mean batch | queue ms | backend ms | errors |",
        "|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for concurrency, by_side in summary.items():
        for side in sides:
            point = by_side[side]
            errors = ", ".join(f"{code} {n}" for code, n in point["errors"].items()) or "0"
            lines.append(
                f"| {concurrency} | {labels[side]} | {number(point['requests_per_s'], 0)} "
                f"| {number(point['p50_ms'], 2)} | {number(point['p99_ms'], 2)} "
                f"| {number(point.get('p999_ms'), 2)} "
                f"| {number(point.get('server_cpu_ms_per_request'), 3)} "
                f"| {number(point.get('mean_batch_size'), 1)} "
                f"| {number(point.get('mean_queue_ms'), 2)} "
                f"| {number(point.get('mean_backend_ms'), 2)} | {errors} |"
            )
    return lines
