"""The converter's fast path: a spool segment's records decoded column by column.

A format-2 record is a fixed header (numbers and the byte lengths of the variable fields)
followed by those fields, so a whole segment's headers can be read as one numpy structured
array and each string field gathered into one Arrow string array, without a Python object per
record and field. Only the tensors (`parquet.assemble_table`) are still decoded record by
record. This covers the common segment: every record in format 2 without selected headers or
request parameters (so no shadow records), strings that are UTF-8, a batch size within the
column's int32. For any other segment `SegmentColumns.decode` says None and the converter
decodes `CaptureRecord`s one by one; both give the same tables (tested).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from headrace.capture.layout import NANOSECONDS_PER_HOUR, Partition
from headrace.capture.parquet import METADATA_COLUMNS, assemble_table, status_names
from headrace.capture.record import FORMAT_VERSION, HEADER, STRING_FIELDS, TRUNCATED_FLAG

_HEADER_DTYPE = np.dtype(
    [
        ("format", "u1"),
        ("flags", "u1"),
        ("received", "<i8"),
        ("responded", "<i8"),
        ("latency", "<i8"),
        ("code", "<i4"),
        ("batch_size", "<i8"),
        ("sizes", "<u4", (13,)),
    ]
)
"""`record.HEADER` as a numpy record (packed, little-endian)."""
assert _HEADER_DTYPE.itemsize == HEADER.size
_STRING_COLUMNS = (
    "request_id",
    "model_name",
    "model_version",
    "status_message",
    "trace_id",
    "span_id",
    "batch_id",
    "endpoint",
    "identity",
)
"""The string fields after the header, in their order (`CaptureRecord`'s first nine)."""
_HEADERS, _PARAMETERS, _REQUEST, _RESPONSE = range(STRING_FIELDS, STRING_FIELDS + 4)
_INT32 = np.iinfo(np.int32)
_FIELD_TYPES = {field.name: field.type for field in METADATA_COLUMNS}


@dataclass(frozen=True, slots=True)
class SegmentColumns:
    """A segment's records, column-wise: the metadata as Arrow arrays (one element per
    record, in spool order), the request and response bytes per record."""

    columns: dict[str, pa.Array]
    requests: list[bytes]
    responses: list[bytes]
    received_ns: np.ndarray

    @classmethod
    def decode(cls, data: bytes, spans: Sequence[tuple[int, int]]) -> SegmentColumns | None:
        """The records at `spans` ((offset, length) of each entry in `data`), or None when
        the segment is not one for the fast path (see the module's docstring): a record of
        another format, with headers or parameters, with unknown flags, whose lengths do
        not add up, with a string that is not UTF-8, or a batch size past int32."""
        count = len(spans)
        if not count:
            return None
        buffer = np.frombuffer(data, np.uint8)
        where = np.array(spans, dtype=np.int64).reshape(count, 2)
        offsets, lengths = where[:, 0], where[:, 1]
        if int(lengths.min()) < HEADER.size:
            return None
        headers = buffer[offsets[:, None] + np.arange(HEADER.size)].view(_HEADER_DTYPE)[:, 0]
        sizes = headers["sizes"].astype(np.int64)
        if (
            np.any(headers["format"] != FORMAT_VERSION)
            or np.any(headers["flags"] & ~np.uint8(TRUNCATED_FLAG))
            or np.any(sizes[:, _HEADERS])
            or np.any(sizes[:, _PARAMETERS])
            or np.any(sizes.sum(axis=1) + HEADER.size != lengths)
        ):
            return None
        batch_sizes = headers["batch_size"]
        if int(batch_sizes.min()) < _INT32.min or int(batch_sizes.max()) > _INT32.max:
            return None
        starts = offsets[:, None] + HEADER.size + np.cumsum(sizes, axis=1) - sizes
        columns: dict[str, pa.Array] = {}
        try:
            for index, name in enumerate(_STRING_COLUMNS):
                columns[name] = _strings(buffer, starts[:, index], sizes[:, index])
        except pa.ArrowInvalid:  # not UTF-8: the record-by-record path says which record
            return None
        received = headers["received"].copy()
        codes = headers["code"].copy()
        columns["received"] = pa.array(received, type=_FIELD_TYPES["received"])
        columns["responded"] = pa.array(headers["responded"].copy(), type=_FIELD_TYPES["responded"])
        columns["latency_ns"] = pa.array(headers["latency"].copy(), type=pa.int64())
        columns["status_code"] = pa.array(codes, type=pa.int32())
        columns["status"] = status_names(codes)
        columns["batch_size"] = pa.array(batch_sizes.astype(np.int32), type=pa.int32())
        columns["headers"] = pa.array([[]] * count, type=_FIELD_TYPES["headers"])
        columns["parameters"] = _repeated("{}", count)  # as `records_to_table` writes {}
        columns["truncated"] = pa.array((headers["flags"] & TRUNCATED_FLAG).astype(bool))
        requests = _slices(data, starts[:, _REQUEST], sizes[:, _REQUEST])
        responses = _slices(data, starts[:, _RESPONSE], sizes[:, _RESPONSE])
        return cls(columns, requests, responses, received)

    def __len__(self) -> int:
        return len(self.requests)

    def model_versions(self) -> set[tuple[str, str]]:
        """The (model, version) pairs present."""
        pairs = (
            pa.Table.from_arrays(
                [self.columns["model_name"], self.columns["model_version"]], ["model", "version"]
            )
            .group_by(["model", "version"])
            .aggregate([])
        )
        return set(zip(pairs["model"].to_pylist(), pairs["version"].to_pylist(), strict=True))

    def counts(self) -> dict[str, int]:
        """Records per model."""
        models = self.columns["model_name"].value_counts()
        return {str(item["values"]): int(item["counts"]) for item in models.to_pylist()}

    def partitions(self) -> Iterator[tuple[Partition, np.ndarray]]:
        """Each partition (model, version, UTC hour) with the indices of its records, in
        spool order; partitions in sorted order."""
        hours = self.received_ns // NANOSECONDS_PER_HOUR
        models = self.columns["model_name"].to_pylist()
        versions = self.columns["model_version"].to_pylist()
        if (
            len(set(models)) == 1
            and len(set(versions)) == 1
            and int(hours.min()) == int(hours.max())
        ):
            everything = np.arange(len(self), dtype=np.int64)
            yield Partition.of(models[0], versions[0], int(self.received_ns[0])), everything
            return
        groups: dict[tuple[str, str, int], list[int]] = {}
        for index, key in enumerate(zip(models, versions, hours.tolist(), strict=True)):
            groups.setdefault(key, []).append(index)
        found = {
            Partition.of(model, version, hour * NANOSECONDS_PER_HOUR): indices
            for (model, version, hour), indices in groups.items()
        }
        for partition in sorted(found):
            yield partition, np.array(found[partition], dtype=np.int64)

    def tensor_bytes(self, indices: np.ndarray) -> list[int]:
        """Request plus response bytes of each record at `indices` (for cutting files)."""
        return [
            len(self.requests[index]) + len(self.responses[index]) for index in indices.tolist()
        ]

    def table(self, indices: np.ndarray, pace: Callable[[int], None] | None = None) -> pa.Table:
        """The Parquet table of the records at `indices` (one model version)."""
        if len(indices) == len(self):
            columns = self.columns
            requests, responses = self.requests, self.responses
        else:
            taken = pa.array(indices)
            columns = {name: array.take(taken) for name, array in self.columns.items()}
            positions = indices.tolist()
            requests = [self.requests[index] for index in positions]
            responses = [self.responses[index] for index in positions]
        return assemble_table(columns, requests, responses, pace)


def _strings(buffer: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> pa.Array:
    """The strings at `starts` with `sizes` bytes in `buffer`, as one Arrow string array
    (UTF-8 checked; raises pyarrow.ArrowInvalid otherwise)."""
    count = len(starts)
    offsets = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    total = int(offsets[-1])
    if total > _INT32.max:
        raise pa.ArrowInvalid("strings too large for one array")
    # Byte i of string r sits at starts[r] + i: one gather for all of them.
    positions = np.repeat(starts - offsets[:-1], sizes) + np.arange(total, dtype=np.int64)
    values = buffer[positions]
    array = pa.StringArray.from_buffers(
        count, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(values)
    )
    array.validate(full=True)
    return array


def _repeated(text: str, count: int) -> pa.Array:
    """A string array of `count` times `text`."""
    return pa.array([text]).take(pa.array(np.zeros(count, dtype=np.int64)))


def _slices(data: bytes, starts: np.ndarray, sizes: np.ndarray) -> list[bytes]:
    return [
        data[start : start + size]
        for start, size in zip(starts.tolist(), sizes.tolist(), strict=True)
    ]
