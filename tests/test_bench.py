"""The benchmarks run end to end (tiny settings): servers start, replies are verified, the
report is written as JSON, Markdown and a PNG plot. They assert no timings: speed is measured
in bench/, never in tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--trials", "1", "--warmup-s", "0.2", "--duration-s", "0.4", "--clients", "1"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _results_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reports and server logs of these runs go to a temporary folder, not bench/results/."""
    monkeypatch.setenv("BENCH_RESULTS_DIR", str(tmp_path / "results"))


def _run_keeping_files(*arguments: str) -> tuple[str, dict[str, Any], Path]:
    """stdout, the JSON report, and the results' path without suffix (SCENARIO-STAMP)."""
    result = subprocess.run(
        [sys.executable, "-m", "bench", *arguments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    report_path = Path(result.stdout.rsplit("Every number: ", 1)[1].strip())
    return result.stdout, json.loads(report_path.read_text()), report_path.with_suffix("")


def _run(*arguments: str) -> tuple[str, dict[str, Any]]:
    output, report, base = _run_keeping_files(*arguments)
    for suffix in (".json", ".md", ".png"):
        base.with_suffix(suffix).unlink(missing_ok=True)
    return output, report


def test_stream_scenario_writes_json_markdown_and_a_png() -> None:
    output, report, base = _run_keeping_files("stream", *QUICK, "--concurrency", "2")
    try:
        assert report["scenario"] == "stream"
        assert report["machine"]["nproc"] >= 1
        assert [trial["side"] for trial in report["trials"]] == ["unary", "stream"]
        for trial in report["trials"]:
            load = trial["load"]
            assert load["completed"] > 0
            assert not load["errors"]
            for key in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "server_cpu_ms_per_request"):
                assert load[key] > 0
        markdown = base.with_suffix(".md").read_text()
        assert markdown in output
        assert markdown.startswith("## stream:")
        table = [line for line in markdown.splitlines() if line.startswith("| ")]
        header_cells = table[0].count("|")
        assert len(table) == 3  # header + one row per side (the separator starts "|--")
        assert all(line.count("|") == header_cells for line in table)
        png = base.with_suffix(".png")
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        assert matplotlib.image.imread(png).ndim == 3
    finally:
        for suffix in (".json", ".md", ".png"):
            base.with_suffix(suffix).unlink(missing_ok=True)


def test_open_loop_scenario_runs() -> None:
    output, report = _run(
        "open_loop", *QUICK, "--rates", "100", "--max-in-flight", "8", "--seed", "3"
    )
    assert "scheduled/s" in output
    assert [(p["side"], p["rate"]) for p in report["points"]] == [
        ("headrace", 100.0),
        ("bare", 100.0),
    ]
    headrace, bare = report["points"]
    # The same seeded schedule for both servers.
    assert headrace["offered_per_s"] == bare["offered_per_s"] > 0
    for point in report["points"]:
        assert point["completed"] > 0
        assert not point["errors"]


def test_frontend_scenario_runs() -> None:
    output, report = _run("frontend", *QUICK, "--concurrency", "2")
    assert "Headrace / bare requests/s" in output
    assert report["scenario"] == "frontend"
    for trial in report["trials"]:
        assert trial["load"]["completed"] > 0
        assert not trial["load"]["errors"]


@pytest.mark.timeout(240)
def test_gpu_sim_scenario_runs() -> None:
    output, report = _run("gpu_sim", *QUICK, "--concurrencies", "1,4")
    assert "batching on / off" in output
    assert [(p["model"], p["concurrency"]) for p in report["points"]] == [
        (model, concurrency)
        for concurrency in (1, 4)
        for model in ("gpu_sim_unbatched", "gpu_sim", "identity")
    ]
    for point in report["points"]:
        assert point["completed"] > 0
        assert not point["errors"]
        # Read from the server's /metrics: one item per execution without the batcher.
        assert point["batching"]["batches"] > 0
        if point["model"] != "gpu_sim":
            assert point["batching"]["mean_batch_size"] == 1.0


def test_telemetry_scenario_runs() -> None:
    output, report = _run("telemetry", *QUICK, "--concurrency", "2")
    assert "tracing on" in output
    assert [trial["side"] for trial in report["trials"]] == ["off", "tracing", "metrics"]
    for trial in report["trials"]:
        assert trial["load"]["completed"] > 0
        assert not trial["load"]["errors"]
    # Two spans per traced request (server, backend); shutdown flushed them all.
    traced = next(t for t in report["trials"] if t["side"] == "tracing")
    assert report["spans_received"] >= 2 * traced["load"]["completed"]


@pytest.mark.timeout(240)
def test_capture_scenario_runs() -> None:
    output, report = _run("capture", *QUICK, "--concurrency", "2")
    assert "Capture on / off" in output
    assert [trial["side"] for trial in report["trials"]] == ["off", "on"]
    for trial in report["trials"]:
        assert trial["load"]["completed"] > 0
        assert not trial["load"]["errors"]
    captured = next(t for t in report["trials"] if t["side"] == "on")["capture"]
    assert captured["dropped"] == 0
    # The graceful stop stored what was spooled: the bucket holds Parquet files.
    assert report["objects_stored"] > 0


@pytest.mark.timeout(240)
def test_capture_scenario_runs_with_h2load() -> None:
    # h2load's calls are checked against the server's own counters on both sides.
    output, report = _run("capture", *QUICK, "--concurrency", "2", "--client", "h2load")
    assert "Load from h2load" in output
    assert report["load_generator"] == "h2load"
    for trial in report["trials"]:
        assert trial["load"]["completed"] > 0
        assert not trial["load"]["errors"]


@pytest.mark.timeout(240)
def test_triton_scenario_runs() -> None:
    output, report = _run("triton", *QUICK, "--concurrencies", "2")
    assert "Headrace / direct unbatched" in output
    assert {point["side"] for point in report["points"]} == {"direct", "triton_batched", "headrace"}
    for point in report["points"]:
        assert point["completed"] > 0
        assert not point["errors"]
        assert (point["batching"] is not None) == (point["side"] == "headrace")


@pytest.mark.timeout(240)
def test_shared_memory_scenario_runs() -> None:
    output, report = _run(
        "shared_memory", *QUICK, "--concurrencies", "1,2", "--elements", str(64 * 1024)
    )
    assert "Shared memory / bytes requests/s" in output
    assert [(p["model"], p["concurrency"]) for p in report["points"]] == [
        ("identity_shm", 1),
        ("identity_bytes", 1),
        ("triton_direct", 1),
        ("identity_shm", 2),
        ("identity_bytes", 2),
        ("triton_direct", 2),
    ]
    assert set(report["vs_direct"]["1"]) == {"identity_shm", "identity_bytes"}
    for point in report["points"]:
        assert point["completed"] > 0
        assert not point["errors"]


def test_workers_scenario_runs() -> None:
    output, report = _run("workers", *QUICK, "--concurrency", "4", "--connections", "2")
    assert "2 workers / 1 worker requests/s" in output
    assert [trial["workers"] for trial in report["trials"]] == [1, 2]
    for trial in report["trials"]:
        assert trial["load"]["completed"] > 0
        assert not trial["load"]["errors"]
        # The meter counts the supervisor's workers too: a server that answered used CPU.
        assert trial["server_cpu_ms_per_request"] > 0


def test_overload_scenario_runs() -> None:
    output, report = _run(
        "overload",
        "--warmup-s",
        "0.2",
        "--duration-s",
        "0.5",
        "--clients",
        "1",
        "--capacity-concurrency",
        "4",
        "--overload-ratios",
        "10",
        "--storm-concurrency",
        "16",
        "--queue-size",
        "4",
        "--max-inflight-requests",
        "4",
    )
    assert "offered vs capacity" in output
    assert "retry storm" in output
    for model in ("batched", "unbatched"):
        row = report["models"][model]
        assert row["capacity"]["load"]["completed"] > 0
        [point] = row["open_loop"]
        for overloaded in (point, row["retry_storm"]):
            assert overloaded["load"]["completed"] > 0
            # Far more offered than served is refused, and refused with nothing but
            # RESOURCE_EXHAUSTED; each refusal's time is measured.
            assert overloaded["refused"] > 0
            assert overloaded["other_errors"] == 0
            assert overloaded["load"]["error_p99_ms"] is not None
        # The open loop offers its rate whatever comes back.
        assert point["load"]["offered_per_s"] > 0


def test_soak_runs_ten_seconds_without_errors_or_runaway_memory() -> None:
    output, report = _run("soak", "--duration-s", "10", "--window-s", "2", "--warmup-s", "1")
    assert "server RSS" in output
    assert len(report["windows"]) == 5
    assert report["completed"] > 0
    assert report["errors"] == {}
    # Generous on purpose: this catches a runaway (every request's tensors kept), not a slow
    # drift, which `make soak` measures over half an hour.
    assert report["rss_growth_kib"] < 64 * 1024


@pytest.mark.timeout(240)
def test_backtest_scenario_runs() -> None:
    output, report = _run("backtest", "--records", "300", "--batch-size", "32")
    assert "calls/s" in output
    assert report["options"]["records"] == 300
    assert report["max_rel_error"] < 1e-4
    assert Path(report["report"]).is_file()
