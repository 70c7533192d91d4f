"""What batching looks like from a client on the wire."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from headrace.backends.local import LocalBackend
from headrace.batching import BatchPolicy, DynamicBatcher
from headrace.batching.batcher import RETRY_PUSHBACK_METADATA
from headrace.config import BatchingSettings, LocalBackendSettings
from headrace.inference import InferenceRequest, InferenceResponse
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol import grpc_service_pb2_grpc as pb_grpc
from headrace.spec import ModelSpec
from tests.conftest import ServerThread, gated_model, make_settings, server_with
from tests.models import GATED

MODEL = "wire_gated"


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    batching = {
        "max_queue_size": 2,
        "max_queue_delay_us": 1500,
        "preferred_batch_sizes": [4, 8],
        "priority_levels": 2,
    }
    with server_with(gated_model(MODEL, batching)) as running:
        yield running


@contextlib.contextmanager
def _held(channel: grpc.Channel) -> Iterator[grpc.Future]:
    """Hold the gated model on a first request (yielded) until the block ends."""
    model = GATED[MODEL]
    model.gate.clear()
    model.running.clear()
    try:
        held = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer.future(_message(1.0))
        assert model.running.wait(10)
        yield held
    finally:
        model.gate.set()


def _message(value: float, model: str = MODEL) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=model,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="FP32", shape=[1, 1])
        ],
        raw_input_contents=[np.array([value], dtype="<f4").tobytes()],
    )


def _wait_for_queue(server: ServerThread, depth: int) -> None:
    batcher = server.application.repository.resolve(MODEL).batcher

    async def queued() -> int:
        return batcher.queued

    for _ in range(1000):
        if server.run(queued()) >= depth:
            return
        time.sleep(0.01)
    pytest.fail(f"the queue never reached {depth}")


def test_full_queue_is_resource_exhausted_with_retry_pushback(server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with _held(channel) as held:
            queued = [stub.ModelInfer.future(_message(2.0)), stub.ModelInfer.future(_message(3.0))]
            _wait_for_queue(server, 2)
            with pytest.raises(grpc.RpcError) as raised:
                stub.ModelInfer(_message(4.0), timeout=10)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queue_size 2" in raised.value.details()
        trailers = dict(raised.value.trailing_metadata())
        assert 1 <= int(trailers[RETRY_PUSHBACK_METADATA]) <= 10_000
        for future in (held, *queued):
            assert future.result(10).raw_output_contents
        # The server keeps serving once the queue drains.
        assert stub.ModelInfer(_message(5.0), timeout=10).raw_output_contents


def test_model_config_reports_the_batcher(server) -> None:
    config = triton.InferenceServerClient(server.address).get_model_config(MODEL).config
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    batching = config.dynamic_batching
    assert list(batching.preferred_batch_size) == [4, 8]
    assert batching.max_queue_delay_microseconds == 1500
    assert batching.priority_levels == 2
    assert batching.default_priority_level == 2
    assert batching.default_queue_policy.max_queue_size == 2
    unbatched = triton.InferenceServerClient(server.address).get_model_config("fixed").config
    assert unbatched.WhichOneof("scheduling_choice") is None


def test_concurrent_requests_share_executions(server) -> None:
    client = triton.InferenceServerClient(server.address)
    before = client.get_inference_statistics("echo_fp64").model_stats[0]
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        message = pb.ModelInferRequest(
            model_name="echo_fp64",
            inputs=[
                pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="FP64", shape=[1, 2])
            ],
            raw_input_contents=[np.array([1.5, 2.5], dtype="<f8").tobytes()],
        )
        futures = [stub.ModelInfer.future(message) for _ in range(64)]
        for future in futures:
            assert np.frombuffer(future.result(10).raw_output_contents[0], "<f8").tolist() == [
                1.5,
                2.5,
            ]
    stats = client.get_inference_statistics("echo_fp64").model_stats[0]
    assert stats.inference_count - before.inference_count == 64
    assert stats.inference_stats.success.count - before.inference_stats.success.count == 64
    executions = stats.execution_count - before.execution_count
    assert 1 <= executions <= 64
    assert sum(b.compute_infer.count for b in stats.batch_stats) == stats.execution_count


def test_timeout_parameter_on_the_wire(server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with _held(channel) as held:
            message = _message(12.0)
            message.parameters["timeout"].uint64_param = 20_000
            with pytest.raises(grpc.RpcError) as raised:
                stub.ModelInfer(message, timeout=10)
        held.result(10)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "before it was dispatched" in raised.value.details()


class TimeoutRecorder(LocalBackend):
    """The local backend, remembering the time limit each call was given."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.timeouts: list[float | None] = []

    async def infer(
        self, spec: ModelSpec, request: InferenceRequest, timeout_s: float | None = None
    ) -> InferenceResponse:
        self.timeouts.append(timeout_s)
        return await super().infer(spec, request, timeout_s)


async def test_remaining_deadline_reaches_the_backend() -> None:
    settings = make_settings()
    identity = next(model for model in settings.models if model.name == "echo_fp32")
    backend = TimeoutRecorder([identity], LocalBackendSettings())
    await backend.start()
    spec = backend.model_specs()[0]
    policy = BatchPolicy.resolve(
        BatchingSettings(max_batch_size=2, max_queue_delay_us=10_000_000), spec
    )
    batcher = DynamicBatcher(spec, backend, policy)
    batcher.start()
    try:
        loop = asyncio.get_running_loop()
        data = {"INPUT0": np.ones((1, 1), np.float32)}
        await asyncio.gather(
            batcher.submit(InferenceRequest("echo_fp32", "", "a", data), 1, loop.time() + 3.0),
            batcher.submit(InferenceRequest("echo_fp32", "", "b", data), 1, loop.time() + 5.0),
        )
        await asyncio.gather(
            batcher.submit(InferenceRequest("echo_fp32", "", "c", data), 1, loop.time() + 5.0),
            batcher.submit(InferenceRequest("echo_fp32", "", "d", data), 1, None),
        )
    finally:
        await batcher.stop()
        await backend.stop()
    # The batch's limit is its latest deadline; a request without one lifts the limit.
    assert backend.timeouts[0] is not None
    assert 4.0 < backend.timeouts[0] <= 5.0
    assert backend.timeouts[1] is None


def test_unbatched_model_passes_straight_through(server) -> None:
    served = server.application.repository.resolve("fixed")
    assert served.batcher is None
    client = triton.InferenceServerClient(server.address)
    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    tensor = triton.InferInput("INPUT0", [2, 3], "FP32")
    tensor.set_data_from_numpy(data)
    np.testing.assert_array_equal(client.infer("fixed", [tensor]).as_numpy("OUTPUT0"), data)
