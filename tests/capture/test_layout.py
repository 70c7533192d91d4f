"""Capture paths: formatted from a call's partition and the (writer, segment, part), and read
back."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from headrace.capture.layout import (
    CaptureFile,
    Partition,
    capture_file_path,
    check_writer_id,
    parse_capture_path,
)
from headrace.capture.store import LocalStore
from tests.capture.samples import BASE_NS, HOUR_NS


def test_path_layout() -> None:
    path = capture_file_path("sales_forecast", "3", BASE_NS, "host-a", 42, 1)
    assert path == (
        "model=sales_forecast/version=3/date=2026-11-27/hour=10/host-a-000000000042-0001.parquet"
    )


def test_partition_is_the_utc_hour_of_the_received_time() -> None:
    assert Partition.of("m", "1", BASE_NS - 1).hour == 10
    assert Partition.of("m", "1", BASE_NS + 45 * 60 * 10**9 - 1).hour == 10
    assert Partition.of("m", "1", BASE_NS + 45 * 60 * 10**9).hour == 11
    assert Partition.of("m", "1", BASE_NS + 14 * HOUR_NS).date == date(2026, 11, 28)


def test_names_are_deterministic() -> None:
    first = capture_file_path("m", "1", BASE_NS, "w", 7, 0)
    assert capture_file_path("m", "1", BASE_NS + 1000, "w", 7, 0) == first
    assert capture_file_path("m", "1", BASE_NS, "w", 7, 1) != first
    assert capture_file_path("m", "1", BASE_NS, "w", 8, 0) != first
    assert capture_file_path("m", "1", BASE_NS, "v", 7, 0) != first


@given(
    model=st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,20}", fullmatch=True),
    version=st.sampled_from(["", "1", "17"]),
    received_ns=st.integers(0, 2**62),
    writer=st.from_regex(r"[A-Za-z0-9_.][A-Za-z0-9_.\-]{0,20}", fullmatch=True),
    segment_seq=st.integers(0, 2**63),
    part=st.integers(0, 10**6),
)
def test_parse_reads_back_what_was_formatted(
    model: str, version: str, received_ns: int, writer: str, segment_seq: int, part: int
) -> None:
    path = capture_file_path(model, version, received_ns, writer, segment_seq, part)
    parsed = parse_capture_path(f"some/prefix/{path}")
    assert parsed == CaptureFile(
        Partition.of(model, version, received_ns), writer, segment_seq, part
    )


def test_empty_version_is_hives_null_partition() -> None:
    path = capture_file_path("m", "", BASE_NS, "w", 0, 0)
    assert "/version=__HIVE_DEFAULT_PARTITION__/" in path


@pytest.mark.parametrize(
    "path",
    [
        "model=m/version=1/date=2026-11-27/hour=10/notes.txt",
        "model=m/version=1/date=2026-11-27/hour=24/w-1-0.parquet",
        "model=m/version=1/date=2026-13-27/hour=10/w-1-0.parquet",
        "model=m/date=2026-11-27/hour=10/w-1-0.parquet",
        "version=1/model=m/date=2026-11-27/hour=10/w-1-0.parquet",
        "w-1-0.parquet",
    ],
)
def test_other_paths_are_not_capture_files(path: str) -> None:
    assert parse_capture_path(path) is None


def test_overlap_prunes_by_hour() -> None:
    partition = Partition.of("m", "1", BASE_NS)
    ten = datetime(2026, 11, 27, 10, tzinfo=UTC)
    eleven = datetime(2026, 11, 27, 11, tzinfo=UTC)
    assert partition.overlaps(None, None)
    assert partition.overlaps(ten, eleven)
    assert not partition.overlaps(eleven, None)
    assert not partition.overlaps(None, ten)
    assert partition.overlaps(datetime(2026, 11, 27, 10, 59, tzinfo=UTC), None)


@pytest.mark.parametrize("writer", ["", "a/b", "-x", "a=b"])
def test_writer_ids_that_break_paths_are_refused(writer: str) -> None:
    with pytest.raises(ValueError, match="writer id"):
        check_writer_id(writer)


@pytest.mark.parametrize("model", ["../../etc", "a/b", "x" * 5000, "ü" * 300, "%2F"])
def test_any_model_name_a_client_sends_gives_a_usable_path(model: str, tmp_path: Path) -> None:
    path = capture_file_path(model, "1", BASE_NS, "w", 0, 0)
    assert all(len(part) <= 255 and part not in ("", ".", "..") for part in path.split("/"))
    assert len(path) < 1024
    LocalStore(tmp_path).put(path, b"1")
    parsed = parse_capture_path(path)
    assert parsed is not None
    if len(model) < 100:
        assert parsed.partition.model == model
