"""The span exporter process: finished spans leave the serving process, OTLP-encoded or as
pickled tuples, and are exported from here, off the serving process's GIL.

The serving process keeps a bounded queue of finished spans (`spans.SpanQueue`) and one sender
thread that, every `export_delay_ms` or as soon as `max_export_batch_spans` are waiting,
takes them in chunks of at most `CHUNK_SPANS` (each a short hold of the GIL) and writes them
to a pipe, then a flush marker (blocking on a full pipe only itself: the queue then fills
and new spans are dropped and counted, never waited for). For OTLP gRPC, where the C encoder
(`_fastotlp.c`) is built, a chunk is written as the OTLP Span fields of its spans, encoded by
the sender (about 0.1 us a span); otherwise as a pickle of the tuples (0.3 us a span), which
the process unpickles and encodes (1.3 us a span, in Python) or rebuilds as SDK spans. The
process, spawned at start-up and stopped at shutdown (after exporting what it was sent),
gathers the chunks up to each flush and exports them in requests of at most
`max_export_batch_spans` spans (and, OTLP gRPC, `MAX_REQUEST_BYTES`: an export costs a
fixed few hundred microseconds of CPU on both ends, so fewer, larger ones) with the
configured exporter: OTLP gRPC through the SDK's exporter (its endpoint, headers, TLS,
compression and retry rules) sending requests encoded by `OtlpEncoder` straight from the
tuples, which costs a microsecond a span or less where the SDK's encoder costs tens; OTLP
HTTP and console through the SDK's exporters, given the SDK's `ReadableSpan`s rebuilt from
the tuples.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import pickle
import signal
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, NamedTuple

from headrace.config import TracingSettings
from headrace.telemetry.spans import FinishedSpan, SpanQueue

try:  # built by `pip install` where a C compiler is found; optional
    from headrace.telemetry import _fastotlp
except ImportError:  # pragma: no cover (every test install builds it)
    _fastotlp = None  # type: ignore[assignment]

EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
CHUNK_SPANS = 512
"""At most this many spans are encoded or pickled and written to the exporter process at a
time (the sender holds the GIL meanwhile: about 0.05 ms encoding, 0.2 ms pickling)."""
FLUSH = b"F"
"""The sender's message after the chunks of one wake-up: export what you hold. (A pickle is
never one byte; an empty message means stop.)"""
ENCODED = b"S"
"""The first byte of a chunk of encoded spans: then their count (`_COUNT`), then their OTLP
Span fields (`OtlpEncoder.span_fields`). A pickle starts with its protocol, 0x80."""
_COUNT = struct.Struct("<I")
PIPE_BYTES = 1 << 20
"""The pipe's buffer, where the system allows (Linux: 64 KiB by default, 1 MiB for anyone):
a chunk (about 110 KiB encoded) then goes in one write, not in pieces the process wakes up
for."""
ENCODER_ACCELERATED = _fastotlp is not None
"""Whether `OtlpEncoder.span_fields` is C (`_fastotlp.c`), and so whether the sender ships
encoded spans to an OTLP gRPC exporter process."""
MAX_REQUEST_BYTES = 3 << 20
"""An export request larger than this is split in two (OTLP receivers accept 4 MiB by
default: grpc's and the Collector's limit)."""
STOP_MARGIN_S = 5.0
"""How much longer than one export's timeout shutdown waits for the process."""

_logger = logging.getLogger(__name__)


class Scope(NamedTuple):
    """What every span shares: the resource and the instrumentation scope."""

    resource_attributes: Mapping[str, Any]
    resource_schema_url: str
    name: str
    version: str


class EncodedSpans(NamedTuple):
    """An `ExportTraceServiceRequest`, serialized, and how many spans it holds."""

    payload: bytes
    spans: int


