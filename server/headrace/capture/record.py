"""One captured call: what the spool stores and the Parquet writer turns into one row.

The request path encodes a record straight from references it already holds (the request's
wire bytes, the serialized response) with `encode_record`, without building a `CaptureRecord`;
everything costly (protobuf -> numpy -> Arrow) happens later, off the event loop, when the
writer decodes sealed spool segments.

The spool's entry format (version 2): one fixed little-endian header (format version, flags,
received/responded times, latency, status code, batch size, then the byte length of each
variable field), the strings as UTF-8 one after the other, the headers and parameters as JSON
objects (empty, zero bytes, when there are none), then the request and response bytes
unchanged. `decode()` also reads version 1 (a header, JSON metadata, the request and response
bytes), so a newer Headrace drains an older Headrace's spool after an upgrade.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

FORMAT_VERSION = 2
"""The version `encode_record` writes."""
_HEADER = struct.Struct("<BBqqqiq13I")
"""format version, flags, received_ns, responded_ns, latency_ns, status_code, batch_size, then
the byte lengths of request_id, model, version, status_message, trace_id, span_id, batch_id,
endpoint, identity, headers (JSON), parameters (JSON), request, response."""
_STRINGS = 9
"""Variable fields after the header that are UTF-8 strings (request_id .. identity)."""
_TRUNCATED = 0x01
_KNOWN_FLAGS = _TRUNCATED
HEADER = _HEADER
"""The fixed header of a format-2 record (for decoders of many records at once)."""
STRING_FIELDS = _STRINGS
TRUNCATED_FLAG = _TRUNCATED
_FORMAT_1 = 1
_HEADER_1 = struct.Struct("<BIII")
"""Format 1: format version, metadata (JSON) length, request length, response length."""

ParameterValue = bool | int | float | str


SHADOW_PARAMETER = "headrace_shadow"
"""Request parameter that marks a shadow call's record (value True): the same request mirrored
to a candidate model after the primary answered. It carries the primary's request id."""
SHADOW_OF_PARAMETER = "headrace_shadow_of"
"""Request parameter of a shadow call's record: the primary model version it mirrors (whose
capture rules the record follows)."""


class RecordFormatError(ValueError):
    """Bytes that are not an encoded CaptureRecord (a torn or foreign spool entry)."""


