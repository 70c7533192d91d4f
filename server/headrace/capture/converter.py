"""The capture stage's worker process: turns sealed spool segments into Parquet files in the
object store.

Decoding records, applying the models' rules, building Arrow tables and encoding Parquet is
CPU work; done on a thread of the serving process it would hold the GIL against the event loop
(a convoy that shows in p99 latency). A process of its own, spawned at start-up and stopped at
shutdown, shares nothing with serving but the spool files: it is sent a segment's path and
answers with the records it stored per model, or the error.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from headrace.capture.columns import SegmentColumns
from headrace.capture.record import SHADOW_OF_PARAMETER, CaptureRecord, RecordFormatError
from headrace.capture.rules import CaptureRules
from headrace.capture.spool import Segment, entry_spans
from headrace.config import CaptureSettings, ModelCaptureSettings

POLL_S = 1.0
"""Longest a wait for the worker's answer sleeps between looks at its process (a worker that
dies closes the pipe, which ends the wait at once; the wait's deadline ends it too). Each look
takes the serving process's GIL, from the event loop, so they are rare."""
STOP_TIMEOUT_S = 5.0
START_TIMEOUT_S = 60.0
"""Longest wait for a new worker's warm-up at start-up (spawn, imports, one encoding)."""
_READY = "ready"
"""The worker's first message, once it has warmed up."""

RulesSettings = Mapping[tuple[str, str], ModelCaptureSettings]
"""Each served model version's capture settings; records of others get the defaults."""
PACE_RECORDS = 256
"""Records converted between two looks of the `Pacer` at the CPU used (about 4 ms of CPU)."""

_logger = logging.getLogger(__name__)


class ConverterError(RuntimeError):
    """A segment could not be stored (the store failed, the worker died or took too long)."""


class SegmentConverter:
    """Owns the worker process; `store` is called from the capture stage's thread only."""

    def __init__(self, settings: CaptureSettings, writer_id: str, salt: bytes) -> None:
        self._settings = settings
        self._writer_id = writer_id
        self._salt = salt
        self._context = multiprocessing.get_context("spawn")
        self._process: BaseProcess | None = None
        self._connection: Connection | None = None

    @property
    def pid(self) -> int | None:
        """The worker process's pid while it runs (from `start`, or from the first segment
        after a worker was stopped)."""
        return self._process.pid if self._process is not None else None

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start the worker now (at start-up, before serving) and wait until it is ready: it
        loads its modules and encodes one record first, CPU (about 0.6 s) that would
        otherwise come in one burst while serving. Idempotent.

        Raises:
            ConverterError: the worker died, or was not ready within `timeout_s` (it is then
                stopped; the first segment starts a new one).
        """
        if self._connection is not None:
            return
        connection = self._start()
        outcome, value = self._answer(connection, time.monotonic() + timeout_s)
        if outcome != _READY:
            self._discard()
            raise ConverterError(f"the capture worker said {outcome!r} ({value}) at start-up")

    def _start(self) -> Connection:
        parent, child = self._context.Pipe()
        process = self._context.Process(
            target=_serve,
            args=(child, self._settings, self._writer_id, self._salt),
            name="headrace-capture-convert",
            daemon=True,
        )
        process.start()
        child.close()
        self._process, self._connection = process, parent
        return parent

    def store(
        self,
        segment: Segment,
        rules: RulesSettings,
        deadline: float | None = None,
        pace_s: float = 0.0,
    ) -> dict[str, int]:
        """Store one segment's records; returns records stored per model. Blocks until the
        worker answers (the GIL is free meanwhile) or `deadline` (monotonic) passes. For
        the first `pace_s` seconds the worker keeps to `converter_cpu_share` of a CPU.

        Raises:
            ConverterError: the store failed, the worker died, or the deadline passed (the
                worker is then stopped; the next call starts a new one).
        """
        connection = self._connection if self._connection is not None else self._start()
        connection.send((str(segment.path), segment.seq, dict(rules), pace_s))
        while True:
            outcome, value = self._answer(connection, deadline)
            if outcome != _READY:  # a worker started by this call says it is ready first
                break
        if outcome != "ok":
            raise ConverterError(str(value))
        counts: dict[str, int] = value
        return counts

    def _answer(self, connection: Connection, deadline: float | None) -> tuple[str, Any]:
        """The worker's next message, waiting until `deadline` (monotonic) at most.

        Raises:
            ConverterError: the worker died or the deadline passed (it is then stopped).
        """
        while not connection.poll(
            POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic()))
        ):
            process = self._process
            if process is None or not process.is_alive():
                self._discard()
                raise ConverterError("the capture worker process died")
            if deadline is not None and time.monotonic() >= deadline:
                self._discard()
                raise ConverterError("the capture worker did not finish in time")
        try:
            outcome, value = connection.recv()
        except (EOFError, OSError) as exc:
            self._discard()
            raise ConverterError("the capture worker process died") from exc
        return outcome, value

    def _discard(self) -> None:
        process, self._process = self._process, None
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
        if process is not None:
            process.terminate()
            process.join(STOP_TIMEOUT_S)

    def stop(self) -> None:
        """Ask the worker to exit (after its current segment), then make sure it has."""
        process, connection = self._process, self._connection
        if process is None or connection is None:
            return
        with contextlib.suppress(OSError):
            connection.send(None)
        process.join(STOP_TIMEOUT_S)
        self._discard()


def _serve(connection: Connection, settings: CaptureSettings, writer_id: str, salt: bytes) -> None:
    """The worker's main: build the writer, then store segments until told to stop."""
    if settings.converter_niceness:
        # Background work: under CPU contention serving wins, the spool holds the backlog.
        os.nice(settings.converter_niceness)
        # And no wake-up preemption: a segment's burst of work waits for the running
        # serving threads' time slices to end instead of cutting into them (its share of
        # the CPUs, set by its niceness, stays the same). Linux only.
        with contextlib.suppress(AttributeError, OSError):
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from headrace.capture.store import make_store
    from headrace.capture.writer import CaptureFileWriter

    writer: Any = None
    try:
        writer = CaptureFileWriter(make_store(settings.store), writer_id, settings.max_file_bytes)
    except Exception as exc:  # each segment tries again, and reports the error
        _logger.warning("capture: the worker could not open the store yet: %s", exc)
    else:
        _warm_up(writer)
    try:
        connection.send((_READY, None))
    except OSError:
        return  # the serving process is gone
    while True:
        try:
            job = connection.recv()
        except (EOFError, OSError):
            return  # the serving process is gone
        if job is None:
            return
        path, seq, rules, pace_s = job
        pace = Pacer(settings.converter_cpu_share, time.monotonic() + pace_s)
        try:
            if writer is None:
                writer = CaptureFileWriter(
                    make_store(settings.store), writer_id, settings.max_file_bytes
                )
            counts = _store_segment(writer, Path(path), seq, rules, salt, pace)
        except Exception as exc:
            connection.send(("error", f"{type(exc).__name__}: {exc}"))
        else:
            connection.send(("ok", counts))


