"""Captured calls from spool records and from capture files: failed, truncated and shadow
calls."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from headrace.analysis.calls import (
    SHADOW_PARAMETER,
    call_from_record,
    captured_calls,
)
from headrace.capture.record import CaptureRecord
from headrace.inference import InferenceResponse
from headrace.protocol.converters import response_to_proto
from tests.analysis.traffic import MODEL, features_request, write_captures


def _record(request_id: str, **fields: object) -> CaptureRecord:
    features = np.arange(12, dtype=np.float32).reshape(2, 6)
    response = InferenceResponse(MODEL, "1", request_id, {"FORECAST": features[:, :1]})
    values: dict[str, object] = {
        "request_id": request_id,
        "model": MODEL,
        "version": "1",
        "received_ns": 1_800_000_000_000_000_000,
        "responded_ns": 1_800_000_000_002_000_000,
        "latency_ns": 2_000_000,
        "status_code": 0,
        "status_message": "",
        "request": features_request(features, request_id=request_id).SerializeToString(),
        "response": response_to_proto(response).SerializeToString(),
    }
    values.update(fields)
    return CaptureRecord(**values)  # type: ignore[arg-type]


def test_records_decode_and_failed_or_truncated_calls_are_left_out() -> None:
    call = call_from_record(_record("a"))
    assert call is not None
    assert call.inputs["FEATURES"].shape == (2, 6)
    assert call.outputs["FORECAST"].tolist() == [[0.0], [6.0]]
    assert call.latency_s == 0.002
    assert not call.shadow
    assert call_from_record(_record("b", status_code=13, response=b"")) is None
    assert call_from_record(_record("c", truncated=True, request=b"", response=b"")) is None


def test_capture_files_keep_the_shadow_mark(tmp_path: Path) -> None:
    write_captures(
        tmp_path,
        [
            _record("a"),
            _record("a", version="2", parameters={SHADOW_PARAMETER: True}),
            _record("b", status_code=14, response=b""),
        ],
    )
    calls = sorted(captured_calls(str(tmp_path), MODEL), key=lambda call: call.version)
    assert [(call.request_id, call.version, call.shadow) for call in calls] == [
        ("a", "1", False),
        ("a", "2", True),
    ]
    np.testing.assert_array_equal(calls[0].inputs["FEATURES"], calls[1].inputs["FEATURES"])
