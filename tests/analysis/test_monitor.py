"""Live drift in the server: traffic from the reference distribution keeps every feature's PSI
low; a shift of one feature raises that feature's PSI (and KS) alone, as Prometheus sees it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from headrace.analysis.drift import ProfileBuilder
from headrace.app import Application
from headrace.config import Settings
from headrace.errors import ConfigError
from headrace.examples.sales_forecast import synthetic_sales
from tests.analysis.traffic import MODEL, features_request, infer, sample_value, scrape
from tests.conftest import ServerThread, make_settings

WINDOW_ROWS = 1000
ROWS_PER_CALL = 50
SHIFTED = 3  # store_area_m2
PSI_STABLE = 0.1
PSI_DRIFTED = 0.25


@pytest.fixture(scope="module")
def monitored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    reference, _ = synthetic_sales(20_000, seed=21)
    builder = ProfileBuilder(MODEL, "1")
    builder.add_tensors("input", {"FEATURES": reference})
    profile_path = tmp_path_factory.mktemp("drift") / "profile.json"
    builder.build().save(profile_path)
    tree: dict[str, Any] = make_settings(
        metrics={"enabled": True, "host": "127.0.0.1", "port": 0}
    ).model_dump(mode="json")
    for model in tree["models"]:
        if model["name"] == MODEL:
            model["drift"] = {
                "profile_path": str(profile_path),
                "window_rows": WINDOW_ROWS,
                "min_rows": 200,
                "update_interval_s": 0.05,
            }
    with ServerThread(Settings.model_validate(tree)) as server:
        yield server


def _send(server: ServerThread, features: np.ndarray) -> None:
    for start in range(0, len(features), ROWS_PER_CALL):
        infer(server, features_request(features[start : start + ROWS_PER_CALL]))


def _wait_for_rows(server: ServerThread, rows: int) -> dict[str, tuple[float, float]]:
    """PSI and KS per feature once the gauges were computed over `rows` rows in all."""
    for _ in range(600):
        samples = scrape(server)
        taken = sample_value(samples, "headrace_drift_rows_total", model=MODEL, version="1")
        if taken == rows:
            result = {}
            for column in range(6):
                feature = f"input:FEATURES[{column}]"
                labels = {"model": MODEL, "version": "1", "feature": feature}
                psi = sample_value(samples, "headrace_drift_psi", **labels)
                ks = sample_value(samples, "headrace_drift_ks", **labels)
                assert psi is not None
                assert ks is not None
                result[feature] = (psi, ks)
            return result
        time.sleep(0.05)
    raise AssertionError(f"the drift worker never took {rows} rows")


def test_reference_traffic_stays_stable_and_a_shifted_feature_drifts_alone(
    monitored: ServerThread,
) -> None:
    current, _ = synthetic_sales(WINDOW_ROWS, seed=22)
    _send(monitored, current)
    stable = _wait_for_rows(monitored, WINDOW_ROWS)
    for feature, (psi, ks) in stable.items():
        assert psi < PSI_STABLE, feature
        assert ks < 0.1, feature

    shifted, _ = synthetic_sales(WINDOW_ROWS, seed=23)
    shifted[:, SHIFTED] *= 1.6  # larger stores; the window now holds only these
    _send(monitored, shifted)
    drifted = _wait_for_rows(monitored, 2 * WINDOW_ROWS)
    for feature, (psi, ks) in drifted.items():
        if feature == f"input:FEATURES[{SHIFTED}]":
            assert psi > PSI_DRIFTED
            assert ks > 0.2
        else:
            assert psi < PSI_STABLE, feature
    samples = scrape(monitored)
    assert sample_value(samples, "headrace_drift_window_rows", model=MODEL, version="1") == (
        WINDOW_ROWS
    )
    assert sample_value(samples, "headrace_drift_dropped_total", model=MODEL, version="1") == 0


async def test_a_missing_profile_stops_start_up(tmp_path: Path) -> None:
    tree: dict[str, Any] = make_settings().model_dump(mode="json")
    for model in tree["models"]:
        if model["name"] == MODEL:
            model["drift"] = {"profile_path": str(tmp_path / "missing.json")}
    application = Application(Settings.model_validate(tree))
    with pytest.raises(ConfigError, match=r"drift: .*missing\.json"):
        await application.start()
