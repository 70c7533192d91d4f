"""The span recorder's C part (`_fastspans.c`): built wherever Headrace is installed with a
compiler, and giving exactly the spans, records and sampling decisions of the Python code it
stands in for (`LeanTracer(accelerated=False)`, `RecordingSpan._end`)."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import itertools
import logging
import os
import random
import struct
import sys
from collections import deque
from collections.abc import Iterator
from typing import Any, NamedTuple

import grpc
import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import SpanLimits
from opentelemetry.trace import (
    INVALID_SPAN_CONTEXT,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from headrace.telemetry import spans
from headrace.telemetry.interceptor import (
    _CALL_METADATA,
    TracingInterceptor,
    _MethodAttributes,
    traced_methods,
)
from headrace.telemetry.spans import (
    FinishedSpan,
    LeanTracer,
    RecordingSpan,
    current_context,
    parent_of,
)

END = 8
SEED = 20261128


def _tracers(ratio: float) -> tuple[LeanTracer, list[FinishedSpan], LeanTracer, list[FinishedSpan]]:
    """A C and a Python tracer drawing their ids from the same seeded bytes."""
    fast_finished: list[FinishedSpan] = []
    python_finished: list[FinishedSpan] = []
    fast, python = (
        LeanTracer(
            ratio,
            finished.append,
            SpanLimits(),
            accelerated=accelerated,
            random_bytes=random.Random(SEED).randbytes,
        )
        for finished, accelerated in ((fast_finished, True), (python_finished, False))
    )
    return fast, fast_finished, python, python_finished


PARENTS: list[Any] = [
    None,
    INVALID_SPAN_CONTEXT,
    SpanContext(0xABC, 0xDEF, True, TraceFlags(0x01)),
    SpanContext(0xABC, 0xDEF, True, TraceFlags(0x00)),
    SpanContext(0xABC, 0xDEF, False, TraceFlags(0x03), TraceState([("k", "v")])),
    SpanContext(0xABC, 0xDEF, True, TraceFlags(0x02), TraceState([("a", "b")])),
    (0x123, 0x456, False, TraceFlags(0x03), SpanContext(1, 1, False).trace_state, True),
]


def test_the_extension_is_built_and_used() -> None:
    """`make test` installs Headrace with its C part: a missing build fails here, not as
    a slower tracer nobody notices."""
    assert spans.ACCELERATED
    tracer = LeanTracer(1.0, [].append, SpanLimits())
    assert type(tracer.start_prepared).__name__ == "builtin_function_or_method"
    assert type(RecordingSpan.__dict__["end"]).__name__ == "method_descriptor"
    assert type(RecordingSpan.__dict__["set_prepared_attribute"]).__name__ == "method_descriptor"
    assert spans.CONTEXT_ACCELERATED
    assert type(tracer.start_current).__name__ == "builtin_function_or_method"
    assert type(spans.end_current).__name__ == "builtin_function_or_method"
    assert type(spans.SpanQueue(10, 5).record).__name__ == "builtin_function_or_method"
    assert type(tracer.span_id).__name__ == "builtin_function_or_method"


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.0])
def test_c_and_python_give_the_same_spans_records_and_decisions(ratio: float) -> None:
    fast, fast_finished, python, python_finished = _tracers(ratio)
    prepared = fast.prepare({"model": "m", "n": 3})
    for round_ in range(50):
        for index, parent in enumerate(PARENTS):
            for kind in (SpanKind.SERVER, SpanKind.CLIENT, SpanKind.INTERNAL):
                start_time = 1_000 + round_ if index % 2 else None
                shared = bool(round_ % 2)
                made = []
                for tracer in (fast, python):
                    span = tracer.start_prepared(
                        "op", parent, kind, prepared, start_time, shared=shared
                    )
                    made.append(span)
                fast_span, python_span = made
                assert type(fast_span) is type(python_span)
                assert fast_span.get_span_context() == python_span.get_span_context()
                assert fast_span.is_recording() == python_span.is_recording()
                if type(fast_span) is RecordingSpan:
                    assert isinstance(python_span, RecordingSpan)
                    assert fast_span._shared == python_span._shared == shared
                    fast_span.end(end_time=5_000)  # C
                    RecordingSpan._end(python_span, 5_000)  # Python
                else:
                    assert isinstance(fast_span, NonRecordingSpan)
    assert len(fast_finished) == len(python_finished)
    for fast_record, python_record in zip(fast_finished, python_finished, strict=True):
        if fast_record[7] != python_record[7]:  # start times read from the clock differ
            assert abs(fast_record[7] - python_record[7]) < 10**9
            fast_record, python_record = list(fast_record), list(python_record)
            fast_record[7] = python_record[7] = 0
        assert fast_record == python_record
    if ratio == 1.0:
        assert len(fast_finished) > 0


def test_start_and_end_take_the_apis_arguments_and_refuse_others() -> None:
    tracer = LeanTracer(1.0, [].append, SpanLimits())
    prepared = tracer.prepare({})
    span = tracer.start_prepared("op", None, SpanKind.SERVER, prepared, start_time=7)
    assert isinstance(span, RecordingSpan)
    assert span._data[7] == 7
    with pytest.raises(TypeError, match="unexpected keyword"):
        tracer.start_prepared("op", None, SpanKind.SERVER, prepared, when=7)
    with pytest.raises(TypeError, match="4 to 6 arguments"):
        tracer.start_prepared("op", None, SpanKind.SERVER)
    with pytest.raises(TypeError, match="attributes"):
        tracer.start_prepared("op", None, SpanKind.SERVER, {"not": "prepared"})
    with pytest.raises(TypeError, match="parent"):
        tracer.start_prepared("op", "not a context", SpanKind.SERVER, prepared)
    with pytest.raises(TypeError, match="at most one argument"):
        span.end(1, 2)
    with pytest.raises(TypeError, match="unexpected keyword"):
        span.end(when=1)
    span.end(end_time=9)
    assert span._data[END] == 9


@pytest.mark.parametrize("end", [RecordingSpan.end, RecordingSpan._end], ids=["c", "python"])
def test_a_span_ends_once_and_a_second_end_is_logged(
    end: Any, caplog: pytest.LogCaptureFixture
) -> None:
    finished: list[FinishedSpan] = []
    tracer = LeanTracer(1.0, finished.append, SpanLimits())
    span = tracer.start_prepared("op", None, SpanKind.INTERNAL, tracer.prepare({}))
    end(span)
    with caplog.at_level(logging.WARNING, logger="headrace.telemetry.spans"):
        end(span, 123)
    assert len(finished) == 1
    assert finished[0][END] != 123
    assert "ending on an ended span (op)" in caplog.text


def test_the_garbage_collector_leaves_ended_spans_data_alone() -> None:
    """Finished spans wait in the export queue by thousands: C's `end` and
    `record_prepared` take their lists and tuples out of the collector's generations (they
    hold no cycles); what they refer to stays tracked."""
    finished: list[FinishedSpan] = []
    tracer = LeanTracer(1.0, finished.append, SpanLimits())
    prepared = tracer.prepare({"k": ("a", "b")})  # a container value: a tracked dict
    span = tracer.start_prepared("op", None, SpanKind.INTERNAL, prepared)
    assert gc.is_tracked(span._data)
    span.end()
    assert not gc.is_tracked(finished[0])
    assert gc.is_tracked(finished[0][9])  # the attribute dict
    # Spans recorded whole (the batcher's), with a link: the same.
    tracer.record_prepared("q", span.get_span_context(), prepared, 1, 2, PARENTS[2])
    assert not gc.is_tracked(finished[1])
    assert gc.is_tracked(finished[1][9])
    assert finished[1][11] == [(0xABC, 0xDEF, True, {}, 0)]


def test_a_recorder_that_fails_fails_the_end_call() -> None:
    def record(span: FinishedSpan) -> None:
        raise RuntimeError("recorder down")

    tracer = LeanTracer(1.0, record, SpanLimits())
    span = tracer.start_prepared("op", None, SpanKind.INTERNAL, tracer.prepare({}))
    with pytest.raises(RuntimeError, match="recorder down"):
        span.end()


def test_many_spans_leave_no_references_behind() -> None:
    """What the C code takes a reference to, it gives back: after 20,000 spans (ended and
    dropped, sampled or not, children or roots) the shared objects' counts are as before."""
    tracer = LeanTracer(0.5, lambda span: None, SpanLimits())
    attributes = {"model": "m"}
    prepared = tracer.prepare(attributes)
    name = "a span name not interned elsewhere"
    state = TraceState([("k", "v")])
    parent = SpanContext(0xABC, 0xDEF, True, TraceFlags(0x01), state)

    def run() -> None:
        for index in range(10_000):
            root = tracer.start_prepared(name, None, SpanKind.SERVER, prepared)
            child = tracer.start_prepared(
                name, parent if index % 2 else parent_of(None), SpanKind.CLIENT, prepared, 5
            )
            child.end()
            root.end()

    run()  # warm caches (interned strings, small ints) first
    gc.collect()
    before = [sys.getrefcount(thing) for thing in (prepared[0], name, state, parent)]
    run()
    gc.collect()
    after = [sys.getrefcount(thing) for thing in (prepared[0], name, state, parent)]
    assert after == before


