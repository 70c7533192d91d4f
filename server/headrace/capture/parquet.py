"""Capture records <-> Arrow tables: the columns of the capture files, and reading them back.

One row per call. Metadata columns (`METADATA_COLUMNS`), then two columns per tensor:

- `input.NAME` / `output.NAME`: the tensor's elements, flattened row-major, as an Arrow list
  (`list<bool|int8..uint64|float|double|binary>`); null when the row has no such tensor.
- `input_shape.NAME` / `output_shape.NAME`: its shape, `list<int64>`.

The protocol datatype is kept in the data column's field metadata (`headrace.datatype`), so
each one comes back as the exact numpy dtype: FP16 and BF16 are stored widened to float32 (an
exact widening, NaN payloads included; DuckDB and older readers do not read Parquet float16,
and nothing reads bfloat16) and narrowed back on reading; BYTES elements are Arrow binary,
any bytes including NUL. Everything else is stored as itself.

Model and version are `model_name` / `model_version` in the file (the protocol's names), not
`model` / `version`: those are the partition folders, and a reader that adds partition columns
(pandas, pyarrow.dataset with Hive partitioning) refuses a file column of the same name.

Nothing is lost when a request cannot be turned into columns (it does not decode, or a tensor
has another datatype than in the file's other rows): its wire bytes go to `undecoded_request`
(and `undecoded_response`), `decode_error` says why, and `rows_from_table` decodes them again.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, cast

import grpc
import ml_dtypes
import numpy as np
import pyarrow as pa
from google.protobuf.message import DecodeError

from headrace.capture.record import CaptureRecord, ParameterValue
from headrace.errors import HeadraceError
from headrace.protocol import converters
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol.datatypes import DATATYPES, Datatype, datatype_of

FORMAT_VERSION = "1"
SCHEMA_METADATA_KEY = b"headrace.capture.format"
DATATYPE_METADATA_KEY = b"headrace.datatype"
INPUT_PREFIX = "input."
OUTPUT_PREFIX = "output."
INPUT_SHAPE_PREFIX = "input_shape."
OUTPUT_SHAPE_PREFIX = "output_shape."

_TIMESTAMP = pa.timestamp("ns", tz="UTC")
METADATA_COLUMNS: tuple[pa.Field, ...] = (
    pa.field("request_id", pa.string()),
    pa.field("model_name", pa.string()),
    pa.field("model_version", pa.string()),
    pa.field("received", _TIMESTAMP),
    pa.field("responded", _TIMESTAMP),
    pa.field("latency_ns", pa.int64()),
    pa.field("status_code", pa.int32()),
    pa.field("status", pa.string()),
    pa.field("status_message", pa.string()),
    pa.field("trace_id", pa.string()),
    pa.field("span_id", pa.string()),
    pa.field("batch_id", pa.string()),
    pa.field("batch_size", pa.int32()),
    pa.field("endpoint", pa.string()),
    pa.field("identity", pa.string()),
    pa.field("headers", pa.map_(pa.string(), pa.string())),
    pa.field("parameters", pa.string()),
    pa.field("response_parameters", pa.string()),
    pa.field("requested_outputs", pa.list_(pa.string())),
    pa.field("truncated", pa.bool_()),
    pa.field("decode_error", pa.string()),
    pa.field("undecoded_request", pa.binary()),
    pa.field("undecoded_response", pa.binary()),
)
"""The columns every capture file has, in this order, before the tensor columns."""
DICTIONARY_COLUMNS = (
    "model_name",
    "model_version",
    "status",
    "status_message",
    "endpoint",
    "identity",
    "batch_id",
)
"""Columns that repeat a few values: dictionary-encoded in Parquet. Tensor columns are not
(it rarely pays, and float dictionaries would compare NaNs)."""

_STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}

_STORAGE_TYPES: dict[str, pa.DataType] = {
    "BOOL": pa.bool_(),
    "UINT8": pa.uint8(),
    "UINT16": pa.uint16(),
    "UINT32": pa.uint32(),
    "UINT64": pa.uint64(),
    "INT8": pa.int8(),
    "INT16": pa.int16(),
    "INT32": pa.int32(),
    "INT64": pa.int64(),
    "FP16": pa.float32(),
    "FP32": pa.float32(),
    "FP64": pa.float64(),
    "BF16": pa.float32(),
    "BYTES": pa.binary(),
}
_DEFAULT_DATATYPES: dict[pa.DataType, str] = {
    pa.bool_(): "BOOL",
    pa.uint8(): "UINT8",
    pa.uint16(): "UINT16",
    pa.uint32(): "UINT32",
    pa.uint64(): "UINT64",
    pa.int8(): "INT8",
    pa.int16(): "INT16",
    pa.int32(): "INT32",
    pa.int64(): "INT64",
    pa.float16(): "FP16",
    pa.float32(): "FP32",
    pa.float64(): "FP64",
    pa.binary(): "BYTES",
    pa.large_binary(): "BYTES",
    pa.string(): "BYTES",
    pa.large_string(): "BYTES",
}
"""The datatype of a tensor column written without Headrace's field metadata."""


