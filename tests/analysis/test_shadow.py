"""Shadow traffic: the primary answers as without it whatever the candidate does; shadow calls
are recorded with the primary's request id and compared by `backtest --shadow`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from headrace.analysis.backtest import run_shadow_backtest
from headrace.analysis.calls import SHADOW_PARAMETER, calls_from_records
from headrace.analysis.comparison import Thresholds
from headrace.app import Application
from headrace.capture.record import CaptureRecord
from headrace.config import Settings
from headrace.errors import ConfigError
from headrace.examples.sales_forecast import synthetic_sales
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol.converters import response_from_proto
from tests.analysis.traffic import (
    RecordSink,
    assert_valid_png,
    features_request,
    infer,
    sample_value,
    scrape,
)
from tests.conftest import ServerThread, gated_model, make_settings, server_with
from tests.models import GATED

CANDIDATE = "shadow_gate"
QUEUE_SIZE = 2


def _with_shadow(tree: dict[str, Any], name: str, version: str, shadow: dict[str, Any]) -> None:
    for model in tree["models"]:
        if model["name"] == name and model["version"] == version:
            model["shadow"] = shadow
            return
    raise AssertionError(f"no model {name} {version}")


class Recorded:
    """Shadow records as the capture sink receives them, with the server serving them."""

    def __init__(self, server: ServerThread) -> None:
        self.server = server
        self.records: list[CaptureRecord] = []


@pytest.fixture(scope="module")
def shadowed() -> Iterator[Recorded]:
    """`scaled` 1 (x) shadowed by a gated model (2x + 1) with a queue of 2 and one call at a
    time; `scaled` 2 (2x) shadowed by a model that always fails."""
    tree = make_settings(metrics={"enabled": True, "host": "127.0.0.1", "port": 0}).model_dump(
        mode="json"
    )
    tree["models"].append(gated_model(CANDIDATE, {"enabled": False}))
    _with_shadow(
        tree,
        "scaled",
        "1",
        {
            "model": CANDIDATE,
            "max_queue_size": QUEUE_SIZE,
            "max_concurrency": 1,
            "timeout_s": 60,
        },
    )
    _with_shadow(tree, "scaled", "2", {"model": "failing", "timeout_s": 5})
    server = ServerThread(Settings.model_validate(tree))
    recorded = Recorded(server)
    sink = RecordSink()
    recorded.records = sink.records
    server.application.capture_sink = sink
    with server:
        yield recorded
    GATED[CANDIDATE].gate.set()


def _request(value: float, version: str, request_id: str) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="scaled",
        model_version=version,
        id=request_id,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="FP32", shape=[1, 2])
        ],
        raw_input_contents=[np.array([value, value + 1], np.float32).tobytes()],
    )


def _primary_record(
    request: pb.ModelInferRequest, response: pb.ModelInferResponse
) -> CaptureRecord:
    now = time.time_ns()
    return CaptureRecord(
        request_id=request.id,
        model="scaled",
        version=response.model_version,
        received_ns=now,
        responded_ns=now,
        latency_ns=1000,
        status_code=0,
        status_message="",
        request=request.SerializeToString(),
        response=response.SerializeToString(),
    )


def _wait_for(condition: Any) -> None:
    for _ in range(600):
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition never held")


def _shadow_count(server: ServerThread, version: str, result: str) -> float:
    value = sample_value(
        scrape(server),
        "headrace_shadow_requests_total",
        model="scaled",
        version=version,
        result=result,
    )
    return value or 0.0


def test_a_stuck_candidate_neither_delays_nor_changes_the_primary(
    shadowed: Recorded, tmp_path: Path
) -> None:
    server, records = shadowed.server, shadowed.records
    gate = GATED[CANDIDATE].gate
    gate.clear()  # the candidate takes the first shadow call and holds it
    primaries = []
    for index in range(10):
        request = _request(float(index), "1", f"primary-{index}")
        response = infer(server, request)
        output = response_from_proto(response).outputs["OUTPUT0"]
        assert output.tolist() == [[index, index + 1]]
        primaries.append(_primary_record(request, response))
    # All ten answered while the candidate held the first shadow call: one in flight, two
    # queued, the other seven dropped.
    assert _shadow_count(server, "1", "dropped") == 10 - 1 - QUEUE_SIZE
    assert records == []

    gate.set()
    _wait_for(lambda: len(records) == 1 + QUEUE_SIZE)
    assert _shadow_count(server, "1", "ok") == 1 + QUEUE_SIZE
    assert [record.request_id for record in records] == ["primary-0", "primary-1", "primary-2"]
    for index, record in enumerate(records):
        assert record.status_code == 0
        assert record.model == "scaled"
        assert record.parameters[SHADOW_PARAMETER] is True
        assert record.endpoint == "local"
        shadow_output = response_from_proto(pb.ModelInferResponse.FromString(record.response))
        assert shadow_output.outputs["OUTPUT0"].tolist() == [[2 * index + 1, 2 * index + 3]]

    # `backtest --shadow` pairs them by request id: |2x + 1 - x| = x + 1, largest for x = 3.
    outcome = run_shadow_backtest(
        lambda: calls_from_records([*primaries, *records]), "scaled", tmp_path, Thresholds()
    )
    output = outcome.summary["outputs"]["OUTPUT0"]
    assert outcome.summary["calls"] == 3
    assert outcome.summary["primaries_without_shadow"] == 7
    assert output["max_abs_error"] == pytest.approx(4.0)
    assert output["mean_abs_error"] == pytest.approx((1 + 2 + 2 + 3 + 3 + 4) / 6)
    assert_valid_png(tmp_path / "latency.png")
    records.clear()


def test_a_failing_candidate_leaves_the_primary_alone(shadowed: Recorded) -> None:
    server, records = shadowed.server, shadowed.records
    for index in range(3):
        response = infer(server, _request(float(index), "2", f"failing-{index}"))
        assert response_from_proto(response).outputs["OUTPUT0"].tolist() == [
            [2 * index, 2 * index + 2]
        ]
    _wait_for(lambda: _shadow_count(server, "2", "error") == 3)
    failed = [record for record in records if record.request_id.startswith("failing-")]
    assert len(failed) == 3
    for record in failed:
        assert record.status_code == 13  # INTERNAL: the model raised
        assert record.response == b""
        assert "weights are corrupt" in record.status_message


def test_a_remote_candidate_is_called_over_grpc() -> None:
    with server_with() as candidate:
        tree = make_settings().model_dump(mode="json")
        _with_shadow(tree, "sales_forecast", "1", {"endpoint": candidate.address, "version": "1"})
        primary = ServerThread(Settings.model_validate(tree))
        sink = RecordSink()
        records = sink.records
        primary.application.capture_sink = sink
        features, _ = synthetic_sales(4, seed=41)
        with primary:
            response = infer(primary, features_request(features, request_id="remote-1"))
            _wait_for(lambda: len(records) == 1)
    (record,) = records
    assert record.request_id == "remote-1"
    assert record.endpoint == candidate.address
    assert record.status_code == 0
    shadow = response_from_proto(pb.ModelInferResponse.FromString(record.response))
    primary_forecast = response_from_proto(response).outputs["FORECAST"]
    np.testing.assert_array_equal(shadow.outputs["FORECAST"], primary_forecast)


@pytest.mark.parametrize(
    ("shadow", "message"),
    [
        ({"model": "no_such_model"}, "shadow candidate: unknown model 'no_such_model'"),
        ({}, "shadow names the model itself"),
    ],
)
async def test_a_shadow_candidate_that_cannot_be_stops_start_up(
    shadow: dict[str, Any], message: str
) -> None:
    tree = make_settings().model_dump(mode="json")
    _with_shadow(tree, "scaled", "2", shadow)
    application = Application(Settings.model_validate(tree))
    with pytest.raises(ConfigError, match=message):
        await application.start()