def _contexts() -> list[Context | None]:
    """Contexts to start a child in: the current one (None) and explicit ones holding no
    span, a RecordingSpan of another tracer, a remote parent (as extracted), an unsampled
    one, and an invalid span; with another entry that must be kept."""
    other = LeanTracer(1.0, [].append, SpanLimits())
    recording = other.start_prepared("p", None, SpanKind.SERVER, other.prepare({}))
    converted = other.start_prepared("q", None, SpanKind.SERVER, other.prepare({}))
    converted.get_span_context()  # its context now a SpanContext, not a tuple
    key = otel_context.create_key("headrace-test")
    return [
        None,
        Context(),
        Context({key: "kept"}),
        trace.set_span_in_context(recording, Context({key: "kept"})),
        trace.set_span_in_context(converted),
        trace.set_span_in_context(NonRecordingSpan(PARENTS[2])),
        trace.set_span_in_context(NonRecordingSpan(PARENTS[3])),
        trace.set_span_in_context(NonRecordingSpan(PARENTS[4])),
        trace.set_span_in_context(NonRecordingSpan(INVALID_SPAN_CONTEXT)),
    ]


@pytest.mark.parametrize("ratio", [1.0, 0.0])
def test_c_and_python_start_current_and_end_current_alike(ratio: float) -> None:
    fast, fast_finished, python, python_finished = _tracers(ratio)
    prepared = fast.prepare({"model": "m"})
    outer = current_context()
    # The parent: the span current in the context (None), or given (a sampled, an unsampled
    # and a raw one, as `parent_of` gives them).
    given = [None, PARENTS[2], PARENTS[3], PARENTS[6]]
    for context, parent, error in itertools.product(
        _contexts(), given, (None, ValueError("bad"), KeyboardInterrupt())
    ):
        made = []
        for tracer, end_current in (
            (fast, spans.end_current),
            (python, spans._end_current),
        ):
            before = current_context()
            span, token = tracer.start_current("op", context, SpanKind.CLIENT, prepared, parent)
            now = current_context()
            assert trace.get_current_span(now) is span
            base = before if context is None else context
            assert {k: v for k, v in now.items() if k != spans._SPAN_KEY} == {
                k: v for k, v in base.items() if k != spans._SPAN_KEY
            }
            assert parent_of(now) == span.get_span_context()
            if parent is not None and span.is_recording():
                assert span._data[4] == parent[1]  # the parent span id
            end_current(span, token, error)
            assert current_context() is before
            made.append(span)
        fast_span, python_span = made
        assert type(fast_span) is type(python_span)
        assert fast_span.get_span_context() == python_span.get_span_context()
    assert current_context() is outer
    assert len(fast_finished) == len(python_finished) == (78 if ratio == 1.0 else 66)
    for fast_record, python_record in zip(fast_finished, python_finished, strict=True):
        fast_record, python_record = list(fast_record), list(python_record)
        fast_record[7] = python_record[7] = fast_record[8] = python_record[8] = 0  # times
        fast_events, python_events = fast_record[10], python_record[10]
        if fast_events:  # the exception event: its time and traceback's lines differ
            assert [event[0] for event in fast_events] == [event[0] for event in python_events]
            assert fast_events[0][2]["exception.message"] == "bad"
            fast_record[10] = python_record[10] = None
        assert fast_record == python_record


