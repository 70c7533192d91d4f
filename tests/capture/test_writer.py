"""The segment writer: partitioned Parquet files, cut by size, named deterministically."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from headrace.capture.layout import Partition, parse_capture_path
from headrace.capture.parquet import rows_from_table
from headrace.capture.store import LocalStore, ObjectStore
from headrace.capture.writer import CaptureFileWriter
from headrace.errors import ObjectStoreError
from headrace.launchers.seaweedfs import SeaweedFS
from tests.capture.samples import BASE_NS, HOUR_NS, make_record


def records_across_partitions() -> list:
    vector = np.arange(4, dtype=np.float32)
    return [
        make_record("a1", {"X": vector}, {"Y": vector}, model="a", received_ns=BASE_NS),
        make_record("b1", {"X": vector}, {"Y": vector}, model="b", received_ns=BASE_NS + 1),
        make_record("a2", {"X": vector}, {"Y": vector}, model="a", received_ns=BASE_NS + 2),
        make_record("a3", {"X": vector}, None, model="a", version="2", status_code=13),
        make_record("a4", {"X": vector}, {"Y": vector}, model="a", received_ns=BASE_NS + HOUR_NS),
    ]


def rows_by_path(store: ObjectStore) -> dict[str, list[str]]:
    return {
        path: [
            row.request_id for row in rows_from_table(pq.read_table(io.BytesIO(store.get(path))))
        ]
        for path, _ in store.list()
    }


def test_segment_becomes_one_file_per_partition(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    writer = CaptureFileWriter(store, "host-1", max_file_bytes=1 << 20)
    paths = writer.write_segment(5, records_across_partitions())
    assert rows_by_path(store) == {
        "model=a/version=1/date=2026-11-27/hour=10/host-1-000000000005-0000.parquet": ["a1", "a2"],
        "model=a/version=1/date=2026-11-27/hour=11/host-1-000000000005-0000.parquet": ["a4"],
        "model=a/version=2/date=2026-11-27/hour=10/host-1-000000000005-0000.parquet": ["a3"],
        "model=b/version=1/date=2026-11-27/hour=10/host-1-000000000005-0000.parquet": ["b1"],
    }
    assert sorted(paths) == sorted(path for path, _ in store.list())


def test_writing_a_segment_again_replaces_its_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    writer = CaptureFileWriter(store, "host-1")
    first = writer.write_segment(5, records_across_partitions())
    again = CaptureFileWriter(store, "host-1").write_segment(5, records_across_partitions())
    assert again == first
    assert sum(len(ids) for ids in rows_by_path(store).values()) == 5


def test_files_are_cut_by_size(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    tensor = np.zeros(1000, dtype=np.float64)  # 8 kB per request
    records = [make_record(f"r{i}", {"X": tensor}) for i in range(10)]
    written = CaptureFileWriter(store, "w", max_file_bytes=20_000).write_segment_files(3, records)
    assert [file.rows for file in written] == [2, 2, 2, 2, 2]
    assert [parse_capture_path(file.path).part for file in written] == [0, 1, 2, 3, 4]  # type: ignore[union-attr]
    assert all(
        size == file.size_bytes for file, (_, size) in zip(written, store.list(), strict=True)
    )
    assert [rid for ids in rows_by_path(store).values() for rid in ids] == [
        f"r{i}" for i in range(10)
    ]


def test_files_are_zstd_parquet(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    (path,) = CaptureFileWriter(store, "w").write_segment(0, records_across_partitions()[:1])
    metadata = pq.ParquetFile(io.BytesIO(store.get(path))).metadata
    assert metadata.row_group(0).column(0).compression == "ZSTD"


def test_writer_writes_to_s3(seaweedfs: SeaweedFS) -> None:
    store = seaweedfs.store(f"test-writer-{uuid.uuid4().hex[:8]}")
    paths = CaptureFileWriter(store, "w").write_segment(1, records_across_partitions())
    assert len(paths) == 4
    assert sum(len(ids) for ids in rows_by_path(store).values()) == 5


def test_a_failed_upload_raises(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    writer = CaptureFileWriter(LocalStore(tmp_path / "file"), "w")
    with pytest.raises(ObjectStoreError):
        writer.write_segment(0, records_across_partitions())


def test_records_land_in_the_hour_they_were_received(tmp_path: Path) -> None:
    """Records are grouped by hour since the epoch: the same partitions, at hour boundaries
    and before 1970 too, as Partition.of gives each record."""
    hour_start = BASE_NS - BASE_NS % HOUR_NS
    times = [hour_start - 1, hour_start, hour_start + HOUR_NS - 1, hour_start + HOUR_NS, -1, 0]
    vector = np.arange(2, dtype=np.int8)
    records = [
        make_record(f"r{index}", {"X": vector}, received_ns=received_ns)
        for index, received_ns in enumerate(times)
    ]
    store = LocalStore(tmp_path)
    CaptureFileWriter(store, "w").write_segment(0, records)
    folder_of = {
        request_id: path.rsplit("/", 1)[0]
        for path, request_ids in rows_by_path(store).items()
        for request_id in request_ids
    }
    assert folder_of == {
        record.request_id: Partition.of(record.model, record.version, record.received_ns).directory
        for record in records
    }
    assert len(set(folder_of.values())) == 5
