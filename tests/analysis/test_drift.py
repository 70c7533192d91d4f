"""Drift numerics (PSI, KS) against known values and scipy, and reference profiles."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from headrace.analysis.calls import CapturedCall
from headrace.analysis.drift import (
    PSI_FLOOR,
    Profile,
    ProfileBuilder,
    ProfileError,
    bin_shares,
    compare_with_profile,
    ks_distance,
    profile_from_file,
    psi,
    quantile_cuts,
)
from headrace.examples.sales_forecast import synthetic_sales


def test_psi_of_known_shares() -> None:
    assert psi(np.array([0.5, 0.5]), np.array([0.5, 0.5])) == 0
    # (0.25 - 0.5) ln(0.25 / 0.5) + (0.75 - 0.5) ln(0.75 / 0.5)
    assert psi(np.array([0.5, 0.5]), np.array([0.25, 0.75])) == pytest.approx(
        0.25 * math.log(2) + 0.25 * math.log(1.5)
    )
    # An empty bin counts as PSI_FLOOR, not as infinitely surprising.
    swapped = psi(np.array([1.0, 0.0]), np.array([0.0, 1.0]))
    assert swapped == pytest.approx(2 * (1 - PSI_FLOOR) * math.log(1 / PSI_FLOOR))


@pytest.mark.parametrize("seed", range(5))
def test_ks_distance_is_scipys_two_sample_statistic(seed: int) -> None:
    rng = np.random.default_rng(seed)
    reference = rng.normal(0, 1, 700)
    current = rng.normal(0.2 * seed, 1 + 0.1 * seed, 300)
    expected = stats.ks_2samp(reference, current).statistic
    assert ks_distance(np.sort(reference), current) == pytest.approx(expected, abs=1e-12)
    # Ties (discrete values) too.
    reference_counts = rng.integers(0, 5, 400).astype(float)
    current_counts = rng.integers(0, 6, 250).astype(float)
    expected = stats.ks_2samp(reference_counts, current_counts).statistic
    assert ks_distance(np.sort(reference_counts), current_counts) == pytest.approx(expected)


def test_ks_distance_of_identical_and_disjoint_samples() -> None:
    values = np.arange(100.0)
    assert ks_distance(values, values) == 0
    assert ks_distance(values, values + 1000) == 1
    assert math.isnan(ks_distance(values, np.empty(0)))


def test_bins_keep_discrete_values_apart() -> None:
    flags = np.array([0.0] * 92 + [1.0] * 8)
    cuts = quantile_cuts(flags, 10)
    shares = bin_shares(cuts, flags)
    assert shares[0] == pytest.approx(0.92)
    assert shares[1:].sum() == pytest.approx(0.08)
    # More holidays is a shift PSI sees.
    shifted = bin_shares(cuts, np.array([0.0] * 60 + [1.0] * 40))
    assert psi(shares, shifted) > 0.25


def _calls(features: np.ndarray, rows_per_call: int) -> list[CapturedCall]:
    return [
        CapturedCall(
            request_id=str(start),
            inputs={"FEATURES": features[start : start + rows_per_call]},
            outputs={"FORECAST": features[start : start + rows_per_call, :1] * 2},
            latency_s=0.001,
        )
        for start in range(0, len(features), rows_per_call)
    ]


def test_profile_of_calls_has_exact_moments_and_round_trips(tmp_path: Path) -> None:
    features, _ = synthetic_sales(5000, seed=1)
    builder = ProfileBuilder("sales_forecast", "1", reservoir_rows=1000, sample_size=500)
    builder.add_calls(_calls(features, 50))
    profile = builder.build()
    assert profile.rows == 100
    assert sorted(profile.features) == [
        *(f"input:FEATURES[{column}]" for column in range(6)),
        "output:FORECAST[0]",
    ]
    price = profile.features["input:FEATURES[0]"]
    assert price.count == 5000
    assert price.mean == pytest.approx(features[:, 0].astype(np.float64).mean())
    assert price.std == pytest.approx(features[:, 0].astype(np.float64).std(), rel=1e-6)
    assert price.min == pytest.approx(features[:, 0].min())
    assert len(price.sample) == 500
    assert list(price.sample) == sorted(price.sample)
    assert len(price.cuts) == 9
    assert sum(price.shares) == pytest.approx(1)
    # Its own distribution does not drift from it.
    assert price.psi(features[:, 0].astype(np.float64)) < 0.02

    path = tmp_path / "profile.json"
    profile.save(path)
    assert Profile.load(path) == profile


def test_profile_from_an_npz_file(tmp_path: Path) -> None:
    features, units = synthetic_sales(2000, seed=2)
    path = tmp_path / "reference.npz"
    np.savez(path, FEATURES=features, **{"output:FORECAST": units.reshape(-1, 1)})
    profile = profile_from_file(path, "sales_forecast")
    assert profile.rows == 2000
    assert profile.features["output:FORECAST[0]"].mean == pytest.approx(units.mean(), rel=1e-5)
    assert profile.features["input:FEATURES[3]"].kind == "input"
    with pytest.raises(ProfileError, match=r"\.npz or \.parquet"):
        profile_from_file(tmp_path / "reference.csv", "sales_forecast")


def test_unreadable_profiles_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    path.write_text('{"format": 99}')
    with pytest.raises(ProfileError, match="not a Headrace drift profile"):
        Profile.load(path)
    with pytest.raises(ProfileError, match="cannot read"):
        Profile.load(tmp_path / "missing.json")


def test_a_shift_of_one_feature_shows_in_that_feature_only() -> None:
    reference, _ = synthetic_sales(20_000, seed=3)
    builder = ProfileBuilder("sales_forecast")
    builder.add_tensors("input", {"FEATURES": reference})
    profile = builder.build()
    current, _ = synthetic_sales(2000, seed=4)
    current[:, 3] *= 1.6  # larger stores
    values = {f"input:FEATURES[{column}]": current[:, column] for column in range(6)}
    drifts = {drift.feature: drift for drift in compare_with_profile(profile, values)}
    assert drifts["input:FEATURES[3]"].psi > 0.25
    assert drifts["input:FEATURES[3]"].ks > 0.2
    for column in (0, 1, 2, 4, 5):
        assert drifts[f"input:FEATURES[{column}]"].psi < 0.1