def _warm_up(writer: Any) -> None:
    """Encode one record as Parquet (in memory, stored nowhere): what a first conversion
    loads lazily (Arrow's compute kernels, its pandas shim, zstd) is loaded now."""
    from headrace.protocol import grpc_service_pb2 as pb

    try:
        tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1])
        request = pb.ModelInferRequest(
            model_name="warm-up", inputs=[tensor], raw_input_contents=[bytes(4)]
        )
        record = CaptureRecord("", "warm-up", "1", 0, 0, 0, 0, "", request.SerializeToString())
        writer.encode([record])
    except Exception:  # only a warm-up: the first segment loads what this could not
        _logger.exception("capture: the worker's warm-up failed")


class Pacer:
    """Keeps a segment's conversion within `share` of one CPU until `until` (monotonic), so
    that its CPU comes in slices between serving's rather than in one burst. Called with the
    number of records converted since its last call; every `PACE_RECORDS` records it sleeps
    until the process's CPU time since the pacer began is at most `share` of the wall time
    since. Past `until` it never sleeps. The clocks are arguments for tests.
    """

    __slots__ = ("_count", "_cpu", "_cpu_start", "_now", "_share", "_sleep", "_start", "_until")

    def __init__(
        self,
        share: float,
        until: float,
        *,
        now: Callable[[], float] = time.monotonic,
        cpu: Callable[[], float] = time.process_time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._share = share
        self._until = until
        self._now, self._cpu, self._sleep = now, cpu, sleep
        self._start = now()
        self._cpu_start = cpu()
        self._count = 0

    def __call__(self, records: int) -> None:
        before = self._count
        self._count += records
        if self._share >= 1.0 or self._count // PACE_RECORDS == before // PACE_RECORDS:
            return
        now = self._now()
        if now >= self._until:
            return
        ahead = (self._cpu() - self._cpu_start) / self._share - (now - self._start)
        if ahead > 0:
            self._sleep(min(ahead, self._until - now))


def _unpaced(records: int) -> None:
    """A pacer that never waits."""


def _store_segment(
    writer: Any,
    path: Path,
    seq: int,
    rules: RulesSettings,
    salt: bytes,
    pace: Callable[[int], None] = _unpaced,
) -> dict[str, int]:
    """Store one segment's records, with the cyclic garbage collector paused: the segment's
    records and the rows made of them hold no cycles and die by reference counting, but while
    they are alive every few hundred allocations made the collector walk them all again
    (a third of the conversion's CPU, measured with 20,000 small records)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _store_records(writer, path, seq, rules, salt, pace)
    finally:
        if collecting:
            gc.enable()


def _store_records(
    writer: Any,
    path: Path,
    seq: int,
    rules: RulesSettings,
    salt: bytes,
    pace: Callable[[int], None],
) -> dict[str, int]:
    data = path.read_bytes()
    spans = entry_spans(data, path)
    default = CaptureRules(ModelCaptureSettings(), salt)
    compiled: dict[tuple[str, str], CaptureRules] = {}

    def rules_of(key: tuple[str, str]) -> CaptureRules:
        found = compiled.get(key)
        if found is None:
            settings = rules.get(key)
            found = compiled[key] = CaptureRules(settings, salt) if settings else default
        return found

    columns = SegmentColumns.decode(data, spans)
    if columns is not None and not any(
        rules_of(key).changes_anything for key in columns.model_versions()
    ):
        writer.write_columns(seq, columns, pace)
        return columns.counts()
    view = memoryview(data)
    records: list[CaptureRecord] = []
    for start, length in spans:
        try:
            record = CaptureRecord.decode(view[start : start + length])
            # A shadow call's record holds the primary's request: the primary's rules apply.
            shadow_of = record.parameters.get(SHADOW_OF_PARAMETER)
            version = str(shadow_of) if shadow_of is not None else record.version
            records.append(rules_of((record.model, version)).apply(record))
        except (RecordFormatError, DecodeError, ValueError) as exc:
            _logger.warning("capture: skipped an unreadable record in %s: %s", path, exc)
        pace(1)
    if records:
        writer.write_segment(seq, records, pace)
    counts: dict[str, int] = {}
    for record in records:
        counts[record.model] = counts.get(record.model, 0) + 1
    return counts