@dataclass(frozen=True, slots=True)
class CaptureRow:
    """One captured call as read back: its metadata and its tensors as numpy arrays.

    Times are Unix epoch nanoseconds (`received` / `responded` give aware UTC datetimes).
    `inputs` / `outputs` map tensor names to arrays of the protocol datatype's numpy dtype
    (object arrays of bytes for BYTES, `ml_dtypes.bfloat16` for BF16); `outputs` is empty for
    a failed call, both are empty for a `truncated` record.
    """

    request_id: str
    model: str
    version: str
    received_ns: int
    responded_ns: int
    latency_ns: int
    status_code: int
    status: str
    """The gRPC status code's name (OK, INVALID_ARGUMENT, ...)."""
    status_message: str
    trace_id: str = ""
    span_id: str = ""
    batch_id: str = ""
    batch_size: int = 0
    endpoint: str = ""
    identity: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    parameters: dict[str, ParameterValue] = field(default_factory=dict)
    response_parameters: dict[str, ParameterValue] = field(default_factory=dict)
    requested_outputs: tuple[str, ...] = ()
    """The outputs the client asked for; empty when it asked for all."""
    truncated: bool = False
    decode_error: str = ""
    """Why the request or response could not be decoded into tensors; empty when it was."""
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def received(self) -> datetime:
        return _datetime(self.received_ns)

    @property
    def responded(self) -> datetime:
        return _datetime(self.responded_ns)


