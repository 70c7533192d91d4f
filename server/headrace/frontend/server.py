"""Construction of the gRPC server: the inference service, health checking and reflection."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from headrace.config import ServerSettings
from headrace.errors import StartupError
from headrace.frontend.servicer import InferenceServicer
from headrace.frontend.status import serialized, tolerant_deserializer, wire_deserializer
from headrace.frontend.tls import ServerTls
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol.descriptor_pool import POOL
from headrace.telemetry.interceptor import REFLECTION_SERVICES, TracedService, TracingInterceptor

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_SERVICE_NAME: str = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
LIVENESS_SERVICE = "liveness"
"""grpc.health.v1 service name that is SERVING from start-up until shutdown begins, whatever
the models' readiness: for liveness probes, which must not restart a gateway because the
Triton behind it is down (readiness, service "", does follow the models)."""

_OTHER_SERVICES = (HEALTH_SERVICE_NAME, *REFLECTION_SERVICES)
"""The services the server registers beside the inference service."""

_logger = logging.getLogger(__name__)


def _method_handlers(servicer: InferenceServicer) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        # The protocol declares methods Headrace only calls on Triton (SystemSharedMemory*);
        # left unregistered, grpc answers them UNIMPLEMENTED, as for any undeclared method.
        behaviour: Callable[..., Any] | None = getattr(servicer, method.name, None)
        if behaviour is None:
            continue
        request_type: type[Message] = getattr(pb, method.input_type.name)
        response_type: type[Message] = getattr(pb, method.output_type.name)
        make: Callable[..., grpc.RpcMethodHandler[Any, Any]]
        if method.client_streaming and method.server_streaming:
            make = grpc.stream_stream_rpc_method_handler
        elif not method.client_streaming and not method.server_streaming:
            make = grpc.unary_unary_rpc_method_handler
        else:  # the protocol has neither mix; a new one needs its own handler kind
            raise NotImplementedError(f"{method.name}: unsupported streaming kind")
        if request_type is pb.ModelInferRequest:
            # Inference handlers get the wire bytes too (capture), and may answer with bytes.
            handlers[method.name] = make(
                behaviour,
                request_deserializer=wire_deserializer(request_type),
                response_serializer=serialized,
            )
        else:
            handlers[method.name] = make(
                behaviour,
                request_deserializer=tolerant_deserializer(request_type),
                response_serializer=response_type.SerializeToString,
            )
    return handlers


def server_options(settings: ServerSettings, *, reuse_port: bool = False) -> list[tuple[str, int]]:
    """grpc core's options for `settings`: message sizes, streams per connection, keepalive
    (both the server's pings and what it tolerates from clients), port sharing."""
    limits = settings.limits
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", round(limits.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", round(limits.keepalive_timeout_s * 1000)),
        (
            "grpc.http2.min_ping_interval_without_data_ms",
            round(limits.min_client_ping_interval_s * 1000),
        ),
        ("grpc.http2.max_ping_strikes", limits.max_ping_strikes),
        ("grpc.keepalive_permit_without_calls", int(limits.permit_keepalive_without_calls)),
        # Never share a port silently with another process (grpc enables it by default); only
        # the workers of one supervisor share theirs, on purpose.
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]
    if limits.max_concurrent_streams is not None:
        options.append(("grpc.max_concurrent_streams", limits.max_concurrent_streams))
    return options


class _GenericHandlersOnly:
    """The server as the generated `add_*Servicer_to_server` functions see it: their generic
    handlers are added, their registered methods are not.

    Why: grpc.aio (1.81-1.85) keeps a pending call request per registered method and, for
    every call that arrives, waits again on all of them (`asyncio.wait` adds and removes a
    callback on each). With the ~30 methods of the inference, health and reflection services,
    that cost 70k instructions a call, 9% of a whole call on the event loop (`python -m
    bench.tracing_path --callgrind`: 755k -> 686k with the inference service unregistered),
    more than the registered lookup saves. A generic handler's lookup is one dict read.
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(
        self, handlers: Sequence[grpc.GenericRpcHandler[Any, Any]]
    ) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        """Left out (see the class)."""


class FrontendServer:
    """The grpc.aio server with the inference service, grpc.health.v1 and reflection."""

    def __init__(
        self,
        settings: ServerSettings,
        servicer: InferenceServicer,
        interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (),
        *,
        tracing: TracingInterceptor | None = None,
        reuse_port: bool = False,
    ) -> None:
        """`tracing`: a span per call, current in the `interceptors` that follow it. With no
        other interceptor and health and reflection untraced (the default), it wraps the
        inference service's handlers here, once, instead of intercepting each call.
        `reuse_port`: share the port with other processes that set it too (the workers of
        `headrace serve --workers N`; the kernel spreads connections over them)."""
        self._settings = settings
        chain = list(interceptors)
        handlers = _method_handlers(servicer)
        traced: TracedService | None = None
        if tracing is not None:
            if chain or any(tracing.traces(f"/{service}/") for service in _OTHER_SERVICES):
                chain.insert(0, tracing)
            else:
                traced = TracedService(
                    {
                        f"/{SERVICE_NAME}/{name}": tracing.wrap_handler(
                            f"/{SERVICE_NAME}/{name}", handler
                        )
                        for name, handler in handlers.items()
                    }
                )
        self._server = grpc.aio.server(
            interceptors=chain, options=server_options(settings, reuse_port=reuse_port)
        )
        # Generic handlers only, no registered methods (see `_GenericHandlersOnly`).
        generic_only = _GenericHandlersOnly(self._server)
        if traced is not None:
            # It also hands each call's metadata to its span.
            generic_only.add_generic_rpc_handlers((traced,))
        else:
            generic_only.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
            )
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, generic_only)
        # Reflection reads Headrace's private pool, which must also know the health and
        # reflection services to describe them.
        for file_descriptor in (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
            POOL.AddSerializedFile(file_descriptor.serialized_pb)
        # What `reflection.enable_server_reflection` does for a grpc.aio server.
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(  # type: ignore[attr-defined]
                (SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), pool=POOL
            ),
            generic_only,
        )
        self.port = 0
        self.tls = ServerTls(settings.tls) if settings.tls is not None else None
        """TLS credentials (None: plaintext); `tls.reload()` re-reads the files."""

    async def start(self) -> int:
        """Bind and start serving; returns the bound port (useful with port 0).

        Raises:
            StartupError: the address cannot be bound (in use, or not this host's).
        """
        address = f"{self._settings.host}:{self._settings.port}"
        try:
            if self.tls is not None:
                self.port = self._server.add_secure_port(address, self.tls.credentials)
            else:
                self.port = self._server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc's only signal for a failed bind
            raise StartupError(
                f"cannot listen on {address}: address in use or unavailable"
            ) from exc
        await self._server.start()
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def set_serving(self, serving: bool) -> None:
        """Set the health status of the server ("") and the inference service."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def stop(self, grace_s: float | None) -> None:
        """Report NOT_SERVING, stop accepting calls, let in-flight calls finish for up to
        `grace_s` seconds, then cancel the rest."""
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace_s)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()
