"""The lean tracer: the SDK's sampling decision, limits and status rules, what a finished span
hands over, and the bounded queue of finished spans."""

from __future__ import annotations

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import SpanLimits
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from headrace.telemetry.spans import (
    FinishedSpan,
    LeanTracer,
    SpanQueue,
    attach_context,
    current_context,
    detach_context,
    end_current,
    make_current,
    parent_of,
)

NAME, TRACE_ID, SPAN_ID, TRACE_STATE, PARENT_ID, PARENT_REMOTE, KIND = range(7)
START, END, ATTRIBUTES, EVENTS, LINKS, STATUS_CODE, STATUS_MESSAGE = range(7, 14)
DROPPED_ATTRIBUTES, DROPPED_EVENTS, DROPPED_LINKS = range(14, 17)


def _tracer(
    ratio: float = 1.0, limits: SpanLimits | None = None
) -> tuple[LeanTracer, list[FinishedSpan]]:
    finished: list[FinishedSpan] = []
    return LeanTracer(ratio, finished.append, limits or SpanLimits()), finished


def _remote_parent(flags: int, state: TraceState | None = None) -> otel_context.Context:
    parent = SpanContext(0xABC, 0xDEF, True, TraceFlags(flags), state)
    return trace.set_span_in_context(NonRecordingSpan(parent))


def test_a_new_trace_is_sampled_as_the_sdks_ratio_sampler_decides() -> None:
    tracer, finished = _tracer(0.5)
    bound = TraceIdRatioBased(0.5).bound
    decisions = []
    for _ in range(400):
        span = tracer.start_span("x")
        span.end()
        trace_id = span.get_span_context().trace_id
        decisions.append(span.is_recording() or bool(span.get_span_context().trace_flags.sampled))
        assert span.get_span_context().trace_flags.sampled == ((trace_id & (2**64 - 1)) < bound)
    assert len(finished) == sum(decisions)
    assert 0 < len(finished) < 400


def test_a_parents_decision_is_kept_whatever_the_ratio() -> None:
    never, never_finished = _tracer(0.0)
    span = never.start_span("child", context=_remote_parent(0x01))
    span.end()
    (recorded,) = never_finished
    assert recorded[TRACE_ID] == 0xABC
    assert (recorded[PARENT_ID], recorded[PARENT_REMOTE]) == (0xDEF, True)
    assert span.get_span_context().trace_flags == 0x01  # no random-trace-id flag to inherit

    always, always_finished = _tracer(1.0)
    unsampled = always.start_span("child", context=_remote_parent(0x00))
    assert isinstance(unsampled, NonRecordingSpan)
    assert unsampled.get_span_context().trace_id == 0xABC
    unsampled.end()
    assert always_finished == []


def test_a_root_span_has_the_random_trace_id_flag_and_children_inherit_trace_state() -> None:
    tracer, finished = _tracer()
    root = tracer.start_span("root")
    assert root.get_span_context().trace_flags == TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID
    state = TraceState([("vendor", "value")])
    child = tracer.start_span("child", context=_remote_parent(0x03, state))
    assert child.get_span_context().trace_state == state
    root.end()
    child.end()
    assert finished[0][PARENT_ID] == 0
    assert finished[1][TRACE_STATE] == "vendor=value"


def test_a_finished_span_carries_its_data_once() -> None:
    tracer, finished = _tracer()
    span = tracer.start_span(
        "work", kind=SpanKind.CLIENT, attributes={"a": "b", "n": 3}, start_time=1000
    )
    span.set_attribute("ok", True)
    span.update_name("renamed")
    span.end(end_time=2000)
    span.end(end_time=3000)
    span.set_attribute("late", 1)
    (recorded,) = finished
    assert recorded[NAME] == "renamed"
    assert recorded[KIND] == SpanKind.CLIENT.value
    assert (recorded[START], recorded[END]) == (1000, 2000)
    assert recorded[ATTRIBUTES] == {"a": "b", "n": 3, "ok": True}
    assert recorded[STATUS_CODE] == StatusCode.UNSET.value
    assert not span.is_recording()


