"""The span exporter process and its OTLP encoding: the request it sends is the one the SDK's
encoder would build (and the C encoder's bytes are the Python encoder's), it reaches real OTLP
receivers (gRPC and HTTP) and standard output whether the sender ships spans encoded or
pickled, and a full queue drops spans rather than waiting."""

from __future__ import annotations

import fcntl
import os
import random
import signal
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from headrace.config import TracingSettings
from headrace.telemetry import _fastotlp
from headrace.telemetry import export as export_module
from headrace.telemetry.export import (
    MAX_REQUEST_BYTES,
    PIPE_BYTES,
    ExportProcess,
    OtlpEncoder,
    Scope,
    readable_spans,
)
from headrace.telemetry.spans import FinishedSpan
from tests.telemetry.receiver import OtlpHttpReceiver, OtlpReceiver

SCOPE = Scope({"service.name": "headrace", "service.instance.id": "i-1"}, "", "headrace", "9.9")
TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C


def _span(name: str, span_id: int, **fields: Any) -> FinishedSpan:
    values: dict[str, Any] = {
        "trace_state": "",
        "parent_span_id": 0,
        "parent_is_remote": False,
        "kind": 1,
        "start_ns": 1_700_000_000_000_000_000,
        "end_ns": 1_700_000_000_000_500_000,
        "attributes": {"rpc.system": "grpc", "network.peer.port": 40000},
        "events": None,
        "links": None,
        "status_code": 0,
        "status_message": None,
        "dropped_attributes": 0,
        "dropped_events": 0,
        "dropped_links": 0,
        **fields,
    }
    return (name, TRACE_ID, span_id, *values.values())


SPANS = [
    _span("server", 1),
    _span(
        "child",
        2,
        trace_state="vendor=value",
        parent_span_id=1,
        parent_is_remote=True,
        kind=2,
        attributes={
            "s": "text",
            "b": True,
            "i": -7,
            "f": 0.25,
            "bytes": b"\x00\x01",
            "list": ("a", "b"),
            "none": None,
        },
        events=[("exception", 1_700_000_000_000_100_000, {"exception.type": "E"}, 1)],
        links=[(0xFEED, 0xBEEF, True, {"k": "v"}, 2), (0xFEED, 0xCAFE, False, {}, 0)],
        status_code=2,
        status_message="ValueError: bad",
        dropped_attributes=3,
        dropped_events=4,
        dropped_links=5,
    ),
    _span("ok", 3, kind=0, attributes={}, status_code=1),
]


def test_the_encoded_request_is_the_one_the_sdk_encoder_builds() -> None:
    encoded = ExportTraceServiceRequest.FromString(OtlpEncoder(SCOPE).encode(SPANS))
    resource = Resource(dict(SCOPE.resource_attributes))
    scope = InstrumentationScope(SCOPE.name, SCOPE.version)
    expected = encode_spans(readable_spans(SPANS, resource, scope))
    assert encoded == expected
    span = encoded.resource_spans[0].scope_spans[0].spans[1]
    assert span.parent_span_id == (1).to_bytes(8, "big")
    assert span.links[0].attributes[0].key == "k"


SHARED = {"headrace.model.name": "identity", "headrace.model.version": "1"}


def _repeated_shapes() -> list[FinishedSpan]:
    shared = SHARED
    spans = [
        _span(
            name,
            10 + index,
            parent_span_id=parent,
            parent_is_remote=remote,
            kind=kind,
            attributes=attributes,
            status_code=status,
            start_ns=1_700_000_000_000_000_000 + index,
            end_ns=1_700_000_000_000_000_000 + 1_000 * index,
        )
        for index, (name, parent, remote, kind, attributes, status) in enumerate(
            [
                ("backend", 0xABCDEF, False, 2, shared, 0),
                ("backend", 0xABCDEF + 1, False, 2, shared, 0),  # the same shape again
                ("backend", 0, False, 2, shared, 0),  # no parent
                ("backend", 0x1234, True, 2, shared, 2),  # remote parent, ERROR
                ("server", 0, False, 1, shared, 1),  # the same set under another name
                ("server", 0, False, 1, dict(shared), 1),  # an equal set, another object
                ("server", 0, False, 1, {**shared, "n": 7}, 0),
                ("server", 2**64 - 1, True, 1, {}, 0),
            ]
        )
    ]
    plain_links = [(0xFEED, 0xBEEF, True, {}, 0), (2**128 - 1, 2**64 - 1, False, {}, 0)]
    spans += [  # links without attributes: part of the shape, by count
        _span("batch", 30, links=plain_links[:1], attributes=shared),
        _span("batch", 31, links=plain_links, attributes=shared, status_code=2),
        _span("batch", 32, links=plain_links, attributes=shared, parent_span_id=5),
        _span("batch", 33, links=[(1, 2, False, {"k": 1}, 0)], attributes=shared),
    ]
    spans.insert(3, SPANS[1])  # a span of the rare fields between them
    return spans


