"""`server.limits` through the real front end: each refusal's status names the limit and its
config key, nothing is allocated for a hostile shape, and the server keeps serving."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest

from headrace.config import Settings
from headrace.errors import InvalidArgumentError
from headrace.frontend.limits import InflightLimit, RequestLimits
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import ServerThread, gated_model, make_settings
from tests.models import GATED

HELD = "limits_held"
"""A gated, unbatched model: a test holds calls in it."""
LIMITS = {
    "max_request_elements": 1000,
    "max_request_bytes": 2000,
    "max_tensor_rank": 4,
    "max_request_batch_size": 2,
    "max_inflight_requests": 2,
    "max_concurrent_streams": 2,
    "min_client_ping_interval_s": 5,
    "max_ping_strikes": 1,
}


def _settings(**limits: Any) -> Settings:
    tree = make_settings().model_dump(mode="json")
    tree["models"].append(gated_model(HELD, {"enabled": False}))
    tree["server"]["limits"] = {**LIMITS, **limits}
    tree["server"]["max_message_bytes"] = 4 * 1024 * 1024
    return Settings.model_validate(tree)


@pytest.fixture(scope="module")
def limited() -> Iterator[ServerThread]:
    with ServerThread(_settings()) as running:
        yield running


@pytest.fixture
def stub(limited: ServerThread) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(limited.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _request(
    model: str = "identity", shape: tuple[int, ...] = (1, 4), raw: bytes | None = None
) -> pb.ModelInferRequest:
    if raw is None:
        raw = np.ones(shape, dtype="<f4").tobytes()
    return pb.ModelInferRequest(
        model_name=model,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="FP32", shape=shape)],
        raw_input_contents=[raw],
    )


def _own_connection(address: str) -> grpc.Channel:
    """A channel on a connection of its own: grpc shares one between channels to the same
    address with the same options unless told otherwise."""
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def _refusal(call: Any, request: Any, timeout_s: float = 10) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call(request, timeout=timeout_s)
    return raised.value


def _assert_serving(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    reply = stub.ModelInfer(_request(), timeout=10)
    assert np.frombuffer(reply.raw_output_contents[0], "<f4").tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize(
    ("shape", "key"),
    [
        ((1, 1001), "max_request_elements"),
        ((1, 2**40), "max_request_elements"),
        ((0, 2**62), "max_request_elements"),
        ((1, 1, 1, 1, 1), "max_tensor_rank"),
        ((1,) * 40, "max_tensor_rank"),
    ],
)
def test_declared_shapes_over_the_limits_are_refused(stub, shape, key: str) -> None:
    # The raw contents need not match: the limit is checked before anything is decoded.
    error = _refusal(stub.ModelInfer, _request(shape=shape, raw=b""))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"(server.limits.{key})" in error.details()
    assert "input 'INPUT0'" in error.details()
    _assert_serving(stub)


def test_request_bytes_over_the_limit_are_refused(stub) -> None:
    request = pb.ModelInferRequest(
        model_name="echo_bytes",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="INPUT0",
                datatype="BYTES",
                shape=[1, 3],
                contents=pb.InferTensorContents(bytes_contents=[b"x" * 1000] * 3),
            )
        ],
    )
    error = _refusal(stub.ModelInfer, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        "input 'INPUT0' brings the request to 3000 bytes of tensor data; the limit is 2000 "
        "(server.limits.max_request_bytes)"
    )


def test_batch_over_the_limit_is_refused(stub) -> None:
    error = _refusal(stub.ModelInfer, _request(shape=(3, 2)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        "request to model 'identity' has batch size 3; the limit is 2 "
        "(server.limits.max_request_batch_size)"
    )
    assert stub.ModelInfer(_request(shape=(2, 2)), timeout=10).raw_output_contents


def test_messages_over_max_message_bytes_are_refused(stub) -> None:
    big = _request(shape=(1, 1024 * 1024 + 16))  # just over 4 MiB
    error = _refusal(stub.ModelInfer, big)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in error.details()
    _assert_serving(stub)


def test_inflight_requests_over_the_limit_get_resource_exhausted_with_a_hint(
    limited: ServerThread, stub
) -> None:
    model = GATED[HELD]
    model.gate.clear()
    try:
        with ThreadPoolExecutor(2) as pool:
            held = [
                pool.submit(stub.ModelInfer, _request(HELD, (1, 1)), timeout=30) for _ in range(2)
            ]
            _wait_until(lambda: limited.application.servicer.inflight.inflight == 2)
            # Another connection: this one is at its max_concurrent_streams.
            with (
                _own_connection(limited.address) as channel,
                pytest.raises(grpc.RpcError) as raised,
            ):
                pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_request(), timeout=10)
            error = raised.value
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error.details() == (
                "2 inference requests are in progress; the limit is 2 "
                "(server.limits.max_inflight_requests); retry later"
            )
            trailing = dict(error.trailing_metadata())
            assert int(trailing["grpc-retry-pushback-ms"]) >= 1
            model.gate.set()
            for call in held:
                assert call.result().raw_output_contents
    finally:
        model.gate.set()
    _assert_serving(stub)


def _wait_until(condition: Any) -> None:
    done = threading.Event()
    for _ in range(1000):
        if condition():
            return
        done.wait(0.01)
    pytest.fail("condition never held")


def test_streams_per_connection_are_capped(limited: ServerThread) -> None:
    """With two calls held open on a connection (max_concurrent_streams 2), a third on it
    waits in the client; on another connection it goes through."""
    model = GATED[HELD]
    model.gate.clear()
    try:
        with (
            _own_connection(limited.address) as busy,
            _own_connection(limited.address) as other,
            ThreadPoolExecutor(2) as pool,
        ):
            busy_stub = pb_grpc.GRPCInferenceServiceStub(busy)
            held = [
                pool.submit(busy_stub.ModelInfer, _request(HELD, (1, 1)), timeout=30)
                for _ in range(2)
            ]
            _wait_until(lambda: limited.application.servicer.inflight.inflight == 2)
            waiting = _refusal(busy_stub.ServerLive, pb.ServerLiveRequest(), timeout_s=1)
            assert waiting.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            other_stub = pb_grpc.GRPCInferenceServiceStub(other)
            assert other_stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
            model.gate.set()
            for call in held:
                assert call.result().raw_output_contents
    finally:
        model.gate.set()


def test_clients_pinging_too_often_are_sent_away(limited: ServerThread) -> None:
    """min_client_ping_interval_s 5, max_ping_strikes 1: a client pinging every 50 ms is
    sent GOAWAY (too_many_pings) and its open call ends UNAVAILABLE."""
    model = GATED[HELD]
    model.gate.clear()
    options = [
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.keepalive_time_ms", 50),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_time_between_pings_ms", 50),
    ]
    try:
        with grpc.insecure_channel(limited.address, options=options) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            error = _refusal(stub.ModelInfer, _request(HELD, (1, 1)))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "ping" in error.details().lower()
    finally:
        model.gate.set()


def test_raw_contents_are_counted_against_the_inputs_they_belong_to() -> None:
    """Raw contents belong to the inputs not in shared memory, in order: an input placed in a
    region counts by its declared shape, the raw entry by its length, each once."""
    limits = RequestLimits(_settings(max_request_elements=100_000).server.limits)
    request = pb.ModelInferRequest(model_name="m")
    placed = request.inputs.add(name="A", datatype="FP32", shape=[1, 10])
    placed.parameters["shared_memory_region"].string_param = "r"
    placed.parameters["shared_memory_byte_size"].int64_param = 40
    request.inputs.add(name="B", datatype="UINT8", shape=[1, 1990])
    request.raw_input_contents.append(b"\x00" * 1990)
    with pytest.raises(InvalidArgumentError) as refused:
        limits.check_message(request)
    assert refused.value.message.startswith(
        "input 'B' brings the request to 2030 bytes of tensor data"
    )


def test_inflight_retry_hint_starts_at_the_first_duration_then_follows_the_average() -> None:
    limit = InflightLimit(1)
    assert limit.retry_hint_ms() == 1  # nothing finished yet
    limit.record_duration(0.4)
    assert limit.retry_hint_ms() == 400
    limit.record_duration(0.2)
    assert limit.retry_hint_ms() == 390  # 0.4 + 0.05 x (0.2 - 0.4)
    limit.record_duration(1000.0)
    assert limit.retry_hint_ms() == 10_000  # capped
