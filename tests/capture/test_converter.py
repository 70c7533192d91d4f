"""The capture stage's worker process: it stores a sealed segment's records, and runs at the
configured niceness so that serving keeps the CPUs when they are saturated."""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import pytest

from headrace.capture.converter import (
    PACE_RECORDS,
    ConverterError,
    Pacer,
    SegmentConverter,
    _store_segment,
)
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


class _Clocks:
    """Wall and CPU clocks a test moves by hand; `sleep` moves the wall clock."""

    def __init__(self) -> None:
        self.wall = 100.0
        self.cpu = 10.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.wall += seconds


def _pacer(clocks: _Clocks, share: float, until: float) -> Pacer:
    return Pacer(share, until, now=lambda: clocks.wall, cpu=lambda: clocks.cpu, sleep=clocks.sleep)


def test_pacer_keeps_the_cpu_within_its_share_of_the_time_since_it_began() -> None:
    clocks = _Clocks()
    pace = _pacer(clocks, 0.25, until=clocks.wall + 10)
    clocks.cpu += 0.1
    clocks.wall += 0.1  # a burst at full speed: 0.1 s of CPU in 0.1 s
    pace(PACE_RECORDS - 1)
    assert clocks.sleeps == []  # looks only every PACE_RECORDS records
    pace(1)
    assert clocks.sleeps == [pytest.approx(0.3)]  # 0.1 s of CPU is 25% of 0.4 s
    clocks.cpu += 0.01
    clocks.wall += 0.2  # slower than the share: no sleep
    pace(PACE_RECORDS)
    assert len(clocks.sleeps) == 1


def test_pacer_never_sleeps_past_its_end_nor_at_a_full_share() -> None:
    clocks = _Clocks()
    pace = _pacer(clocks, 0.1, until=clocks.wall + 0.5)
    clocks.cpu += 1.0
    pace(PACE_RECORDS)
    assert clocks.sleeps == [pytest.approx(0.5)]  # 10 s owed, 0.5 s left
    pace(PACE_RECORDS)
    assert clocks.sleeps == [pytest.approx(0.5)]  # past the end: full speed
    unpaced = _pacer(clocks, 1.0, until=clocks.wall + 10)
    clocks.cpu += 1.0
    unpaced(10 * PACE_RECORDS)
    assert len(clocks.sleeps) == 1


def test_a_paced_segment_takes_longer_and_stores_the_same_records(tmp_path: Path) -> None:
    spool = Spool(
        tmp_path / "spool", max_bytes=1 << 30, segment_max_bytes=1 << 30, segment_max_age_s=60
    )
    count = 16 * PACE_RECORDS
    spool.append([record(f"n{index:05d}").encode() for index in range(count)])
    spool.seal()
    (segment,) = spool.sealed()
    spool.close()
    settings = CaptureSettings(
        enabled=True,
        spool_dir=tmp_path / "spool",
        store=LocalStoreSettings(path=tmp_path / "store"),
        converter_cpu_share=0.05,
    )
    converter = SegmentConverter(settings, "test-0", b"salt")
    try:
        converter.start()
        pid = converter.pid
        assert pid is not None
        cpu_before = _cpu_seconds(pid)
        started = time.monotonic()
        assert converter.store(segment, {}, pace_s=30.0) == {"identity": count}
        elapsed = time.monotonic() - started
        cpu = _cpu_seconds(pid) - cpu_before
    finally:
        converter.stop()
    # Within 5% of a CPU (clock ticks of 10 ms make the CPU reading coarse).
    assert cpu >= 0.03, "too little work to see the pacing"
    assert cpu <= 0.05 * elapsed + 0.02
    assert elapsed >= cpu / 0.05 - 0.2
    assert sorted(stored_request_ids(tmp_path / "store")) == [
        f"n{index:05d}" for index in range(count)
    ]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
