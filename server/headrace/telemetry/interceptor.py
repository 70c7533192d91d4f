"""The server interceptor that gives every RPC a server span (OpenTelemetry RPC conventions).

Why not opentelemetry-instrumentation-grpc's aio interceptor: it proxies the ServicerContext
(wrapt) to learn the status code, names spans with a leading slash, reports the deprecated
`net.peer.*` attributes, records every abort as an exception event, and leaves
`rpc.grpc.status_code` at 0 when a handler fails without aborting. grpc.aio's context already
tells the code (`context.code()`), so a thin interceptor needs no proxy.

One helper (`wrap_rpc_behaviour`) wraps all four call kinds; predicates choose the methods.
The span is made current in the call's context, so everything the handler starts (batcher
submissions, logs, stream tasks) sees it; a streaming handler restores the context when it
ends, a unary one leaves it to end with the call's task. Where no other interceptor
runs, the server applies it to the service's handlers once (`wrap_handler`) rather than as an
interceptor, whose per-call coroutines cost more than the span itself, and finds them with
`TracedService`, which hands each call's metadata to its span (grpc has just decoded it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import Any
from urllib.parse import unquote

import grpc
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from headrace.telemetry.spans import (
    CONTEXT_ACCELERATED,
    LeanTracer,
    Prepared,
    RecordingSpan,
    end_current,
)

try:  # the server span's start and finish in C, where built (see `_start_and_finish`)
    from headrace.telemetry import _fastspans
except ImportError:  # pragma: no cover (built wherever the tests run)
    _fastspans = None  # type: ignore[assignment]

MAX_CACHED = 4096
"""Wrapped handlers and peers' attribute sets (per method) kept at most (then the caches
start over)."""
_TRACE_CONTEXT_KEYS = ("traceparent", "tracestate")
_NO_PARENT = Context()
"""What the propagator extracts from metadata without a trace context: a new trace."""
_CALL_METADATA: ContextVar[grpc.aio.Metadata | tuple[tuple[str, str | bytes], ...]] = ContextVar(
    "headrace_call_metadata"
)
"""The call's metadata as grpc.aio read it to find the handler (`TracedService`), in the
call's own context: the span's start reads it there instead of asking grpc again."""

MethodPredicate = Callable[[grpc.HandlerCallDetails], bool]
"""Chooses the RPCs an interceptor applies to, from the method path `/package.Service/Method`."""
Behaviour = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Any]

HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICES = (
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)

ATTRIBUTE_RPC_SYSTEM = "rpc.system"
ATTRIBUTE_RPC_SERVICE = "rpc.service"
ATTRIBUTE_RPC_METHOD = "rpc.method"
ATTRIBUTE_RPC_GRPC_STATUS_CODE = "rpc.grpc.status_code"
ATTRIBUTE_NETWORK_PEER_ADDRESS = "network.peer.address"
ATTRIBUTE_NETWORK_PEER_PORT = "network.peer.port"

SERVER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
"""Codes that make a server span's status ERROR (the RPC conventions: the others are the
client's doing)."""
_SERVER_ERROR_NUMBERS = frozenset(code.value[0] for code in SERVER_ERROR_CODES)


def in_services(*services: str) -> MethodPredicate:
    """True for methods of any of `services` (full names, `package.Service`)."""
    prefixes = tuple(f"/{service}/" for service in services)

    def predicate(details: grpc.HandlerCallDetails) -> bool:
        return details.method.startswith(prefixes)

    return predicate


def negate(predicate: MethodPredicate) -> MethodPredicate:
    def negated(details: grpc.HandlerCallDetails) -> bool:
        return not predicate(details)

    return negated


def traced_methods(trace_health: bool) -> MethodPredicate:
    """Every method, or every method but health checks and reflection."""
    if trace_health:
        return lambda details: True
    return negate(in_services(HEALTH_SERVICE, *REFLECTION_SERVICES))


