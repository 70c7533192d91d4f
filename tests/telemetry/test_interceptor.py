"""The server interceptor's pieces: method predicates and peer attributes."""

from __future__ import annotations

from typing import NamedTuple

import pytest

from headrace.telemetry.interceptor import _peer_attributes, traced_methods


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