def _datetime(ns: int) -> datetime:
    seconds, remainder = divmod(ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds, UTC).replace(microsecond=remainder // 1000)


@dataclass(slots=True)
class _Decoded:
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    requested_outputs: tuple[str, ...] | None = None
    response_parameters: dict[str, ParameterValue] | None = None
    error: str | None = None


def _decode(request_bytes: bytes, response_bytes: bytes) -> _Decoded:
    decoded = _Decoded()
    try:
        if request_bytes:
            request = converters.request_from_proto(pb.ModelInferRequest.FromString(request_bytes))
            decoded.inputs = request.inputs
            decoded.requested_outputs = request.requested_outputs
        if response_bytes:
            response = converters.response_from_proto(
                pb.ModelInferResponse.FromString(response_bytes)
            )
            decoded.outputs = response.outputs
            decoded.response_parameters = dict(response.parameters)
    except DecodeError as exc:
        return _Decoded(error=f"not a valid protobuf message: {exc}")
    except HeadraceError as exc:
        return _Decoded(error=exc.message)
    return decoded


def _datatype(array: np.ndarray) -> Datatype:
    found = datatype_of(array)
    if found is None:  # the converters only produce protocol dtypes
        raise TypeError(f"numpy dtype {array.dtype} has no protocol datatype")
    return found


_BYTES = DATATYPES["BYTES"]
_LENGTH_PREFIX = struct.Struct("<I")
"""A BYTES element's length before its bytes, in raw contents."""
_MAX_DIMS = 32
"""Shapes with more dimensions go through the converters, where numpy decides whether it can
represent them (its limit is 64, 32 before numpy 2)."""
_MAX_EMPTY_SPAN = 2**40
"""Zero-element shapes whose other dimensions multiply past this go through the converters
too (numpy refuses some of them)."""
_MAX_LAYOUT_KEY_BYTES = 4096
"""Messages longer than this without their raw contents (typed contents) are not cached."""
_MAX_LAYOUTS = 4096


class _Header(NamedTuple):
    """A tensor's description in a message, without its contents."""

    name: str
    datatype: Datatype
    shape: tuple[int, ...]
    elements: int
    size: int | None
    """Bytes of raw contents it needs; None for BYTES (elements of any length)."""


_Tensors = tuple[tuple[_Header, ...], Sequence[bytes], Sequence[Sequence[int] | None] | None]
"""A message's tensors: their headers, each one's contents in their wire form (little-endian
values, or BYTES' length-prefixed elements), and for each BYTES tensor its elements' lengths
(None when there is no BYTES tensor). A plain tuple: one is made per message."""

_NO_TENSORS: _Tensors = ((), (), None)


@dataclass(slots=True)
class _Row:
    """One record's tensors, ready to be put into columns."""

    inputs: _Tensors = _NO_TENSORS
    outputs: _Tensors = _NO_TENSORS
    requested_outputs: tuple[str, ...] | None = None
    response_parameters: dict[str, ParameterValue] | None = None
    error: str | None = None


class _Layout(NamedTuple):
    """The tensors of a message whose contents are all raw, and the outputs it asks for."""

    headers: tuple[_Header, ...]
    sizes: list[int] | None
    """Each tensor's raw contents size; None when one is BYTES (elements of any length)."""
    requested: tuple[str, ...]


_UNSEEN = _Layout((), None, ())
"""Not looked at yet (a layout of its own, so that the cache keeps its type)."""


def _element_count(shape: tuple[int, ...]) -> int | None:
    """The elements of `shape`; None when the converters must judge it (negative dimensions,
    or a shape numpy may not represent)."""
    if not shape:
        return 1
    if min(shape) < 0 or len(shape) > _MAX_DIMS:
        return None
    count = math.prod(shape)
    if count == 0 and math.prod(dim for dim in shape if dim) > _MAX_EMPTY_SPAN:
        return None
    return count


def _header(tensor: Any, request: bool) -> _Header | None:
    """`tensor`'s header when its contents can come from raw contents alone; None when the
    converters must decode or explain it (typed contents or shared memory in a request, an
    unknown datatype, a shape numpy may not represent)."""
    if request and (tensor.parameters or tensor.HasField("contents")):
        return None
    datatype = DATATYPES.get(tensor.datatype)
    if datatype is None:
        return None
    shape = tuple(tensor.shape)
    count = _element_count(shape)
    if count is None:
        return None
    size = None if datatype is _BYTES else count * datatype.dtype.itemsize
    return _Header(tensor.name, datatype, shape, count, size)


def _layout_of(tensors: Any, outputs: Any, request: bool) -> _Layout | None:
    found = [_header(tensor, request) for tensor in tensors]
    headers = tuple(header for header in found if header is not None)
    if len(headers) != len(found) or len({header.name for header in headers}) != len(headers):
        return None
    sizes = [header.size for header in headers]
    return _Layout(
        headers,
        None if None in sizes else cast(list[int], sizes),
        tuple(output.name for output in outputs),
    )


def _bytes_lengths(data: bytes, count: int) -> list[int] | None:
    """The lengths of the `count` elements of raw BYTES contents; None unless they exactly
    fill `data`."""
    end = len(data)
    if count * _LENGTH_PREFIX.size > end:
        return None
    unpack = _LENGTH_PREFIX.unpack_from
    lengths = []
    offset = 0
    for _ in range(count):
        if offset + _LENGTH_PREFIX.size > end:
            return None
        (length,) = unpack(data, offset)
        offset += _LENGTH_PREFIX.size + length
        lengths.append(length)
    return lengths if offset == end else None


def _with_contents(layout: _Layout | None, contents: list[bytes]) -> _Tensors | None:
    """The layout's tensors with their raw contents, if these match it; else None."""
    if layout is None:
        return None
    if layout.sizes is not None:
        if list(map(len, contents)) != layout.sizes:
            return None
        return (layout.headers, contents, None)
    if len(contents) != len(layout.headers):
        return None
    lengths: list[list[int] | None] = []
    for header, data in zip(layout.headers, contents, strict=True):
        if header.size is None:
            found = _bytes_lengths(data, header.elements)
            if found is None:
                return None
            lengths.append(found)
        elif len(data) != header.size:
            return None
        else:
            lengths.append(None)
    return (layout.headers, contents, lengths)


_parse_request = pb.ModelInferRequest.FromString
_parse_response = pb.ModelInferResponse.FromString


class _RowDecoder:
    """Decodes the records of one table into rows.

    The common case takes no numpy per record: requests and responses whose tensors all travel
    in raw contents that match their datatype and shape. What describes the tensors (names,
    datatypes, shapes, requested outputs) repeats from call to call of a model, so a message is
    parsed, its raw contents taken out, and the rest (less the id and parameters, which are not
    needed here) serialized again as the key to its layout, worked out once. Anything else
    (typed contents, shared memory, malformed messages) goes through the converters as before,
    so it decodes, or fails with the same reason, exactly as it did.
    """

    def __init__(self) -> None:
        self._requests: dict[bytes, _Layout | None] = {}
        self._responses: dict[bytes, _Layout | None] = {}

    def row(self, request: bytes, response: bytes) -> _Row:
        """The row of a record with these request and response bytes."""
        row = self._raw_row(request, response)
        if row is not None:
            return row
        decoded = _decode(request, response)
        if decoded.error is not None:
            return _Row(error=decoded.error)
        return _Row(
            _wire_tensors(decoded.inputs),
            _wire_tensors(decoded.outputs),
            decoded.requested_outputs,
            decoded.response_parameters,
        )

    def _raw_row(self, request_bytes: bytes, response_bytes: bytes) -> _Row | None:
        inputs = outputs = _NO_TENSORS
        requested = None
        parameters = None
        try:
            if request_bytes:
                request = _parse_request(request_bytes)
                contents = request.raw_input_contents[:]
                request.ClearField("raw_input_contents")
                request.ClearField("id")
                if request.parameters:
                    request.ClearField("parameters")
                layout = self._layout(self._requests, request, True)
                found = _with_contents(layout, contents)
                if found is None or layout is None:
                    return None
                inputs, requested = found, layout.requested
            if response_bytes:
                response = _parse_response(response_bytes)
                contents = response.raw_output_contents[:]
                parameters = {}
                if response.parameters:
                    parameters = converters.parameters_from_proto(response.parameters)
                    response.ClearField("parameters")
                response.ClearField("raw_output_contents")
                response.ClearField("id")
                layout = self._layout(self._responses, response, False)
                found = _with_contents(layout, contents)
                if found is None:
                    return None
                outputs = found
        except DecodeError:
            return None
        return _Row(inputs, outputs, requested, parameters)

    @staticmethod
    def _layout(
        layouts: dict[bytes, _Layout | None], message: Any, request: bool
    ) -> _Layout | None:
        key = message.SerializeToString()
        layout = layouts.get(key, _UNSEEN)
        if layout is _UNSEEN:
            # The tensors are read only here: a message's repeated field costs 0.17 us a read.
            tensors = message.inputs if request else message.outputs
            layout = _layout_of(tensors, message.outputs if request else (), request)
            if len(key) <= _MAX_LAYOUT_KEY_BYTES:
                if len(layouts) >= _MAX_LAYOUTS:
                    layouts.clear()
                layouts[key] = layout
        return layout


def _wire_tensors(arrays: Mapping[str, np.ndarray]) -> _Tensors:
    """Decoded arrays back in their wire form, to share the columns of raw tensors."""
    headers: list[_Header] = []
    contents: list[bytes] = []
    lengths: list[list[int] | None] = []
    for name, array in arrays.items():
        datatype = _datatype(array)
        if datatype is _BYTES:
            elements = [_bytes_element(element) for element in array.reshape(-1)]
            lengths.append([len(element) for element in elements])
            contents.append(
                b"".join(
                    part
                    for element in elements
                    for part in (_LENGTH_PREFIX.pack(len(element)), element)
                )
            )
            size = None
        else:
            contents.append(np.ascontiguousarray(array, dtype=datatype.dtype).tobytes())
            lengths.append(None)
            size = len(contents[-1])
        headers.append(_Header(name, datatype, array.shape, array.size, size))
    return (tuple(headers), contents, lengths)


def _plan_columns(rows: Sequence[_Row], side: str) -> dict[str, Datatype]:
    """Tensor name -> datatype, first seen wins; rows that disagree become undecoded."""
    plan: dict[str, Datatype] = {}
    agreeing: set[int] = set()
    """The ids of header tuples (shared by the rows of one layout) known to agree with the
    plan; the rows hold them, so no id is reused meanwhile."""
    for row in rows:
        if row.error is not None:
            continue
        headers = (row.inputs if side == "input" else row.outputs)[0]
        if id(headers) in agreeing:
            continue
        for header in headers:
            known = plan.setdefault(header.name, header.datatype)
            if known is not header.datatype:
                row.error = (
                    f"{side} '{header.name}' is {header.datatype.name} in this call but "
                    f"{known.name} in earlier calls of the same file"
                )
                break
        else:
            agreeing.add(id(headers))
    return plan


def _to_storage(array: np.ndarray, datatype: Datatype) -> np.ndarray:
    flat = array.reshape(-1)
    if datatype.name == "BF16":
        # bfloat16 is the top half of a float32: shifting the bits is exact, NaNs included.
        bits = flat.view(np.uint16).astype(np.uint32) << np.uint32(16)
        return bits.view(np.float32)
    if datatype.name == "FP16":
        return flat.astype(np.float32)
    native = datatype.dtype.newbyteorder("=")
    return flat.astype(native, copy=False)


def _from_storage(values: np.ndarray, datatype: Datatype) -> np.ndarray:
    if datatype.name == "BF16":
        bits = (values.astype(np.float32, copy=False).view(np.uint32) >> np.uint32(16)).astype(
            np.uint16
        )
        return bits.view(ml_dtypes.bfloat16)
    if datatype.name == "FP16":
        return values.astype(np.float16)
    return values.astype(datatype.dtype.newbyteorder("="), copy=False)


def _bytes_element(element: Any) -> bytes:
    return element.encode() if isinstance(element, str) else bytes(element)


_POOL_JOIN_MIN_BYTES = 1 << 20
_POOL_JOIN_MIN_AVERAGE_BYTES = 4096


def _joined(chunks: Sequence[bytes]) -> bytes | pa.Buffer:
    """The chunks back to back. Large ones are copied into a buffer of Arrow's memory pool,
    which keeps its pages from call to call: `b"".join` of tens of MiB maps fresh memory each
    time, and its page faults cost five times the copy (measured: 31 against 5 ms for 48 MiB).
    """
    if len(chunks) == 1:
        return chunks[0]
    total = sum(map(len, chunks))
    if total < _POOL_JOIN_MIN_BYTES or total < len(chunks) * _POOL_JOIN_MIN_AVERAGE_BYTES:
        return b"".join(chunks)
    buffer = pa.allocate_buffer(total)
    view = memoryview(buffer).cast("B")
    offset = 0
    for chunk in chunks:
        end = offset + len(chunk)
        view[offset:end] = chunk
        offset = end
    return buffer


def _bytes_values(data: bytes | pa.Buffer, lengths: np.ndarray) -> pa.Array:
    """The elements of length-prefixed BYTES contents (one or more tensors' back to back) as
    one Arrow binary array: the length prefixes cut out in one pass."""
    count = len(lengths)
    if len(data) - count * _LENGTH_PREFIX.size >= 2**31:  # past 32-bit binary offsets
        view = memoryview(data)
        ends = np.cumsum(lengths + _LENGTH_PREFIX.size).tolist()
        return pa.array(
            [
                bytes(view[end - size : end])
                for end, size in zip(ends, lengths.tolist(), strict=True)
            ],
            type=pa.binary(),
        )
    prefixes = np.cumsum(lengths + _LENGTH_PREFIX.size) - lengths - _LENGTH_PREFIX.size
    keep = np.ones(len(data), dtype=np.bool_)
    for byte in range(_LENGTH_PREFIX.size):
        keep[prefixes + byte] = False
    values = np.frombuffer(data, dtype=np.uint8)[keep]
    offsets = np.zeros(count + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.Array.from_buffers(
        pa.binary(), count, [None, pa.py_buffer(offsets), pa.py_buffer(values)]
    )


@dataclass(slots=True)
class _ColumnParts:
    """One tensor column's rows before they become Arrow arrays."""

    headers: list[_Header | None]
    """Each row's header; None where the row has no such tensor or failed."""
    contents: list[bytes] = field(default_factory=list)
    """The present rows' contents, in row order."""
    lengths: list[Sequence[int]] = field(default_factory=list)
    """For BYTES, the present rows' element lengths, in row order."""


def _side_columns(
    rows: Sequence[_Row], plan: Mapping[str, Datatype], side: str
) -> dict[str, _ColumnParts]:
    columns = {name: _ColumnParts([None] * len(rows)) for name in plan}
    for index, row in enumerate(rows):
        if row.error is not None:
            continue
        headers, contents, lengths = row.inputs if side == "input" else row.outputs
        for position, header in enumerate(headers):
            parts = columns[header.name]
            parts.headers[index] = header
            parts.contents.append(contents[position])
            if lengths is not None:
                element_lengths = lengths[position]
                if element_lengths is not None:
                    parts.lengths.append(element_lengths)
    return columns


def _tensor_columns(
    name: str, datatype: Datatype, parts: _ColumnParts, side: str
) -> tuple[pa.Field, pa.Array, pa.Field, pa.Array]:
    """One tensor's two columns, built in bulk: one join of the rows' contents, one numpy
    conversion of the whole column."""
    headers = parts.headers
    mask = pa.array([header is None for header in headers], type=pa.bool_())
    offsets = np.zeros(len(headers) + 1, dtype=np.int64)
    np.cumsum([0 if header is None else header.elements for header in headers], out=offsets[1:])
    shape_offsets = np.zeros(len(headers) + 1, dtype=np.int64)
    np.cumsum(
        [0 if header is None else len(header.shape) for header in headers],
        out=shape_offsets[1:],
    )
    data = _joined(parts.contents)
    if datatype is _BYTES:
        lengths = np.fromiter(
            itertools.chain.from_iterable(parts.lengths), dtype=np.int64, count=int(offsets[-1])
        )
        values = _bytes_values(data, lengths)
    else:
        values = pa.array(
            _to_storage(np.frombuffer(data, dtype=datatype.dtype), datatype),
            type=_STORAGE_TYPES[datatype.name],
        )
    shapes = np.fromiter(
        itertools.chain.from_iterable(header.shape for header in headers if header is not None),
        dtype=np.int64,
        count=int(shape_offsets[-1]),
    )
    if offsets[-1] < 2**31:
        data_array = pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), values, mask=mask)
    else:  # more elements than 32-bit offsets reach (a file larger than its cap asked for)
        data_array = pa.LargeListArray.from_arrays(pa.array(offsets), values, mask=mask)
    shape = pa.ListArray.from_arrays(
        pa.array(shape_offsets, type=pa.int32()), pa.array(shapes, type=pa.int64()), mask=mask
    )
    data_prefix, shape_prefix = (
        (INPUT_PREFIX, INPUT_SHAPE_PREFIX)
        if side == "input"
        else (OUTPUT_PREFIX, OUTPUT_SHAPE_PREFIX)
    )
    return (
        pa.field(
            data_prefix + name,
            data_array.type,
            metadata={DATATYPE_METADATA_KEY: datatype.name.encode()},
        ),
        data_array,
        pa.field(shape_prefix + name, pa.list_(pa.int64())),
        shape,
    )