def wrap_rpc_behaviour(
    handler: grpc.RpcMethodHandler[Any, Any],
    wrap: Callable[[Behaviour, bool], Behaviour],
) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler` with its behaviour replaced by `wrap(behaviour, response_streaming)`, for
    any of the four call kinds."""
    make: Callable[..., grpc.RpcMethodHandler[Any, Any]]
    if handler.request_streaming and handler.response_streaming:
        behaviour, make = handler.stream_stream, grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        behaviour, make = handler.stream_unary, grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        behaviour, make = handler.unary_stream, grpc.unary_stream_rpc_method_handler
    else:
        behaviour, make = handler.unary_unary, grpc.unary_unary_rpc_method_handler
    return make(
        wrap(behaviour, handler.response_streaming),  # type: ignore[arg-type]
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _peer_attributes(peer: str) -> dict[str, str | int]:
    """`ipv4:127.0.0.1:5000` or `ipv6:%5B::1%5D:5000` as network.peer.* attributes."""
    kind, _, address = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return {}
    host, _, port = unquote(address).rpartition(":")
    attributes: dict[str, str | int] = {ATTRIBUTE_NETWORK_PEER_ADDRESS: host.strip("[]")}
    if port.isdigit():
        attributes[ATTRIBUTE_NETWORK_PEER_PORT] = int(port)
    return attributes


class _MethodAttributes:
    """A method's server span attributes with each peer's network.peer.*, checked against
    the span limits once per peer (a connection makes many calls), and each of those with
    the status codes its calls ended with: the sets spans share (`PeerAttributes`)."""

    __slots__ = ("_attributes", "_tracer", "by_peer")

    def __init__(self, tracer: LeanTracer, attributes: dict[str, str]) -> None:
        self._tracer = tracer
        self._attributes = attributes
        self.by_peer: dict[str, PeerAttributes] = {}
        """What `for_peer` gave each peer so far (read it first: no call when known)."""

    def for_peer(self, peer: str) -> PeerAttributes:
        prepared = self.by_peer.get(peer)
        if prepared is None:
            if len(self.by_peer) >= MAX_CACHED:
                self.by_peer.clear()
            prepared = self.by_peer[peer] = (
                self._tracer.prepare({**self._attributes, **_peer_attributes(peer)}),
                {},
            )
        return prepared


class TracedService(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """A service's traced handlers (`TracingInterceptor.wrap_handler`) by method path, as a
    generic handler: grpc.aio hands it each call's metadata, which it has just read from the
    call to find the handler, and the span's start takes it from here (`_CALL_METADATA`)
    rather than reading it again (`invocation_metadata()` builds a tuple of named tuples,
    every key and value decoded: about 2 us timed alone). grpc.aio asks for the handler in
    the call's own task, before the handler runs there (a registered method would not be
    looked up here: the server registers none)."""

    __slots__ = ("_handlers",)

    def __init__(self, handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]) -> None:
        """`handlers`: by full method path, `/package.Service/Method`."""
        self._handlers = dict(handlers)

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = self._handlers.get(handler_call_details.method)
        if handler is not None:
            _CALL_METADATA.set(handler_call_details.invocation_metadata)
        return handler


class _CallDetails(grpc.HandlerCallDetails):
    """A method path as the predicates see a call's (no metadata: they read only the path)."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


class TracingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """A SERVER span per RPC, child of the W3C trace context in the call's metadata.

    Name `package.Service/Method`; attributes `rpc.system` (grpc), `rpc.service`,
    `rpc.method`, `rpc.grpc.status_code` (the code's number), `network.peer.address` and
    `network.peer.port`; status ERROR (with the details) for server-side failure codes.

    An interceptor, or (`wrap_handler`) a wrapper applied to a service's handlers once, where
    no other interceptor must run inside its span: grpc.aio runs two more coroutines and a
    handler lookup per call for every interceptor.
    """

    def __init__(
        self,
        tracer: LeanTracer,
        propagator: TraceContextTextMapPropagator,
        traced: MethodPredicate,
    ) -> None:
        self._tracer = tracer
        self._propagator = propagator
        self._traced = traced
        self._wrapped: dict[
            str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]
        ] = {}
        """Per method path: the handler and its traced wrapper, made once (the server's
        handlers are long-lived objects; a different one is wrapped anew)."""

    def traces(self, method_path: str) -> bool:
        """Whether calls of `method_path` (`/package.Service/Method`) get a span."""
        return self._traced(_CallDetails(method_path))

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method_path = handler_call_details.method
        cached = self._wrapped.get(method_path)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self.wrap_handler(method_path, handler)
        if len(self._wrapped) >= MAX_CACHED:
            self._wrapped.clear()
        self._wrapped[method_path] = (handler, wrapped)
        return wrapped

    def wrap_handler(
        self, method_path: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """`handler` of `method_path` (`/package.Service/Method`) with a span per call, or
        itself where the method is not traced."""
        if not self.traces(method_path):
            return handler
        name = method_path.lstrip("/")
        service, _, method = name.partition("/")
        attributes = _MethodAttributes(
            self._tracer,
            {
                ATTRIBUTE_RPC_SYSTEM: "grpc",
                ATTRIBUTE_RPC_SERVICE: service,
                ATTRIBUTE_RPC_METHOD: method,
            },
        )
        start, finish = self._start_and_finish(name, attributes)

        def wrap(behaviour: Behaviour, response_streaming: bool) -> Behaviour:
            if response_streaming:
                return _streaming(behaviour, start, finish)
            return _unary(behaviour, start, finish)

        return wrap_rpc_behaviour(handler, wrap)

    def _start_and_finish(self, name: str, attributes: _MethodAttributes) -> tuple[_Start, _Finish]:
        """What starts a call's span and makes it current, and what finishes it, for one
        method: in C where the tracer's spans start there (`_fastspans.ServerSpans`, which
        leaves failures and server error codes to `_finish`), else `_starter` and `_finish`."""
        starter = self._tracer.starter
        if starter is None or not CONTEXT_ACCELERATED or _fastspans is None:
            return self._starter(name, attributes), _finish
        spans = _fastspans.ServerSpans(
            starter,
            name,
            _SERVER,
            attributes.by_peer,
            attributes.for_peer,
            _CALL_METADATA,
            self._propagator.extract,
            _NO_PARENT,
            _STATUS_CODE,
            _SERVER_ERROR_NUMBERS,
            _finish,
            ATTRIBUTE_RPC_GRPC_STATUS_CODE,
        )
        return spans.start, spans.finish

    def _starter(self, name: str, attributes: _MethodAttributes) -> _Start:
        """What starts a call's span and makes it current, for one method (in Python)."""
        extract = self._propagator.extract
        call_metadata = _CALL_METADATA.get
        start_current = self._tracer.start_current
        for_peer = attributes.for_peer
        by_peer = attributes.by_peer

        def start(
            context: grpc.aio.ServicerContext[Any, Any],
        ) -> tuple[Span, object, PeerAttributes]:
            # The propagator reads only two keys; most calls carry neither. (A tuple, not a
            # set: the keys are new strings each call, compared rather than hashed.)
            carrier: dict[str, str | bytes] | None = None
            metadata = call_metadata(None)
            if metadata is None:  # intercepted, or grpc's own generic handler found it
                metadata = context.invocation_metadata() or ()
            for key, value in metadata:
                if key in _TRACE_CONTEXT_KEYS:
                    if carrier is None:
                        carrier = {}
                    carrier[key] = value
            parent = _NO_PARENT if carrier is None else extract(carrier)
            peer = context.peer()
            attributes = by_peer.get(peer)
            if attributes is None:
                attributes = for_peer(peer)
            span, token = start_current(name, parent, _SERVER, attributes[0])
            return span, token, attributes

        return start


_SERVER = SpanKind.SERVER
PeerAttributes = tuple[Prepared, dict[Any, Prepared]]
"""A method's and peer's server span attributes, and those with each status code added."""
_Start = Callable[[grpc.aio.ServicerContext[Any, Any]], tuple[Span, object, PeerAttributes]]
"""Starts a call's span, made current: (span, token to reset the context with, the
attributes it was started with)."""
_Finish = Callable[
    [Span, object | None, PeerAttributes, grpc.aio.ServicerContext[Any, Any], BaseException | None],
    None,
]
"""Finishes a call's span (`_finish`): its status code and status set, the context reset
(unless the token is None) and the span ended."""
_OK = grpc.StatusCode.OK
_CANCELLED = grpc.StatusCode.CANCELLED
_UNKNOWN = grpc.StatusCode.UNKNOWN
_STATUS_CODE = grpc.StatusCode


def _finish(
    span: Span,
    token: object | None,
    attributes: PeerAttributes,
    context: grpc.aio.ServicerContext[Any, Any],
    error: BaseException | None,
) -> None:
    code = context.code()
    if type(code) is not _STATUS_CODE:  # None until the handler sets one
        if error is None:
            code = _OK
        elif not isinstance(error, Exception):  # cancelled, or the generator closed
            code = _CANCELLED
        else:  # grpc answers an exception escaping the handler with UNKNOWN
            code = _UNKNOWN
            span.record_exception(error)
    number = code._value_[0]  # the enum's value without its descriptor
    if type(span) is RecordingSpan:
        span.set_prepared_attribute(
            attributes[0], ATTRIBUTE_RPC_GRPC_STATUS_CODE, number, attributes[1]
        )
    elif type(span) is not NonRecordingSpan:  # (whose set_attribute does nothing)
        span.set_attribute(ATTRIBUTE_RPC_GRPC_STATUS_CODE, number)
    if number in _SERVER_ERROR_NUMBERS:
        details = context.details() or ""
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}".rstrip(": ")))
    if token is not None:
        end_current(span, token, None)  # the context restored, then the span ended
    else:
        span.end()


def _unary(behaviour: Behaviour, start: _Start, finish: _Finish) -> Behaviour:
    # The span stays current after it ends: a unary handler is the last code of the call's
    # own task (grpc.aio runs every call in a task of its own; tasks the handler started
    # took their copies of the context already), whose context goes with it. Restoring
    # it would be a context change (about 1.7k instructions) that nothing reads.
    async def traced(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        span, _, attributes = start(context)
        try:
            response = await behaviour(request, context)
        except BaseException as exc:
            finish(span, None, attributes, context, exc)
            raise
        finish(span, None, attributes, context, None)
        return response

    return traced


def _streaming(behaviour: Behaviour, start: _Start, finish: _Finish) -> Behaviour:
    async def traced(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        span, token, attributes = start(context)
        try:
            async for response in behaviour(request, context):
                yield response
        except GeneratorExit:
            # Closed while suspended, possibly by the garbage collector in another
            # context, where the token cannot be reset (the call's context ends anyway).
            finish(span, None, attributes, context, GeneratorExit())
            raise
        except BaseException as exc:
            finish(span, token, attributes, context, exc)
            raise
        finish(span, token, attributes, context, None)

    return traced
