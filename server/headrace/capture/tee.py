"""Capture on the request path: the per-model decision (sample, refuse when the spool is full),
the record encoded from references the servicer already holds, and its write to the spool
before the answer leaves.

Cost on the event loop: a small record is one `encode_record` (a struct and a join of the wire
bytes, no `CaptureRecord` built) and, in the default durability modes, one `os.write` right
away: no future and no extra event-loop turn. Where batching writes pays, records go through
the group commit instead, which puts the records of one event-loop turn into the spool with one
write: when every write must be fsynced (one fsync per group, not per record), for large
records (a group holding large records is encoded and written on the spool's own thread, so a
4 MiB tensor never stalls the loop), and while an earlier group is still being written (so
records stay in order).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from time import perf_counter_ns
from typing import TYPE_CHECKING

from opentelemetry import trace

from headrace.capture.record import CaptureRecord, encode_record
from headrace.capture.spool import Spool
from headrace.config import ModelCaptureSettings
from headrace.errors import ModelUnavailableError
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol.converters import parameters_from_proto

if TYPE_CHECKING:
    from prometheus_client import Counter

    from headrace.inference import InferenceResponse
    from headrace.spec import ModelSpec
    from headrace.telemetry.metrics import CaptureMetrics

LARGE_GROUP_BYTES = 256 * 1024
"""A group commit holding more bytes than this is encoded and written off the event loop."""
DIRECT_WRITE_BYTES = 64 * 1024
"""Records with at most this many tensor bytes are written on the loop as they come (unless a
group commit is due anyway: fsync per write, or a group pending or in flight)."""

_logger = logging.getLogger(__name__)


COUNTS_FLUSH_RECORDS = 64
"""Records written at once whose counts wait at most for this many more..."""
COUNTS_FLUSH_S = 0.2
"""...or this long before they reach the metrics: three Prometheus increments per call
(queued, spooled, bytes) cost about 3 us on the event loop, a shared sum per 64 calls about
nothing."""


class _Outcomes:
    """One model's record counters (no-ops without metrics)."""

    __slots__ = ("bytes", "counters", "unflushed", "unflushed_bytes")

    def __init__(self, metrics: CaptureMetrics | None, model: str) -> None:
        self.counters: dict[str, Counter] = metrics.outcomes(model) if metrics else {}
        self.bytes: Counter | None = metrics.bytes.labels(model) if metrics else None
        self.unflushed = 0
        """Records written at once and not counted yet (queued and spooled alike)."""
        self.unflushed_bytes = 0

    def flush(self) -> None:
        """Count the records written at once since the last flush."""
        count, self.unflushed = self.unflushed, 0
        size, self.unflushed_bytes = self.unflushed_bytes, 0
        if count:
            self.count("queued", count)
            self.count("spooled", count)
            if self.bytes is not None:
                self.bytes.inc(size)

    def count(self, outcome: str, amount: int = 1) -> None:
        counter = self.counters.get(outcome)
        if counter is not None:
            counter.inc(amount)

    def spooled(self, entry: bytes) -> None:
        """Count a record whose encoded `entry` is in the spool."""
        self.count("spooled")
        if self.bytes is not None:
            self.bytes.inc(len(entry))


_Pending = tuple[CaptureRecord | bytes, asyncio.Future[bool], _Outcomes]
"""A record waiting for its group write (encoded already unless it is large), the future its
submitter awaits, its model's counters."""


