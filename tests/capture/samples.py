"""Capture records built the way the request path builds them: the protocol messages a client
sends and a server answers, serialized."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from headrace.capture.record import CaptureRecord
from headrace.inference import InferenceRequest, InferenceResponse
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol.converters import request_to_proto, response_to_proto

# 2026-11-27 10:15:00 UTC
BASE_NS = 1_795_774_500_000_000_000
HOUR_NS = 3600 * 1_000_000_000


def request_bytes(
    inputs: Mapping[str, np.ndarray],
    *,
    model: str = "m",
    version: str = "1",
    request_id: str = "",
    outputs: tuple[str, ...] = (),
) -> bytes:
    message = request_to_proto(
        InferenceRequest(model_name=model, model_version=version, id=request_id, inputs=inputs),
        model,
        version,
    )
    for name in outputs:
        message.outputs.add(name=name)
    return message.SerializeToString()


def response_bytes(outputs: Mapping[str, np.ndarray], *, model: str = "m") -> bytes:
    response = InferenceResponse(model_name=model, model_version="1", id="", outputs=outputs)
    return response_to_proto(response).SerializeToString()


def make_record(
    request_id: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Mapping[str, np.ndarray] | None = None,
    *,
    model: str = "m",
    version: str = "1",
    received_ns: int = BASE_NS,
    status_code: int = 0,
    status_message: str = "",
    **fields: Any,
) -> CaptureRecord:
    """A call's record; no outputs means a failed call (empty response)."""
    return CaptureRecord(
        request_id=request_id,
        model=model,
        version=version,
        received_ns=received_ns,
        responded_ns=received_ns + 2_000_000,
        latency_ns=2_000_000,
        status_code=status_code,
        status_message=status_message,
        request=request_bytes(inputs, model=model, version=version, request_id=request_id),
        response=response_bytes(outputs, model=model) if outputs is not None else b"",
        **fields,
    )


def typed_request_bytes(name: str, values: list[int], datatype: str = "INT32") -> bytes:
    """A request whose input travels in typed contents (int_contents), not raw bytes."""
    message = pb.ModelInferRequest(model_name="m", model_version="1")
    tensor = message.inputs.add(name=name, datatype=datatype, shape=[len(values)])
    tensor.contents.int_contents.extend(values)
    return message.SerializeToString()
