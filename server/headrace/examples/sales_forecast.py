"""Weekly unit sales of one product in one store: a small two-layer network over six numeric
features, with fixed weights stored beside this file (sales_forecast_weights.json).

Features, in order: price (EUR), promotion (0 or 1), week_of_year (1-53), store_area_m2,
last_week_units, holiday_week (0 or 1). Output: forecast units for the week (>= 0).

The weights were fitted to synthetic sales by `python -m headrace.examples.sales_forecast`,
which rewrites the weights file; serving only reads it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

WEIGHTS_PATH = Path(__file__).with_name("sales_forecast_weights.json")
FEATURE_COUNT = 6


class SalesForecast:
    """Maps FEATURES [batch, 6] (FP32) to FORECAST [batch, 1] (FP32)."""

    def __init__(self, weights_path: str | None = None) -> None:
        weights = json.loads(Path(weights_path or WEIGHTS_PATH).read_text())
        self._mean = np.asarray(weights["feature_mean"], dtype=np.float32)
        self._scale = np.asarray(weights["feature_scale"], dtype=np.float32)
        self._hidden_weights = np.asarray(weights["hidden_weights"], dtype=np.float32)
        self._hidden_bias = np.asarray(weights["hidden_bias"], dtype=np.float32)
        self._output_weights = np.asarray(weights["output_weights"], dtype=np.float32)
        self._output_bias = np.float32(weights["output_bias"])

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        standardized = (inputs["FEATURES"] - self._mean) / self._scale
        hidden = np.maximum(standardized @ self._hidden_weights + self._hidden_bias, 0)
        forecast = hidden @ self._output_weights + self._output_bias
        return {"FORECAST": np.maximum(forecast, 0).reshape(-1, 1).astype(np.float32)}


def synthetic_sales(rows: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Feature rows and the week's units from a made-up but plausible demand curve."""
    rng = np.random.default_rng(seed)
    price = rng.uniform(1.5, 12.0, rows)
    promotion = rng.integers(0, 2, rows).astype(float)
    week = rng.integers(1, 54, rows).astype(float)
    area = rng.uniform(300, 4000, rows)
    holiday = (rng.random(rows) < 0.08).astype(float)
    base = 0.04 * area * np.exp(-0.12 * price) * (1 + 0.35 * promotion) * (1 + 0.5 * holiday)
    seasonal = 1 + 0.2 * np.sin(2 * np.pi * (week - 10) / 52)
    last_week = base * seasonal * rng.lognormal(0, 0.15, rows)
    units = 0.6 * base * seasonal + 0.4 * last_week + rng.normal(0, 3, rows)
    features = np.stack([price, promotion, week, area, last_week, holiday], axis=1)
    return features.astype(np.float32), np.maximum(units, 0).astype(np.float32)


def _fit(
    hidden_units: int = 16, steps: int = 3000, learning_rate: float = 0.01
) -> dict[str, object]:
    """Fit the network to synthetic sales with full-batch Adam; returns the weights file."""
    features, units = synthetic_sales(20_000)
    mean, scale = features.mean(axis=0), features.std(axis=0)
    x = (features - mean) / scale
    rng = np.random.default_rng(0)
    params = [
        rng.normal(0, np.sqrt(2 / FEATURE_COUNT), (FEATURE_COUNT, hidden_units)),
        np.zeros(hidden_units),
        rng.normal(0, np.sqrt(2 / hidden_units), hidden_units),
        np.array(units.mean()),
    ]
    moments = [np.zeros_like(param) for param in params]
    squares = [np.zeros_like(param) for param in params]
    for step in range(1, steps + 1):
        w1, b1, w2, b2 = params
        pre = x @ w1 + b1
        hidden = np.maximum(pre, 0)
        error = hidden @ w2 + b2 - units
        grad_out = 2 * error / len(units)
        grad_pre = np.outer(grad_out, w2) * (pre > 0)
        grads = [x.T @ grad_pre, grad_pre.sum(axis=0), hidden.T @ grad_out, grad_out.sum()]
        for index, grad in enumerate(grads):
            moments[index] = 0.9 * moments[index] + 0.1 * grad
            squares[index] = 0.999 * squares[index] + 0.001 * grad * grad
            m_hat = moments[index] / (1 - 0.9**step)
            v_hat = squares[index] / (1 - 0.999**step)
            params[index] = params[index] - learning_rate * m_hat / (np.sqrt(v_hat) + 1e-8)
    print(f"fitted {hidden_units} hidden units, training RMSE {np.sqrt(np.mean(error**2)):.2f}")
    w1, b1, w2, b2 = params
    return {
        "feature_mean": mean.round(6).tolist(),
        "feature_scale": scale.round(6).tolist(),
        "hidden_weights": w1.round(6).tolist(),
        "hidden_bias": b1.round(6).tolist(),
        "output_weights": w2.round(6).tolist(),
        "output_bias": round(float(b2), 6),
    }


if __name__ == "__main__":
    WEIGHTS_PATH.write_text(json.dumps(_fit(), indent=1) + "\n")
    print(f"wrote {WEIGHTS_PATH}")
