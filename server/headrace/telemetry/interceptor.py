"""The server interceptor that gives every RPC a server span (OpenTelemetry RPC conventions).

Why not opentelemetry-instrumentation-grpc's aio interceptor: it proxies the ServicerContext
(wrapt) to learn the status code, names spans with a leading slash, reports the deprecated
`net.peer.*` attributes, records every abort as an exception event, and leaves
`rpc.grpc.status_code` at 0 when a handler fails without aborting. grpc.aio's context already
tells the code (`context.code()`), so a thin interceptor needs no proxy.

One helper (`wrap_rpc_behaviour`) wraps all four call kinds; predicates choose the methods.
The span is made current with a contextvars token, reset when the call ends, so everything the
handler starts (batcher submissions, logs, stream tasks) sees it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import unquote

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from headrace.telemetry.spans import LeanTracer, Prepared, parent_of

MAX_CACHED = 4096
"""Wrapped handlers and peers' attribute sets (per method) kept at most (then the caches
start over)."""
_TRACE_CONTEXT_KEYS = frozenset({"traceparent", "tracestate"})
_NO_PARENT = Context()
"""What the propagator extracts from metadata without a trace context: a new trace."""

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
    the span limits once per peer (a connection makes many calls)."""

    __slots__ = ("_attributes", "_by_peer", "_tracer")

    def __init__(self, tracer: LeanTracer, attributes: dict[str, str]) -> None:
        self._tracer = tracer
        self._attributes = attributes
        self._by_peer: dict[str, Prepared] = {}

    def for_peer(self, peer: str) -> Prepared:
        prepared = self._by_peer.get(peer)
        if prepared is None:
            if len(self._by_peer) >= MAX_CACHED:
                self._by_peer.clear()
            prepared = self._by_peer[peer] = self._tracer.prepare(
                {**self._attributes, **_peer_attributes(peer)}
            )
        return prepared


class TracingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """A SERVER span per RPC, child of the W3C trace context in the call's metadata.

    Name `package.Service/Method`; attributes `rpc.system` (grpc), `rpc.service`,
    `rpc.method`, `rpc.grpc.status_code` (the code's number), `network.peer.address` and
    `network.peer.port`; status ERROR (with the details) for server-side failure codes.
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
        wrapped = self._wrap(handler, handler_call_details)
        if len(self._wrapped) >= MAX_CACHED:
            self._wrapped.clear()
        self._wrapped[method_path] = (handler, wrapped)
        return wrapped

    def _wrap(
        self,
        handler: grpc.RpcMethodHandler[Any, Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        if not self._traced(handler_call_details):
            return handler
        name = handler_call_details.method.lstrip("/")
        service, _, method = name.partition("/")
        attributes = _MethodAttributes(
            self._tracer,
            {
                ATTRIBUTE_RPC_SYSTEM: "grpc",
                ATTRIBUTE_RPC_SERVICE: service,
                ATTRIBUTE_RPC_METHOD: method,
            },
        )

        def wrap(behaviour: Behaviour, response_streaming: bool) -> Behaviour:
            if response_streaming:
                return self._streaming(behaviour, name, attributes)
            return self._unary(behaviour, name, attributes)

        return wrap_rpc_behaviour(handler, wrap)

    def _start(
        self, name: str, attributes: _MethodAttributes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tuple[Span, object]:
        metadata: Iterable[tuple[str, str | bytes]] = context.invocation_metadata() or ()
        # The propagator reads only these two keys; most calls carry neither.
        carrier = {key: value for key, value in metadata if key in _TRACE_CONTEXT_KEYS}
        if carrier:
            parent = self._propagator.extract(carrier)
            parent_span = parent_of(parent)
        else:
            parent, parent_span = _NO_PARENT, None
        span = self._tracer.start_prepared(
            name, parent_span, SpanKind.SERVER, attributes.for_peer(context.peer())
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        return span, token

    @staticmethod
    def _finish(
        span: Span,
        token: object | None,
        context: grpc.aio.ServicerContext[Any, Any],
        error: BaseException | None,
    ) -> None:
        if token is not None:
            otel_context.detach(token)  # type: ignore[arg-type]
        code = context.code()
        if not isinstance(code, grpc.StatusCode):  # None until the handler sets one
            if error is None:
                code = grpc.StatusCode.OK
            elif not isinstance(error, Exception):  # cancelled, or the generator closed
                code = grpc.StatusCode.CANCELLED
            else:  # grpc answers an exception escaping the handler with UNKNOWN
                code = grpc.StatusCode.UNKNOWN
                span.record_exception(error)
        number = code._value_[0]  # the enum's value without its descriptor
        span.set_attribute(ATTRIBUTE_RPC_GRPC_STATUS_CODE, number)
        if number in _SERVER_ERROR_NUMBERS:
            details = context.details() or ""
            span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}".rstrip(": ")))
        span.end()

    def _unary(self, behaviour: Behaviour, name: str, attributes: _MethodAttributes) -> Behaviour:
        async def traced(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            span, token = self._start(name, attributes, context)
            try:
                response = await behaviour(request, context)
            except BaseException as exc:
                self._finish(span, token, context, exc)
                raise
            self._finish(span, token, context, None)
            return response

        return traced

    def _streaming(
        self, behaviour: Behaviour, name: str, attributes: _MethodAttributes
    ) -> Behaviour:
        async def traced(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            span, token = self._start(name, attributes, context)
            try:
                async for response in behaviour(request, context):
                    yield response
            except GeneratorExit:
                # Closed while suspended, possibly by the garbage collector in another
                # context, where the token cannot be reset (the call's context ends anyway).
                self._finish(span, None, context, GeneratorExit())
                raise
            except BaseException as exc:
                self._finish(span, token, context, exc)
                raise
            self._finish(span, token, context, None)

        return traced