def test_limits_evict_the_oldest_attribute_truncate_strings_and_count_drops() -> None:
    limits = SpanLimits(max_span_attributes=2, max_attribute_length=3, max_links=1)
    tracer, finished = _tracer(limits=limits)
    links = [Link(SpanContext(1, 2, False)), Link(SpanContext(3, 4, True), {"k": "v"})]
    span = tracer.start_span("x", attributes={"a": 1, "b": "long value"}, links=links)
    span.set_attribute("c", ["abcdef", "x"])
    span.set_attribute("", 1)
    span.end()
    (recorded,) = finished
    assert recorded[ATTRIBUTES] == {"b": "lon", "c": ("abc", "x")}
    assert recorded[DROPPED_ATTRIBUTES] == 2  # "a" evicted, "" refused
    assert recorded[LINKS] == [(3, 4, True, {"k": "v"}, 0)]
    assert recorded[DROPPED_LINKS] == 1


def test_status_ok_is_final_unset_is_ignored_and_only_errors_keep_a_description() -> None:
    tracer, finished = _tracer()
    described = tracer.start_span("a")
    described.set_status(StatusCode.ERROR, "broken")
    described.set_status(StatusCode.UNSET)
    described.end()
    final = tracer.start_span("b")
    final.set_status(Status(StatusCode.OK))
    final.set_status(StatusCode.ERROR, "too late")
    final.end()
    quiet = tracer.start_span("c")
    quiet.set_status(StatusCode.OK, "ignored")
    quiet.end()
    assert [(s[STATUS_CODE], s[STATUS_MESSAGE]) for s in finished] == [
        (StatusCode.ERROR.value, "broken"),
        (StatusCode.OK.value, None),
        (StatusCode.OK.value, None),
    ]


def test_a_span_made_current_is_current_until_ended_and_records_an_escaping_exception() -> None:
    tracer, finished = _tracer()
    span = tracer.start_span("call")
    outside = trace.get_current_span()
    seen = []

    def fail() -> None:
        seen.append(trace.get_current_span())
        raise ValueError("bad input")

    def call() -> None:
        token = make_current(span, current_context())
        try:
            fail()
        except BaseException as exc:
            end_current(span, token, exc)
            raise

    with pytest.raises(ValueError, match="bad input"):
        call()
    assert seen == [span]
    assert trace.get_current_span() is outside
    (recorded,) = finished
    assert (recorded[STATUS_CODE], recorded[STATUS_MESSAGE]) == (
        StatusCode.ERROR.value,
        "ValueError: bad input",
    )
    ((event_name, _, event_attributes, _),) = recorded[EVENTS]
    assert event_name == "exception"
    assert event_attributes["exception.type"] == "ValueError"
    assert event_attributes["exception.message"] == "bad input"
    assert "Traceback" in event_attributes["exception.stacktrace"]


def test_start_as_current_span_makes_the_span_the_parent_of_the_next() -> None:
    tracer, finished = _tracer()
    with tracer.start_as_current_span("outer") as outer:
        tracer.start_span("inner").end()
    inner, recorded_outer = finished
    assert inner[PARENT_ID] == outer.get_span_context().span_id
    assert recorded_outer[NAME] == "outer"


def test_the_queue_drops_and_counts_beyond_its_bound_and_signals_a_full_batch() -> None:
    queue = SpanQueue(max_queued=3, batch_size=2)
    queue.record(("a",))
    assert not queue.ready.is_set()
    queue.record(("b",))
    assert queue.ready.is_set()
    for name in "cde":
        queue.record((name,))
    assert queue.dropped == 2
    assert queue.take(2) == [("a",), ("b",)]
    assert queue.take(5) == [("c",)]
    assert len(queue) == 0


