"""Spool segments -> Parquet files in the object store.

`CaptureFileWriter.write_segment` is the background stage's one call per sealed spool segment:
it groups the segment's records by partition (model, version, UTC date and hour), cuts each
group into files of about `max_file_bytes`, encodes them (Parquet, zstd) and stores them, and
returns once every file is stored. File names come from (writer id, segment sequence number,
part index) only, so writing the same segment again after a crash replaces its files rather
than duplicating rows. Blocking: the pipeline calls it from a worker thread.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from headrace.capture.columns import SegmentColumns
from headrace.capture.layout import NANOSECONDS_PER_HOUR, CaptureFile, Partition, check_writer_id
from headrace.capture.parquet import DICTIONARY_COLUMNS, records_to_table
from headrace.capture.record import CaptureRecord
from headrace.capture.store import ObjectStore

DEFAULT_MAX_FILE_BYTES = 128 * 1024 * 1024
_RECORD_OVERHEAD_BYTES = 256
"""Per row beyond the request and response bytes (metadata, offsets), for sizing files."""


@dataclass(frozen=True, slots=True)
class WrittenFile:
    """One file `write_segment` stored."""

    path: str
    rows: int
    size_bytes: int
    """Encoded (compressed) size as stored."""


class CaptureFileWriter:
    """Writes spool segments as partitioned Parquet files to `store`.

    Args:
        store: where the files go.
        writer_id: this writer's name in file names; unique among writers sharing a store
            (e.g. the host name), stable across restarts.
        max_file_bytes: files are cut before their records' (uncompressed) size passes this;
            a single larger record gets a file of its own.
        compression: Parquet codec; zstd by default.
        compression_level: the codec's level (None: its default).
        row_group_rows: rows per Parquet row group.
    """

    def __init__(
        self,
        store: ObjectStore,
        writer_id: str,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        *,
        compression: str = "zstd",
        compression_level: int | None = None,
        row_group_rows: int = 64 * 1024,
    ) -> None:
        if max_file_bytes < 1:
            raise ValueError("max_file_bytes must be >= 1")
        self.store = store
        self.writer_id = check_writer_id(writer_id)
        self.max_file_bytes = max_file_bytes
        self._compression = compression
        self._compression_level = compression_level
        self._row_group_rows = row_group_rows

    def write_segment(
        self,
        segment_seq: int,
        records: Sequence[CaptureRecord],
        pace: Callable[[int], None] | None = None,
    ) -> list[str]:
        """Store `records` (spool segment `segment_seq`) as Parquet files; their paths.
        `pace`, when given, is called with the number of records each step has converted
        (it may sleep: the converter's `Pacer`).

        Raises:
            ObjectStoreError: a file could not be stored after the store's retries; keep the
                segment and call again later (files already stored are simply replaced).
        """
        return [written.path for written in self.write_segment_files(segment_seq, records, pace)]

    def write_segment_files(
        self,
        segment_seq: int,
        records: Sequence[CaptureRecord],
        pace: Callable[[int], None] | None = None,
    ) -> list[WrittenFile]:
        """`write_segment`, saying how many rows and bytes each file holds (for metrics)."""
        if segment_seq < 0:
            raise ValueError("segment sequence number must be >= 0")
        # Grouped by (model, version, hour since the epoch): a Partition per record (a
        # datetime and a dataclass) cost more than the rest of the grouping.
        hours: dict[tuple[str, str, int], list[CaptureRecord]] = {}
        for record in records:
            key = (record.model, record.version, record.received_ns // NANOSECONDS_PER_HOUR)
            group = hours.get(key)
            if group is None:
                hours[key] = [record]
            else:
                group.append(record)
        groups = {
            Partition.of(model, version, hour * NANOSECONDS_PER_HOUR): group
            for (model, version, hour), group in hours.items()
        }
        written = []
        for partition in sorted(groups):
            group = groups[partition]
            sizes = [len(record.request) + len(record.response) for record in group]
            for part, (start, end) in enumerate(self._parts(sizes)):
                chunk = group[start:end]
                path = CaptureFile(partition, self.writer_id, segment_seq, part).path
                data = self.encode(chunk, pace)
                self.store.put(path, data)
                written.append(WrittenFile(path, len(chunk), len(data)))
                if pace is not None:
                    pace(len(chunk))
        return written

    def write_columns(
        self,
        segment_seq: int,
        segment: SegmentColumns,
        pace: Callable[[int], None] | None = None,
    ) -> list[WrittenFile]:
        """`write_segment_files` for a segment decoded column-wise: the same files (names,
        partitions, parts, tables)."""
        if segment_seq < 0:
            raise ValueError("segment sequence number must be >= 0")
        written = []
        for partition, indices in segment.partitions():
            for part, (start, end) in enumerate(self._parts(segment.tensor_bytes(indices))):
                chunk = indices[start:end]
                path = CaptureFile(partition, self.writer_id, segment_seq, part).path
                data = self._encoded(segment.table(chunk, pace))
                self.store.put(path, data)
                written.append(WrittenFile(path, len(chunk), len(data)))
                if pace is not None:
                    pace(len(chunk))
        return written

    def _parts(self, tensor_bytes: list[int]) -> list[tuple[int, int]]:
        """(start, end) of each file's records, given each record's request and response
        bytes: a record that would take a file past `max_file_bytes` starts the next one (a
        larger record gets one of its own)."""
        parts: list[tuple[int, int]] = []
        start = total = 0
        for index, size in enumerate(tensor_bytes):
            size += _RECORD_OVERHEAD_BYTES
            if index > start and total + size > self.max_file_bytes:
                parts.append((start, index))
                start, total = index, 0
            total += size
        if start < len(tensor_bytes):
            parts.append((start, len(tensor_bytes)))
        return parts

    def encode(
        self, records: Sequence[CaptureRecord], pace: Callable[[int], None] | None = None
    ) -> bytes:
        """One Parquet file of `records` (one model version); `pace` as `write_segment`'s."""
        return self._encoded(records_to_table(records, pace))

    def _encoded(self, table: pa.Table) -> bytes:
        sink = pa.BufferOutputStream()
        pq.write_table(
            table,
            sink,
            compression=self._compression,
            compression_level=self._compression_level,
            use_dictionary=list(DICTIONARY_COLUMNS),
            row_group_size=self._row_group_rows,
        )
        return bytes(sink.getvalue().to_pybytes())