def test_spans_of_repeated_shapes_and_shared_attribute_sets_encode_as_the_sdks() -> None:
    spans = _repeated_shapes()
    encoder = OtlpEncoder(SCOPE)
    resource = Resource(dict(SCOPE.resource_attributes))
    scope = InstrumentationScope(SCOPE.name, SCOPE.version)
    expected = encode_spans(readable_spans(spans, resource, scope))
    for _ in range(2):  # shapes made, then reused
        assert ExportTraceServiceRequest.FromString(encoder.encode(spans)) == expected


def _edge_spans() -> list[FinishedSpan]:
    """Spans at the edges of what the C encoder takes itself, and just past them (those it
    hands to the Python encoder)."""
    many = {f"key.{index}": "v" * index for index in range(40)}  # a set past 2**7 bytes
    blob = {"blob": "x" * (20 << 10)}  # a span past 2**14 bytes
    spans: list[FinishedSpan] = [
        list(_span("a list", 1)),
        _span("décodé ✓", 2, attributes=many),
        _span("n" * 200, 3, attributes=blob, parent_span_id=2**64 - 1, parent_is_remote=True),
        (*_span("edge ids", 2**64 - 1)[:1], 2**128 - 1, *_span("", 2**64 - 1)[2:]),
        (*_span("zero ids", 0)[:1], 0, *_span("", 0)[2:]),
        _span("times", 4, start_ns=0, end_ns=2**64 - 1),
        _span("no attributes", 5, attributes=None),
        _span("empty tuple", 6, attributes=()),
        _span("empty links", 7, links=[], events=[], trace_state=None, status_message=""),
        _span("link lists", 8, links=[[1, 2, True, None, 0], [3, 4, False, (), 0]]),
        _span("link tuple", 9, links=((2**128 - 1, 2**64 - 1, True, {}, 0),)),
    ]
    spans += [_span("kind", 10 + kind, kind=kind, status_code=kind % 3) for kind in range(5)]
    # Values the C encoder leaves to Python: bools for ints, an int for a bool, a message.
    spans += [
        _span("bool count", 20, dropped_attributes=False, dropped_links=False),
        _span("int remote", 21, parent_is_remote=1, parent_span_id=7),
        _span("status message", 22, status_code=2, status_message="bad"),
        _span("link remote 1", 23, links=[(1, 2, 1, {}, 0)]),
        _span("link count", 24, links=[(1, 2, True, {}, False)]),
        _span("float kind", 25, kind=True),
        _span("dropped attributes", 26, dropped_attributes=1),
        _span("dropped events", 27, dropped_events=2**40),
        _span("dropped links", 28, dropped_links=3),
    ]
    # More distinct attribute sets than the C encoder remembers in one call, and one shared.
    spans += [_span("sets", 30 + index, attributes={"i": index}) for index in range(40)]
    spans += [_span("shared", 80 + index, attributes=SHARED) for index in range(5)]
    return spans


def _c_fields(encoder: OtlpEncoder, spans: list[FinishedSpan]) -> bytes:
    return _fastotlp.span_fields(spans, encoder._attribute_set, encoder.span_field)


def test_the_c_encoder_gives_the_python_encoders_bytes() -> None:
    assert export_module.ENCODER_ACCELERATED  # `make test` builds it: a skipped build fails here
    encoder = OtlpEncoder(SCOPE)
    spans = SPANS + _repeated_shapes() + _edge_spans()
    expected = encoder.python_span_fields(spans)
    assert _c_fields(encoder, spans) == expected
    assert encoder.span_fields(spans) == expected
    handed_over: list[str] = []

    def span_field(span: FinishedSpan) -> bytes:
        handed_over.append(span[0])
        return encoder.span_field(span)

    assert _fastotlp.span_fields(spans, encoder._attribute_set, span_field) == expected
    assert handed_over == [  # the rare spans only: the others are the C encoder's own
        "child",
        "child",
        "batch",
        "bool count",
        "int remote",
        "status message",
        "link remote 1",
        "link count",
        "float kind",
        "dropped attributes",
        "dropped events",
        "dropped links",
    ]
    for span in spans:  # one at a time too: every span on its own path
        assert _c_fields(encoder, [span]) == encoder.python_span_fields([span])
    resource = Resource(dict(SCOPE.resource_attributes))
    scope = InstrumentationScope(SCOPE.name, SCOPE.version)
    common = SPANS + _repeated_shapes() + _edge_spans()[:16]  # the SDK's own types
    decoded = ExportTraceServiceRequest.FromString(encoder.request(_c_fields(encoder, common)))
    assert decoded == encode_spans(readable_spans(common, resource, scope))
    assert _c_fields(encoder, []) == b""
    # A head is written first, the spans after it (the sender's message in one piece).
    assert encoder.span_fields(spans, b"S\x01\x02") == b"S\x01\x02" + expected
    assert encoder.span_fields([], b"S") == b"S"