def test_a_failing_call_is_recorded_on_its_span_and_a_cancellation_is_not() -> None:
    finished: list[FinishedSpan] = []
    tracer = LeanTracer(1.0, finished.append, SpanLimits())
    prepared = tracer.prepare({})
    for error in (ValueError("bad input"), KeyboardInterrupt()):
        span, token = tracer.start_current("op", None, SpanKind.CLIENT, prepared)
        spans.end_current(span, token, error)
    failed, cancelled = finished
    assert failed[12] == 2  # ERROR
    assert failed[13] == "ValueError: bad input"
    assert failed[10][0][0] == "exception"
    assert cancelled[12] == 0
    assert cancelled[10] is None


def test_end_current_with_a_wrong_token_logs_and_still_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    finished: list[FinishedSpan] = []
    tracer = LeanTracer(1.0, finished.append, SpanLimits())
    span, token = tracer.start_current("op", None, SpanKind.CLIENT, tracer.prepare({}))
    spans.end_current(span, token, None)
    other, other_token = tracer.start_current("op2", None, SpanKind.CLIENT, tracer.prepare({}))
    with caplog.at_level(logging.ERROR, logger="headrace.telemetry.spans"):
        spans.end_current(other, token, None)  # used already
        spans.end_current(NonRecordingSpan(PARENTS[2]), "not a token", None)
    assert caplog.text.count("Failed to detach context") == 2
    assert [record[0] for record in finished] == ["op", "op2"]
    spans.end_current(NonRecordingSpan(PARENTS[2]), other_token, None)  # restores
    assert not trace.get_current_span().is_recording()


