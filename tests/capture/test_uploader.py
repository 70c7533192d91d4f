"""The capture stage's thread: which segments it stores, in which order, and how fast it asks
for each (a lone segment is spread out; a backlog and a shutdown flush are not)."""

from __future__ import annotations

import threading
from pathlib import Path

from headrace.capture.spool import Segment, Spool
from headrace.capture.uploader import CaptureUploader
from tests.capture.test_pipeline import record

AGE_S = 60.0


class _Recorder:
    """A segment store that records each call (what the stage asked for) and stores nothing."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, float]] = []
        self.called = threading.Event()

    def __call__(self, segment: Segment, deadline: float | None, pace_s: float) -> dict[str, int]:
        self.calls.append((segment.seq, pace_s))
        self.called.set()
        return {"identity": 1}


def _spool(tmp_path: Path) -> Spool:
    return Spool(
        tmp_path / "spool", max_bytes=1 << 30, segment_max_bytes=1 << 30, segment_max_age_s=AGE_S
    )


def _uploader(spool: Spool, store: _Recorder) -> CaptureUploader:
    return CaptureUploader(
        spool, store, segment_max_age_s=AGE_S, fsync_interval_ms=None, retry_max_s=1.0
    )


def _seal_one(spool: Spool, name: str) -> None:
    spool.append([record(name).encode()])
    spool.seal()


def test_a_lone_segment_is_spread_over_half_the_sealing_interval(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    _seal_one(spool, "a")
    store = _Recorder()
    uploader = _uploader(spool, store)
    uploader.start()
    try:
        assert store.called.wait(10)
    finally:
        uploader.stop(5.0)
        spool.close()
    assert store.calls[0][1] == AGE_S / 2
    assert not spool.sealed()


def test_a_backlog_and_the_shutdown_flush_go_at_full_speed(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    for name in ("a", "b", "c"):
        _seal_one(spool, name)
    store = _Recorder()
    uploader = _uploader(spool, store)
    uploader.start()
    try:
        assert store.called.wait(10)
    finally:
        spool.append([record("d").encode()])  # open at shutdown: sealed and flushed
        assert uploader.stop(5.0)
        spool.close()
    seqs = [seq for seq, _ in store.calls]
    assert seqs == sorted(seqs)
    assert len(seqs) == 4
    assert [pace for _, pace in store.calls] == [0.0, 0.0, 0.0, 0.0]