class ExportProcess:
    """Owns the exporter process and the sender thread that feeds it; `queue.record` is the
    tracer's recorder. Started by the constructor, stopped (flushed) by `stop`."""

    def __init__(self, settings: TracingSettings, scope: Scope) -> None:
        self._settings = settings
        self._scope = scope
        self.queue = SpanQueue(settings.max_queued_spans, settings.max_export_batch_spans)
        self._chunk_spans = chunk_spans(settings.max_export_batch_spans)
        self._encoder = (
            OtlpEncoder(scope) if settings.exporter == "otlp_grpc" and ENCODER_ACCELERATED else None
        )
        """Encodes chunks in this process, else they go pickled."""
        self._context = multiprocessing.get_context("spawn")
        self._process: BaseProcess | None = None
        self._connection: Connection | None = None
        self._stopping = threading.Event()
        self._abandoned = False
        """Set when shutdown gave up on the process: no new one is started."""
        self._reported_dropped = 0
        self._start_process()
        self._sender = threading.Thread(
            target=self._send_forever, name="headrace-span-sender", daemon=True
        )
        self._sender.start()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _start_process(self) -> None:
        receiver, sender = self._context.Pipe(duplex=False)
        with contextlib.suppress(ImportError, OSError, AttributeError):  # Linux; else as is
            import fcntl

            fcntl.fcntl(sender.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        process = self._context.Process(
            target=_serve,
            args=(receiver, self._settings, self._scope),
            name="headrace-span-export",
            daemon=True,
        )
        process.start()
        receiver.close()
        self._process, self._connection = process, sender

    def _send_forever(self) -> None:
        queue = self.queue
        delay_s = self._settings.export_delay_ms / 1000
        while True:
            stopping = self._stopping.is_set()
            if not stopping:
                queue.ready.wait(delay_s)
                queue.ready.clear()
            sent = False
            while len(queue):
                sent = self._send(queue.take(self._chunk_spans)) or sent
            if sent:
                self._send_flush()
            self._report_dropped()
            if stopping:
                return

    def _send(self, chunk: list[FinishedSpan]) -> bool:
        """Write `chunk` to the exporter process; whether any of it was written (what was
        not is counted as dropped)."""
        if self._encoder is not None:
            sent = False
            for payload, spans in self._encoded(self._encoder, chunk):
                sent = self._write(payload, spans) or sent
            return sent
        try:
            payload = pickle.dumps(chunk, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # an attribute value that cannot be pickled: never kill the sender
            _logger.exception("tracing: a batch of %d spans could not be sent", len(chunk))
            self.queue.dropped += len(chunk)
            return False
        return self._write(payload, len(chunk))

    def _encoded(self, encoder: OtlpEncoder, chunk: list[FinishedSpan]) -> list[tuple[bytes, int]]:
        """`chunk` as messages of encoded spans and their counts, each message's spans short
        of `MAX_REQUEST_BYTES` where they can be; a span that cannot be encoded is dropped
        (counted, logged), not the spans around it."""
        head = ENCODED + _COUNT.pack(len(chunk))
        try:
            message: bytes | None = encoder.span_fields(chunk, head)
        except Exception:  # a value the encoder refuses: never kill the sender
            if len(chunk) == 1:
                _logger.exception("tracing: a span could not be encoded: %r", chunk[0][0])
                self.queue.dropped += 1
                return []
            message = None
        if message is None or (len(message) - len(head) > MAX_REQUEST_BYTES and len(chunk) > 1):
            half = len(chunk) // 2
            return self._encoded(encoder, chunk[:half]) + self._encoded(encoder, chunk[half:])
        return [(message, len(chunk))]

    def _write(self, payload: bytes, spans: int) -> bool:
        """Write one message of `spans` spans to the exporter process; whether it was
        written (else they are counted as dropped)."""
        for attempt in range(2):
            process, connection = self._process, self._connection
            if process is None or connection is None:
                break
            try:
                connection.send_bytes(payload)
            except (OSError, ValueError):
                # The process died (killed, out of memory): the next one takes the spans
                # (what the dead one held unexported is lost).
                _logger.error("tracing: the span exporter process died; starting another")
                self._discard()
                if attempt == 0 and not self._abandoned:
                    self._start_process()
            else:
                return True
        self.queue.dropped += spans
        return False

    def _send_flush(self) -> None:
        connection = self._connection
        if connection is not None:
            with contextlib.suppress(OSError, ValueError):  # gone: `_send` finds out next
                connection.send_bytes(FLUSH)

    def _report_dropped(self) -> None:
        dropped = self.queue.dropped
        if dropped != self._reported_dropped:
            _logger.warning(
                "tracing: %d spans dropped (%d in all): the export queue (max_queued_spans %d)"
                " was full or the exporter process was gone",
                dropped - self._reported_dropped,
                dropped,
                self._settings.max_queued_spans,
            )
            self._reported_dropped = dropped

    def _discard(self) -> None:
        process, self._process = self._process, None
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
        if process is not None:
            process.kill()  # it ignores SIGTERM (see _serve)
            process.join(STOP_MARGIN_S)

    def stop(self) -> None:
        """Send what is queued, let the process export it, then make sure it has exited;
        idempotent. Takes at most about twice the export timeout: a process that does not
        drain its pipe in time (a collector that does not answer) is killed, and what it
        had not exported is lost."""
        limit_s = self._settings.export_timeout_s + STOP_MARGIN_S
        self._stopping.set()
        self.queue.ready.set()
        self._sender.join(limit_s)
        if self._sender.is_alive():  # blocked writing to a process that does not read
            self._abandoned = True
            _logger.warning("tracing: the span exporter process did not take the last spans")
            process = self._process
            if process is not None:
                process.kill()  # its pipe breaks: the sender drops the rest and ends
            self._sender.join()
            self._discard()
            return
        process, connection = self._process, self._connection
        if process is None or connection is None:
            return
        with contextlib.suppress(OSError, ValueError):
            connection.send_bytes(b"")
        process.join(limit_s)
        if process.is_alive():
            _logger.warning("tracing: the span exporter process did not finish in time")
        self._discard()


def _serve(connection: Connection, settings: TracingSettings, scope: Scope) -> None:
    """The exporter process's main: export every batch received until told to stop."""
    # Ctrl-C or a group-wide SIGTERM reaches this process too: the serving process decides
    # when it stops (it sends what is left first), or its end closes the pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if settings.export_niceness:
        os.nice(settings.export_niceness)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    export = _exporter(settings, scope)
    batch_spans = settings.max_export_batch_spans
    held: list[FinishedSpan] = []
    encoded: list[tuple[memoryview, int]] = []
    encoded_spans = 0
    try:
        while True:
            try:
                message = connection.recv_bytes()
            except (EOFError, OSError):
                message = b""  # the serving process is gone: export what is held
            if message and message != FLUSH:
                if message[:1] == ENCODED:
                    spans = _COUNT.unpack_from(message, 1)[0]
                    encoded.append((memoryview(message)[1 + _COUNT.size :], spans))
                    encoded_spans += spans
                else:
                    try:
                        held.extend(pickle.loads(message))
                    except Exception:
                        _logger.exception("tracing: a batch of spans could not be read")
                if len(held) + encoded_spans < batch_spans:
                    continue
            _export_held(export, held, batch_spans)
            _export_encoded(export, encoded, batch_spans)
            held, encoded, encoded_spans = [], [], 0
            if not message:
                return
    finally:
        with contextlib.suppress(Exception):
            export.shutdown()


def chunk_spans(batch_spans: int) -> int:
    """How many spans the sender takes at a time: at most `CHUNK_SPANS`, and a whole
    fraction of a batch, so that whole chunks fill export requests."""
    chunks = -(-batch_spans // CHUNK_SPANS)
    return -(-batch_spans // chunks)


def _export_encoded(
    export: _Export, encoded: list[tuple[memoryview, int]], batch_spans: int
) -> None:
    """Export chunks of encoded spans, whole chunks to a request, each request at most
    `batch_spans` spans and `MAX_REQUEST_BYTES` bytes (or one chunk)."""
    group: list[memoryview] = []
    spans = size = 0
    for fields, count in encoded:
        if group and (spans + count > batch_spans or size + len(fields) > MAX_REQUEST_BYTES):
            _export_fields(export, group, spans)
            group, spans, size = [], 0, 0
        group.append(fields)
        spans += count
        size += len(fields)
    if group:
        _export_fields(export, group, spans)


def _export_fields(export: _Export, group: list[memoryview], spans: int) -> None:
    try:
        export.export_fields(group, spans)
    except Exception:
        _logger.exception("tracing: a batch of %d spans could not be exported", spans)


def _export_held(export: _Export, held: list[FinishedSpan], batch_spans: int) -> None:
    """Export `held` in requests of at most `batch_spans` spans (OTLP gRPC splits one
    further where its bytes pass `MAX_REQUEST_BYTES`)."""
    for first in range(0, len(held), batch_spans):
        batch = held[first : first + batch_spans]
        try:
            export(batch)
        except Exception:
            _logger.exception("tracing: a batch of %d spans could not be exported", len(batch))


class _Export:
    """Exports batches of finished spans with one configured exporter."""

    def __call__(self, spans: Sequence[FinishedSpan]) -> None:
        raise NotImplementedError

    def export_fields(self, fields: Sequence[bytes | memoryview], spans: int) -> None:
        """Export `spans` spans given as their OTLP Span fields (`OtlpEncoder.span_fields`
        results)."""
        raise NotImplementedError(f"{type(self).__name__} takes no encoded spans")

    def shutdown(self) -> None:
        raise NotImplementedError


def _exporter(settings: TracingSettings, scope: Scope) -> _Export:
    headers = dict(settings.headers) or None
    if settings.exporter == "otlp_grpc":
        return _GrpcExport(settings, scope, headers)
    if settings.exporter == "otlp_http":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return _SdkExport(
            HttpExporter(
                endpoint=settings.endpoint, headers=headers, timeout=settings.export_timeout_s
            ),
            scope,
        )
    if settings.exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return _SdkExport(ConsoleSpanExporter(service_name=settings.service_name), scope)
    raise ValueError("tracing exporter 'none' exports nothing")


class _GrpcExport(_Export):
    def __init__(self, settings: TracingSettings, scope: Scope, headers: Any) -> None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceResponse,
        )

        class EncodedStub:
            """TraceService's stub sending requests that are already serialized."""

            def __init__(self, channel: Any) -> None:
                self.Export = channel.unary_unary(
                    EXPORT_METHOD,
                    request_serializer=None,  # the request is its bytes
                    response_deserializer=ExportTraceServiceResponse.FromString,
                )

        class EncodedExporter(OTLPSpanExporter):
            """The SDK's OTLP gRPC exporter (channel, TLS, compression, headers, timeout,
            retries and reconnection) sending requests encoded elsewhere: its two per-signal
            hooks take `EncodedSpans`, and its stub sends their bytes as they are."""

            def __init__(self, **kwargs: Any) -> None:
                super().__init__(**kwargs)
                # The SDK makes its client from `_stub` (here and when it reconnects).
                self._stub = EncodedStub
                self._client = EncodedStub(self._channel)  # type: ignore[assignment]

            def _translate_data(self, data: Any) -> Any:
                return data.payload

            def _count_data(self, data: Any) -> int:
                return int(data.spans)

        self._exporter = EncodedExporter(
            endpoint=settings.endpoint, headers=headers, timeout=settings.export_timeout_s
        )
        self._encoder = OtlpEncoder(scope)

    def __call__(self, spans: Sequence[FinishedSpan]) -> None:
        payload = self._encoder.encode(spans)
        if len(payload) > MAX_REQUEST_BYTES and len(spans) > 1:
            half = len(spans) // 2
            self(spans[:half])
            self(spans[half:])
            return
        self._exporter.export(EncodedSpans(payload, len(spans)))  # type: ignore[arg-type]

    def export_fields(self, fields: Sequence[bytes | memoryview], spans: int) -> None:
        payload = self._encoder.request(*fields)
        self._exporter.export(EncodedSpans(payload, spans))  # type: ignore[arg-type]

    def shutdown(self) -> None:
        self._exporter.shutdown()


class _SdkExport(_Export):
    def __init__(self, exporter: Any, scope: Scope) -> None:
        self._exporter = exporter
        self._scope = scope
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        self._resource = Resource(
            dict(scope.resource_attributes), schema_url=scope.resource_schema_url
        )
        self._instrumentation_scope = InstrumentationScope(scope.name, scope.version)

    def __call__(self, spans: Sequence[FinishedSpan]) -> None:
        self._exporter.export(readable_spans(spans, self._resource, self._instrumentation_scope))

    def shutdown(self) -> None:
        self._exporter.shutdown()


def readable_spans(spans: Sequence[FinishedSpan], resource: Any, scope: Any) -> list[Any]:
    """The SDK's `ReadableSpan`s for finished spans (for the SDK's exporters)."""
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceState

    flags = _SpanFlags()
    readable = []
    for finished in spans:
        name, trace_id, span_id, trace_state = finished[:4]
        parent_span_id, parent_is_remote, kind, start_ns, end_ns = finished[4:9]
        attributes, events, links, status_code, status_message = finished[9:14]
        dropped_attributes, dropped_events, dropped_links = finished[14:]
        state = TraceState.from_header([trace_state]) if trace_state else None
        context = SpanContext(trace_id, span_id, False, flags.sampled, state)
        parent = (
            SpanContext(trace_id, parent_span_id, parent_is_remote, flags.sampled, state)
            if parent_span_id
            else None
        )
        span = ReadableSpan(
            name=name,
            context=context,
            parent=parent,
            resource=resource,
            attributes=_Counted(attributes, dropped_attributes),
            events=_counted_list(
                [
                    Event(event_name, _Counted(event_attributes, event_dropped), time_ns)
                    for event_name, time_ns, event_attributes, event_dropped in events or ()
                ],
                dropped_events,
            ),
            links=_counted_list(
                [
                    Link(
                        SpanContext(link_trace, link_span, link_remote, flags.sampled),
                        _Counted(link_attributes, link_dropped),
                    )
                    for link_trace, link_span, link_remote, link_attributes, link_dropped in links
                    or ()
                ],
                dropped_links,
            ),
            kind=SpanKind(kind),
            status=Status(StatusCode(status_code), status_message),
            start_time=start_ns,
            end_time=end_ns,
            instrumentation_scope=scope,
        )
        readable.append(span)
    return readable


class _SpanFlags:
    def __init__(self) -> None:
        from opentelemetry.trace import TraceFlags

        self.sampled = TraceFlags(TraceFlags.SAMPLED)


def _counted_list(items: list[Any], dropped: int) -> Any:
    """Events or links as the SDK's `BoundedList`, with their dropped count."""
    from opentelemetry.sdk.util import BoundedList

    bounded = BoundedList.from_seq(None, items)
    bounded.dropped = dropped
    return bounded


def _Counted(attributes: Mapping[str, Any], dropped: int) -> Any:  # noqa: N802
    """Attributes as the SDK's `BoundedAttributes`, with their dropped count."""
    from opentelemetry.attributes import BoundedAttributes

    bounded = BoundedAttributes(None, attributes, immutable=True)
    bounded.dropped = dropped
    return bounded


# OTLP protobuf, encoded by hand: the wire format is stable (opentelemetry-proto), and the
# tests check the result against the SDK's own encoder.

_FIXED64 = struct.Struct("<Q")
_FIXED32 = struct.Struct("<I")
_DOUBLE = struct.Struct("<d")
_SPAN_TIMES = struct.Struct("<BQBQ")
_TAG_START, _TAG_END = 0x39, 0x41  # Span fields 7 and 8, fixed64
_SPAN_FLAGS_TAG = b"\x85\x01"  # Span field 16, fixed32
_FLAGS_HAS_IS_REMOTE, _FLAGS_IS_REMOTE = 0x100, 0x200
_IDS = struct.Struct(">2sQQ2sQ")  # Span fields 1 (16 bytes) and 2 (8 bytes), big-endian
_PARENT = struct.Struct(">2sQ")  # Span field 4
_IDS_AND_PARENT = struct.Struct(">2sQQ2sQ2sQ")  # Span fields 1, 2 and 4
_TRACE_ID, _SPAN_ID, _PARENT_ID = b"\x0a\x10", b"\x12\x08", b"\x22\x08"
_LINK = struct.Struct(">4sQQ2sQ5s")  # Span field 13: a Link of trace id, span id and flags
_LINK_HEAD = b"\x6a\x21\x0a\x10"  # field 13, 33 bytes; Link field 1, 16 bytes
_MASK64 = (1 << 64) - 1
_SPAN_FLAGS = {
    remote: _SPAN_FLAGS_TAG
    + _FIXED32.pack(_FLAGS_HAS_IS_REMOTE | (_FLAGS_IS_REMOTE if remote else 0))
    for remote in (False, True)
}
"""Span field 16 by the parent's is_remote."""
_LINK_FLAGS = {
    remote: b"\x35" + _FIXED32.pack(_FLAGS_HAS_IS_REMOTE | (_FLAGS_IS_REMOTE if remote else 0))
    for remote in (False, True)
}
"""Link field 6 (fixed32 flags) by the linked span's is_remote."""
_TAILS = {
    (code, remote): b"\x7a" + (bytes([2, 0x18, code]) if code else b"\x00") + _SPAN_FLAGS[remote]
    for code in range(3)
    for remote in (False, True)
}
"""Span fields 15 (a status without message) and 16, by status code and the parent's
is_remote."""
_CACHED_VALUES = 4096
"""Encoded key-value pairs kept for reuse (model names, methods, peers repeat)."""
_Template = tuple[bytes, Callable[..., bytes], bytes, bytes, bytes]
"""A span shape's bytes: the Span field's tag and length, the packer of its ids, its name
and kind, what follows its times (attributes; status and flags too for a span without links),
and, for a span with links, its status and flags (after the links)."""


def _plain_links(links: Sequence[Any]) -> bool:
    """Whether no link has attributes or dropped any: each then has a fixed encoding."""
    return not any(link[3] or link[4] for link in links)


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL[value] if value >= 0 else _varint(value + (1 << 64))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL = [bytes([value]) for value in range(0x80)]


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field: `tag` is the field number and wire type 2, as a byte."""
    return _SMALL[tag] + _varint(len(payload)) + payload


def _any_value(value: Any) -> bytes:
    """An AnyValue message's content."""
    kind = type(value)
    if kind is str:
        return _field(0x0A, value.encode())
    if kind is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if kind is int:
        return b"\x18" + _varint(value)
    if kind is float:
        return b"\x21" + _DOUBLE.pack(value)
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _field(0x0A, str(value).encode())
    if isinstance(value, int):
        return b"\x18" + _varint(int(value))
    if isinstance(value, float):
        return b"\x21" + _DOUBLE.pack(value)
    if isinstance(value, bytes):
        return _field(0x3A, value)
    if isinstance(value, Mapping):
        pairs = b"".join(_field(0x0A, _key_value(str(k), v)) for k, v in value.items())
        return _field(0x32, pairs)
    if isinstance(value, Sequence):
        return _field(0x2A, b"".join(_field(0x0A, _any_value(v)) for v in value))
    raise TypeError(f"invalid attribute value type {type(value).__name__}")


def _key_value(key: str, value: Any) -> bytes:
    """A KeyValue message's content."""
    return _field(0x0A, key.encode()) + _field(0x12, _any_value(value))


class OtlpEncoder:
    """Encodes batches of finished spans as one serialized `ExportTraceServiceRequest`
    (one resource, one scope), field for field what the SDK's encoder sends: `encode`, or
    `span_fields` for the spans' part and `request` around one or more such parts."""

    def __init__(self, scope: Scope) -> None:
        resource = b"".join(
            _field(0x0A, _key_value(key, value)) for key, value in scope.resource_attributes.items()
        )
        instrumentation = _field(0x0A, scope.name.encode())
        if scope.version:
            instrumentation += _field(0x12, scope.version.encode())
        self._resource = _field(0x0A, resource)
        self._resource_schema = (
            _field(0x1A, scope.resource_schema_url.encode()) if scope.resource_schema_url else b""
        )
        self._scope = _field(0x0A, instrumentation)
        self._pairs: dict[tuple[str, Any], bytes] = {}
        self._sets: dict[tuple[Any, ...], bytes] = {}
        self._names: dict[tuple[str, int], bytes] = {}
        self._templates: dict[tuple[Any, ...], _Template] = {}

    def _attributes(self, tag: int, attributes: Mapping[str, Any]) -> bytes:
        """Repeated KeyValue fields; whole sets that repeat (a model's, a connection's) and
        simple pairs come from caches."""
        try:
            # Types too: True == 1 == 1.0 as keys, not as encodings.
            set_key = (tag, *attributes.items(), *map(type, attributes.values()))
            encoded_set = self._sets.get(set_key)
        except TypeError:  # an unhashable value
            return self._encode_attributes(tag, attributes)
        if encoded_set is None:
            encoded_set = self._encode_attributes(tag, attributes)
            if len(self._sets) >= _CACHED_VALUES:
                self._sets.clear()
            self._sets[set_key] = encoded_set
        return encoded_set

    def _encode_attributes(self, tag: int, attributes: Mapping[str, Any]) -> bytes:
        pairs = self._pairs
        out = []
        for key, value in attributes.items():
            kind = type(value)
            cache_key = (key, value, kind) if kind is str or kind is int else None
            encoded = pairs.get(cache_key) if cache_key is not None else None  # type: ignore[arg-type]
            if encoded is None:
                try:
                    encoded = _field(tag, _key_value(key, value))
                except TypeError as exc:
                    _logger.warning("tracing: attribute %s not exported: %s", key, exc)
                    continue
                if cache_key is not None:
                    if len(pairs) >= _CACHED_VALUES:
                        pairs.clear()
                    pairs[cache_key] = encoded  # type: ignore[index]
            out.append(encoded)
        return b"".join(out)

    def _attribute_set(self, attributes: Mapping[str, Any]) -> bytes:
        """A span's attributes field (here and `_fastotlp`'s callback)."""
        return self._attributes(0x4A, attributes) if attributes else b""

    def span_field(self, span: FinishedSpan) -> bytes:
        """One span's Span field of the ScopeSpans message, any span."""
        out: list[bytes] = []
        self._span(span, out)
        return b"".join(out)

    def _span(self, span: FinishedSpan, out: list[bytes]) -> None:
        """Append the Span field (tag and length, then content) of `span` to `out`: any
        span, where `encode`'s shapes take only the common ones."""
        name, trace_id, span_id, trace_state = span[:4]
        parent_span_id, parent_is_remote, kind, start_ns, end_ns = span[4:9]
        attributes, events, links, status_code, status_message = span[9:14]
        dropped_attributes, dropped_events, dropped_links = span[14:]
        # Span fields in number order: ids, trace state, parent, name and kind, times, ...
        parts = [_IDS.pack(b"\x0a\x10", trace_id >> 64, trace_id & _MASK64, b"\x12\x08", span_id)]
        if trace_state:
            parts.append(_field(0x1A, trace_state.encode()))
        if parent_span_id:
            parts.append(_PARENT.pack(b"\x22\x08", parent_span_id))
        name_and_kind = self._names.get((name, kind))
        if name_and_kind is None:
            # OTLP's SpanKind counts from UNSPECIFIED.
            name_and_kind = _field(0x2A, name.encode()) + b"\x30" + _SMALL[kind + 1]
            if len(self._names) < _CACHED_VALUES:
                self._names[name, kind] = name_and_kind
        parts.append(name_and_kind)
        parts.append(_SPAN_TIMES.pack(_TAG_START, start_ns, _TAG_END, end_ns))
        if attributes:
            parts.append(self._attributes(0x4A, attributes))
        if dropped_attributes or events or dropped_events or links or dropped_links:
            self._rare_fields(
                parts, dropped_attributes, events, dropped_events, links, dropped_links
            )
        if status_message:
            status = _field(0x12, status_message.encode())
            if status_code:
                status += b"\x18" + _SMALL[status_code]
            parts.append(_field(0x7A, status))
            parts.append(_SPAN_FLAGS[parent_is_remote])
        else:
            parts.append(_TAILS[status_code, parent_is_remote])
        span_bytes = b"".join(parts)
        out.append(_SMALL[0x12] + _varint(len(span_bytes)))
        out.append(span_bytes)

    def _rare_fields(
        self,
        parts: list[bytes],
        dropped_attributes: int,
        events: Sequence[Any] | None,
        dropped_events: int,
        links: Sequence[Any] | None,
        dropped_links: int,
    ) -> None:
        """Span fields 10 to 14: dropped attributes, events, links and their counts."""
        if dropped_attributes:
            parts.append(b"\x50" + _varint(dropped_attributes))
        for event_name, time_ns, event_attributes, event_dropped in events or ():
            event = b"\x09" + _FIXED64.pack(time_ns) + _field(0x12, event_name.encode())
            if event_attributes:
                event += self._attributes(0x1A, event_attributes)
            if event_dropped:
                event += b"\x20" + _varint(event_dropped)
            parts.append(_field(0x5A, event))
        if dropped_events:
            parts.append(b"\x60" + _varint(dropped_events))
        for link_trace, link_span, link_remote, link_attributes, link_dropped in links or ():
            link = b"\x0a\x10" + link_trace.to_bytes(16, "big") + b"\x12\x08"
            link += link_span.to_bytes(8, "big")
            if link_attributes:
                link += self._attributes(0x22, link_attributes)
            if link_dropped:
                link += b"\x28" + _varint(link_dropped)
            flags = _FLAGS_HAS_IS_REMOTE | (_FLAGS_IS_REMOTE if link_remote else 0)
            parts.append(_field(0x6A, link + b"\x35" + _FIXED32.pack(flags)))
        if dropped_links:
            parts.append(b"\x70" + _varint(dropped_links))

    def _template(
        self,
        name: str,
        kind: int,
        attributes: bytes,
        status_code: int,
        parent: bool,
        remote: bool,
        links: int,
    ) -> _Template:
        """What the spans of one shape share: everything but their ids, times and links
        (`links` of them, each with no attributes)."""
        key = (name, kind, attributes, status_code, parent, remote, links)
        template = self._templates.get(key)
        if template is None:
            name_and_kind = _field(0x2A, name.encode()) + b"\x30" + _SMALL[kind + 1]
            status = _TAILS[status_code, remote]
            ids = _IDS_AND_PARENT if parent else _IDS
            length = (
                ids.size
                + len(name_and_kind)
                + _SPAN_TIMES.size
                + len(attributes)
                + links * _LINK.size
                + len(status)
            )
            head = _SMALL[0x12] + _varint(length)
            if links:
                template = (head, ids.pack, name_and_kind, attributes, status)
            else:  # what follows the times in one piece
                template = (head, ids.pack, name_and_kind, attributes + status, b"")
            if len(self._templates) >= _CACHED_VALUES:
                self._templates.clear()
            self._templates[key] = template
        return template

    def encode(self, spans: Sequence[FinishedSpan]) -> bytes:
        """The request for `spans`."""
        return self.request(self.span_fields(spans))

    def request(self, *span_fields: bytes | memoryview) -> bytes:
        """The request holding the spans of `span_fields` (`span_fields` results), made
        with one copy of them (an export request is a megabyte or so)."""
        scope_spans = len(self._scope) + sum(map(len, span_fields))
        scope_head = _SMALL[0x12] + _varint(scope_spans)
        resource_spans = (
            len(self._resource) + len(scope_head) + scope_spans + len(self._resource_schema)
        )
        head = _SMALL[0x0A] + _varint(resource_spans) + self._resource + scope_head
        return b"".join((head, self._scope, *span_fields, self._resource_schema))

    def span_fields(self, spans: Sequence[FinishedSpan], head: bytes = b"") -> bytes:
        """`head`, then the Span fields of the ScopeSpans message for `spans`:
        `_fastotlp.span_fields` where it was built (the common spans in C, the others
        through `span_field`; written where they stay, after `head`), else
        `python_span_fields`, the reference."""
        if _fastotlp is not None:
            return _fastotlp.span_fields(spans, self._attribute_set, self.span_field, head)
        return head + self.python_span_fields(spans)

    def python_span_fields(self, spans: Sequence[FinishedSpan]) -> bytes:
        """`span_fields` in Python. Most spans come in few shapes (name, kind, attribute
        set, status, parent or not): each shape's bytes are made once, and a span adds only
        its ids and times. An attribute set is encoded once per call: spans that share one
        (prepared sets: a model's, a peer's) arrive as one object."""
        out: list[bytes] = []
        append = out.append
        encode_span = self._span
        template_of = self._template
        templates = self._templates
        by_object: dict[int, bytes] = {}
        """Encoded attribute sets by the id of their dict, alive in `spans` meanwhile."""
        times = _SPAN_TIMES.pack
        for span in spans:
            (
                name,
                trace_id,
                span_id,
                trace_state,
                parent_span_id,
                parent_is_remote,
                kind,
                start_ns,
                end_ns,
                attributes,
                events,
                links,
                status_code,
                status_message,
                dropped_attributes,
                dropped_events,
                dropped_links,
            ) = span
            if (
                trace_state
                or events
                or status_message
                or dropped_attributes
                or dropped_events
                or dropped_links
                or (links and not _plain_links(links))
            ):
                encode_span(span, out)
                continue
            count = len(links) if links else 0
            encoded = by_object.get(id(attributes))
            if encoded is None:
                encoded = by_object[id(attributes)] = self._attribute_set(attributes)
            parent = parent_span_id != 0
            template = templates.get(
                (name, kind, encoded, status_code, parent, parent_is_remote, count)
            ) or template_of(name, kind, encoded, status_code, parent, parent_is_remote, count)
            head, pack_ids, name_and_kind, after_times, status = template
            append(head)
            if parent:
                append(
                    pack_ids(
                        _TRACE_ID,
                        trace_id >> 64,
                        trace_id & _MASK64,
                        _SPAN_ID,
                        span_id,
                        _PARENT_ID,
                        parent_span_id,
                    )
                )
            else:
                append(pack_ids(_TRACE_ID, trace_id >> 64, trace_id & _MASK64, _SPAN_ID, span_id))
            append(name_and_kind)
            append(times(_TAG_START, start_ns, _TAG_END, end_ns))
            append(after_times)
            if count:
                for link_trace, link_span, link_remote, _, _ in links:
                    append(
                        _LINK.pack(
                            _LINK_HEAD,
                            link_trace >> 64,
                            link_trace & _MASK64,
                            _SPAN_ID,
                            link_span,
                            _LINK_FLAGS[link_remote],
                        )
                    )
                append(status)
        return b"".join(out)