def test_start_current_and_end_current_leave_no_references_behind() -> None:
    tracer = LeanTracer(0.5, lambda span: None, SpanLimits())
    prepared = tracer.prepare({"model": "m"})
    name = "another span name not interned elsewhere"
    contexts = _contexts()

    def run() -> None:
        for index in range(10_000):
            context = contexts[index % len(contexts)]
            span, token = tracer.start_current(name, context, SpanKind.CLIENT, prepared)
            spans.end_current(span, token, None if index % 3 else ValueError("x"))

    run()
    gc.collect()
    before = [sys.getrefcount(thing) for thing in (prepared[0], name, *contexts[1:])]
    run()
    gc.collect()
    after = [sys.getrefcount(thing) for thing in (prepared[0], name, *contexts[1:])]
    assert after == before


def test_start_current_and_end_current_refuse_wrong_arguments() -> None:
    tracer = LeanTracer(1.0, [].append, SpanLimits())
    with pytest.raises(TypeError, match="4 or 5 arguments"):
        tracer.start_current("op", None, SpanKind.CLIENT)  # type: ignore[call-arg]
    prepared = tracer.prepare({})
    with pytest.raises(TypeError, match="4 or 5 arguments"):
        tracer.start_current("op", None, SpanKind.CLIENT, prepared, None, 1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="attributes"):
        tracer.start_current("op", None, SpanKind.CLIENT, {"not": "prepared"})  # type: ignore[arg-type]
    assert not trace.get_current_span().is_recording()  # nothing left current
    with pytest.raises(TypeError, match="3 arguments"):
        spans.end_current(None, None)  # type: ignore[call-arg]


@pytest.mark.parametrize("accelerated", [True, False], ids=["c", "python"])
def test_the_span_queue_keeps_up_to_max_queued_wakes_at_a_batch_and_counts_drops(
    accelerated: bool,
) -> None:
    queue = spans.SpanQueue(5, 3, accelerated=accelerated)
    assert (type(queue.record).__name__ == "builtin_function_or_method") == accelerated
    records: list[FinishedSpan] = [[index] for index in range(8)]
    for index, record in enumerate(records[:3]):
        assert not queue.ready.is_set()
        queue.record(record)
        assert queue.ready.is_set() == (index == 2)  # the third fills a batch
    queue.ready.clear()
    for record in records[3:]:
        queue.record(record)
    assert not queue.ready.is_set()  # not again on the way past a batch
    assert len(queue) == 5
    assert queue.dropped == 3
    queue.dropped += 2  # the sender's count of spans it could not send
    assert queue.dropped == 5
    assert queue.take(4) == records[:4]
    queue.record(records[0])
    assert queue.take(10) == [records[4], records[0]]
    gc.collect()
    before = [sys.getrefcount(record) for record in records]
    for _ in range(1000):
        for record in records:
            queue.record(record)
        queue.take(10)
    gc.collect()
    assert [sys.getrefcount(record) for record in records] == before


