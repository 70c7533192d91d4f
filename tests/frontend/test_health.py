"""grpc.health.v1 follows the models and shutdown; reflection describes every service."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.conftest import ServerThread, make_settings

SERVICE = "inference.GRPCInferenceService"
LIVENESS = "liveness"


def _check(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


@pytest.mark.parametrize("service", ["", SERVICE, LIVENESS])
def test_serving_when_models_ready(server, service: str) -> None:
    assert _check(server.address, service) == health_pb2.HealthCheckResponse.SERVING


def test_unknown_service_is_not_found(server) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        _check(server.address, "no.such.Service")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("service", [SERVICE, LIVENESS])
def test_not_serving_once_shutdown_begins(service: str) -> None:
    with (
        ServerThread(make_settings()) as running,
        grpc.insecure_channel(running.address) as channel,
    ):
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stopping = running.run_in_background(running.application.stop(grace_s=2))
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        stopping.result(10)


def _reflect(address: str, request: reflection_pb2.ServerReflectionRequest):
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        return next(stub.ServerReflectionInfo(iter([request]), timeout=5))


def test_reflection_lists_services(server) -> None:
    reply = _reflect(server.address, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {service.name for service in reply.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize(
    "symbol", ["inference.GRPCInferenceService", "inference.ModelConfig", "grpc.health.v1.Health"]
)
def test_reflection_describes_symbols(server, symbol: str) -> None:
    reply = _reflect(
        server.address, reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
    )
    assert reply.WhichOneof("message_response") == "file_descriptor_response"
    assert reply.file_descriptor_response.file_descriptor_proto
