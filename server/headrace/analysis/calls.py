"""The captured call as analysis sees it, and the sources that yield them.

Analysis works on `CapturedCall`s: a request id, the decoded input and output tensors, the
latency and whether the call was a shadow call. Sources are plain iterables, so a backtest or a
drift report streams a capture of any size in bounded memory: the capture reader
(`headrace.capture.reader.read_records`, Parquet files one by one), spool records
(`CaptureRecord`s, e.g. what the shadow mirror produced), or anything else that yields calls.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from headrace.capture.reader import read_records
from headrace.capture.record import (
    SHADOW_OF_PARAMETER,
    SHADOW_PARAMETER,
    CaptureRecord,
    ParameterValue,
)
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol.converters import request_from_proto, response_from_proto


@dataclass(frozen=True, slots=True)
class CapturedCall:
    """One answered call: what was sent, what came back, and how long it took."""

    request_id: str
    inputs: Mapping[str, np.ndarray]
    outputs: Mapping[str, np.ndarray]
    latency_s: float
    model: str = ""
    version: str = ""
    received_ns: int = 0
    parameters: Mapping[str, ParameterValue] = field(default_factory=dict)

    @property
    def shadow(self) -> bool:
        """Whether this is a shadow call's record (mirrored to a candidate)."""
        return bool(self.parameters.get(SHADOW_PARAMETER, False))


__all__ = [
    "SHADOW_OF_PARAMETER",
    "SHADOW_PARAMETER",
    "CallSource",
    "CapturedCall",
    "call_from_record",
    "call_from_row",
    "calls_from_records",
    "captured_calls",
]

CallSource = Callable[[], Iterable[CapturedCall]]
"""A source of calls that can be read more than once (a fresh iterable per call)."""


def call_from_record(record: CaptureRecord) -> CapturedCall | None:
    """Decode a spool record; None for a failed call or one whose tensors were left out."""
    if record.status_code != 0 or record.truncated or not record.response:
        return None
    request = request_from_proto(pb.ModelInferRequest.FromString(record.request))
    response = response_from_proto(pb.ModelInferResponse.FromString(record.response))
    return CapturedCall(
        request_id=record.request_id,
        inputs=request.inputs,
        outputs=response.outputs,
        latency_s=record.latency_ns / 1e9,
        model=record.model,
        version=record.version,
        received_ns=record.received_ns,
        parameters=record.parameters,
    )


def calls_from_records(records: Iterable[CaptureRecord]) -> Iterator[CapturedCall]:
    """The answered calls among spool records, decoded one at a time."""
    for record in records:
        call = call_from_record(record)
        if call is not None:
            yield call


def call_from_row(row: Any) -> CapturedCall | None:
    """A row of the capture reader (a `CaptureRow`, or a mapping with the same fields:
    metadata plus `inputs`/`outputs` as numpy arrays); None for a failed, truncated or
    undecodable call."""
    field: Callable[[str, Any], Any] = (
        row.get if isinstance(row, Mapping) else functools.partial(getattr, row)
    )
    if int(field("status_code", 0)) != 0 or field("truncated", False):
        return None
    outputs = field("outputs", None)
    if not outputs or field("decode_error", ""):
        return None
    parameters = field("parameters", None) or {}
    if isinstance(parameters, str | bytes):  # a store may keep them as JSON text
        parameters = json.loads(parameters)
    return CapturedCall(
        request_id=str(field("request_id", "")),
        inputs=dict(field("inputs", None) or {}),
        outputs=dict(outputs),
        latency_s=int(field("latency_ns", 0)) / 1e9,
        model=str(field("model", "")),
        version=str(field("version", "")),
        received_ns=int(field("received_ns", 0)),
        parameters=dict(parameters) if isinstance(parameters, dict) else {},
    )


def captured_calls(
    source: str,
    model: str,
    version: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    **source_options: str,
) -> Iterator[CapturedCall]:
    """Answered calls of `model` (one version, or all) captured in [start, end) under
    `source` (a local folder or an s3:// URL; `source_options`: the reader's endpoint,
    region, scheme), streamed file by file through the capture reader."""
    for row in read_records(source, model, version, start, end, **source_options):
        call = call_from_row(row)
        if call is not None:
            yield call