@pytest.mark.parametrize("accelerated", [True, False], ids=["c", "python"])
def test_the_span_queue_keeps_order_across_growth_and_wrap_around(accelerated: bool) -> None:
    # The C queue is a ring that grows by doubling: spans taken in pieces while others
    # arrive wrap around its end, and growing it with a wrapped ring keeps their order.
    queue = spans.SpanQueue(5000, 10_000, accelerated=accelerated)
    expected: deque[int] = deque()
    taken: list[int] = []
    number = 0
    for step in range(60):
        for _ in range(7 + 13 * (step % 5)):
            queue.record([number])  # type: ignore[arg-type]
            expected.append(number)
            number += 1
        taken += [record[0] for record in queue.take(5 + 11 * (step % 3))]
        assert len(queue) == len(expected) - len(taken) + (number - len(expected))
    taken += [record[0] for record in queue.take(10_000)]
    assert taken == list(expected)
    assert len(queue) == 0
    assert queue.take(3) == []
    assert queue.take(-1) == []


def test_a_queue_dropped_with_spans_in_it_releases_them() -> None:
    def fill() -> tuple[int, int]:
        queue = spans.SpanQueue(100, 10)
        for record in records[:50]:
            queue.record(record)
        queue.take(20)
        for record in records[50:]:
            queue.record(record)  # wraps around, then fills to the bound
        return len(queue), sys.getrefcount(records[60])

    records: list[FinishedSpan] = [[index] for index in range(300)]
    alone = sys.getrefcount(records[60])
    assert fill() == (100, alone + 1)  # the queue held it, and lets it go with itself
    gc.collect()
    assert [sys.getrefcount(records[index]) for index in range(300)] == [alone] * 300


@pytest.mark.parametrize("queued", [True, False], ids=["span-queue", "callable"])
def test_each_tracer_records_its_own_spans_and_every_kind_keeps_its_value(queued: bool) -> None:
    # The C span keeps its tracer's recorder (a SpanQueue's is called directly) and the
    # starter remembers each kind's value: spans of two tracers and of every kind, mixed.
    queues = [spans.SpanQueue(1000, 1000) for _ in range(2)]
    lists: list[list[FinishedSpan]] = [[], []]
    tracers = [
        LeanTracer(1.0, queue.record if queued else finished.append, SpanLimits())
        for queue, finished in zip(queues, lists, strict=True)
    ]
    assert all(tracer.starter is not None for tracer in tracers)
    for _ in range(3):
        for kind in SpanKind:
            for index, tracer in enumerate(tracers):
                tracer.start_span(f"tracer {index}", kind=kind).end()
    for index in range(2):
        recorded = queues[index].take(1000) if queued else lists[index]
        assert [record[0] for record in recorded] == [f"tracer {index}"] * 15
        assert [record[6] for record in recorded] == [kind.value for kind in SpanKind] * 3


