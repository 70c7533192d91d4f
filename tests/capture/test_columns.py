"""The converter's column-wise fast path writes exactly the files (names, partitions, parts,
tables) that decoding record by record writes, and leaves every segment it does not cover to
that path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headrace.capture.columns import SegmentColumns
from headrace.capture.converter import _store_segment
from headrace.capture.record import CaptureRecord
from headrace.capture.spool import Spool, entry_spans, frame
from headrace.capture.store import LocalStore
from headrace.capture.writer import CaptureFileWriter, WrittenFile
from headrace.config import ModelCaptureSettings
from tests.capture.samples import BASE_NS, make_record

HOUR_NS = 3600 * 1_000_000_000
TENSORS = {
    "A": np.arange(4, dtype=np.int32).reshape(2, 2),
    "B": np.array([b"x\x00", b""], dtype=object),
    "C": np.array([0.5], dtype=np.float16),
}


def _segment(records: list[CaptureRecord]) -> tuple[bytes, list[tuple[int, int]]]:
    data = b"".join(frame(record.encode()) for record in records)
    return data, entry_spans(data, Path("test-segment"))


def _written_by_both(
    records: list[CaptureRecord], tmp_path: Path, max_file_bytes: int = 1 << 30
) -> tuple[list[WrittenFile], list[WrittenFile], Path, Path]:
    data, spans = _segment(records)
    columns = SegmentColumns.decode(data, spans)
    assert columns is not None
    fast = tmp_path / "fast"
    slow = tmp_path / "slow"
    by_columns = CaptureFileWriter(LocalStore(fast, fsync=False), "w-0", max_file_bytes)
    by_records = CaptureFileWriter(LocalStore(slow, fsync=False), "w-0", max_file_bytes)
    return (
        by_columns.write_columns(7, columns),
        by_records.write_segment_files(7, records),
        fast,
        slow,
    )


def _assert_same_files(
    fast_files: list[WrittenFile], slow_files: list[WrittenFile], fast: Path, slow: Path
) -> None:
    assert [(f.path, f.rows) for f in fast_files] == [(f.path, f.rows) for f in slow_files]
    for written in slow_files:
        expected = pq.read_table(slow / written.path)
        actual = pq.read_table(fast / written.path)
        assert actual.schema.equals(expected.schema, check_metadata=True)
        assert actual.equals(expected)


call = st.tuples(
    st.sets(st.sampled_from(sorted(TENSORS)), min_size=1),
    st.booleans(),  # answered
    st.sampled_from(["m", "other", "modèle"]),
    st.sampled_from(["1", "2"]),
    st.integers(0, 2),  # hour
    st.sampled_from(["", "déjà vu", "UNAVAILABLE: backend down"]),
    st.booleans(),  # truncated
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(calls=st.lists(call, min_size=1, max_size=12))
def test_the_fast_path_writes_what_the_record_path_writes(
    calls: list[tuple[set[str], bool, str, str, int, str, bool]],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    records = []
    for index, (names, answered, model, version, hour, message, truncated) in enumerate(calls):
        inputs = {name: TENSORS[name] for name in sorted(names)}
        record = make_record(
            f"r{index}-ü" if index % 3 == 0 else f"r{index}",
            inputs,
            {"OUT": np.array([index], np.uint64)} if answered else None,
            model=model,
            version=version,
            received_ns=BASE_NS + hour * HOUR_NS + index,
            status_code=0 if answered else 14,
            status_message=message,
            trace_id=f"{index:032x}",
            span_id=f"{index:016x}",
            batch_id=f"batch-{index // 2}",
            batch_size=index % 5,
            endpoint="local",
            identity="team-a" if index % 2 else "",
        )
        if truncated:
            record = CaptureRecord(
                **{**_fields(record), "request": b"", "response": b"", "truncated": True}
            )
        records.append(record)
    # Small files: the parts of a partition are cut alike too.
    _assert_same_files(*_written_by_both(records, tmp_path_factory.mktemp("w"), 2048))


def _fields(record: CaptureRecord) -> dict[str, object]:
    return {name: getattr(record, name) for name in CaptureRecord.__dataclass_fields__}


def test_one_partition_of_many_records_is_one_file_with_their_counts(tmp_path: Path) -> None:
    records = [
        make_record(f"r{index}", {"A": TENSORS["A"]}, {"A": TENSORS["A"]}) for index in range(50)
    ]
    fast_files, slow_files, fast, slow = _written_by_both(records, tmp_path)
    assert len(fast_files) == 1
    _assert_same_files(fast_files, slow_files, fast, slow)
    data, spans = _segment(records)
    columns = SegmentColumns.decode(data, spans)
    assert columns is not None
    assert columns.counts() == {"m": 50}
    assert columns.model_versions() == {("m", "1")}


@pytest.mark.parametrize(
    "odd",
    [
        make_record("h", {"A": TENSORS["A"]}, headers={"x-tenant": "acme"}),
        make_record("p", {"A": TENSORS["A"]}, parameters={"headrace_shadow_of": "1"}),
        make_record("b", {"A": TENSORS["A"]}, batch_size=2**31),
    ],
    ids=["headers", "parameters", "batch-size-past-int32"],
)
def test_segments_the_fast_path_does_not_cover_are_left_to_the_record_path(
    odd: CaptureRecord,
) -> None:
    plain = make_record("plain", {"A": TENSORS["A"]})
    assert SegmentColumns.decode(*_segment([plain])) is not None
    assert SegmentColumns.decode(*_segment([plain, odd])) is None


def test_a_string_that_is_not_utf8_is_left_to_the_record_path() -> None:
    entry = bytearray(make_record("abc", {"A": TENSORS["A"]}).encode())
    at = bytes(entry).index(b"abc")
    entry[at] = 0xFF  # the request id's first byte
    data = frame(bytes(entry))
    assert SegmentColumns.decode(data, entry_spans(data, Path("s"))) is None
    assert SegmentColumns.decode(b"", []) is None


def test_the_converter_applies_rules_through_the_record_path(tmp_path: Path) -> None:
    spool = Spool(
        tmp_path / "spool", max_bytes=1 << 30, segment_max_bytes=1 << 30, segment_max_age_s=60
    )
    spool.append(
        [make_record(f"r{i}", {"A": TENSORS["A"], "B": TENSORS["B"]}).encode() for i in range(3)]
    )
    spool.seal()
    (segment,) = spool.sealed()
    spool.close()
    writer = CaptureFileWriter(LocalStore(tmp_path / "store", fsync=False), "w-0")
    rules = {("m", "1"): ModelCaptureSettings(drop=("inputs.B",))}
    assert _store_segment(writer, segment.path, segment.seq, rules, b"") == {"m": 3}
    (stored,) = (tmp_path / "store").rglob("*.parquet")
    names = pq.read_schema(stored).names
    assert "input.A" in names
    assert "input.B" not in names
