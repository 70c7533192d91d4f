"""Reading captures back: rows (metadata + numpy tensors) or whole arrays per tensor.

    from headrace.capture.reader import read_records, read_arrays

    for row in read_records("captures/", "sales_forecast", start=yesterday):
        row.request_id, row.received, row.inputs["INPUT0"], row.outputs["OUTPUT0"]

    arrays = read_arrays("s3://bucket/prefix", "sales_forecast", endpoint="127.0.0.1:8333",
                         scheme="http")
    arrays["input.INPUT0"], arrays["output.OUTPUT0"]  # every OK call, concatenated on axis 0

`source` is an ObjectStore, a local folder, or `s3://bucket/prefix` (S3 options as keywords:
endpoint, region, scheme; credentials from the AWS chain). Files are read one at a time, so
memory holds one file; only the partitions (UTC hours) that overlap [start, end) are read.
Rows come in file order (by date, hour, writer, segment), which is received order per writer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from headrace.capture.layout import CaptureFile, parse_capture_path, partition_prefix
from headrace.capture.parquet import CaptureRow, rows_from_table
from headrace.capture.store import LocalStore, ObjectStore, S3Store

__all__ = [
    "CaptureRow",
    "StoredFile",
    "list_files",
    "open_source",
    "read_arrays",
    "read_records",
    "read_tables",
]

Source = ObjectStore | str | Path


@dataclass(frozen=True, slots=True)
class StoredFile:
    """One capture file in a store."""

    path: str
    size_bytes: int
    file: CaptureFile


def open_source(
    source: Source,
    *,
    endpoint: str | None = None,
    region: str = "us-east-1",
    scheme: str = "https",
) -> ObjectStore:
    """The store `source` names: a store as it is, `s3://bucket/prefix`, else a local folder."""
    if not isinstance(source, str | Path):
        return source
    text = str(source)
    if text.startswith("s3://"):
        return S3Store.from_uri(text, endpoint=endpoint, region=region, scheme=scheme)
    return LocalStore(text, fsync=False)


def _utc(moment: datetime | None) -> datetime | None:
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def list_files(
    store: ObjectStore,
    model: str | None = None,
    version: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
) -> list[StoredFile]:
    """The capture files of `model` (all models when None) and `version` whose UTC hour
    overlaps [start, end) (naive datetimes are UTC), in partition and write order."""
    start, end = _utc(start), _utc(end)
    prefix = partition_prefix(model, version) if model is not None else ""
    found = []
    for path, size in store.list(prefix):
        parsed = parse_capture_path(path)
        if parsed is None:
            continue
        partition = parsed.partition
        if prefix and not partition_prefix(partition.model, partition.version).startswith(prefix):
            continue  # compared encoded: a very long model name is cut in the path
        if partition.overlaps(start, end):
            found.append(StoredFile(path, size, parsed))
    found.sort(key=lambda stored: (stored.file, stored.path))
    return found


def read_tables(
    source: Source,
    model: str | None = None,
    version: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    **source_options: str,
) -> Iterator[tuple[StoredFile, pa.Table]]:
    """Each capture file as an Arrow table, one at a time, with rows outside [start, end)
    removed."""
    store = open_source(source, **source_options)
    start, end = _utc(start), _utc(end)
    for stored in list_files(store, model, version, start, end):
        table = pq.read_table(pa.BufferReader(store.get(stored.path)))
        if start is not None or end is not None:
            received = table.column("received").cast(pa.int64()).to_numpy()
            keep = np.ones(len(received), dtype=bool)
            if start is not None:
                keep &= received >= _nanoseconds(start)
            if end is not None:
                keep &= received < _nanoseconds(end)
            if not keep.all():
                table = table.filter(pa.array(keep))
        yield stored, table


def _nanoseconds(moment: datetime) -> int:
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


def read_records(
    source: Source,
    model: str,
    version: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    **source_options: str,
) -> Iterator[CaptureRow]:
    """Every captured call of `model` (any version when None) received in [start, end)
    (naive datetimes are UTC), as `CaptureRow`s, streaming file by file."""
    for _, table in read_tables(source, model, version, start, end, **source_options):
        yield from rows_from_table(table)


def read_arrays(
    source: Source,
    model: str,
    version: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    *,
    only_ok: bool = True,
    **source_options: str,
) -> dict[str, np.ndarray]:
    """Each tensor of `model` over the time range, every call's tensor concatenated along
    axis 0 (the batch dimension, as the batcher merges requests): keys `input.NAME` and
    `output.NAME`. `only_ok` (default) keeps calls that succeeded, so inputs and outputs line
    up row for row; a tensor some calls lack has fewer rows.

    Raises:
        ValueError: calls disagree on a tensor's dtype or its shape after axis 0.
    """
    parts: dict[str, list[np.ndarray]] = {}
    for row in read_records(source, model, version, start, end, **source_options):
        if only_ok and row.status_code != 0:
            continue
        for side, tensors in (("input", row.inputs), ("output", row.outputs)):
            for name, array in tensors.items():
                parts.setdefault(f"{side}.{name}", []).append(np.atleast_1d(array))
    result = {}
    for key, arrays in parts.items():
        try:
            result[key] = np.concatenate(arrays, axis=0)
        except ValueError as exc:
            raise ValueError(f"{key}: calls have shapes that do not line up: {exc}") from exc
    return result
