"""A lean OpenTelemetry tracer: spans as the `opentelemetry.trace` API defines them, recorded
as plain tuples for the exporter process (`headrace.telemetry.export`).

Why not the SDK's `Tracer`: its spans cost about 30 us each to start and end (a lock per
span and per attribute set, `BoundedAttributes`, a `ReadableSpan` copy, processor fan-out),
and its `BatchSpanProcessor` encodes and exports on a thread of the serving process, holding
the GIL in bursts. Here a span is a slotted object holding a plain list; `end` appends that
list of ints and strings (`FinishedSpan`) to a bounded queue (`SpanQueue`), and a sender
thread ships them to the exporter process every `export_delay_ms` (or sooner when a batch is
full), OTLP-encoded in C (`export.py`) or pickled. Everything else (the export call, retries)
runs in that process.

What is kept from the SDK: the sampler (parent-based, trace-id ratio: the same decision for
the same trace id), random 128/64-bit ids with the W3C random-trace-id flag (from
`os.urandom` where the SDK uses `random.getrandbits`: `_Ids`), `SpanLimits`
(counts and lengths, from the same OTEL_* variables, oldest attribute evicted first), status
rules (OK is final, UNSET ignored, descriptions only with ERROR), exception events, and
non-recording spans for unsampled traces.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from time import time_ns
from types import MappingProxyType, TracebackType
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.context import Context
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.sdk.trace import SpanLimits
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.trace import (
    INVALID_SPAN_ID,
    INVALID_TRACE_ID,
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.trace.propagation import _SPAN_KEY
from opentelemetry.util.types import Attributes, AttributeValue

try:  # the per-span hot path in C, when it was built (optional: Python below otherwise)
    from headrace.telemetry import _fastspans
except ImportError:  # pragma: no cover (built wherever the tests run)
    _fastspans = None  # type: ignore[assignment]

_logger = logging.getLogger(__name__)

FinishedSpan = Sequence[Any]
"""A finished span as the exporter process receives it (pickled in batches), a tuple (spans
recorded whole: `record_span`) or a list (a `RecordingSpan`'s data, never changed once ended):
`(name, trace_id, span_id, trace_state, parent_span_id, parent_is_remote, kind, start_ns,
end_ns, attributes, events, links, status_code, status_message, dropped_attributes,
dropped_events, dropped_links)`: ids as ints (parent 0 for a root span), `trace_state` the
W3C header value ("" when empty), `kind` and `status_code` the API enums' values,
`attributes` a dict, `events` a list of `(name, time_ns, attributes, dropped_attributes)`,
`links` a list of `(trace_id, span_id, is_remote, attributes, dropped_attributes)`,
`status_message` None unless the status is ERROR with a description."""

Recorder = Callable[[FinishedSpan], None]
"""Takes each finished span; called on the thread that ended it, must not block."""


def _runtime_context() -> tuple[
    Callable[[], Context],
    Callable[[Context], Any],
    Callable[[Any], None],
    ContextVar[Context] | None,
]:
    """(get, attach, detach, variable) of OpenTelemetry's current context: its ContextVar's
    own methods when the runtime context is the default contextvars one (what
    `otel_context.get_current`, `attach` and `detach` end in, two Python calls deeper), and
    that variable; else the API's functions and None."""
    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    variable = getattr(runtime, "_current_context", None)
    if type(runtime) is not ContextVarsRuntimeContext or type(variable) is not ContextVar:
        return otel_context.get_current, otel_context.attach, otel_context.detach, None
    reset = variable.reset

    def detach(token: Any) -> None:
        try:
            reset(token)
        except Exception:  # as the API's detach: a token of another context is logged
            _logger.exception("Failed to detach context")

    return variable.get, variable.set, detach, variable


current_context, attach_context, detach_context, _CONTEXT_VARIABLE = _runtime_context()
"""OpenTelemetry's `context.get_current`, `attach` and `detach`, without their indirection:
`trace.get_current_span()` sees what `attach_context` makes current."""


_INTERNAL = SpanKind.INTERNAL._value_
_SIMPLE_VALUES = (str, int, float, bool)
_SIMPLE_TYPES = frozenset(_SIMPLE_VALUES)
_FLAGS = [TraceFlags(flags) for flags in range(4)]
"""Trace flags by value: bit 0 sampled, bit 1 random trace id (W3C level 2), which the SDK
sets on new traces and keeps from a parent."""


def _clean_value(value: Any, max_length: int | None) -> Any:
    """An attribute value as the SDK would keep it: strings truncated, sequences as tuples,
    other types made strings (or None) by the SDK's own rules."""
    if type(value) is str:
        if max_length is not None and len(value) > max_length:
            return value[:max_length]
        return value
    if type(value) in _SIMPLE_VALUES:
        return value
    # Rare (sequences, mappings, bytes, other types): the SDK's BoundedAttributes decides.
    cleaned = BoundedAttributes(None, {"value": value}, max_value_len=max_length)
    return cleaned.get("value")


def _put_attribute(
    attributes: dict[str, Any], key: str, value: Any, limit: int | None, max_length: int | None
) -> int:
    """Set `key` in a dict of attributes under a count limit (when full, the oldest entry
    goes, as in the SDK's BoundedAttributes); returns how many were dropped (0 or 1)."""
    if not key or type(key) is not str:
        _logger.warning("invalid attribute key %r: must be a non-empty string", key)
        return 1
    if limit == 0:
        return 1
    value = _clean_value(value, max_length)
    dropped = 0
    if key in attributes:
        del attributes[key]
    elif limit is not None and len(attributes) >= limit:
        del attributes[next(iter(attributes))]
        dropped = 1
    attributes[key] = value
    return dropped


def _bounded(
    attributes: Attributes, limit: int | None, max_length: int | None
) -> tuple[dict[str, Any], int]:
    """A fresh dict of `attributes` under the limits, and how many were dropped."""
    if not attributes:
        return {}, 0
    if max_length is None and (limit is None or len(attributes) <= limit):
        for key, value in attributes.items():
            if type(value) not in _SIMPLE_TYPES or type(key) is not str or not key:
                break
        else:
            return dict(attributes), 0
    cleaned: dict[str, Any] = {}
    dropped = 0
    if attributes:
        for key, value in attributes.items():
            dropped += _put_attribute(cleaned, key, value, limit, max_length)
    return cleaned, dropped


Prepared = tuple[dict[str, Any], int]
"""Attributes checked against the span limits, and how many were dropped
(`LeanTracer.prepare`)."""

_NO_STATE = SpanContext(1, 1, False).trace_state
"""The empty trace state every SpanContext built without one holds (the API's default)."""


def parent_of(context: Context | None) -> Parent:
    """The span context of the span current in `context` (None: the current context), the
    parent `LeanTracer.start_prepared` takes; None or invalid: a new trace."""
    span = (context if context is not None else current_context()).get(_SPAN_KEY)
    if type(span) is RecordingSpan:  # ours: no ABC check, its context as it is
        return span._context
    return trace.get_current_span(context).get_span_context()


def _checked_span_context(
    trace_id: int, span_id: int, flags: TraceFlags, state: Any
) -> SpanContext:
    return SpanContext(trace_id, span_id, False, flags, state)


def _tuple_span_context(trace_id: int, span_id: int, flags: TraceFlags, state: Any) -> SpanContext:
    # Valid ids by construction (1 to 2**128-1, 1 to 2**64-1): the API's checks are skipped.
    return tuple.__new__(SpanContext, (trace_id, span_id, False, flags, state, True))


# A local SpanContext (ids known valid) built as the tuple it is, where that gives what the
# API's constructor gives (checked once here); its constructor otherwise.
_TUPLE_IS_SPAN_CONTEXT = _tuple_span_context(3, 5, TraceFlags(1), _NO_STATE) == (
    _checked_span_context(3, 5, TraceFlags(1), _NO_STATE)
)
_span_context = _tuple_span_context if _TUPLE_IS_SPAN_CONTEXT else _checked_span_context

RawContext = tuple[int, int, bool, TraceFlags, Any, bool]
"""A span's context as the plain tuple a `SpanContext` is, made into one when first asked
for (most spans' contexts are never read: a local backend's, a span without children)."""


Parent = SpanContext | RawContext
"""A parent span's context, as `parent_of` gives it: what is read of it is the same."""


def _as_span_context(raw: RawContext) -> SpanContext:
    if _TUPLE_IS_SPAN_CONTEXT:
        return tuple.__new__(SpanContext, raw)
    return SpanContext(raw[0], raw[1], raw[2], raw[3], raw[4])


_SAMPLED_RANDOM = _FLAGS[TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID]
_RANDOM_TRACE_ID = int(TraceFlags.RANDOM_TRACE_ID)
_LOW_64_BITS = 0xFFFFFFFFFFFFFFFF


# The fields of a FinishedSpan a RecordingSpan reads or changes, by index (a running span's
# data is the list it will record; `FinishedSpan` lists them all).
_NAME = 0
_END = 8
_ATTRIBUTES = 9
_EVENTS = 10
_LINKS = 11
_STATUS_CODE = 12
_STATUS_MESSAGE = 13
_DROPPED_ATTRIBUTES = 14
_DROPPED_EVENTS = 15
_DROPPED_LINKS = 16
_UNSET = StatusCode.UNSET._value_
_OK = StatusCode.OK._value_


class RecordingSpan(trace.Span):
    """A sampled span: mutable until `end`, which hands its data to the recorder once.

    Its data is the list it records (a `FinishedSpan`, end time None until it ends), built
    in one step by `LeanTracer`; the span object holds only that list, its context, the
    tracer (limits), its recorder and whether its attribute dict is shared."""

    __slots__ = ("_context", "_data", "_record", "_shared", "_tracer")

    _record_exception = True
    """Set on the instance (its `__dict__`: the API's base class has no slots) when
    `start_span` is told otherwise; the class's default is read everywhere else."""
    _set_status_on_exception = True

    def __init__(
        self, data: list[Any], context: SpanContext | RawContext, tracer: LeanTracer, shared: bool
    ) -> None:
        """`data`: the `FinishedSpan` it will record, end time None (made by `LeanTracer`).
        `shared`: its attribute dict is a prepared set other spans hold too: copied before
        the first change, recorded as it is otherwise (the exporter then sees one object)."""
        self._data = data
        self._context = context
        self._tracer = tracer
        self._record = tracer._record
        """The tracer's recorder, read once (`end` hands the data to it)."""
        self._shared = shared

    def __repr__(self) -> str:
        return f'RecordingSpan(name="{self._data[_NAME]}", context={self.get_span_context()})'

    @property
    def name(self) -> str:
        return self._data[_NAME]  # type: ignore[no-any-return]

    @property
    def attributes(self) -> Mapping[str, Any]:
        return MappingProxyType(self._data[_ATTRIBUTES])

    def get_span_context(self) -> SpanContext:
        context = self._context
        if type(context) is tuple:
            context = self._context = _as_span_context(context)
        return context  # type: ignore[return-value]

    def is_recording(self) -> bool:
        return self._data[_END] is None

    def _ended(self, what: str) -> bool:
        if self._data[_END] is None:
            return False
        _logger.warning("%s on an ended span (%s)", what, self._data[_NAME])
        return True

    def _own_attributes(self) -> dict[str, Any]:
        """The attribute dict, copied first if it is shared."""
        data = self._data
        if self._shared:
            data[_ATTRIBUTES] = dict(data[_ATTRIBUTES])
            self._shared = False
        return data[_ATTRIBUTES]  # type: ignore[no-any-return]

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if self._ended("setting an attribute"):
            return
        attributes = self._own_attributes()
        limits = self._tracer._limits
        if (
            type(value) in _SIMPLE_TYPES
            and type(key) is str
            and key
            and limits.max_span_attribute_length is None
            and (
                key in attributes
                or limits.max_span_attributes is None
                or len(attributes) < limits.max_span_attributes
            )
        ):
            attributes[key] = value
            return
        self._data[_DROPPED_ATTRIBUTES] += _put_attribute(
            attributes,
            key,
            value,
            limits.max_span_attributes,
            limits.max_span_attribute_length,
        )

    def _set_prepared_attribute(
        self, base: Prepared, key: str, value: Any, variants: dict[Any, Prepared]
    ) -> None:
        """`set_attribute(key, value)` on a span started with `base` (`start_prepared`) and
        unchanged since: the resulting set comes from `variants` (by value; made and kept
        there the first time), shared with every span that ended the same way. Otherwise
        (changed, or `base` is not its set), `set_attribute`."""
        data = self._data
        if self._shared and data[_ATTRIBUTES] is base[0] and data[_END] is None:
            variant = variants.get(value)
            if variant is None:
                attributes = dict(base[0])
                limits = self._tracer._limits
                dropped = base[1] + _put_attribute(
                    attributes,
                    key,
                    value,
                    limits.max_span_attributes,
                    limits.max_span_attribute_length,
                )
                variant = variants[value] = (attributes, dropped)
            data[_ATTRIBUTES], data[_DROPPED_ATTRIBUTES] = variant
            return
        self.set_attribute(key, value)

    set_prepared_attribute = _set_prepared_attribute
    """(C where built: a variant already made is swapped in there, the rest comes here.)"""

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def add_event(
        self, name: str, attributes: Attributes = None, timestamp: int | None = None
    ) -> None:
        if self._ended("adding an event"):
            return
        limits = self._tracer._limits
        cleaned, dropped = _bounded(
            attributes, limits.max_event_attributes, limits.max_attribute_length
        )
        event = (name, timestamp if timestamp is not None else time.time_ns(), cleaned, dropped)
        data = self._data
        events = data[_EVENTS]
        if events is None:
            events = data[_EVENTS] = []
        maximum = limits.max_events
        if maximum is not None and len(events) >= maximum:
            data[_DROPPED_EVENTS] += 1
            if maximum == 0:
                return
            del events[0]
        events.append(event)

    def add_link(self, context: SpanContext, attributes: Attributes = None) -> None:
        if self._ended("adding a link") or not _valid_link(context, attributes):
            return
        limits = self._tracer._limits
        cleaned, dropped = _bounded(
            attributes, limits.max_link_attributes, limits.max_attribute_length
        )
        data = self._data
        links = data[_LINKS]
        if links is None:
            links = data[_LINKS] = []
        maximum = limits.max_links
        if maximum is not None and len(links) >= maximum:
            data[_DROPPED_LINKS] += 1
            if maximum == 0:
                return
            del links[0]
        links.append((context.trace_id, context.span_id, context.is_remote, cleaned, dropped))

    def update_name(self, name: str) -> None:
        if not self._ended("renaming"):
            self._data[_NAME] = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._ended("setting the status"):
            return
        if isinstance(status, Status):
            code, description = status.status_code, status.description
        else:
            code = status
            if code is not StatusCode.ERROR:
                description = None
        data = self._data
        if data[_STATUS_CODE] == _OK or code is StatusCode.UNSET:
            return  # OK is final; UNSET is never set
        data[_STATUS_CODE] = code._value_
        data[_STATUS_MESSAGE] = description

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        module = type(exception).__module__
        qualname = type(exception).__qualname__
        event: dict[str, Any] = {
            "exception.type": f"{module}.{qualname}"
            if module and module != "builtins"
            else qualname,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            event.update(attributes)
        self.add_event("exception", event, timestamp)

    def _end(self, end_time: int | None = None) -> None:
        """`end` in Python (the C one replaces it where built: `ACCELERATED`)."""
        data = self._data
        if data[_END] is not None:
            self._ended("ending")
            return
        data[_END] = end_time if end_time is not None else time_ns()
        self._record(data)

    end = _end

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        if exc_val is not None and self.is_recording():
            if self._record_exception:
                self.record_exception(exc_val, escaped=True)
            if self._set_status_on_exception:
                self.set_status(Status(StatusCode.ERROR, f"{type(exc_val).__name__}: {exc_val}"))
        self.end()


ACCELERATED = _fastspans is not None
"""Whether spans start and end in C (`_fastspans.c`: the same spans, a fraction of the
CPU); `LeanTracer(accelerated=False)` keeps a tracer's starts in Python."""
if _fastspans is not None:
    RecordingSpan.end, RecordingSpan.set_prepared_attribute = _fastspans.install(RecordingSpan)


def _non_recording(trace_id: int, span_id: int, flags: int, state: Any) -> NonRecordingSpan:
    """The span of an unsampled trace (flags 0 to 3: `_FLAGS`), for `_fastspans`."""
    return NonRecordingSpan(_span_context(trace_id, span_id, _FLAGS[flags], state))


def _valid_link(context: SpanContext | None, attributes: Attributes) -> bool:
    return bool(
        context is not None
        and (
            context.trace_id != INVALID_TRACE_ID
            or context.span_id != INVALID_SPAN_ID
            or attributes
            or context.trace_state
        )
    )


def make_current(span: trace.Span, context: Context) -> object:
    """Make `span` current in a copy of `context` (its other entries kept): the token
    `end_current` takes. `trace.use_span`'s work as two plain calls (no generator, no
    context manager object per span)."""
    return attach_context(Context({**context, _SPAN_KEY: span}))


def _end_current(span: trace.Span, token: object, error: BaseException | None) -> None:
    """`end_current` in Python: restore the context `make_current` (or
    `LeanTracer.start_current`) replaced and end `span`; an `Exception` that escaped while it
    was current (`error`) is recorded on it and sets its status to ERROR, as `trace.use_span`
    does (a cancellation is not an error of the span's)."""
    detach_context(token)
    if error is None:
        span.end()
    else:
        _end_failed(span, error)


def _end_failed(span: trace.Span, error: BaseException) -> None:
    """End `span`, which `error` escaped while it was current (`end_current`)."""
    if isinstance(error, Exception) and span.is_recording():
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    span.end()


end_current: Callable[[trace.Span, object, BaseException | None], None] = _end_current
"""Restore the context `make_current` (or `LeanTracer.start_current`) replaced and end the
span (see `_end_current`); in C where built (`CONTEXT_ACCELERATED`: the same steps)."""
CONTEXT_ACCELERATED = _fastspans is not None and _CONTEXT_VARIABLE is not None
"""Whether `LeanTracer.start_current` and `end_current` run in C (they need the default
contextvars runtime context: another one is used through the API's functions, in Python)."""
if _fastspans is not None and _CONTEXT_VARIABLE is not None:
    _fastspans.configure(
        _CONTEXT_VARIABLE,
        _SPAN_KEY,
        Context,
        parent_of,
        _end_failed,
        detach_context,
        NonRecordingSpan,
    )
    end_current = _fastspans.end_current


ID_WORDS = 64
"""Random 64-bit words read at a time for span and trace ids (`ID_WORDS * 8` bytes from
`os.urandom`, one system call for many ids)."""
_WORDS = struct.Struct(f"<{ID_WORDS}Q")
_forks = 0
"""Forks of this process so far (counted in the child): words read before a fork are not
used after it, where the parent uses them too."""


def _count_fork() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_count_fork)


class _Ids:
    """Span and trace ids from random bytes (`_fastspans.c`'s Starter makes the same ones
    from the same bytes, in the same order): a span id is a word (64 bits, little-endian), a
    trace id two (high, then low 64 bits); an id that comes out 0 is 1 (never 0, as the
    SDK's)."""

    __slots__ = ("_forks", "_random_bytes", "_words")

    def __init__(self, random_bytes: Callable[[int], bytes]) -> None:
        self._random_bytes = random_bytes
        self._words: list[int] = []
        """Words not yet used, the next last."""
        self._forks = _forks

    def _word(self) -> int:
        words = self._words
        if not words or self._forks != _forks:
            words[:] = _WORDS.unpack(self._random_bytes(_WORDS.size))
            words.reverse()
            self._forks = _forks
        return words.pop()

    def span_id(self) -> int:
        return self._word() or 1

    def trace_id(self) -> int:
        high = self._word()
        return ((high << 64) | self._word()) or 1


class LeanTracer(trace.Tracer):
    """`opentelemetry.trace.Tracer` making `RecordingSpan`s (sampled) and
    `NonRecordingSpan`s (not sampled), with the SDK's `ParentBased(TraceIdRatioBased(ratio))`
    decision: a valid parent's sampled flag is kept; a new trace is sampled when its id's low
    64 bits fall under `ratio` of their range."""

    def __init__(
        self,
        sample_ratio: float,
        record: Recorder,
        limits: SpanLimits,
        accelerated: bool = ACCELERATED,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        """`accelerated`: `start_prepared` in C (where built), else in Python.
        `random_bytes(n)`: n random bytes, what ids are made of (`_Ids`; a seeded source
        makes a test's ids repeat)."""
        self._bound = TraceIdRatioBased(sample_ratio).bound
        self._record = record
        self._limits = limits
        self._ids = _Ids(random_bytes)
        self.span_id: Callable[[], int] = self._ids.span_id
        """A new span id (for spans recorded whole); in C where the tracer's spans start
        there, from the same words."""
        self.starter: Any = None
        """The C `_fastspans.Starter` behind `start_prepared` where accelerated, else None."""
        if accelerated and _fastspans is not None:
            # The instance's own attribute, found before the class's method: no Python
            # frame between the caller and C.
            starter = _fastspans.Starter(
                self,
                random_bytes,
                _non_recording,
                _FLAGS,
                _NO_STATE,
                self._bound,
                _NO_ATTRIBUTES,
                _INTERNAL,
                limits.max_links != 0,
            )
            self.starter = starter
            self.span_id = starter.span_id
            self.record_prepared = starter.record_prepared  # type: ignore[method-assign]
            self.start_prepared = starter.start  # type: ignore[method-assign]
            if CONTEXT_ACCELERATED:
                self.start_current = starter.start_current  # type: ignore[method-assign]

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        limits = self._limits
        if attributes:
            cleaned, dropped = _bounded(
                attributes, limits.max_span_attributes, limits.max_span_attribute_length
            )
        else:
            cleaned, dropped = {}, 0
        kept_links: list[tuple[int, int, bool, dict[str, Any], int]] | None = None
        dropped_links = 0
        if links:
            kept_links = []
            for link in links:
                link_context = link.context
                if not _valid_link(link_context, link.attributes):
                    continue
                if link.attributes:
                    link_attributes, link_dropped = _bounded(
                        link.attributes, limits.max_link_attributes, limits.max_attribute_length
                    )
                else:
                    link_attributes, link_dropped = {}, 0
                kept_links.append(
                    (
                        link_context.trace_id,
                        link_context.span_id,
                        link_context.is_remote,
                        link_attributes,
                        link_dropped,
                    )
                )
            maximum = limits.max_links
            if maximum is not None and len(kept_links) > maximum:
                dropped_links = len(kept_links) - maximum
                kept_links = kept_links[dropped_links:]
        span = self.start_prepared(
            name, parent_of(context), kind, (cleaned, dropped), start_time, shared=False
        )
        if type(span) is RecordingSpan:
            span._data[_LINKS] = kept_links
            span._data[_DROPPED_LINKS] = dropped_links
            if not record_exception:
                span._record_exception = False
            if not set_status_on_exception:
                span._set_status_on_exception = False
        return span

    def prepare(self, attributes: Mapping[str, Any]) -> Prepared:
        """`attributes` checked once against the span limits, for `start_prepared` to give
        many spans (a model's, a method's and peer's)."""
        limits = self._limits
        return _bounded(attributes, limits.max_span_attributes, limits.max_span_attribute_length)

    def start_prepared(
        self,
        name: str,
        parent: Parent | None,
        kind: SpanKind,
        attributes: Prepared,
        start_time: int | None = None,
        shared: bool = True,
    ) -> trace.Span:
        """`start_span(name, context, kind, attributes, start_time=start_time)` for a parent
        already read from its context (`parent_of`) and attributes from `prepare` (not
        checked again; shared by the spans given them, copied by a span before it changes
        them). `shared` False: the span may keep the dict as its own. Where `_fastspans`
        is built, each tracer's own attribute of this name is its C version (the same
        steps, `__init__`)."""
        ids = self._ids
        span_id = ids.span_id()
        # A SpanContext is a tuple: (trace_id, span_id, is_remote, flags, state, is_valid).
        if parent is not None and parent[5]:
            trace_id = parent[0]
            flags = parent[3]
            trace_state = parent[4]
            if not flags & 1:
                return NonRecordingSpan(
                    _span_context(trace_id, span_id, _FLAGS[flags & _RANDOM_TRACE_ID], trace_state)
                )
            header = "" if trace_state is _NO_STATE else trace_state.to_header()
            parent_id, parent_remote = parent[1], parent[2]
            context_flags = _FLAGS[(flags & _RANDOM_TRACE_ID) | 1]
        else:
            trace_id = ids.trace_id()
            if (trace_id & _LOW_64_BITS) >= self._bound:
                return NonRecordingSpan(
                    _span_context(trace_id, span_id, _FLAGS[_RANDOM_TRACE_ID], _NO_STATE)
                )
            trace_state, header, parent_id, parent_remote = _NO_STATE, "", 0, False
            context_flags = _SAMPLED_RANDOM
        cleaned, dropped = attributes
        return RecordingSpan(
            [
                name,
                trace_id,
                span_id,
                header,
                parent_id,
                parent_remote,
                kind._value_,
                start_time if start_time is not None else time_ns(),
                None,  # end
                cleaned,
                None,  # events
                None,  # links
                _UNSET,
                None,  # status message
                dropped,
                0,
                0,
            ],
            (trace_id, span_id, False, context_flags, trace_state, True),
            self,
            shared,
        )

    def start_current(
        self,
        name: str,
        context: Context | None,
        kind: SpanKind,
        attributes: Prepared,
        parent: Parent | None = None,
        /,
    ) -> tuple[trace.Span, object]:
        """Start a span (`start_prepared`) whose parent is `parent` (as `parent_of` gives
        it), or else the span current in `context` (None: the current context), and make
        it current in a copy of that context: (span, token) for `end_current`. In C where
        built (`CONTEXT_ACCELERATED`)."""
        if context is None:
            context = current_context()
        if parent is None:
            parent = parent_of(context)
        span = self.start_prepared(name, parent, kind, attributes)
        return span, make_current(span, context)

    @contextlib.contextmanager
    def start_as_current_span(  # type: ignore[override]
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[trace.Span]:
        span = self.start_span(
            name,
            context,
            kind,
            attributes,
            links,
            start_time,
            record_exception,
            set_status_on_exception,
        )
        with trace.use_span(
            span,
            end_on_exit=end_on_exit,
            record_exception=record_exception,
            set_status_on_exception=set_status_on_exception,
        ) as current:
            yield current

    def record_span(
        self,
        name: str,
        parent: SpanContext,
        attributes: Mapping[str, Any],
        start_ns: int,
        end_ns: int,
        link: SpanContext | None = None,
        status: Status | None = None,
    ) -> None:
        """Record an INTERNAL span whose times are already known, child of `parent` (and
        sampled as it is), with at most one link: what `start_span` then `end` would record,
        without a span object (the batcher's queue and batch-request spans)."""
        if not parent.is_valid:
            span = self.start_span(
                name,
                Context(),  # a new trace
                attributes=attributes,
                links=[Link(link)] if link is not None else (),
                start_time=start_ns,
            )
            if status is not None:
                span.set_status(status)
            span.end(end_ns)
            return
        if not parent.trace_flags.sampled:
            return
        limits = self._limits
        cleaned, dropped = _bounded(
            attributes, limits.max_span_attributes, limits.max_span_attribute_length
        )
        links: list[tuple[int, int, bool, dict[str, Any], int]] | None = None
        dropped_links = 0
        if link is not None and _valid_link(link, None):
            if limits.max_links == 0:
                dropped_links = 1
            else:
                links = [(link.trace_id, link.span_id, link.is_remote, {}, 0)]
        code, message = StatusCode.UNSET, None
        if status is not None and status.status_code is not StatusCode.UNSET:
            code, message = status.status_code, status.description
        self._record(
            (
                name,
                parent.trace_id,
                self.span_id(),
                "" if parent.trace_state is _NO_STATE else parent.trace_state.to_header(),
                parent.span_id,
                parent.is_remote,
                _INTERNAL,
                start_ns,
                end_ns,
                cleaned,
                None,
                links,
                code._value_,
                message,
                dropped,
                0,
                dropped_links,
            )
        )

    def _record_prepared(
        self,
        name: str,
        parent: Parent,
        attributes: Prepared,
        start_ns: int,
        end_ns: int,
        link: Parent | None = None,
        status: Status | None = None,
    ) -> None:
        """`record_span` for a parent and a link as `parent_of` gives them, and attributes
        from `prepare` (shared, not checked again): the batcher's spans, one per request per
        batch. An invalid parent starts a new trace, as in `record_span`. (`record_prepared`:
        in C where the tracer's spans start there, which leaves invalid parents, statuses and
        links the limits refuse to this method.)"""
        if not parent[5]:  # no valid parent: a new trace, as record_span makes it
            self.record_span(
                name,
                trace.INVALID_SPAN_CONTEXT,
                attributes[0],
                start_ns,
                end_ns,
                _as_span_context(link) if type(link) is tuple else link,  # type: ignore[arg-type]
                status,
            )
            return
        if not parent[3] & 1:  # not sampled
            return
        links = None
        dropped_links = 0
        if link is not None:
            if self._limits.max_links == 0:
                dropped_links = 1
            elif link[0] or link[1]:
                links = [(link[0], link[1], link[2], _NO_ATTRIBUTES, 0)]
        code, message = 0, None
        if status is not None and status.status_code is not StatusCode.UNSET:
            code, message = status.status_code._value_, status.description
        state = parent[4]
        # A SpanContext is the tuple a RawContext is: read alike.
        self._record(
            (
                name,
                parent[0],
                self.span_id(),
                "" if state is _NO_STATE else state.to_header(),
                parent[1],
                parent[2],
                _INTERNAL,
                start_ns,
                end_ns,
                attributes[0],
                None,
                links,
                code,
                message,
                attributes[1],
                0,
                dropped_links,
            )
        )

    record_prepared = _record_prepared

    def start_linked(
        self,
        name: str,
        parent: Parent | None,
        attributes: Prepared,
        links: Sequence[Parent],
        start_time: int,
    ) -> trace.Span:
        """An INTERNAL span (`start_prepared`) linked to `links` (span contexts as
        `parent_of` gives them; invalid ones skipped, the oldest dropped beyond the limit)."""
        span = self.start_prepared(name, parent, SpanKind.INTERNAL, attributes, start_time)
        if type(span) is RecordingSpan:
            kept = [
                (link[0], link[1], link[2], _NO_ATTRIBUTES, 0)
                for link in links
                if link[0] or link[1] or link[4]
            ]
            maximum = self._limits.max_links
            if maximum is not None and len(kept) > maximum:
                dropped = span._data[_DROPPED_LINKS] = len(kept) - maximum
                kept = kept[dropped:]
            span._data[_LINKS] = kept or None
        return span


_NO_ATTRIBUTES: dict[str, Any] = {}
"""The attributes of links made here (never changed)."""


class _Recorder:
    """`SpanQueue`'s queue in Python (the C `_fastspans.Recorder` where built: the same
    steps, and no Python frame for each span that ends or is taken)."""

    __slots__ = ("_batch_size", "_max_queued", "_spans", "_wake", "dropped")

    def __init__(self, wake: Callable[[], None], max_queued: int, batch_size: int) -> None:
        self._spans: deque[FinishedSpan] = deque()
        self._wake = wake
        self._max_queued = max_queued
        self._batch_size = batch_size
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._spans)

    def record(self, span: FinishedSpan) -> None:
        spans = self._spans
        queued = len(spans)
        if queued >= self._max_queued:
            self.dropped += 1
            return
        spans.append(span)
        if queued + 1 == self._batch_size:
            self._wake()

    def take(self, count: int) -> list[FinishedSpan]:
        spans = self._spans
        popleft = spans.popleft
        return [popleft() for _ in range(min(count, len(spans)))]


class SpanQueue:
    """Finished spans waiting for the exporter process: a bounded queue filled by whichever
    thread ends a span (append only: no lock, no wait) and drained by the sender thread.
    Beyond `max_queued` spans, new ones are dropped and counted."""

    def __init__(self, max_queued: int, batch_size: int, accelerated: bool = ACCELERATED) -> None:
        """`accelerated`: `record` and `take` in C (where built), else in Python."""
        self.ready = threading.Event()
        """Set when a batch is full: the sender need not wait for its timer."""
        recorder_type = _fastspans.Recorder if accelerated and _fastspans is not None else _Recorder
        self._recorder = recorder_type(self.ready.set, max_queued, batch_size)
        self.record: Recorder = self._recorder.record
        """Queue a finished span (the tracer's recorder), or count it dropped when full."""
        self.take: Callable[[int], list[FinishedSpan]] = self._recorder.take
        """Up to `count` of the oldest spans, taken out of the queue (one thread: the
        sender's)."""

    @property
    def dropped(self) -> int:
        """Spans dropped because the queue was full (or, counted by the sender, because
        they could not be sent), since start-up."""
        return self._recorder.dropped

    @dropped.setter
    def dropped(self, value: int) -> None:
        self._recorder.dropped = value

    def __len__(self) -> int:
        return len(self._recorder)
