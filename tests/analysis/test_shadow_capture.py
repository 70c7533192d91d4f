"""Shadow traffic with capture on: the primary's and the shadow's calls land in the store with
one request id (generated when the client sent none), under the primary's capture rules, and
`headrace backtest --shadow` reports on them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from headrace.analysis.calls import SHADOW_PARAMETER
from headrace.capture.reader import read_records
from headrace.cli import main
from headrace.config import Settings
from headrace.examples.sales_forecast import synthetic_sales
from headrace.protocol import grpc_service_pb2 as pb
from tests.analysis.traffic import (
    BIAS_SHIFT,
    MODEL,
    features_request,
    infer,
    perturbed_weights,
    sales_version,
    sample_value,
    scrape,
)
from tests.conftest import ServerThread, make_settings

CALLS = 12


def test_primary_and_shadow_are_captured_with_one_request_id(tmp_path: Path) -> None:
    tree = make_settings(metrics={"enabled": True, "host": "127.0.0.1", "port": 0}).model_dump(
        mode="json"
    )
    tree["capture"] = {
        "enabled": True,
        "spool_dir": str(tmp_path / "spool"),
        "writer_id": "test",
        "store": {"kind": "local", "path": str(tmp_path / "store")},
    }
    tree["models"].append(sales_version("2", perturbed_weights(tmp_path)))
    for model in tree["models"]:
        if model["name"] == MODEL and model["version"] == "1":
            model["shadow"] = {"version": "2"}
            model["capture"] = {"hash": ["parameters.customer"]}
    server = ServerThread(Settings.model_validate(tree))
    features, _ = synthetic_sales(CALLS * 2, seed=61)
    with server:
        for index in range(CALLS):
            request = features_request(features[2 * index : 2 * index + 2])  # no request id
            request.parameters["customer"].CopyFrom(pb.InferParameter(string_param="alice"))
            infer(server, request)
        for _ in range(600):
            shadowed = sample_value(
                scrape(server),
                "headrace_shadow_requests_total",
                model=MODEL,
                version="1",
                result="ok",
            )
            if shadowed == CALLS:
                break
            time.sleep(0.05)
        assert shadowed == CALLS
    # Shutdown stored what was spooled.
    rows = list(read_records(tmp_path / "store", MODEL))
    primaries = {row.request_id: row for row in rows if not row.parameters.get(SHADOW_PARAMETER)}
    shadows = {row.request_id: row for row in rows if row.parameters.get(SHADOW_PARAMETER)}
    assert len(primaries) == CALLS
    assert set(shadows) == set(primaries)
    assert all(request_id for request_id in primaries)
    for request_id, shadow in shadows.items():
        assert shadow.version == "2"
        assert primaries[request_id].version == "1"
        # The primary's rules: the customer is hashed in the shadow's record too.
        assert shadow.parameters["customer"] == primaries[request_id].parameters["customer"]
        assert shadow.parameters["customer"] != "alice"

    output = tmp_path / "report"
    code = main(
        [
            "backtest",
            "--shadow",
            "--captures",
            str(tmp_path / "store"),
            "--model",
            MODEL,
            "--max-abs-error",
            "1",
            "--output",
            str(output),
            "--no-progress",
        ]
    )
    assert code == 1
    summary = json.loads((output / "summary.json").read_text())
    assert summary["calls"] == CALLS
    assert summary["primaries_without_shadow"] == 0
    assert summary["outputs"]["FORECAST"]["max_abs_error"] == pytest.approx(BIAS_SHIFT, abs=1e-3)
