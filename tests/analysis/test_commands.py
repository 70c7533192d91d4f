"""`headrace backtest` and `headrace drift` on real capture files (written by the capture
writer from calls a real Headrace answered): exit codes, reports, shadow pairs."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from headrace.analysis.drift import Profile
from headrace.cli import main
from headrace.config import Settings
from headrace.examples.sales_forecast import WEIGHTS_PATH, synthetic_sales
from tests.analysis.traffic import (
    BIAS_SHIFT,
    MODEL,
    RecordSink,
    assert_valid_png,
    capture_calls,
    perturbed_weights,
    sales_version,
    write_captures,
)
from tests.certificates import Authority, write_issued
from tests.conftest import ServerThread, make_settings

ROWS = 400
ROWS_PER_CALL = 4


@dataclass
class Captured:
    server: ServerThread
    folder: Path
    """Captures of version 1's calls and of their shadow calls to version 2."""
    shifted: Path
    """Captures of version 1's calls with one feature shifted."""


@pytest.fixture(scope="module")
def captured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Captured]:
    """sales_forecast 1 (shadowed by 2), 2 (output bias + BIAS_SHIFT), 3 (identical to 1)."""
    directory = tmp_path_factory.mktemp("captures")
    tree: dict[str, Any] = make_settings().model_dump(mode="json")
    for model in tree["models"]:
        if model["name"] == MODEL:
            model["shadow"] = {"version": "2"}
    tree["models"] += [
        sales_version("2", perturbed_weights(directory)),
        sales_version("3", WEIGHTS_PATH),
    ]
    server = ServerThread(Settings.model_validate(tree))
    sink = RecordSink()
    shadows = sink.records
    server.application.capture_sink = sink
    with server:
        features, _ = synthetic_sales(ROWS, seed=51)
        primaries = capture_calls(server, features, ROWS_PER_CALL)
        for _ in range(600):
            if len(shadows) == len(primaries):
                break
            time.sleep(0.05)
        assert len(shadows) == len(primaries)
        folder = directory / "store"
        write_captures(folder, [*primaries, *shadows])
        shifted_features, _ = synthetic_sales(ROWS, seed=52)
        shifted_features[:, 0] += 5  # dearer
        shifted = directory / "shifted"
        write_captures(shifted, capture_calls(server, shifted_features, ROWS_PER_CALL))
        yield Captured(server, folder, shifted)


def _backtest(captured: Captured, output: Path, *arguments: str) -> int:
    return main(
        [
            "backtest",
            "--captures",
            str(captured.folder),
            "--model",
            MODEL,
            "--output",
            str(output),
            "--no-progress",
            *arguments,
        ]
    )


def test_backtest_against_an_identical_version_passes(captured: Captured, tmp_path: Path) -> None:
    code = _backtest(
        captured,
        tmp_path,
        "--version",
        "1",
        "--candidate",
        captured.server.address,
        "--candidate-version",
        "3",
        "--concurrency",
        "1",
        "--max-abs-error",
        "0",
    )
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["calls"] == ROWS // ROWS_PER_CALL
    assert summary["outputs"]["FORECAST"]["max_abs_error"] == 0


