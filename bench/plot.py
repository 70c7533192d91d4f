"""Throughput vs p99 latency, one PNG per scenario run, next to its JSON.

Every scenario's report carries its load points in one of two shapes, which `series` reads:
`points` (a list of flat dicts with `requests_per_s`, `p99_ms` and a side key such as `side`
or `model`, as the sweeps write) or `trials` (dicts with a side and a `load` dict, as
`frontend` and `telemetry` write). A scenario with another shape may define
`series(report)` itself; `python -m bench` then uses that.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server or in CI

import matplotlib.pyplot as plt  # after use(): the backend is chosen first
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

SIDE_KEYS = ("side", "model", "mode", "path", "variant", "config")
"""Keys naming the side a load point belongs to, tried in this order."""

Series = dict[str, list[tuple[float, float]]]
"""Side label -> (requests/s, p99 ms) points."""


def _side_of(point: dict[str, Any]) -> str:
    for key in SIDE_KEYS:
        value = point.get(key)
        if isinstance(value, str):
            return value
    return "all"


def _load_of(point: dict[str, Any]) -> dict[str, Any]:
    load = point.get("load")
    return load if isinstance(load, dict) else point


def series(report: dict[str, Any]) -> Series:
    """Each side's (requests/s, p99 ms) points in `report`, one per trial and load level,
    ascending by requests/s. Points without a p99 (nothing completed) are left out."""
    found: Series = {}
    for key in ("points", "trials"):
        entries = report.get(key)
        if not isinstance(entries, list):
            continue
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            load = _load_of(entry)
            throughput, p99 = load.get("requests_per_s"), load.get("p99_ms")
            if isinstance(throughput, int | float) and isinstance(p99, int | float):
                found.setdefault(_side_of(entry), []).append((float(throughput), float(p99)))
    return {side: sorted(points) for side, points in found.items()}


def draw(
    report: dict[str, Any],
    path: Path,
    series_of: Callable[[dict[str, Any]], Series] = series,
) -> Path | None:
    """Write the scenario's throughput vs p99 plot to `path` (PNG); None, and no file, when
    the report has no load points."""
    lines = series_of(report)
    if not lines:
        return None
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=100)
    try:
        for side, points in lines.items():
            throughputs = [point[0] for point in points]
            latencies = [point[1] for point in points]
            axes.plot(throughputs, latencies, marker="o", linestyle="-", label=side)
        axes.set_xlabel("requests/s")
        axes.set_ylabel("p99 latency, ms")
        if min(p99 for points in lines.values() for _, p99 in points) > 0:
            axes.set_yscale("log")  # p99 spans decades between the sides of a sweep
            axes.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            axes.yaxis.set_major_formatter(ScalarFormatter())
            axes.yaxis.set_minor_formatter(NullFormatter())
        axes.set_title(f"{report.get('scenario', '')}: throughput vs p99 latency")
        axes.grid(visible=True, which="both", alpha=0.3)
        axes.legend(fontsize="small")
        machine = report.get("machine", {})
        axes.annotate(
            f"{report.get('started_utc', '')}  {machine.get('nproc', '?')} CPUs",
            xy=(0.99, 0.01),
            xycoords="figure fraction",
            ha="right",
            fontsize="x-small",
            color="grey",
        )
        figure.tight_layout()
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)
    return path