def _json_or_none(value: Mapping[str, ParameterValue] | None) -> str | None:
    if value is None:
        return None
    if not value:
        return "{}"  # most calls: skip the encoder
    return json.dumps(dict(value), separators=(",", ":"))


def records_to_table(
    records: Sequence[CaptureRecord], pace: Callable[[int], None] | None = None
) -> pa.Table:
    """One row per record, for records of one model version (the writer groups them so).
    `pace`, when given, is called once per record decoded (it may sleep between them).

    Never fails on a record's contents: a request or response that does not decode is kept as
    bytes (`undecoded_request` / `undecoded_response`) with the reason in `decode_error`.
    """
    requests = [record.request for record in records]
    responses = [record.response for record in records]
    columns: dict[str, list[Any] | pa.Array] = {
        "request_id": [r.request_id for r in records],
        "model_name": [r.model for r in records],
        "model_version": [r.version for r in records],
        "received": [r.received_ns for r in records],
        "responded": [r.responded_ns for r in records],
        "latency_ns": [r.latency_ns for r in records],
        "status_code": [r.status_code for r in records],
        "status": [_STATUS_NAMES.get(r.status_code, str(r.status_code)) for r in records],
        "status_message": [r.status_message for r in records],
        "trace_id": [r.trace_id for r in records],
        "span_id": [r.span_id for r in records],
        "batch_id": [r.batch_id for r in records],
        "batch_size": [r.batch_size for r in records],
        "endpoint": [r.endpoint for r in records],
        "identity": [r.identity for r in records],
        "headers": [list(r.headers.items()) for r in records],
        "parameters": [_json_or_none(r.parameters) for r in records],
        "truncated": [r.truncated for r in records],
    }
    return assemble_table(columns, requests, responses, pace)