class SpoolCommitter:
    """The spool's writer on the event loop: a record written right away (`write_now`), or a
    group commit, where records submitted during one event-loop turn are written together and
    each submitter learns when (and whether) its record is in."""

    def __init__(self, spool: Spool, executor: ThreadPoolExecutor) -> None:
        self._spool = spool
        self._executor = executor
        self._pending: list[_Pending] = []
        self._pending_bytes = 0
        self._scheduled = False
        self._threaded_writes = 0
        self._writes: set[asyncio.Future[list[bytes]]] = set()
        self._unflushed: list[_Outcomes] = []
        """Counters with records written at once and not counted yet."""
        self._flush_timer: asyncio.TimerHandle | None = None

    def writes_now(self, size: int) -> bool:
        """Whether a record with `size` tensor bytes goes to `write_now` rather than to a
        group commit: small, not fsynced per write, and no group ahead of it (order)."""
        return (
            size <= DIRECT_WRITE_BYTES
            and not self._pending
            and not self._threaded_writes
            and not self._spool.fsync_each_append
        )

    def write_now(self, entry: bytes, outcomes: _Outcomes) -> bool:
        """Write an encoded record to the spool now, on the loop (where `writes_now` said so);
        True once it is in the OS, False when the write failed (the record is dropped,
        counted and logged). Counts like a group commit of one, within `COUNTS_FLUSH_S`."""
        try:
            self._spool.append((entry,))
        except OSError as exc:
            _logger.error("capture spool write failed; 1 record dropped: %s", exc)
            outcomes.count("queued")
            outcomes.count("dropped")
            return False
        if outcomes.bytes is None:  # metrics off
            return True
        outcomes.unflushed += 1
        outcomes.unflushed_bytes += len(entry)
        if outcomes.unflushed == 1:
            self._unflushed.append(outcomes)
            if self._flush_timer is None:
                self._flush_timer = asyncio.get_running_loop().call_later(
                    COUNTS_FLUSH_S, self.flush_counts
                )
        elif outcomes.unflushed >= COUNTS_FLUSH_RECORDS:
            outcomes.flush()
        return True

    def flush_counts(self) -> None:
        """Count every record written at once so far (on the loop)."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        unflushed, self._unflushed = self._unflushed, []
        for outcomes in unflushed:
            outcomes.flush()

    def submit(
        self, record: CaptureRecord | bytes, size: int, outcomes: _Outcomes
    ) -> asyncio.Future[bool]:
        """Queue `record` (a `CaptureRecord`, or one encoded already) with `size` tensor bytes
        for the next group write; the future says whether it was written (False: the write
        failed and the record is dropped, counted and logged)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._pending.append((record, future, outcomes))
        self._pending_bytes += size
        outcomes.count("queued")
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._scheduled = False
        group, self._pending = self._pending, []
        size, self._pending_bytes = self._pending_bytes, 0
        if not group:
            return
        if size > LARGE_GROUP_BYTES or self._spool.fsync_each_append or self._threaded_writes:
            # While a threaded write runs, later groups follow it on the same thread rather
            # than wait for the spool's lock on the loop.
            self._threaded_writes += 1
            loop = asyncio.get_running_loop()
            write = loop.run_in_executor(self._executor, self._write, group)
            self._writes.add(write)
            write.add_done_callback(lambda done: self._written(done, group))
            return
        try:
            entries = self._write(group)
        except OSError as exc:
            self._failed(group, exc)
            return
        self._succeeded(group, entries)

    def _write(self, group: list[_Pending]) -> list[bytes]:
        entries = [
            record if isinstance(record, bytes) else record.encode() for record, _, _ in group
        ]
        self._spool.append(entries)
        return entries

    def _written(self, write: asyncio.Future[list[bytes]], group: list[_Pending]) -> None:
        self._threaded_writes -= 1
        self._writes.discard(write)
        if write.cancelled():
            self._failed(group, OSError("spool write cancelled at shutdown"))
        elif (error := write.exception()) is not None:
            self._failed(group, error)
        else:
            self._succeeded(group, write.result())

    @staticmethod
    def _succeeded(group: list[_Pending], entries: list[bytes]) -> None:
        for (_, future, outcomes), entry in zip(group, entries, strict=True):
            outcomes.spooled(entry)
            if not future.done():
                future.set_result(True)

    @staticmethod
    def _failed(group: list[_Pending], error: BaseException) -> None:
        _logger.error("capture spool write failed; %d records dropped: %s", len(group), error)
        for _, future, outcomes in group:
            outcomes.count("dropped")
            if not future.done():
                future.set_result(False)

    async def drain(self) -> None:
        """Wait until every submitted record is written (or has failed), and counted."""
        while self._pending or self._writes or self._scheduled:
            if self._writes:
                await asyncio.gather(*self._writes, return_exceptions=True)
            else:
                await asyncio.sleep(0)
        self.flush_counts()


