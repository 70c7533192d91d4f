"""Tracing: the tracer provider built from settings, and the spans of queues and batches.

Span names and attribute keys here are a public interface (README, "Tracing"): dashboards and
queries depend on them.

A batch serves many traces, so its spans are tied to the requests' by links both ways: the
`headrace.batch` span links to every request's span (the span current when it was submitted:
the RPC's server span) and each request's `headrace.batch.request` span links to the batch
span. The batch span's parent is the first sampled request's span, so a lone request's trace
(and one of each batch's) runs unbroken from the client through the backend call, and the
parent-based sampler records a batch exactly when one of its requests is recorded.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from functools import partial

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import SpanLimits
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation import _SPAN_KEY
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from headrace import __version__
from headrace.config import TracingSettings
from headrace.spec import ModelSpec
from headrace.telemetry.export import ExportProcess, Scope
from headrace.telemetry.spans import (
    LeanTracer,
    Parent,
    Prepared,
    RecordingSpan,
    current_context,
    parent_of,
)

INSTRUMENTATION_NAME = "headrace"

SPAN_QUEUE = "headrace.queue"
"""INTERNAL, child of the request's span: from the request's arrival in its model's batcher to
its dispatch (or to its expiry, cancellation or refusal: status ERROR)."""
SPAN_BATCH = "headrace.batch"
"""INTERNAL, one per backend call of a batcher: merge, backend call, split; links to every
request span in the batch."""
SPAN_BATCH_REQUEST = "headrace.batch.request"
"""INTERNAL, child of the request's span: from dispatch until its batch is answered; links to
the batch span."""
SPAN_BACKEND = "headrace.backend"
"""CLIENT, child of the batch span (or of the request's span when the model has no
batcher): the backend call. It is the current span while the backend runs, so a remote
backend injects it into its call's metadata and the upstream's spans join the trace."""

ATTRIBUTE_MODEL_NAME = "headrace.model.name"
ATTRIBUTE_MODEL_VERSION = "headrace.model.version"
ATTRIBUTE_REQUEST_ITEMS = "headrace.request.items"
"""Items (first-dimension rows) of one request."""
ATTRIBUTE_BATCH_ITEMS = "headrace.batch.items"
"""Items in the batch: the backend call's batch size."""
ATTRIBUTE_BATCH_REQUESTS = "headrace.batch.requests"
"""Requests merged into the batch."""
MAX_ATTRIBUTE_SETS = 4096
"""A model's queue, batch-request and batch attribute sets kept at most (then started over)."""


class Tracing:
    """The tracer of one Headrace process and its span exporter process: created at start-up
    from settings, shut down (finished spans exported) at exit, last of all.

    Spans are made by a lean tracer (`headrace.telemetry.spans`) and exported by a process of
    their own (`headrace.telemetry.export`): the request path only appends a tuple.

    Raises:
        ValueError: `exporter` is `none` (tracing is off; nothing is built).
    """

    def __init__(self, settings: TracingSettings) -> None:
        if settings.exporter == "none":
            raise ValueError("tracing exporter 'none' exports nothing")
        # Resource.create merges OTEL_RESOURCE_ATTRIBUTES and the SDK's own attributes.
        resource = Resource.create(
            {
                SERVICE_NAME: settings.service_name,
                SERVICE_VERSION: __version__,
                SERVICE_INSTANCE_ID: settings.service_instance_id or str(uuid.uuid4()),
                **settings.resource_attributes,
            }
        )
        self.export = ExportProcess(
            settings,
            Scope(
                dict(resource.attributes), resource.schema_url, INSTRUMENTATION_NAME, __version__
            ),
        )
        self.tracer = LeanTracer(settings.sample_ratio, self.export.queue.record, SpanLimits())
        self.propagator = TraceContextTextMapPropagator()
        """Reads W3C `traceparent`/`tracestate` from incoming metadata."""

    def for_model(self, spec: ModelSpec) -> ModelTracing:
        return ModelTracing(self.tracer, spec)

    def shutdown(self) -> None:
        """Export what is queued (within the export timeout) and stop the exporter process."""
        self.export.stop()


def _error_status(error: BaseException) -> Status:
    message = getattr(error, "message", None) or str(error) or type(error).__name__
    return Status(StatusCode.ERROR, f"{type(error).__name__}: {message}")


_CLIENT = SpanKind.CLIENT


