"""The benchmark runs end to end (tiny settings): servers start, replies are verified, the
report is written. It asserts no timings: speed is measured in bench/, never in tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_frontend_scenario_runs() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "frontend",
            "--trials",
            "1",
            "--warmup-s",
            "0.3",
            "--duration-s",
            "0.5",
            "--concurrency",
            "2",
            "--clients",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Headrace / bare requests/s" in result.stdout
    report_path = Path(result.stdout.rsplit("Every number: ", 1)[1].strip())
    report = json.loads(report_path.read_text())
    report_path.unlink()
    assert report["scenario"] == "frontend"
    assert all(
        trial["load"]["completed"] > 0 and not trial["load"]["errors"] for trial in report["trials"]
    ), report["trials"]
