"""Backtests of the example sales forecast against other versions served by one Headrace:
a perturbed version shows its difference and its size, an identical one none."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from headrace.analysis.backtest import run_backtest
from headrace.analysis.calls import CapturedCall, captured_calls
from headrace.analysis.comparison import Thresholds
from headrace.analysis.replay import Target
from headrace.cli import main
from headrace.examples.sales_forecast import WEIGHTS_PATH, synthetic_sales
from tests.analysis.traffic import (
    BIAS_SHIFT,
    MODEL,
    assert_valid_png,
    capture_calls,
    perturbed_weights,
    sales_version,
    write_captures,
)
from tests.conftest import ServerThread, server_with

ROWS = 600


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """sales_forecast 1 (the example), 2 (output bias + BIAS_SHIFT), 3 (identical weights)."""
    directory = tmp_path_factory.mktemp("weights")
    with server_with(
        sales_version("2", perturbed_weights(directory)), sales_version("3", WEIGHTS_PATH)
    ) as server:
        yield server


@pytest.fixture(scope="module")
def captured(
    versions: ServerThread, tmp_path_factory: pytest.TempPathFactory
) -> list[CapturedCall]:
    """Calls of 1 to 5 rows answered by version 1, stored and read back as captures."""
    features, _ = synthetic_sales(ROWS, seed=11)
    records = []
    start = 0
    for size in [1, 2, 3, 4, 5] * 100:
        if start >= ROWS:
            break
        records += capture_calls(versions, features[start : start + size], size)
        start += size
    folder = tmp_path_factory.mktemp("captures")
    write_captures(folder, records)
    return list(captured_calls(str(folder), MODEL))


def _target(server: ServerThread, version: str) -> Target:
    return Target(server.address, MODEL, version)


def test_identical_version_shows_no_difference(
    versions: ServerThread, captured: list[CapturedCall], tmp_path: Path
) -> None:
    # One call at a time, each as captured: the same float32 math bit for bit.
    outcome = run_backtest(
        captured,
        _target(versions, "3"),
        tmp_path,
        Thresholds(max_abs_error=0.0, max_rel_error=0.0),
        batch_size=1,
        concurrency=1,
    )
    forecast = outcome.summary["outputs"]["FORECAST"]
    assert outcome.passed, outcome.summary["violations"]
    assert outcome.summary["calls"] == len(captured)
    assert forecast["elements"] == ROWS
    assert forecast["max_abs_error"] == 0
    assert forecast["equal_share"] == 1
    assert outcome.summary["failures"] == {}


def test_batched_replay_of_an_identical_version_differs_by_rounding_only(
    versions: ServerThread, captured: list[CapturedCall], tmp_path: Path
) -> None:
    # Joined calls run as larger matrix products, whose float32 sums round differently.
    outcome = run_backtest(
        captured,
        _target(versions, "3"),
        tmp_path,
        Thresholds(max_rel_error=1e-5),
        batch_size=64,
        concurrency=4,
    )
    assert outcome.passed, outcome.summary["violations"]
    assert outcome.summary["calls"] == len(captured)
    assert outcome.summary["outputs"]["FORECAST"]["elements"] == ROWS


def test_perturbed_version_shows_the_difference_and_its_size(
    versions: ServerThread, captured: list[CapturedCall], tmp_path: Path
) -> None:
    outcome = run_backtest(
        captured,
        _target(versions, "2"),
        tmp_path,
        Thresholds(max_abs_error=1.0),
        batch_size=32,
        concurrency=4,
    )
    forecast = outcome.summary["outputs"]["FORECAST"]
    # The output bias moved by BIAS_SHIFT; only forecasts clipped at 0 move by less.
    assert forecast["max_abs_error"] == pytest.approx(BIAS_SHIFT, abs=1e-3)
    assert BIAS_SHIFT * 0.9 < forecast["mean_abs_error"] <= BIAS_SHIFT + 1e-3
    assert not outcome.passed
    assert outcome.summary["violations"] == [
        f"FORECAST: max absolute error {forecast['max_abs_error']:.6g} > 1"
    ]

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["outputs"]["FORECAST"]["max_abs_error"] == forecast["max_abs_error"]
    assert summary["passed"] is False
    assert "FAILED" in (tmp_path / "report.md").read_text()
    page = (tmp_path / "report.html").read_text()
    for plot in ("error_FORECAST.png", "scatter_FORECAST.png", "latency.png"):
        assert f"src='{plot}'" in page
        assert_valid_png(tmp_path / plot)


def test_an_unreachable_candidate_is_a_usage_error(tmp_path: Path) -> None:
    code = main(
        [
            "backtest",
            "--captures",
            str(tmp_path),
            "--model",
            MODEL,
            "--candidate",
            "127.0.0.1:1",
            "--output",
            str(tmp_path / "report"),
            "--no-progress",
        ]
    )
    assert code == 2


def test_missing_arguments_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["backtest", "--model", MODEL, "--candidate", "127.0.0.1:1"])
    assert exit_info.value.code == 2