def status_names(codes: np.ndarray) -> pa.Array:
    """The `status` column of these status codes (the grpc name, else the number)."""
    unique, inverse = np.unique(codes, return_inverse=True)
    names = pa.array([_STATUS_NAMES.get(int(code), str(int(code))) for code in unique])
    return names.take(pa.array(inverse.astype(np.int64)))


def assemble_table(
    columns: Mapping[str, list[Any] | pa.Array],
    requests: Sequence[bytes],
    responses: Sequence[bytes],
    pace: Callable[[int], None] | None = None,
) -> pa.Table:
    """The table of records whose metadata columns (every `METADATA_COLUMNS` field but those
    the tensors give: response_parameters, requested_outputs, decode_error, undecoded_request
    and undecoded_response) are `columns`, as lists or as Arrow arrays of the field's type,
    and whose request and response bytes are `requests` and `responses`: the tensors are
    decoded here. `pace` as `records_to_table`'s."""
    decoder = _RowDecoder()
    if pace is None:
        decoded = [
            decoder.row(request, response)
            for request, response in zip(requests, responses, strict=True)
        ]
    else:
        decoded = []
        for request, response in zip(requests, responses, strict=True):
            decoded.append(decoder.row(request, response))
            pace(1)
    input_plan = _plan_columns(decoded, "input")
    output_plan = _plan_columns(decoded, "output")
    failed = [row.error is not None for row in decoded]
    derived: dict[str, list[Any]] = {
        "response_parameters": [
            None if bad else _json_or_none(row.response_parameters)
            for row, bad in zip(decoded, failed, strict=True)
        ],
        "requested_outputs": [
            None if bad or not row.requested_outputs else list(row.requested_outputs)
            for row, bad in zip(decoded, failed, strict=True)
        ],
        "decode_error": [row.error for row in decoded],
        "undecoded_request": [
            request if bad else None for request, bad in zip(requests, failed, strict=True)
        ],
        "undecoded_response": [
            (response or None) if bad else None
            for response, bad in zip(responses, failed, strict=True)
        ],
    }
    fields = list(METADATA_COLUMNS)
    arrays: list[pa.Array] = []
    for f in fields:
        values = derived[f.name] if f.name in derived else columns[f.name]
        arrays.append(values if isinstance(values, pa.Array) else pa.array(values, type=f.type))
    for side, plan in (("input", input_plan), ("output", output_plan)):
        tensors = _side_columns(decoded, plan, side)
        for name, datatype in plan.items():
            data_field, data, shape_field, shape = _tensor_columns(
                name, datatype, tensors[name], side
            )
            fields += [data_field, shape_field]
            arrays += [data, shape]
    schema = pa.schema(fields, metadata={SCHEMA_METADATA_KEY: FORMAT_VERSION.encode()})
    return pa.Table.from_arrays(arrays, schema=schema)


