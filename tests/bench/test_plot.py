"""The throughput vs p99 plot: points found in both report shapes, a real PNG written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.image

from bench.plot import draw, series

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _sweep_report() -> dict[str, Any]:
    points = [
        {"model": model, "concurrency": c, "requests_per_s": rps, "p99_ms": p99}
        for model, c, rps, p99 in [
            ("gpu_sim", 64, 3000.0, 40.0),
            ("gpu_sim", 1, 150.0, 8.0),
            ("gpu_sim_unbatched", 1, 150.0, 7.5),
            ("gpu_sim_unbatched", 64, 170.0, 380.0),
        ]
    ]
    points.append({"model": "identity", "concurrency": 1, "requests_per_s": 0.0, "p99_ms": None})
    return {"scenario": "gpu_sim", "started_utc": "20260101T000000Z", "points": points}


def test_series_reads_sweep_points_per_side_ascending() -> None:
    assert series(_sweep_report()) == {
        "gpu_sim": [(150.0, 8.0), (3000.0, 40.0)],
        "gpu_sim_unbatched": [(150.0, 7.5), (170.0, 380.0)],
    }


def test_series_reads_trials_with_a_load() -> None:
    report = {
        "trials": [
            {"side": "headrace", "load": {"requests_per_s": 2700.0, "p99_ms": 8.5}},
            {"side": "bare", "load": {"requests_per_s": 3000.0, "p99_ms": 8.9}},
        ]
    }
    assert series(report) == {"headrace": [(2700.0, 8.5)], "bare": [(3000.0, 8.9)]}


def test_draw_writes_a_png_matplotlib_reads_back(tmp_path: Path) -> None:
    path = draw(_sweep_report(), tmp_path / "gpu_sim.png")
    assert path == tmp_path / "gpu_sim.png"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width, _channels = matplotlib.image.imread(path).shape
    assert (width, height) == (700, 450)


def test_no_points_no_plot(tmp_path: Path) -> None:
    assert draw({"scenario": "x", "points": []}, tmp_path / "x.png") is None
    assert not (tmp_path / "x.png").exists()
