"""The capture pipeline of one Headrace process, built from settings: the spool, the group
committer on the request path, and the capture stage with its worker process.

Start-up: spool (leftover segments sealed and queued first) -> spool thread -> capture stage
thread (it spawns the worker process that writes Parquet to the store). Shutdown (after the
front end and batchers): records still being committed are written -> the stage seals and
stores what is spooled within `shutdown_timeout_s` -> threads and worker end. What is not
stored stays in the spool for the next start.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from headrace.capture.converter import ConverterError, SegmentConverter
from headrace.capture.spool import Segment, Spool
from headrace.capture.tee import ModelCapture, SpoolCommitter
from headrace.capture.uploader import CaptureUploader
from headrace.config import (
    ENV_CAPTURE_HASH_SALT,
    ENV_WORKER_ID,
    CaptureSettings,
    ModelCaptureSettings,
)
from headrace.spec import ModelSpec

if TYPE_CHECKING:
    from headrace.telemetry.metrics import CaptureMetrics

_logger = logging.getLogger(__name__)


def writer_id(settings: CaptureSettings, environ: Mapping[str, str]) -> str:
    """`{writer_id}-{worker}`: names this process's files and spool folder, so workers of one
    host never collide."""
    base = settings.writer_id or socket.gethostname().split(".")[0] or "headrace"
    return f"{base}-{environ.get(ENV_WORKER_ID, '0') or '0'}"


class CapturePipeline:
    """Capture for one process; `start` before serving, `drain` then `stop` after."""

    def __init__(
        self,
        settings: CaptureSettings,
        metrics: CaptureMetrics | None = None,
        environ: Mapping[str, str] | None = None,
        *,
        traced: bool = True,
    ) -> None:
        """`environ` (default os.environ) supplies HEADRACE_WORKER_ID and the hash salt.
        `traced`: whether calls may have spans (tracing is on), whose ids records carry."""
        environ = os.environ if environ is None else environ
        self.settings = settings
        self._traced = traced
        self.writer_id = writer_id(settings, environ)
        self._salt = environ.get(ENV_CAPTURE_HASH_SALT, "").encode()
        self._metrics = metrics
        self._rules: dict[tuple[str, str], ModelCaptureSettings] = {}
        self.spool: Spool | None = None
        self.uploader: CaptureUploader | None = None
        self._converter: SegmentConverter | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._committer: SpoolCommitter | None = None

    def start(self) -> None:
        """Open the spool (sealing what a crash left open) and start the capture stage.

        Raises:
            OSError: the spool folder cannot be made or read.
        """
        settings = self.settings
        self.spool = Spool(
            settings.spool_dir / self.writer_id,
            max_bytes=settings.spool_max_bytes,
            segment_max_bytes=settings.segment_max_bytes,
            segment_max_age_s=settings.segment_max_age_s,
            fsync_interval_ms=settings.fsync_interval_ms,
        )
        leftover = self.spool.sealed()
        if leftover:
            _logger.info(
                "capture: %d spool segments (%d bytes) from a previous run are stored first",
                len(leftover),
                sum(segment.size for segment in leftover),
            )
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="headrace-capture-spool")
        self._committer = SpoolCommitter(self.spool, self._executor)
        converter = self._converter = SegmentConverter(settings, self.writer_id, self._salt)
        try:
            # Its warm-up before serving, not in a burst at the first segment.
            converter.start()
        except ConverterError as exc:
            _logger.warning("capture: %s; the first segment starts a new worker", exc)
        rules = self._rules

        def store(segment: Segment, deadline: float | None, pace_s: float) -> dict[str, int]:
            return converter.store(segment, rules, deadline, pace_s)

        self.uploader = CaptureUploader(
            self.spool,
            store,
            segment_max_age_s=settings.segment_max_age_s,
            fsync_interval_ms=settings.fsync_interval_ms,
            retry_max_s=settings.upload_retry_max_s,
            metrics=self._metrics,
        )
        self.uploader.start()
        _logger.info(
            "capture: writer %s, spool %s, store %s",
            self.writer_id,
            self.spool.directory,
            settings.store.kind,
        )

    def for_model(self, spec: ModelSpec, settings: ModelCaptureSettings) -> ModelCapture:
        """The request-path capture of one served model version (after `start`)."""
        if self.spool is None or self._committer is None:
            raise RuntimeError("capture pipeline used before start()")
        if settings.hash and not self._salt:
            _logger.warning(
                "capture: model %s hashes %s without a salt (set %s)",
                spec.name,
                ", ".join(settings.hash),
                ENV_CAPTURE_HASH_SALT,
            )
        self._rules[(spec.name, spec.version)] = settings
        return ModelCapture(
            spec,
            settings,
            self.spool,
            self._committer,
            self._metrics,
            traced=self._traced,
        )

    async def drain(self) -> None:
        """Wait for records being committed to reach the spool (after the last request)."""
        if self._committer is not None:
            await self._committer.drain()

    def stop(self) -> bool:
        """Store what is spooled within `shutdown_timeout_s`, then end the threads; blocks.
        Returns whether the spool was emptied. Idempotent."""
        stored = True
        if self._executor is not None:
            executor, self._executor = self._executor, None
            executor.shutdown(wait=True)
        if self.uploader is not None:
            uploader, self.uploader = self.uploader, None
            stored = uploader.stop(self.settings.shutdown_timeout_s)
        if self._converter is not None:
            converter, self._converter = self._converter, None
            converter.stop()
        if self.spool is not None:
            self.spool.close()
        return stored
