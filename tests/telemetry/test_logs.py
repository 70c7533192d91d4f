"""Structured logs: JSON lines carrying the trace and span of the request they were written
for, and never its tensors."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from headrace.config import LoggingSettings
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol import grpc_service_pb2_grpc as pb_grpc
from headrace.telemetry.logs import log_handler
from headrace.telemetry.tracing import SPAN_BACKEND
from tests.telemetry.conftest import exporting_to, telemetry_server, traceparent
from tests.telemetry.receiver import OtlpReceiver

SECRET_VALUE = 271828.125
"""A value only the request carries."""


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = log_handler(LoggingSettings(format="json"), stream)
    logger = logging.getLogger("headrace")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_a_log_line_written_for_a_request_carries_its_trace_and_no_tensor(
    receiver: OtlpReceiver, json_log: io.StringIO
) -> None:
    header, trace_id, _ = traceparent()
    values = np.array([SECRET_VALUE, -SECRET_VALUE], dtype="<f4")
    secret_tracing_header = "Bearer do-not-log-me"
    server = telemetry_server(
        tracing=exporting_to(receiver, headers={"authorization": secret_tracing_header})
    )
    with server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(
                pb.ModelInferRequest(
                    model_name="failing",
                    inputs=[
                        pb.ModelInferRequest.InferInputTensor(
                            name="INPUT0", datatype="FP32", shape=[1, 2]
                        )
                    ],
                    raw_input_contents=[values.tobytes()],
                ),
                metadata=[("traceparent", header)],
            )
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    failures = [line for line in lines if "raised" in line["message"]]
    assert len(failures) == 1, lines
    failure = failures[0]
    assert failure["level"] == "ERROR"
    assert failure["logger"] == "headrace.backends.local"
    assert "weights are corrupt" in failure["exception"]
    # Written while the backend call's span was current, in the caller's trace.
    assert failure["trace_id"] == trace_id
    backend = [span for span in receiver.in_trace(trace_id) if span.name == SPAN_BACKEND]
    assert [span.span_id for span in backend] == [failure["span_id"]]
    # Start-up lines outside any request carry no ids.
    assert any("listening on" in line["message"] and "trace_id" not in line for line in lines)
    text = json_log.getvalue()
    for forbidden in ("271828", values.tobytes().hex(), repr(values.tobytes()), "do-not-log-me"):
        assert forbidden not in text


def test_text_lines_keep_their_format() -> None:
    stream = io.StringIO()
    handler = log_handler(LoggingSettings(), stream)
    record = logging.LogRecord("headrace.x", logging.INFO, __file__, 1, "hello %s", ("x",), None)
    assert handler.filter(record)
    handler.emit(record)
    assert stream.getvalue().rstrip().endswith("INFO headrace.x: hello x")
