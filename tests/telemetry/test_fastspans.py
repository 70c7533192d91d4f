"""The span recorder's C part (`_fastspans.c`): built wherever Headrace is installed with a
compiler, and giving exactly the spans, records and sampling decisions of the Python code it
stands in for (`LeanTracer(accelerated=False)`, `RecordingSpan._end`)."""

from __future__ import annotations

import gc
import logging
import sys
from typing import Any

import pytest
from opentelemetry.sdk.trace import SpanLimits
from opentelemetry.trace import (
    INVALID_SPAN_CONTEXT,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    TraceFlags,
    TraceState,
)

from headrace.telemetry import spans
from headrace.telemetry.spans import FinishedSpan, LeanTracer, RecordingSpan, parent_of

END = 8
SEED = 20261128


def _tracers(ratio: float) -> tuple[LeanTracer, list[FinishedSpan], LeanTracer, list[FinishedSpan]]:
    fast_finished: list[FinishedSpan] = []
    python_finished: list[FinishedSpan] = []
    fast = LeanTracer(ratio, fast_finished.append, SpanLimits(), accelerated=True)
    python = LeanTracer(ratio, python_finished.append, SpanLimits(), accelerated=False)
    fast._random.seed(SEED)
    python._random.seed(SEED)
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