def tensor_datatype(column: pa.Field) -> Datatype:
    """The protocol datatype of a tensor data column (from its field metadata, else from its
    Arrow type)."""
    metadata = column.metadata or {}
    name = metadata.get(DATATYPE_METADATA_KEY)
    if name is not None and name.decode() in DATATYPES:
        return DATATYPES[name.decode()]
    value_type = column.type.value_type
    if value_type not in _DEFAULT_DATATYPES:
        raise ValueError(f"column '{column.name}' of {column.type} is not a tensor column")
    return DATATYPES[_DEFAULT_DATATYPES[value_type]]


def _column_values(array: pa.Array, datatype: Datatype) -> np.ndarray:
    if datatype.name == "BYTES":
        values = np.empty(len(array), dtype=object)
        values[:] = [
            element.encode() if isinstance(element, str) else element
            for element in array.to_pylist()
        ]
        return values
    return _from_storage(array.to_numpy(zero_copy_only=False), datatype)


def _tensors(
    batch: pa.RecordBatch, data_prefix: str, shape_prefix: str
) -> list[dict[str, np.ndarray]]:
    rows: list[dict[str, np.ndarray]] = [{} for _ in range(batch.num_rows)]
    schema = batch.schema
    for index, column_field in enumerate(schema):
        if not column_field.name.startswith(data_prefix):
            continue
        name = column_field.name[len(data_prefix) :]
        shape_index = schema.get_field_index(shape_prefix + name)
        datatype = tensor_datatype(column_field)
        data = batch.column(index)
        values = _column_values(data.values, datatype)
        offsets = data.offsets.to_numpy()
        nulls = data.is_null().to_numpy(zero_copy_only=False)
        shapes = batch.column(shape_index).to_pylist() if shape_index >= 0 else None
        for row in range(batch.num_rows):
            if nulls[row]:
                continue
            flat = values[offsets[row] : offsets[row + 1]]
            shape = shapes[row] if shapes is not None else None
            rows[row][name] = flat.reshape(shape if shape is not None else (-1,))
    return rows


