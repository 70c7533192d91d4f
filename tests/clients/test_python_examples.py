"""The Python client examples run against a live server and print what the model computes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from headrace.examples.sales_forecast import SalesForecast

EXAMPLES = Path(__file__).resolve().parents[2] / "clients" / "python"


def _run(script: str, address: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--url", address],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


def test_tritonclient_example(server) -> None:
    output = _run("infer_tritonclient.py", server.address)
    assert "live: True ready: True" in output
    sys.path.insert(0, str(EXAMPLES))
    try:
        from infer_tritonclient import FEATURES
    finally:
        sys.path.remove(str(EXAMPLES))
    expected = SalesForecast()({"FEATURES": FEATURES})["FORECAST"][:, 0]
    for value in expected:
        assert f"-> forecast {value:.2f} units" in output


def test_async_stubs_example(server) -> None:
    output = _run("infer_async_stubs.py", server.address)
    assert output.strip() == str(np.arange(6, dtype=np.float32).reshape(2, 3).tolist())