def test_the_recorder_refuses_wrong_arguments() -> None:
    from headrace.telemetry import _fastspans

    with pytest.raises(ValueError, match="max_queued"):
        _fastspans.Recorder(lambda: None, 0, 1)
    with pytest.raises(ValueError, match="wake"):
        _fastspans.Recorder("not callable", 1, 1)
    with pytest.raises(TypeError):
        _fastspans.Recorder(lambda: None, 1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        _fastspans.Recorder(lambda: None, 1, 1).take("many")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "set_prepared",
    [RecordingSpan.set_prepared_attribute, RecordingSpan._set_prepared_attribute],
    ids=["c", "python"],
)
def test_set_prepared_attribute_shares_a_variant_per_value_or_falls_back(
    set_prepared: Any, caplog: pytest.LogCaptureFixture
) -> None:
    finished: list[FinishedSpan] = []
    tracer = LeanTracer(1.0, finished.append, SpanLimits(max_attributes=3))
    base = tracer.prepare({"a": 1, "b": 2})
    variants: dict[Any, Any] = {}

    def start() -> RecordingSpan:
        span = tracer.start_prepared("op", None, SpanKind.SERVER, base)
        assert isinstance(span, RecordingSpan)
        return span

    first, second, third = start(), start(), start()
    set_prepared(first, base, "code", 0, variants)  # makes the variant for 0
    set_prepared(second, base, "code", 0, variants)  # takes it
    set_prepared(third, base, "code", 5, variants)
    assert first._data[9] is second._data[9] is variants[0][0]
    assert first._data[9] == {"a": 1, "b": 2, "code": 0}
    assert third._data[9] == {"a": 1, "b": 2, "code": 5}
    assert base[0] == {"a": 1, "b": 2}  # never changed

    changed = start()
    changed.set_attribute("c", 3)  # its own dict now, at the limit of 3
    set_prepared(changed, base, "code", 0, variants)
    assert changed._data[9] == {"b": 2, "c": 3, "code": 0}  # the oldest evicted
    assert changed._data[14] == 1

    other = start()
    set_prepared(other, tracer.prepare({"z": 1}), "code", 0, variants)  # not its set
    assert other._data[9] == {"a": 1, "b": 2, "code": 0}
    assert other._data[9] is not variants[0][0]

    ended = start()
    ended.end()
    with caplog.at_level(logging.WARNING, logger="headrace.telemetry.spans"):
        set_prepared(ended, base, "code", 0, variants)
    assert ended._data[9] is base[0]
    assert "setting an attribute on an ended span (op)" in caplog.text
    with pytest.raises(TypeError):
        set_prepared(start(), base, "code", 0)


class _CallContext:
    """What the server span reads of a grpc.aio servicer context: the call's metadata, its
    peer, and the code and details its handler set."""

    def __init__(
        self, metadata: Any, peer: str, code: grpc.StatusCode | None, details: str | None
    ) -> None:
        self._metadata = metadata
        self._peer = peer
        self._code = code
        self._details = details

    def invocation_metadata(self) -> Any:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str | None:
        return self._details


_HEADER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
_UNSAMPLED_HEADER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"


class _Metadatum(NamedTuple):
    """A metadata pair as grpc.aio hands them to a generic handler (a named tuple)."""

    key: str
    value: str


class _Swapped(tuple):  # type: ignore[type-arg]
    """A pair that unpacks its own way (value first): what Python's unpacking gives counts."""

    def __iter__(self) -> Iterator[Any]:
        return iter((self[1], self[0]))


METADATA: list[Any] = [
    None,
    (),
    (("user-agent", "grpc-python/1.85"),),
    (("user-agent", "x"), ("traceparent", _HEADER), ("tracestate", "k=v")),
    (("traceparent", _UNSAMPLED_HEADER),),
    (("traceparent", "not a header"),),
    grpc.aio.Metadata(("traceparent", _HEADER), ("x-bin", b"\x00\x01")),
    [["traceparent", _HEADER]],  # pairs as lists
    (_Metadatum("user-agent", "x"), _Metadatum("traceparent", _HEADER)),
    (_Swapped((_HEADER, "traceparent")),),
]
OUTCOMES: list[tuple[grpc.StatusCode | None, BaseException | None]] = [
    (None, None),
    (grpc.StatusCode.OK, None),
    (grpc.StatusCode.NOT_FOUND, None),
    (grpc.StatusCode.INTERNAL, None),
    (grpc.StatusCode.INVALID_ARGUMENT, ValueError("bad input")),
    (None, ValueError("escaped")),
    (None, asyncio.CancelledError()),
]