class ModelCapture:
    """Capture of one served model version's calls, on the request path."""

    __slots__ = (
        "_committer",
        "_headers",
        "_outcomes",
        "_random",
        "_spool",
        "_traced",
        "settings",
        "spec",
    )

    def __init__(
        self,
        spec: ModelSpec,
        settings: ModelCaptureSettings,
        spool: Spool,
        committer: SpoolCommitter,
        metrics: CaptureMetrics | None,
        *,
        traced: bool = True,
    ) -> None:
        """`traced`: whether calls may have a current span (tracing is on), whose trace and
        span ids the records carry; without, the lookup is skipped."""
        self.spec = spec
        self._traced = traced
        self.settings = settings
        self._spool = spool
        self._committer = committer
        self._headers = frozenset(settings.headers)
        self._outcomes = _Outcomes(metrics, spec.name)
        self._random = random.Random()

    def admit(self) -> bool:
        """Decide before the call runs whether it is captured.

        Raises:
            ModelUnavailableError (UNAVAILABLE): the spool is full and the model's policy is
                `refuse`.
        """
        rate = self.settings.sample_rate
        if rate < 1.0 and self._random.random() >= rate:
            self._outcomes.count("sampled_out")
            return False
        if self._spool.full and self.settings.on_spool_full == "refuse":
            self._outcomes.count("refused")
            raise ModelUnavailableError(
                f"capture spool is full ({self._spool.size_bytes} of {self._spool.max_bytes} "
                f"bytes); model '{self.spec.name}' serves no uncaptured call; retry later"
            )
        return True

    async def record(
        self,
        *,
        wire: bytes,
        message: pb.ModelInferRequest,
        metadata: Callable[[], Iterable[tuple[str, str | bytes]] | None],
        identity: str,
        received_ns: int,
        started_ns: int,
        code: int,
        status_message: str,
        response: InferenceResponse | None,
        reply: bytes,
        request_id: str,
    ) -> bool:
        """Spool the record of an admitted call (under `request_id`, which the servicer chose)
        and wait until it is in the spool (a small record is written before this returns,
        without a wait). `metadata` gives the call's client metadata; it is called only when
        the model selects headers. Returns False when the answer must not leave: the record
        could not be spooled and the model's policy is `refuse`."""
        refuse = self.settings.on_spool_full == "refuse"
        if not refuse and self._spool.full:
            self._outcomes.count("dropped")
            return True
        trace_id = span_id = ""
        if self._traced:
            span = trace.get_current_span().get_span_context()
            if span.is_valid:
                trace_id = format(span.trace_id, "032x")
                span_id = format(span.span_id, "016x")
        headers: dict[str, str] = {}
        if self._headers and (pairs := metadata()) is not None:
            for key, value in pairs:
                if key in self._headers:
                    headers[key] = value if isinstance(value, str) else value.hex()
        size = len(wire) + len(reply)
        truncated = size > self.settings.max_record_bytes
        if truncated:
            wire = reply = b""
            size = 0
        fields = (
            request_id,
            self.spec.name,
            self.spec.version,
            received_ns,
            time.time_ns(),
            perf_counter_ns() - started_ns,
            code,
            status_message,
            wire,
            reply,
            trace_id,
            span_id,
            response.batch_id if response is not None else "",
            response.batch_size if response is not None else 0,
            response.endpoint if response is not None else "",
            identity,
            headers,
            parameters_from_proto(message.parameters) if message.parameters else {},
            truncated,
        )
        committer = self._committer
        if committer.writes_now(size):
            written = committer.write_now(encode_record(*fields), self._outcomes)
        elif size <= DIRECT_WRITE_BYTES:
            # Small: encoded here; the group commit only writes it.
            written = await committer.submit(encode_record(*fields), size, self._outcomes)
        else:
            # Large: encoded (a copy of its tensors) with its group, off the loop if large.
            written = await committer.submit(CaptureRecord(*fields), size, self._outcomes)
        return written or not refuse

    async def record_shadow(self, record: CaptureRecord) -> None:
        """Spool a shadow call's record (built by the shadow mirror, off the request path);
        dropped and counted when the spool is full, whatever the policy: no answer waits on
        it. Over the size cap, its tensors are left out like any record's."""
        if self._spool.full:
            self._outcomes.count("dropped")
            return
        if len(record.request) + len(record.response) > self.settings.max_record_bytes:
            record = dataclasses.replace(record, request=b"", response=b"", truncated=True)
        await self._committer.submit(
            record, len(record.request) + len(record.response), self._outcomes
        )
