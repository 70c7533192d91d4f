"""The capture stage: one thread, started at start-up and stopped at shutdown, that seals spool
segments by age, has each sealed segment's records stored as Parquet files (by the worker
process of `headrace.capture.converter`), and deletes the segment only once every file is
stored.

While the store fails, the segment stays and is retried with exponential backoff (serving
never waits: the spool absorbs the backlog up to its cap); when the store returns, the backlog
drains oldest first. Segments left by a previous run have the lowest sequence numbers, so they
go first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from headrace.capture.spool import Segment, Spool

if TYPE_CHECKING:
    from prometheus_client import Counter

    from headrace.telemetry.metrics import CaptureMetrics

FIRST_RETRY_S = 0.5
"""Wait before the first retry of a failed upload; it doubles up to `retry_max_s`."""
MAX_TICK_S = 0.5
"""Longest the stage sleeps between looks at the spool."""

_logger = logging.getLogger(__name__)


SegmentStore = Callable[[Segment, float | None, float], Mapping[str, int]]
"""Stores one sealed segment's records before a deadline (monotonic; None: none), spreading
its CPU over up to the given seconds (0: at full speed), and returns the records stored per
model (`SegmentConverter.store`); raises on any failure."""


class CaptureUploader:
    """Moves sealed spool segments into the object store, on a thread of its own."""

    def __init__(
        self,
        spool: Spool,
        store: SegmentStore,
        *,
        segment_max_age_s: float,
        fsync_interval_ms: int | None,
        retry_max_s: float,
        metrics: CaptureMetrics | None = None,
    ) -> None:
        self._spool = spool
        self._store_segment = store
        self._segment_max_age_s = segment_max_age_s
        self._fsync_interval_s = (fsync_interval_ms or 0) / 1000
        self._retry_max_s = retry_max_s
        self._metrics = metrics
        self._written: dict[str, Counter] = {}
        self._wakeup = threading.Event()
        self._stopping = False
        self._flush_deadline = 0.0
        self._thread: threading.Thread | None = None
        self._retry_s = 0.0
        self._retry_at = 0.0
        self.errors = 0
        """Failed attempts to store a segment (also in headrace_capture_upload_errors)."""

    def lag_s(self) -> float:
        """Age in seconds of the oldest record not yet stored (0 when none is pending)."""
        oldest = self._spool.oldest_s()
        return max(0.0, time.time() - oldest) if oldest is not None else 0.0

    def start(self) -> None:
        if self._thread is None:
            # A daemon: an upload stuck in the store past the shutdown timeout must not keep
            # the process alive; its segment stays in the spool for the next start.
            self._thread = threading.Thread(
                target=self._run, name="headrace-capture-upload", daemon=True
            )
            self._thread.start()

    def stop(self, timeout_s: float) -> bool:
        """Seal the open segment, store what is spooled within `timeout_s`, and end the
        thread. Returns whether everything was stored; what was not stays in the spool."""
        thread, self._thread = self._thread, None
        if thread is None:
            return not self._spool.sealed()
        self._flush_deadline = time.monotonic() + timeout_s
        self._stopping = True
        self._wakeup.set()
        thread.join(timeout_s + 1.0)
        if thread.is_alive():
            _logger.warning(
                "capture: an upload still runs after %.1f s; its segment stays in the spool",
                timeout_s,
            )
            return False
        left = self._spool.sealed()
        if left:
            _logger.warning(
                "capture: %d spool segments (%d bytes) not stored at shutdown; the next start "
                "stores them",
                len(left),
                sum(segment.size for segment in left),
            )
        return not left

    def _run(self) -> None:
        tick = min(MAX_TICK_S, self._segment_max_age_s / 4)
        if self._fsync_interval_s:
            tick = min(tick, self._fsync_interval_s)
        while not self._stopping:
            try:
                self._spool.seal(older_than_s=self._segment_max_age_s)
                if self._fsync_interval_s:
                    self._spool.sync()
                if time.monotonic() >= self._retry_at:
                    self._store_sealed()
            except Exception:
                # The stage must outlive any one bad segment or disk hiccup.
                _logger.exception("capture stage failed a round; retrying")
            self._report()
            self._wakeup.wait(tick)
            self._wakeup.clear()
        try:
            self._spool.seal()
            self._store_sealed()
        except Exception:
            _logger.exception("capture: final flush failed")
        self._report()

    def _report(self) -> None:
        """Set the spool gauges (a gauge set from here works with per-worker metric files
        too, where a callback gauge would not)."""
        if self._metrics is not None:
            self._metrics.spool_bytes.set(self._spool.size_bytes)
            self._metrics.upload_lag.set(self.lag_s())

    def _store_sealed(self) -> None:
        sealed = self._spool.sealed()
        # A lone segment may take up to half the sealing interval (the next one is not due
        # before then): its conversion is spread out. A backlog, or a shutdown, is not.
        pace_s = self._segment_max_age_s / 2 if len(sealed) == 1 and not self._stopping else 0.0
        for segment in sealed:
            # Once shutdown begins, the backlog gets until the flush deadline, no longer.
            if self._stopping and time.monotonic() >= self._flush_deadline:
                return
            if not self._store(segment, pace_s):
                return

    def _store(self, segment: Segment, pace_s: float) -> bool:
        try:
            counts = self._store_segment(
                segment, self._flush_deadline if self._stopping else None, pace_s
            )
        except Exception as exc:
            self.errors += 1
            if self._metrics is not None:
                self._metrics.upload_errors.inc()
            self._retry_s = min(self._retry_max_s, max(FIRST_RETRY_S, self._retry_s * 2))
            self._retry_at = time.monotonic() + self._retry_s
            _logger.warning(
                "capture: storing spool segment %d failed (%s); retrying in %.1f s",
                segment.seq,
                exc,
                self._retry_s,
            )
            return False
        self._retry_s = 0.0
        self._spool.delete(segment)
        self._count_written(counts)
        return True

    def _count_written(self, counts: Mapping[str, int]) -> None:
        if self._metrics is None:
            return
        for model, count in counts.items():
            counter = self._written.get(model)
            if counter is None:
                counter = self._written[model] = self._metrics.records.labels(model, "written")
            counter.inc(count)