@pytest.mark.parametrize("ratio", [1.0, 0.0])
def test_c_and_python_server_spans_alike(ratio: float) -> None:
    """The interceptor's server span through `_fastspans.ServerSpans` and through its
    Python start and finish: the same spans, current spans and contexts afterwards."""
    fast, fast_finished, python, python_finished = _tracers(ratio)
    assert fast.starter is not None
    assert python.starter is None
    method = "/inference.GRPCInferenceService/ModelInfer"
    wrapped = []
    for tracer in (fast, python):
        interceptor = TracingInterceptor(
            tracer, TraceContextTextMapPropagator(), traced_methods(trace_health=False)
        )

        async def behaviour(request: Any, context: Any) -> Any:
            current = trace.get_current_span().get_span_context()
            if request is not None:
                raise request
            return current

        handler = interceptor.wrap_handler(method, grpc.unary_unary_rpc_method_handler(behaviour))
        wrapped.append(handler.unary_unary)
    peers = ["ipv4:127.0.0.1:5000", "ipv6:%5B::1%5D:6000", "unix:/tmp/socket"]
    calls = 0
    for metadata in METADATA:
        for code, error in OUTCOMES:
            for from_lookup in (False, True):
                seen = []
                for behaviour in wrapped:
                    call = _CallContext(metadata, peers[calls % 3], code, "the details")

                    async def one_call(
                        behaviour: Any = behaviour,
                        call: Any = call,
                        from_lookup: bool = from_lookup,
                        metadata: Any = metadata,
                        error: BaseException | None = error,
                    ) -> Any:
                        if from_lookup:  # as TracedService hands it over
                            _CALL_METADATA.set(metadata)
                        try:
                            result = await behaviour(error, call)
                        except BaseException as exc:
                            result = type(exc)
                        # A unary call's span stays current (ended): the call's task ends.
                        after = trace.get_current_span()
                        assert not after.is_recording()
                        if error is None:
                            assert after.get_span_context() == result
                        return result, after.get_span_context()

                    seen.append(contextvars.copy_context().run(asyncio.run, one_call()))
                assert seen[0] == seen[1]
                calls += 1
    assert len(fast_finished) == len(python_finished)
    # Sampled: every call, but those with an unsampled parent (the fourth metadata); not
    # sampled: only those with a sampled parent (five of the metadata).
    per_metadata = 2 * len(OUTCOMES)
    assert len(fast_finished) == (calls - per_metadata if ratio else 5 * per_metadata)
    for fast_record, python_record in zip(fast_finished, python_finished, strict=True):
        fast_record, python_record = list(fast_record), list(python_record)
        fast_record[7] = python_record[7] = fast_record[8] = python_record[8] = 0  # times
        for record in (fast_record, python_record):
            if record[10]:  # an exception event: its time and traceback differ
                record[10] = [event[0] for event in record[10]]
        assert fast_record == python_record
    codes = {(record[9]["rpc.grpc.status_code"], record[12]) for record in fast_finished}
    assert codes == {(0, 0), (5, 0), (13, 2), (3, 0), (2, 2), (1, 0)}


def test_server_spans_share_attribute_sets_and_refuse_bad_metadata() -> None:
    finished: list[FinishedSpan] = []
    tracer = LeanTracer(1.0, finished.append, SpanLimits())
    interceptor = TracingInterceptor(
        tracer, TraceContextTextMapPropagator(), traced_methods(trace_health=False)
    )
    start, finish = interceptor._start_and_finish(
        "a.Service/Method", _MethodAttributes(tracer, {"rpc.method": "Method"})
    )
    assert type(start).__name__ == "builtin_function_or_method"

    def one_call(metadata: Any, peer: str = "ipv4:10.0.0.1:1") -> None:
        call = _CallContext(metadata, peer, grpc.StatusCode.NOT_FOUND, None)
        span, token, attributes = start(call)
        finish(span, token, attributes, call, None)

    for _ in range(3):
        contextvars.copy_context().run(one_call, ())
    assert finished[0][9] is finished[1][9] is finished[2][9]  # one variant, shared
    assert finished[0][9] == {
        "rpc.method": "Method",
        "network.peer.address": "10.0.0.1",
        "network.peer.port": 1,
        "rpc.grpc.status_code": 5,
    }
    for bad, error in (
        ((("traceparent", _HEADER, "third"),), ValueError),
        ((("key",),), ValueError),
        ((42,), TypeError),
        (42, TypeError),
    ):
        with pytest.raises(error):
            contextvars.copy_context().run(one_call, bad)
    assert current_context().get(spans._SPAN_KEY) is None
    assert len(finished) == 3