@dataclass(slots=True)
class CaptureRecord:
    """Everything known of one inference call when its answer (or error) left.

    Treated as a value: never changed once built (`dataclasses.replace` makes a changed
    copy). Not a frozen dataclass because the converter builds one per spooled record, and a
    frozen one's constructor costs ten times as much (2.4 against 0.24 us: one
    `object.__setattr__` per field).

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
        """The record as a spool entry (format `FORMAT_VERSION`)."""
        return encode_record(
            self.request_id,
            self.model,
            self.version,
            self.received_ns,
            self.responded_ns,
            self.latency_ns,
            self.status_code,
            self.status_message,
            self.request,
            self.response,
            self.trace_id,
            self.span_id,
            self.batch_id,
            self.batch_size,
            self.endpoint,
            self.identity,
            self.headers,
            self.parameters,
            self.truncated,
        )

    @classmethod
    def decode(cls, data: bytes | memoryview) -> CaptureRecord:
        """A record from a spool entry of any format version this Headrace knows.

        Raises:
            RecordFormatError: bytes that `encode()` did not produce (torn, corrupt, foreign,
                or a newer format).
        """
        view = memoryview(data)
        if not view:
            raise RecordFormatError("capture record of 0 bytes")
        version = view[0]
        if version == FORMAT_VERSION:
            return cls._decode(view)
        if version == _FORMAT_1:
            return cls._decode_format_1(view)
        raise RecordFormatError(
            f"capture record format {version} is not one of {_FORMAT_1}..{FORMAT_VERSION}"
        )

    @classmethod
    def _decode(cls, view: memoryview) -> CaptureRecord:
        if len(view) < _HEADER.size:
            raise RecordFormatError(
                f"capture record of {len(view)} bytes is shorter than its header"
            )
        _, flags, received, responded, latency, code, batch_size, *sizes = _HEADER.unpack_from(view)
        end = _HEADER.size + sum(sizes)
        if end != len(view):
            raise RecordFormatError(f"capture record declares {end} bytes but holds {len(view)}")
        if flags & ~_KNOWN_FLAGS:
            raise RecordFormatError(f"capture record has unknown flags {flags:#04x}")
        offset = _HEADER.size
        try:
            strings_end = offset + sum(sizes[:_STRINGS])
            text = bytes(view[offset:strings_end])
            strings: list[str] = []
            if text.isascii():
                # One decoding for the nine strings (ids and names are ASCII as a rule): in
                # ASCII a character is a byte, so the byte lengths cut the text.
                whole = text.decode("ascii")
                start = 0
                for size in sizes[:_STRINGS]:
                    strings.append(whole[start : start + size])
                    start += size
            else:
                for size in sizes[:_STRINGS]:
                    strings.append(str(view[offset : offset + size], "utf-8"))
                    offset += size
            offset = strings_end
            headers_size, parameters_size, request_size, _ = sizes[_STRINGS:]
            headers = _json_object(view[offset : offset + headers_size], "headers")
            offset += headers_size
            parameters = _json_object(view[offset : offset + parameters_size], "parameters")
            offset += parameters_size
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
            raise RecordFormatError(f"capture record metadata is unreadable: {exc}") from exc
        request_id, model, version, message, trace_id, span_id, batch_id, endpoint, identity = (
            strings
        )
        return cls(
            request_id,
            model,
            version,
            received,
            responded,
            latency,
            code,
            message,
            bytes(view[offset : offset + request_size]),
            bytes(view[offset + request_size : end]),
            trace_id,
            span_id,
            batch_id,
            batch_size,
            endpoint,
            identity,
            headers,
            parameters,
            bool(flags & _TRUNCATED),
        )

    @classmethod
    def _decode_format_1(cls, view: memoryview) -> CaptureRecord:
        """Format 1, written by Headrace before format 2: JSON metadata."""
        if len(view) < _HEADER_1.size:
            raise RecordFormatError(
                f"capture record of {len(view)} bytes is shorter than its header"
            )
        _, metadata_size, request_size, response_size = _HEADER_1.unpack_from(view)
        start = _HEADER_1.size
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


def _json_object(data: memoryview, name: str) -> dict[str, Any]:
    """A JSON object's fields; empty bytes are an empty object."""
    if not data:
        return {}
    value = json.loads(bytes(data))
    if not isinstance(value, dict):
        raise RecordFormatError(f"{name} are not a JSON object")
    return value


def encode_record(
    request_id: str,
    model: str,
    version: str,
    received_ns: int,
    responded_ns: int,
    latency_ns: int,
    status_code: int,
    status_message: str,
    request: bytes,
    response: bytes,
    trace_id: str,
    span_id: str,
    batch_id: str,
    batch_size: int,
    endpoint: str,
    identity: str,
    headers: dict[str, str],
    parameters: dict[str, ParameterValue],
    truncated: bool,
) -> bytes:
    """The spool entry of a record with these fields (`CaptureRecord`'s, in its order), built
    without a `CaptureRecord`: what the request path calls.

    Raises:
        struct.error: a number outside its field's range (int64; int32 for `status_code`).
    """
    # Spelled out, field by field: this runs once per captured call on the event loop.
    request_id_bytes = request_id.encode()
    model_bytes = model.encode()
    version_bytes = version.encode()
    message_bytes = status_message.encode()
    trace_id_bytes = trace_id.encode()
    span_id_bytes = span_id.encode()
    batch_id_bytes = batch_id.encode()
    endpoint_bytes = endpoint.encode()
    identity_bytes = identity.encode()
    headers_bytes = json.dumps(headers, separators=(",", ":")).encode() if headers else b""
    parameters_bytes = json.dumps(parameters, separators=(",", ":")).encode() if parameters else b""
    header = _HEADER.pack(
        FORMAT_VERSION,
        _TRUNCATED if truncated else 0,
        received_ns,
        responded_ns,
        latency_ns,
        status_code,
        batch_size,
        len(request_id_bytes),
        len(model_bytes),
        len(version_bytes),
        len(message_bytes),
        len(trace_id_bytes),
        len(span_id_bytes),
        len(batch_id_bytes),
        len(endpoint_bytes),
        len(identity_bytes),
        len(headers_bytes),
        len(parameters_bytes),
        len(request),
        len(response),
    )
    return b"".join(
        (
            header,
            request_id_bytes,
            model_bytes,
            version_bytes,
            message_bytes,
            trace_id_bytes,
            span_id_bytes,
            batch_id_bytes,
            endpoint_bytes,
            identity_bytes,
            headers_bytes,
            parameters_bytes,
            request,
            response,
        )
    )