_REFUSALS = (
    TypeError,
    ValueError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    struct.error,
)


def test_the_c_encoder_reads_ints_of_every_size_as_python_does() -> None:
    """Ids and times across the digit boundaries of CPython's ints (30 bits), at the ends of
    their ranges and at random: the same bytes as the Python encoder."""
    rng = random.Random(5)
    edges64 = [0, 1, 2**30 - 1, 2**30, 2**60 - 1, 2**60, 2**63, 2**64 - 1]
    edges128 = [*edges64, 2**64, 2**90 - 1, 2**90, 2**120, 2**127, 2**128 - 1]
    values64 = edges64 + [rng.getrandbits(rng.randint(1, 64)) for _ in range(200)]
    values128 = edges128 + [rng.getrandbits(rng.randint(1, 128)) for _ in range(200)]
    spans: list[FinishedSpan] = []
    for index, (small, large) in enumerate(zip(values64, values128[: len(values64)], strict=True)):
        span = list(
            _span(
                "ints",
                small,
                parent_span_id=values64[-index - 1],
                start_ns=small,
                end_ns=values64[index // 2],
                links=[(large, small, True, None, 0)],
            )
        )
        span[1] = large
        spans.append(span)
    encoder = OtlpEncoder(SCOPE)
    handed_over: list[str] = []

    def span_field(span: FinishedSpan) -> bytes:
        handed_over.append(span[0])
        return encoder.span_field(span)

    fields = _fastotlp.span_fields(spans, encoder._attribute_set, span_field)
    assert fields == encoder.python_span_fields(spans)
    assert handed_over == []
    too_big_trace = (*_span("trace", 1)[:1], 2**150, *_span("", 1)[2:])
    for too_big in (
        _span("id", 2**64),
        _span("id", 2**90),
        _span("time", 1, end_ns=2**64),
        _span("parent", 1, parent_span_id=2**200),
        too_big_trace,
    ):
        with pytest.raises(_REFUSALS):
            _c_fields(encoder, [too_big])


@pytest.mark.parametrize(
    "bad",
    [
        _span(None, 1),  # type: ignore[arg-type]
        _span("id", -1),
        (*_span("trace", 1)[:1], 2**128, *_span("", 1)[2:]),
        _span("time", 1, start_ns=-1),
        _span("status", 1, status_code=3),
        _span("kind", 1, kind="client"),
        _span("short", 1)[:16],
        _span("link", 1, links=[(1, 2, True, {})]),
        _span("surrogate \udc80", 1),
        5,
    ],
)
def test_spans_the_python_encoder_refuses_the_c_encoder_refuses(bad: Any) -> None:
    encoder = OtlpEncoder(SCOPE)
    with pytest.raises(_REFUSALS):
        encoder.python_span_fields([SPANS[0], bad])
    with pytest.raises(_REFUSALS):  # through the Python encoder's span_field
        _c_fields(encoder, [SPANS[0], bad])


def test_the_c_encoders_arguments_are_checked_and_nothing_leaks() -> None:
    encoder = OtlpEncoder(SCOPE)
    with pytest.raises(TypeError, match="3 or 4 arguments"):
        _fastotlp.span_fields(SPANS)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="head must be bytes"):
        _fastotlp.span_fields(SPANS, encoder._attribute_set, encoder.span_field, "S")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable"):
        _fastotlp.span_fields(SPANS, None, encoder.span_field)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _fastotlp.span_fields(5, encoder._attribute_set, encoder.span_field)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="attributes_of returned str"):
        _fastotlp.span_fields(SPANS, lambda _: "x", encoder.span_field)  # type: ignore[arg-type, return-value]
    with pytest.raises(TypeError, match="span_field returned str"):
        _fastotlp.span_fields(SPANS, encoder._attribute_set, lambda _: "x")  # type: ignore[arg-type, return-value]
    with pytest.raises(ZeroDivisionError):
        _fastotlp.span_fields(SPANS, lambda _: 1 // 0, encoder.span_field)
    fixed = b"\x4a\x00"
    spans = _edge_spans()
    watched = [fixed, SHARED, spans[1][0], spans[1][9], spans[9][11], spans[0]]
    before = [sys.getrefcount(item) for item in watched]
    for _ in range(2_000):
        _fastotlp.span_fields(spans, lambda _: fixed, encoder.span_field)
        _fastotlp.span_fields(spans, lambda _: fixed, encoder.span_field, fixed)
        with pytest.raises(ZeroDivisionError):
            _fastotlp.span_fields(spans, lambda _: 1 // 0, encoder.span_field)
    assert [sys.getrefcount(item) for item in watched] == before


def _settings(**fields: Any) -> TracingSettings:
    return TracingSettings.model_validate(
        {"exporter": "otlp_grpc", "export_delay_ms": 60_000, **fields}
    )


@pytest.fixture(params=["encoded", "pickled"])
def shipped(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """How the sender ships spans to the exporter process: OTLP-encoded (by the C encoder,
    built in every test install) or pickled (where it is not built)."""
    if request.param == "pickled":
        monkeypatch.setattr(export_module, "ENCODER_ACCELERATED", False)
    return str(request.param)


def test_spans_reach_an_otlp_grpc_receiver_by_shutdown(shipped: str) -> None:
    with OtlpReceiver() as receiver:
        export = ExportProcess(_settings(endpoint=receiver.endpoint), SCOPE)
        assert (export._encoder is not None) == (shipped == "encoded")
        assert export._connection is not None  # a chunk (about 110 KiB) is one write
        assert fcntl.fcntl(export._connection.fileno(), fcntl.F_GETPIPE_SZ) == PIPE_BYTES
        for span in SPANS:
            export.queue.record(span)
        export.stop()
        export.stop()
        received = receiver.in_trace(f"{TRACE_ID:032x}")
    assert [span.name for span in received] == ["server", "child", "ok"]
    assert received[1].links == [
        (f"{0xFEED:032x}", f"{0xBEEF:016x}"),
        (f"{0xFEED:032x}", f"{0xCAFE:016x}"),
    ]
    assert received[0].resource == {"service.name": "headrace", "service.instance.id": "i-1"}


def test_spans_reach_an_otlp_http_receiver() -> None:
    with OtlpHttpReceiver() as receiver:
        export = ExportProcess(_settings(exporter="otlp_http", endpoint=receiver.traces_url), SCOPE)
        for span in SPANS:
            export.queue.record(span)
        export.stop()
        received = receiver.in_trace(f"{TRACE_ID:032x}")
    assert [(span.name, span.status_code) for span in received] == [
        ("server", 0),
        ("child", 2),
        ("ok", 1),
    ]


def test_the_console_exporter_prints_every_span(capfd: pytest.CaptureFixture[str]) -> None:
    export = ExportProcess(_settings(exporter="console"), SCOPE)
    for span in (SPANS[0], SPANS[2]):  # the SDK's console format has no bytes values
        export.queue.record(span)
    export.stop()
    printed = capfd.readouterr().out
    for name in ("server", "ok"):
        assert f'"name": "{name}"' in printed
    assert f"0x{TRACE_ID:032x}" in printed


def test_a_full_queue_drops_new_spans_and_keeps_the_rest(shipped: str) -> None:
    with OtlpReceiver() as receiver:
        export = ExportProcess(
            _settings(endpoint=receiver.endpoint, max_queued_spans=2, max_export_batch_spans=2),
            SCOPE,
        )
        for span in SPANS:  # the sender, woken at two, takes them after the third is refused
            export.queue.record(span)
        assert export.queue.dropped == 1
        export.stop()
        received = receiver.in_trace(f"{TRACE_ID:032x}")
    assert [span.name for span in received] == ["server", "child"]


def test_the_chunks_of_one_send_go_out_as_one_request(shipped: str) -> None:
    with OtlpReceiver() as receiver:
        export = ExportProcess(
            _settings(endpoint=receiver.endpoint, max_export_batch_spans=1500), SCOPE
        )
        for index in range(1200):  # below the batch: all sent at stop, in three chunks
            export.queue.record(_span("s", index + 1))
        export.stop()
    assert receiver.requests[0][0] == 1200
    assert len(receiver.requests) == 1


def test_spans_short_of_a_batch_go_out_after_export_delay_ms() -> None:
    with OtlpReceiver() as receiver:
        export = ExportProcess(_settings(endpoint=receiver.endpoint, export_delay_ms=50), SCOPE)
        try:
            for span in SPANS:
                export.queue.record(span)
            deadline = time.monotonic() + 10
            while len(receiver.in_trace(f"{TRACE_ID:032x}")) < 3:  # before any stop
                assert time.monotonic() < deadline, "not exported within 10 s"
                time.sleep(0.02)
        finally:
            export.stop()
    assert receiver.requests[0][0] == 3


def test_requests_hold_at_most_max_export_batch_spans(shipped: str) -> None:
    with OtlpReceiver() as receiver:
        export = ExportProcess(
            _settings(
                endpoint=receiver.endpoint, max_export_batch_spans=1500, max_queued_spans=20_000
            ),
            SCOPE,
        )
        for index in range(3200):  # the sender wakes at 1500 queued
            export.queue.record(_span("s", index + 1))
        export.stop()
    counts = [spans for spans, _ in receiver.requests]
    assert sum(counts) == 3200
    assert max(counts) <= 1500
    assert len(counts) >= 3
    assert export.queue.dropped == 0


def test_a_request_past_max_request_bytes_is_split(shipped: str) -> None:
    big = "x" * (128 << 10)
    with OtlpReceiver() as receiver:  # accepts 4 MiB, grpc's default
        export = ExportProcess(_settings(endpoint=receiver.endpoint), SCOPE)
        for index in range(48):  # 6 MiB in all
            export.queue.record(_span("big", index + 1, attributes={"blob": big, "i": index}))
        export.stop()
    assert sum(spans for spans, _ in receiver.requests) == 48
    assert len(receiver.requests) > 1
    assert max(size for _, size in receiver.requests) <= MAX_REQUEST_BYTES


def test_a_dead_exporter_process_is_replaced_and_the_spans_still_go_out(shipped: str) -> None:
    with OtlpReceiver() as receiver:
        export = ExportProcess(_settings(endpoint=receiver.endpoint), SCOPE)
        first = export.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        stat = Path(f"/proc/{first}/stat")
        while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":  # its pipe end is closed
            time.sleep(0.01)
        for span in SPANS:
            export.queue.record(span)
        export.stop()
        received = receiver.in_trace(f"{TRACE_ID:032x}")
    assert [span.name for span in received] == ["server", "child", "ok"]
    assert export.queue.dropped == 0


def test_a_span_the_encoder_refuses_is_dropped_alone() -> None:
    bad = _span("bad", 9, status_code=7)
    with OtlpReceiver() as receiver:
        export = ExportProcess(_settings(endpoint=receiver.endpoint), SCOPE)
        assert export._encoder is not None
        for span in (SPANS[0], bad, SPANS[2]):
            export.queue.record(span)
        export.stop()
        received = receiver.in_trace(f"{TRACE_ID:032x}")
    assert [span.name for span in received] == ["server", "ok"]
    assert export.queue.dropped == 1


def test_chunks_are_whole_fractions_of_a_batch() -> None:
    assert [export_module.chunk_spans(batch) for batch in (1, 2, 512, 513, 1000, 1500, 4096)] == [
        1,
        2,
        512,
        257,
        500,
        500,
        512,
    ]


def test_equal_values_of_other_types_are_encoded_by_type() -> None:
    encoder = OtlpEncoder(SCOPE)
    spans = [_span(str(value), 1, attributes={"x": value}) for value in (True, 1, 1.0, "1")]
    decoded = ExportTraceServiceRequest.FromString(encoder.encode(spans + spans))
    kinds = [
        span.attributes[0].value.WhichOneof("value")
        for span in decoded.resource_spans[0].scope_spans[0].spans
    ]
    assert kinds == ["bool_value", "int_value", "double_value", "string_value"] * 2


class _SilentReceiver(OtlpReceiver):
    """Takes exports and never answers them (until closed)."""

    def __init__(self) -> None:
        super().__init__()
        self.released = threading.Event()

    def Export(
        self, request: ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> ExportTraceServiceResponse:
        self.released.wait()
        return ExportTraceServiceResponse()


def test_shutdown_gives_up_on_a_collector_that_does_not_answer() -> None:
    with _SilentReceiver() as receiver:
        try:
            export = ExportProcess(
                _settings(
                    endpoint=receiver.endpoint,
                    export_timeout_s=1,
                    max_queued_spans=20_000,
                    max_export_batch_spans=512,
                ),
                SCOPE,
            )
            # 20 exports of 1 s each, more than stop waits; distinct spans of 1 KiB fill
            # the pipe (1 MiB) many times over.
            for index in range(20 * 512):
                export.queue.record(_span("s", index + 1, attributes={"b": "x" * 1024, "i": index}))
            export.stop()
        finally:
            receiver.released.set()
    assert export.pid is None
    assert export.queue.dropped > 0
