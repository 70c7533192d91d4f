"""The capture stage's worker process: it stores a sealed segment's records, and runs at the
configured niceness so that serving keeps the CPUs when they are saturated."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

from headrace.capture.converter import ConverterError, SegmentConverter, _store_segment
from headrace.capture.spool import Spool
from headrace.capture.store import LocalStore
from headrace.capture.writer import CaptureFileWriter
from headrace.config import CaptureSettings, LocalStoreSettings
from headrace.errors import ObjectStoreError
from tests.capture.conftest import stored_request_ids
from tests.capture.test_pipeline import record


def test_segment_is_stored_by_a_lower_priority_process(tmp_path: Path) -> None:
    spool = Spool(
        tmp_path / "spool", max_bytes=1 << 30, segment_max_bytes=1 << 20, segment_max_age_s=60
    )
    spool.append([record(f"n{index}").encode() for index in range(5)])
    spool.seal()
    (segment,) = spool.sealed()
    settings = CaptureSettings(
        enabled=True,
        spool_dir=tmp_path / "spool",
        store=LocalStoreSettings(path=tmp_path / "store"),
        converter_niceness=7,
    )
    converter = SegmentConverter(settings, "test-0", b"salt")
    try:
        assert converter.store(segment, {}) == {"identity": 5}
        pid = converter.pid
        assert pid is not None
        assert os.getpriority(os.PRIO_PROCESS, pid) == os.getpriority(os.PRIO_PROCESS, 0) + 7
        if hasattr(os, "SCHED_BATCH"):
            assert os.sched_getscheduler(pid) == os.SCHED_BATCH
    finally:
        converter.stop()
        spool.close()
    assert sorted(stored_request_ids(tmp_path / "store")) == [f"n{index}" for index in range(5)]


def test_the_collector_is_paused_only_while_a_segment_is_stored(tmp_path: Path) -> None:
    spool = Spool(
        tmp_path / "spool", max_bytes=1 << 30, segment_max_bytes=1 << 20, segment_max_age_s=60
    )
    spool.append([record(f"n{index}").encode() for index in range(3)])
    spool.seal()
    (segment,) = spool.sealed()
    spool.close()
    assert gc.isenabled()
    stored = CaptureFileWriter(LocalStore(tmp_path / "store", fsync=False), "test-0")
    assert _store_segment(stored, segment.path, segment.seq, {}, b"") == {"identity": 3}
    assert gc.isenabled()
    (tmp_path / "not-a-folder").write_bytes(b"")
    failing = CaptureFileWriter(LocalStore(tmp_path / "not-a-folder" / "store"), "test-0")
    with pytest.raises(ObjectStoreError):
        _store_segment(failing, segment.path, segment.seq, {}, b"")
    assert gc.isenabled()
    gc.disable()
    try:
        _store_segment(stored, segment.path, segment.seq, {}, b"")
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_worker_started_before_the_first_segment_stores_only_segments(tmp_path: Path) -> None:
    spool = Spool(
        tmp_path / "spool", max_bytes=1 << 30, segment_max_bytes=1 << 20, segment_max_age_s=60
    )
    settings = CaptureSettings(
        enabled=True,
        spool_dir=tmp_path / "spool",
        store=LocalStoreSettings(path=tmp_path / "store"),
    )
    converter = SegmentConverter(settings, "test-0", b"salt")
    try:
        converter.start()
        pid = converter.pid
        assert pid is not None
        spool.append([record(f"n{index}").encode() for index in range(4)])
        spool.seal()
        (segment,) = spool.sealed()
        assert converter.store(segment, {}) == {"identity": 4}
        assert converter.pid == pid  # the worker started up front, warmed up, stored it
    finally:
        converter.stop()
        spool.close()
    # Its warm-up encoded a record but stored nothing.
    assert sorted(stored_request_ids(tmp_path / "store")) == [f"n{index}" for index in range(4)]


def test_worker_whose_store_cannot_be_opened_at_start_reports_it_per_segment(
    tmp_path: Path,
) -> None:
    spool = Spool(
        tmp_path / "spool", max_bytes=1 << 30, segment_max_bytes=1 << 20, segment_max_age_s=60
    )
    spool.append([record("n0").encode()])
    spool.seal()
    (segment,) = spool.sealed()
    (tmp_path / "not-a-folder").write_bytes(b"")
    settings = CaptureSettings(
        enabled=True,
        spool_dir=tmp_path / "spool",
        store=LocalStoreSettings(path=tmp_path / "not-a-folder" / "store"),
    )
    converter = SegmentConverter(settings, "test-0", b"salt")
    try:
        converter.start()
        with pytest.raises(ConverterError):
            converter.store(segment, {})
        (tmp_path / "not-a-folder").unlink()  # the store can be opened now
        assert converter.store(segment, {}) == {"identity": 1}
    finally:
        converter.stop()
        spool.close()