def _parameters(text: str | None) -> dict[str, ParameterValue]:
    return {} if not text else dict(json.loads(text))


def _redecode(request: bytes | None, response: bytes | None) -> _Decoded:
    return _decode(request or b"", response or b"")


def rows_from_table(table: pa.Table | pa.RecordBatch) -> Iterator[CaptureRow]:
    """The rows of a capture table (the inverse of `records_to_table`), batch by batch."""
    batches = [table] if isinstance(table, pa.RecordBatch) else table.to_batches()
    for batch in batches:
        inputs = _tensors(batch, INPUT_PREFIX, INPUT_SHAPE_PREFIX)
        outputs = _tensors(batch, OUTPUT_PREFIX, OUTPUT_SHAPE_PREFIX)
        received = batch.column("received").cast(pa.int64()).to_pylist()
        responded = batch.column("responded").cast(pa.int64()).to_pylist()
        metadata = batch.select(
            [name for name in batch.schema.names if name in _ROW_FIELDS]
        ).to_pylist()
        for index, values in enumerate(metadata):
            row_inputs, row_outputs = inputs[index], outputs[index]
            error = values.get("decode_error") or ""
            response_parameters = _parameters(values.get("response_parameters"))
            requested = values.get("requested_outputs")
            if error and values.get("undecoded_request") is not None:
                again = _redecode(values["undecoded_request"], values.get("undecoded_response"))
                if again.error is None:
                    row_inputs, row_outputs = again.inputs, again.outputs
                    response_parameters = again.response_parameters or {}
                    requested = list(again.requested_outputs or ())
            yield CaptureRow(
                request_id=values["request_id"] or "",
                model=values["model_name"] or "",
                version=values["model_version"] or "",
                received_ns=received[index] or 0,
                responded_ns=responded[index] or 0,
                latency_ns=values["latency_ns"] or 0,
                status_code=values["status_code"] or 0,
                status=values.get("status") or "",
                status_message=values.get("status_message") or "",
                trace_id=values.get("trace_id") or "",
                span_id=values.get("span_id") or "",
                batch_id=values.get("batch_id") or "",
                batch_size=values.get("batch_size") or 0,
                endpoint=values.get("endpoint") or "",
                identity=values.get("identity") or "",
                headers=dict(values.get("headers") or []),
                parameters=_parameters(values.get("parameters")),
                response_parameters=response_parameters,
                requested_outputs=tuple(requested or ()),
                truncated=bool(values.get("truncated")),
                decode_error=error,
                inputs=row_inputs,
                outputs=row_outputs,
            )


_ROW_FIELDS = frozenset(f.name for f in METADATA_COLUMNS) - {"received", "responded"}
