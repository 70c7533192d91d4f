"""The server interceptor's pieces: method predicates, peer attributes, and the generic
handler that hands each call's metadata to its span."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any, NamedTuple

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import SpanLimits
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from headrace.telemetry.interceptor import (
    TracedService,
    TracingInterceptor,
    _peer_attributes,
    traced_methods,
)
from headrace.telemetry.spans import FinishedSpan, LeanTracer


class _Details(NamedTuple):
    method: str
    invocation_metadata: tuple[tuple[str, str], ...] = ()


@pytest.mark.parametrize(
    ("method", "by_default"),
    [
        ("/inference.GRPCInferenceService/ModelInfer", True),
        ("/grpc.health.v1.Health/Check", False),
        ("/grpc.health.v1.Health/Watch", False),
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", False),
        ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", False),
    ],
)
def test_health_and_reflection_are_left_out_unless_asked(method: str, by_default: bool) -> None:
    assert traced_methods(trace_health=False)(_Details(method)) is by_default  # type: ignore[arg-type]
    assert traced_methods(trace_health=True)(_Details(method)) is True  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("peer", "attributes"),
    [
        ("ipv4:127.0.0.1:5000", {"network.peer.address": "127.0.0.1", "network.peer.port": 5000}),
        ("ipv6:%5B::1%5D:6000", {"network.peer.address": "::1", "network.peer.port": 6000}),
        ("unix:/tmp/socket", {}),
    ],
)
def test_peer_attributes(peer: str, attributes: dict[str, object]) -> None:
    assert _peer_attributes(peer) == attributes


class _NoMetadataContext:
    """A servicer context whose metadata must not be read again."""

    def invocation_metadata(self) -> Any:
        raise AssertionError("the span read the metadata from grpc again")

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5000"

    def code(self) -> None:
        return None

    def details(self) -> None:
        return None


def test_a_call_found_by_the_traced_service_gives_its_span_the_metadata_read_for_it() -> None:
    finished: list[FinishedSpan] = []
    tracer = LeanTracer(1.0, finished.append, SpanLimits())
    interceptor = TracingInterceptor(
        tracer, TraceContextTextMapPropagator(), traced_methods(trace_health=False)
    )
    method = "/inference.GRPCInferenceService/ModelInfer"
    seen: list[Any] = []

    async def behaviour(request: Any, context: Any) -> str:
        seen.append(trace.get_current_span().get_span_context())
        return "answer"

    handler = grpc.unary_unary_rpc_method_handler(behaviour)
    service = TracedService({method: interceptor.wrap_handler(method, handler)})
    header = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    def one_call() -> Any:
        # grpc.aio: the lookup, then the handler, in the call's own context.
        found = service.service(_Details(method, (("traceparent", header),)))  # type: ignore[arg-type]
        assert found is not None
        return asyncio.run(found.unary_unary(b"", _NoMetadataContext()))

    assert contextvars.copy_context().run(one_call) == "answer"
    assert service.service(_Details("/other.Service/Method")) is None  # type: ignore[arg-type]
    ((name, trace_id, *_, parent_id, remote),) = [span[:6] for span in finished]
    assert (name, trace_id, parent_id, remote) == (
        method.lstrip("/"),
        0x0AF7651916CD43DD8448EB211C80319C,
        0xB7AD6B7169203331,
        True,
    )
    assert seen[0].trace_id == trace_id