def test_a_span_recorded_from_known_times_follows_its_parents_decision() -> None:
    tracer, finished = _tracer()
    sampled = SpanContext(0xABC, 0xDEF, True, TraceFlags(0x01))
    batch = SpanContext(0x123, 0x456, False, TraceFlags(0x03))
    tracer.record_span(
        "part", sampled, {"n": 2}, 10, 20, link=batch, status=Status(StatusCode.ERROR, "failed")
    )
    tracer.record_span("part", SpanContext(0xABC, 0xDEF, True, TraceFlags(0x00)), {}, 10, 20)
    tracer.record_span("orphan", trace.INVALID_SPAN_CONTEXT, {}, 10, 20)
    part, orphan = finished
    assert part[NAME] == "part"
    assert (part[TRACE_ID], part[PARENT_ID], part[PARENT_REMOTE]) == (0xABC, 0xDEF, True)
    assert (part[START], part[END], part[ATTRIBUTES]) == (10, 20, {"n": 2})
    assert part[LINKS] == [(0x123, 0x456, False, {}, 0)]
    assert (part[STATUS_CODE], part[STATUS_MESSAGE]) == (StatusCode.ERROR.value, "failed")
    assert orphan[PARENT_ID] == 0
    assert orphan[TRACE_ID] not in (0, 0xABC)


def test_span_contexts_and_prepared_spans_match_the_apis_constructor_and_start_span() -> None:
    tracer, finished = _tracer()
    parent = _remote_parent(0x03, TraceState([("k", "v")]))
    attributes: dict[str, str | int] = {"a": "b", "n": 1}
    outer = tracer.start_span("outer", context=parent)
    token = make_current(outer, current_context())
    try:
        prepared = tracer.start_prepared(
            "inner", parent_of(None), SpanKind.CLIENT, tracer.prepare(attributes)
        )
        generic = tracer.start_span("inner", kind=SpanKind.CLIENT, attributes=attributes)
        for span in (prepared, generic):
            context = span.get_span_context()
            assert context == SpanContext(
                context.trace_id,
                context.span_id,
                False,
                TraceFlags(0x03),
                TraceState([("k", "v")]),
            )
            assert context.is_valid
            assert context.trace_id == outer.get_span_context().trace_id
            span.end()
    finally:
        end_current(outer, token, None)
    prepared_record, generic_record, _ = finished
    assert prepared_record[SPAN_ID] != generic_record[SPAN_ID]
    assert prepared_record[:SPAN_ID] + prepared_record[SPAN_ID + 1 : START] == (
        generic_record[:SPAN_ID] + generic_record[SPAN_ID + 1 : START]
    )
    assert prepared_record[PARENT_ID] == outer.get_span_context().span_id
    assert prepared_record[TRACE_STATE] == "k=v"
    assert prepared_record[KIND] == SpanKind.CLIENT.value
    assert prepared_record[ATTRIBUTES] == generic_record[ATTRIBUTES] == attributes


