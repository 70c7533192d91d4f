"""One captured call: what the spool stores and the Parquet writer turns into one row.

The request path builds a `CaptureRecord` from references it already holds (the request's wire
bytes, the serialized response); everything costly (protobuf -> numpy -> Arrow) happens later,
off the event loop, when the writer decodes sealed spool segments.

`encode()` / `decode()` are the spool's entry format: a fixed header, JSON metadata, then the
request and response bytes unchanged. The format is versioned so a newer Headrace can drain an
older Headrace's spool after an upgrade.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

FORMAT_VERSION = 1
_HEADER = struct.Struct("<BIII")
"""format version, metadata length, request length, response length."""

ParameterValue = bool | int | float | str


SHADOW_PARAMETER = "headrace_shadow"
"""Request parameter that marks a shadow call's record (value True): the same request mirrored
to a candidate model after the primary answered. It carries the primary's request id."""
SHADOW_OF_PARAMETER = "headrace_shadow_of"
"""Request parameter of a shadow call's record: the primary model version it mirrors (whose
capture rules the record follows)."""


class RecordFormatError(ValueError):
    """Bytes that are not an encoded CaptureRecord (a torn or foreign spool entry)."""


@dataclass(frozen=True, slots=True)
class CaptureRecord:
    """Everything known of one inference call when its answer (or error) left.

    Times are Unix epoch nanoseconds (wall clock, for partitioning and for people);
    `latency_ns` is measured on a monotonic clock. `status_code` is the gRPC status code's
    integer value (0 = OK). `request` is the serialized `inference.ModelInferRequest` as
    received (after the model's drop/hash rules), `response` the serialized
    `inference.ModelInferResponse`, empty when the call failed.
    """

    request_id: str
    """The client's request id, or one Headrace generated when the client sent none."""
    model: str
    version: str
    """The version that answered (or was asked for, when the call failed)."""
    received_ns: int
    responded_ns: int
    latency_ns: int
    status_code: int
    status_message: str
    request: bytes
    response: bytes = b""
    trace_id: str = ""
    """32 lowercase hex digits; empty when the call was not traced."""
    span_id: str = ""
    """16 lowercase hex digits of the server span; empty when not traced."""
    batch_id: str = ""
    """Id of the backend call that served this request; shared by every request in a batch."""
    batch_size: int = 0
    """Items in that backend call (0 when the call never reached a backend)."""
    endpoint: str = ""
    """The backend endpoint that answered ("local" for the in-process backend)."""
    identity: str = ""
    """The authenticated caller's name (never a token); empty without authentication."""
    headers: dict[str, str] = field(default_factory=dict)
    """The client metadata headers the model's capture settings select."""
    parameters: dict[str, ParameterValue] = field(default_factory=dict)
    """The request's parameters, as the protocol's InferParameter carries them."""
    truncated: bool = False
    """True when the tensors were left out (`request`/`response` empty) because the record
    exceeded the model's size cap; the metadata is still captured."""

    def encode(self) -> bytes:
        metadata = json.dumps(
            {
                "request_id": self.request_id,
                "model": self.model,
                "version": self.version,
                "received_ns": self.received_ns,
                "responded_ns": self.responded_ns,
                "latency_ns": self.latency_ns,
                "status_code": self.status_code,
                "status_message": self.status_message,
                "trace_id": self.trace_id,
                "span_id": self.span_id,
                "batch_id": self.batch_id,
                "batch_size": self.batch_size,
                "endpoint": self.endpoint,
                "identity": self.identity,
                "headers": self.headers,
                "parameters": self.parameters,
                "truncated": self.truncated,
            },
            separators=(",", ":"),
        ).encode()
        header = _HEADER.pack(FORMAT_VERSION, len(metadata), len(self.request), len(self.response))
        return b"".join((header, metadata, self.request, self.response))

    @classmethod
    def decode(cls, data: bytes | memoryview) -> CaptureRecord:
        """Raises RecordFormatError for bytes `encode()` did not produce."""
        view = memoryview(data)
        if len(view) < _HEADER.size:
            raise RecordFormatError(
                f"capture record of {len(view)} bytes is shorter than its header"
            )
        version, metadata_size, request_size, response_size = _HEADER.unpack_from(view)
        if version != FORMAT_VERSION:
            raise RecordFormatError(f"capture record format {version} is not {FORMAT_VERSION}")
        start = _HEADER.size
        end = start + metadata_size + request_size + response_size
        if end != len(view):
            raise RecordFormatError(f"capture record declares {end} bytes but holds {len(view)}")
        try:
            metadata: dict[str, Any] = json.loads(bytes(view[start : start + metadata_size]))
            request_start = start + metadata_size
            response_start = request_start + request_size
            return cls(
                request=bytes(view[request_start:response_start]),
                response=bytes(view[response_start:end]),
                **metadata,
            )
        except (ValueError, TypeError) as exc:
            raise RecordFormatError(f"capture record metadata is unreadable: {exc}") from exc