def test_backtest_against_a_changed_version_fails_its_threshold(
    captured: Captured, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _backtest(
        captured,
        tmp_path,
        "--version",
        "1",
        "--candidate",
        captured.server.address,
        "--candidate-version",
        "2",
        "--batch-size",
        "32",
        "--max-abs-error",
        "1",
    )
    assert code == 1
    assert "FORECAST: max absolute error 5" in capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["outputs"]["FORECAST"]["max_abs_error"] == pytest.approx(BIAS_SHIFT, abs=1e-3)
    assert_valid_png(tmp_path / "scatter_FORECAST.png")


def test_backtest_of_an_empty_window_is_a_usage_error(captured: Captured, tmp_path: Path) -> None:
    code = _backtest(
        captured, tmp_path, "--since", "2100-01-01", "--candidate", captured.server.address
    )
    assert code == 2


def test_shadow_backtest_pairs_primary_and_shadow_captures(
    captured: Captured, tmp_path: Path
) -> None:
    assert _backtest(captured, tmp_path / "loose", "--shadow") == 0
    assert _backtest(captured, tmp_path / "strict", "--shadow", "--max-abs-error", "1") == 1
    summary = json.loads((tmp_path / "strict" / "summary.json").read_text())
    assert summary["calls"] == ROWS // ROWS_PER_CALL
    assert summary["primaries_without_shadow"] == 0
    assert summary["candidate"] == "shadow version 2"
    assert summary["outputs"]["FORECAST"]["max_abs_error"] == pytest.approx(BIAS_SHIFT, abs=1e-3)


def test_drift_profile_and_report_from_captures(captured: Captured, tmp_path: Path) -> None:
    profile_path = tmp_path / "profile.json"
    window = ["--model", MODEL, "--version", "1"]
    assert (
        main(
            [
                "drift",
                "profile",
                "--captures",
                str(captured.folder),
                *window,
                "--output",
                str(profile_path),
            ]
        )
        == 0
    )
    profile = Profile.load(profile_path)
    assert profile.rows == ROWS // ROWS_PER_CALL
    assert profile.features["input:FEATURES[0]"].count == ROWS
    assert "output:FORECAST[0]" in profile.features

    def report(source: Path, output: Path) -> int:
        return main(
            [
                "drift",
                "report",
                "--captures",
                str(source),
                *window,
                "--profile",
                str(profile_path),
                "--output",
                str(output),
            ]
        )

    assert report(captured.folder, tmp_path / "same") == 0
    assert report(captured.shifted, tmp_path / "shifted") == 1
    summary = json.loads((tmp_path / "shifted" / "summary.json").read_text())
    # The price rose: that feature drifted, and with it the forecast it drives.
    assert "input:FEATURES[0]" in summary["drifted"]
    assert not {f"input:FEATURES[{column}]" for column in range(1, 6)} & set(summary["drifted"])
    assert_valid_png(tmp_path / "shifted" / "feature_input_FEATURES_0.png")


def test_drift_profile_from_a_parquet_file(tmp_path: Path) -> None:
    features, units = synthetic_sales(1000, seed=53)
    path = tmp_path / "reference.parquet"
    pq.write_table(
        pa.table(
            {
                "FEATURES": pa.array(list(features), type=pa.list_(pa.float32(), 6)),
                "output:FORECAST": pa.array(units),
            }
        ),
        path,
    )
    output = tmp_path / "profile.json"
    assert (
        main(["drift", "profile", "--file", str(path), "--model", MODEL, "--output", str(output)])
        == 0
    )
    profile = Profile.load(output)
    assert profile.rows == 1000
    assert profile.features["input:FEATURES[5]"].mean == pytest.approx(features[:, 5].mean())
    assert profile.features["output:FORECAST"].mean == pytest.approx(np.mean(units), rel=1e-6)


def test_backtest_over_mutual_tls(captured: Captured, tmp_path: Path) -> None:
    authority = Authority("backtest test CA")
    cert, key = write_issued(tmp_path, authority.issue("headrace", server=True), "server")
    client_cert, client_key = write_issued(
        tmp_path, authority.issue("backtest", server=False), "client"
    )
    ca = tmp_path / "ca.crt"
    ca.write_bytes(authority.pem)
    settings = make_settings(
        **{"server.tls": {"cert_file": str(cert), "key_file": str(key), "client_ca_file": str(ca)}}
    )
    tls = ["--tls", "--tls-ca", str(ca)]
    with ServerThread(settings) as candidate:
        common = ["--version", "1", "--candidate", candidate.address, "--max-abs-error", "0"]
        common += ["--concurrency", "1"]
        assert _backtest(captured, tmp_path / "plain", *common) == 2
        assert _backtest(captured, tmp_path / "anonymous", *common, *tls) == 2
        client = ["--tls-cert", str(client_cert), "--tls-key", str(client_key)]
        assert _backtest(captured, tmp_path / "mutual", *common, *tls, *client) == 0
