"""Drift reports and profiles through the `headrace drift` command and the report writer:
a table per feature and a valid PNG histogram each."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from headrace.analysis.drift import Profile, ProfileBuilder, compare_with_profile
from headrace.analysis.report import write_drift_report
from headrace.cli import main
from headrace.examples.sales_forecast import SalesForecast, synthetic_sales
from tests.analysis.traffic import MODEL, assert_valid_png


def test_drift_profile_from_a_file(tmp_path: Path) -> None:
    features, _ = synthetic_sales(3000, seed=31)
    forecast = SalesForecast()({"FEATURES": features})["FORECAST"]
    reference = tmp_path / "reference.npz"
    np.savez(reference, FEATURES=features, **{"output:FORECAST": forecast})
    output = tmp_path / "profile.json"
    code = main(
        ["drift", "profile", "--file", str(reference), "--model", MODEL, "--output", str(output)]
    )
    assert code == 0
    profile = Profile.load(output)
    assert profile.rows == 3000
    assert len(profile.features) == 7
    assert profile.features["output:FORECAST[0]"].count == 3000


def test_drift_profile_needs_one_source(tmp_path: Path) -> None:
    code = main(["drift", "profile", "--model", MODEL, "--output", str(tmp_path / "p.json")])
    assert code == 2


def test_drift_report_has_a_row_and_a_histogram_per_feature(tmp_path: Path) -> None:
    reference, _ = synthetic_sales(10_000, seed=32)
    builder = ProfileBuilder(MODEL)
    builder.add_tensors("input", {"FEATURES": reference})
    profile = builder.build()
    current_features, _ = synthetic_sales(2000, seed=33)
    current_features[:, 0] += 4  # dearer
    current = ProfileBuilder(MODEL)
    current.add_tensors("input", {"FEATURES": current_features})
    values = current.feature_values()
    drifts = compare_with_profile(profile, values)
    files = write_drift_report(MODEL, drifts, profile.features, values, tmp_path, 0.25)

    summary = json.loads(files["json"].read_text())
    assert summary["drifted"] == ["input:FEATURES[0]"]
    assert len(summary["features"]) == 6
    markdown = files["markdown"].read_text()
    assert "| input:FEATURES[0] |" in markdown
    page = files["html"].read_text()
    for column in range(6):
        plot = f"feature_input_FEATURES_{column}.png"
        assert f"src='{plot}'" in page
        assert_valid_png(tmp_path / plot)