def test_an_attached_context_is_what_the_api_sees_until_detached(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tracer, _ = _tracer()
    span = tracer.start_span("current")
    before = otel_context.get_current()
    token = attach_context(trace.set_span_in_context(span, before))
    assert trace.get_current_span() is span
    assert current_context() is otel_context.get_current()
    assert parent_of(None) == span.get_span_context()
    detach_context(token)
    assert otel_context.get_current() is before
    assert trace.get_current_span() is not span
    detach_context(token)  # used twice: logged as the API's detach does, not raised
    assert "Failed to detach context" in caplog.text


def test_a_span_context_made_when_first_read_is_the_same_object_after() -> None:
    tracer, _ = _tracer()
    span = tracer.start_span("lazy")
    context = span.get_span_context()
    assert isinstance(context, SpanContext)
    assert span.get_span_context() is context
    assert repr(context) in repr(span)


def test_prepared_attributes_are_shared_until_a_span_changes_them() -> None:
    tracer, finished = _tracer(limits=SpanLimits(max_span_attributes=3))
    prepared = tracer.prepare({"a": 1, "b": "x"})
    snapshot = dict(prepared[0])
    variants: dict[object, tuple[dict[str, object], int]] = {}
    spans = [tracer.start_prepared("s", None, SpanKind.SERVER, prepared) for _ in range(4)]
    for span in spans[:2]:  # unchanged: the same set with the code, shared
        span.set_prepared_attribute(prepared, "code", 0, variants)  # type: ignore[attr-defined]
    spans[2].set_attribute("c", True)  # changed first: its own copy
    spans[2].set_prepared_attribute(prepared, "code", 0, variants)  # type: ignore[attr-defined]
    spans[3].set_prepared_attribute(prepared, "code", 5, variants)  # type: ignore[attr-defined]
    spans[3].set_attribute("d", 1.5)  # after sharing a variant: copied, at the limit
    for span in spans:
        span.end()
    assert prepared[0] == snapshot  # never written through
    first, second, changed, other = (span[ATTRIBUTES] for span in finished)
    assert first is second == {"a": 1, "b": "x", "code": 0}
    assert first is not prepared[0]
    assert changed == {"b": "x", "c": True, "code": 0}  # the oldest evicted at the limit
    assert finished[2][DROPPED_ATTRIBUTES] == 1
    assert other == {"b": "x", "code": 5, "d": 1.5}
    assert finished[3][DROPPED_ATTRIBUTES] == 1
    assert variants[5][0] == {"a": 1, "b": "x", "code": 5}
    with pytest.raises(TypeError):
        spans[0].attributes["a"] = 2  # type: ignore[index]


def test_prepared_records_and_linked_spans_follow_the_parent_and_the_link_limits() -> None:
    tracer, finished = _tracer(limits=SpanLimits(max_links=2))
    prepared = tracer.prepare({"n": 1})
    local = tracer.start_prepared("local", None, SpanKind.SERVER, prepared)
    remote = SpanContext(0xABC, 0xDEF, True, TraceFlags(1), TraceState([("k", "v")]))
    unsampled = SpanContext(0xABC, 0xDEF, True, TraceFlags(0))
    link = parent_of(trace.set_span_in_context(local))
    tracer.record_prepared("a", link, prepared, 10, 20, link=remote)
    tracer.record_prepared("b", remote, prepared, 10, 20, status=Status(StatusCode.ERROR, "x"))
    tracer.record_prepared("c", unsampled, prepared, 10, 20)  # not recorded
    tracer.record_prepared("d", trace.INVALID_SPAN_CONTEXT, prepared, 10, 20, link=link)
    linked = tracer.start_linked("e", link, prepared, [remote, link, unsampled], 30)
    linked.end(40)
    a, b, d, e = finished
    assert (a[TRACE_ID], a[PARENT_ID], a[PARENT_REMOTE]) == (
        local.get_span_context().trace_id,
        local.get_span_context().span_id,
        False,
    )
    assert a[ATTRIBUTES] is prepared[0]
    assert a[LINKS] == [(0xABC, 0xDEF, True, {}, 0)]
    assert (b[TRACE_ID], b[TRACE_STATE], b[PARENT_REMOTE]) == (0xABC, "k=v", True)
    assert (b[STATUS_CODE], b[STATUS_MESSAGE]) == (StatusCode.ERROR.value, "x")
    assert d[PARENT_ID] == 0
    assert d[TRACE_ID] != local.get_span_context().trace_id
    assert d[LINKS][0][:2] == (local.get_span_context().trace_id, local.get_span_context().span_id)
    assert [link[:2] for link in e[LINKS]] == [
        (local.get_span_context().trace_id, local.get_span_context().span_id),
        (0xABC, 0xDEF),
    ]  # the oldest of three dropped at the limit of two
    assert e[DROPPED_LINKS] == 1
    tracer, finished = _tracer(limits=SpanLimits(max_links=0))
    tracer.record_prepared("f", remote, prepared, 10, 20, link=remote)
    assert (finished[0][LINKS], finished[0][DROPPED_LINKS]) == (None, 1)