class ModelTracing:
    """The spans of one model version's queue, batches and backend calls."""

    __slots__ = (
        "_attributes",
        "_batch_sets",
        "_prepared",
        "_queue_sets",
        "_request_sets",
        "_sets",
        "_tracer",
        "start_backend",
        "start_batch",
    )

    def __init__(self, tracer: LeanTracer, spec: ModelSpec) -> None:
        self._tracer = tracer
        self._attributes: Mapping[str, str] = {
            ATTRIBUTE_MODEL_NAME: spec.name,
            ATTRIBUTE_MODEL_VERSION: spec.version,
        }
        self._prepared = tracer.prepare(self._attributes)
        """The backend span's attributes, checked against the limits once."""
        self.start_backend: Callable[[], tuple[trace.Span, object]] = partial(
            tracer.start_current, SPAN_BACKEND, None, _CLIENT, self._prepared
        )
        """Start the CLIENT span of a backend call, child of the current span, and make it
        current: (span, token) for `spans.end_current` when the call ends. (A partial: no
        Python frame between the caller and `start_current`.)"""
        self._sets: dict[tuple[str, int, int], Prepared] = {}
        """The queue, batch-request and batch spans' attribute sets by span name and item
        (and request) counts, checked once and shared by the spans that have them."""
        self._queue_sets: dict[int, Prepared] = {}
        self._request_sets: dict[int, Prepared] = {}
        """The queue and batch-request spans' sets of `_sets` by item count, for the loops
        over a batch's requests to read without a call."""
        self._batch_sets: dict[tuple[int, int], Prepared] = {}
        """The batch spans' sets of `_sets` by item and request counts, likewise."""
        self.start_batch: Callable[[Sequence[tuple[Context | None, float, int]]], BatchTrace]
        self.start_batch = partial(BatchTrace, self)
        """Start the spans of a batch being dispatched now, made of `members`: each request's
        trace context, time waited in the queue (seconds) and items. Records their queue
        spans, which end now. (A partial: no Python frame before `BatchTrace`'s.)"""

    def attribute_set(self, name: str, items: int, requests: int = 0) -> Prepared:
        """The attributes of a `name` span (queue, batch request or batch) of `items` items
        (and, for a batch, `requests` requests)."""
        key = (name, items, requests)
        prepared = self._sets.get(key)
        if prepared is None:
            if name == SPAN_QUEUE:
                attributes: dict[str, str | int] = {
                    **self._attributes,
                    ATTRIBUTE_REQUEST_ITEMS: items,
                }
            elif name == SPAN_BATCH_REQUEST:
                attributes = {ATTRIBUTE_REQUEST_ITEMS: items}
            else:
                attributes = {
                    **self._attributes,
                    ATTRIBUTE_BATCH_ITEMS: items,
                    ATTRIBUTE_BATCH_REQUESTS: requests,
                }
            if len(self._sets) >= MAX_ATTRIBUTE_SETS:
                self._sets.clear()
                self._queue_sets.clear()
                self._request_sets.clear()
                self._batch_sets.clear()
            prepared = self._sets[key] = self._tracer.prepare(attributes)
            if name == SPAN_QUEUE:
                self._queue_sets[items] = prepared
            elif name == SPAN_BATCH_REQUEST:
                self._request_sets[items] = prepared
            else:
                self._batch_sets[items, requests] = prepared
        return prepared

    current: Callable[[], Context] = staticmethod(current_context)
    """The caller's trace context, to keep with a request that another task will run
    (`current_context` itself: no Python frame per request)."""

    def left_queue_undispatched(
        self, parent: Context, waited_s: float, items: int, error: BaseException | None
    ) -> None:
        """Record the queue span of a request that never reached its model: expired,
        cancelled (`error` None) or failed at shutdown."""
        now_ns = time.time_ns()
        self._tracer.record_span(
            SPAN_QUEUE,
            trace.get_current_span(parent).get_span_context(),
            {**self._attributes, ATTRIBUTE_REQUEST_ITEMS: items},
            now_ns - int(waited_s * 1e9),
            now_ns,
            status=_error_status(error) if error else Status(StatusCode.ERROR, "request cancelled"),
        )


class BatchTrace:
    """The spans of one batch: its own span (from dispatch until it ends), a queue span and a
    batch-request span per request, and the backend call's span."""

    __slots__ = ("_dispatched_ns", "_members", "_model", "_parent", "_span")

    def __init__(
        self, model: ModelTracing, members: Sequence[tuple[Context | None, float, int]]
    ) -> None:
        self._model = model
        tracer = model._tracer
        self._dispatched_ns = now_ns = time.time_ns()
        attribute_set = model.attribute_set
        queue_sets = model._queue_sets
        record = tracer.record_prepared
        self._members: list[tuple[Parent, int]] = []
        spans = self._members
        parent: Parent | None = None  # the batch span's: the first sampled request's span
        items_in_batch = 0
        for context, waited_s, items in members:
            # parent_of(context), without its call for the common case: our span.
            span = context.get(_SPAN_KEY) if context is not None else None
            span_context = span._context if type(span) is RecordingSpan else parent_of(context)
            spans.append((span_context, items))
            items_in_batch += items
            if parent is None and span_context[5] and span_context[3] & 1:
                parent = span_context
            record(
                SPAN_QUEUE,
                span_context,
                queue_sets.get(items) or attribute_set(SPAN_QUEUE, items),
                now_ns - int(waited_s * 1e9),
                now_ns,
            )
        self._span = span = tracer.start_linked(
            SPAN_BATCH,
            parent if parent is not None else spans[0][0],
            model._batch_sets.get((items_in_batch, len(spans)))
            or attribute_set(SPAN_BATCH, items_in_batch, len(spans)),
            [span_context for span_context, _ in spans],
            now_ns,
        )
        self._parent: Parent = (
            span._context if type(span) is RecordingSpan else parent_of(Context({_SPAN_KEY: span}))
        )
        """The batch span as the parent of the backend span and the link of the requests'
        batch-request spans. (It is never made current: the backend span is, with the batch
        span for parent.)"""

    def start_backend(self) -> tuple[trace.Span, object]:
        """Start the backend call's CLIENT span, child of the batch span, and make it
        current: (span, token) for `spans.end_current` when the call ends."""
        model = self._model
        return model._tracer.start_current(
            SPAN_BACKEND, None, _CLIENT, model._prepared, self._parent
        )

    def end(self, error: BaseException | None) -> None:
        """End the batch span and record each request's part in it; `error` is what failed
        the batch, if anything did."""
        now_ns = time.time_ns()
        status = _error_status(error) if error is not None else None
        batch = self._parent
        attribute_set = self._model.attribute_set
        request_sets = self._model._request_sets
        record = self._model._tracer.record_prepared
        dispatched_ns = self._dispatched_ns
        for span_context, items in self._members:
            record(
                SPAN_BATCH_REQUEST,
                span_context,
                request_sets.get(items) or attribute_set(SPAN_BATCH_REQUEST, items),
                dispatched_ns,
                now_ns,
                batch,
                status,
            )
        if status is not None:
            self._span.set_status(status)
        self._span.end(end_time=now_ns)