def test_server_spans_leave_no_references_behind() -> None:
    tracer = LeanTracer(0.5, lambda span: None, SpanLimits())
    interceptor = TracingInterceptor(
        tracer, TraceContextTextMapPropagator(), traced_methods(trace_health=False)
    )
    start, finish = interceptor._start_and_finish(
        "a.Service/Method", _MethodAttributes(tracer, {"rpc.method": "Method"})
    )
    peer = "ipv4:10.0.0.2:2"
    metadata = (("traceparent", _HEADER), ("user-agent", "u"))
    calls = [
        _CallContext(metadata, peer, code, None)
        for code in (None, grpc.StatusCode.OK, grpc.StatusCode.INTERNAL)
    ] + [_CallContext((), peer, None, None)]

    def run() -> None:
        for index in range(10_000):
            call = calls[index % len(calls)]
            span, token, attributes = start(call)
            finish(span, token, attributes, call, None if index % 5 else ValueError("x"))

    run()
    gc.collect()
    things = (peer, metadata, *calls)
    before = [sys.getrefcount(thing) for thing in things]
    run()
    gc.collect()
    assert [sys.getrefcount(thing) for thing in things] == before


def test_ids_are_words_of_the_random_bytes_and_new_after_a_fork() -> None:
    blocks: list[bytes] = []

    def random_bytes(size: int) -> bytes:
        blocks.append(random.Random(len(blocks)).randbytes(size))
        return blocks[-1]

    tracers = [
        LeanTracer(1.0, [].append, SpanLimits(), accelerated=fast, random_bytes=random_bytes)
        for fast in (True, False)
    ]
    for tracer in tracers:
        blocks.clear()
        ids = [tracer.span_id() for _ in range(spans.ID_WORDS + 1)]
        words = struct.unpack(f"<{spans.ID_WORDS}Q", blocks[0])
        assert ids[: spans.ID_WORDS] == [word or 1 for word in words]
        assert len(blocks) == 2  # the next block for the last id
        span = tracer.start_prepared("root", None, SpanKind.SERVER, tracer.prepare({}))
        words = struct.unpack(f"<{spans.ID_WORDS}Q", blocks[1])
        context = span.get_span_context()
        assert context.span_id == words[1]
        assert context.trace_id == (words[2] << 64) | words[3]
    with pytest.raises(ValueError, match="random_bytes"):
        LeanTracer(1.0, [].append, SpanLimits(), random_bytes=lambda size: b"short").span_id()

    # A fork's child does not use the words its parent read before it (and will use).
    for fast in (True, False):
        tracer = LeanTracer(1.0, [].append, SpanLimits(), accelerated=fast)
        tracer.span_id()
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            os.write(writer, struct.pack("<Q", tracer.span_id()))
            os._exit(0)
        os.close(writer)
        child_id = struct.unpack("<Q", os.read(reader, 8))[0]
        os.close(reader)
        os.waitpid(pid, 0)
        assert child_id != tracer.span_id()


@pytest.mark.parametrize("max_links", [None, 0])
def test_c_and_python_record_prepared_alike(max_links: int | None) -> None:
    """The batcher's spans (queue, batch request), recorded whole: the same records."""
    finished: dict[bool, list[FinishedSpan]] = {True: [], False: []}
    tracers = {
        accelerated: LeanTracer(
            1.0,
            finished[accelerated].append,
            SpanLimits(max_links=max_links),
            accelerated=accelerated,
            random_bytes=random.Random(SEED).randbytes,
        )
        for accelerated in (True, False)
    }
    assert type(tracers[True].record_prepared).__name__ == "builtin_function_or_method"
    prepared = tracers[True].prepare({"model": "m", "items": 4})
    links: list[Any] = [None, PARENTS[2], PARENTS[6], (0, 0, False, PARENTS[2][3], None, False)]
    statuses = [None, Status(StatusCode.ERROR, "failed"), Status(StatusCode.OK)]
    for parent in PARENTS[1:]:  # (what parent_of gives: never None)
        for link in links:
            for status in statuses:
                for tracer in tracers.values():
                    tracer.record_prepared("q", parent, prepared, 10, 20, link, status)
                    tracer.record_prepared("q", parent, prepared, 10, 20, link=link)
    assert finished[True] == finished[False]
    assert len(finished[True]) > len(PARENTS) * len(links)
    with pytest.raises(TypeError, match="5 to 7 arguments"):
        tracers[True].record_prepared("q", PARENTS[2], prepared, 10)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected keyword"):
        tracers[True].record_prepared("q", PARENTS[2], prepared, 10, 20, when=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="parent"):
        tracers[True].record_prepared("q", None, prepared, 10, 20)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="link"):
        tracers[True].record_prepared("q", PARENTS[2], prepared, 10, 20, link=5)  # type: ignore[arg-type]
