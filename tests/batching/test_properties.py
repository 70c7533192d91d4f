"""Property test: many concurrent requests with random sizes, shapes, priorities, deadlines
and cancellations through the real gRPC front end into a batching model computing
f(x) = 2x + 1. Every answered request gets exactly f(its own input); every expired or
cancelled one gets its proper status; none is sent twice; none is lost."""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import ServerThread, gated_model, server_with
from tests.models import GATED

MODEL = "prop"
_ids = itertools.count(1)


@dataclass(frozen=True)
class Call:
    rows: int
    width: int
    priority: int
    timeout_us: int | None
    """The protocol's `timeout` parameter (queue time limit)."""
    deadline_s: float | None
    """The client's gRPC deadline."""
    cancel_after_s: float | None


calls = st.builds(
    Call,
    rows=st.integers(1, 3),
    width=st.integers(1, 3),
    priority=st.integers(0, 3),
    timeout_us=st.sampled_from([None, None, 1, 2_000, 200_000]),
    deadline_s=st.sampled_from([None, None, None, 0.002, 0.05, 5.0]),
    cancel_after_s=st.sampled_from([None, None, None, 0.0, 0.003, 0.02]),
)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    batching = {"max_queue_delay_us": 2000, "priority_levels": 3}
    with server_with(gated_model(MODEL, batching, delay_s=0.002)) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _inputs(call: Call) -> np.ndarray:
    """Values unique to this call (its id in the hundreds), exact in float32 through f."""
    base = next(_ids) * 100
    rows = np.arange(call.rows, dtype=np.float32)[:, None] * 10
    return base + rows + np.arange(call.width, dtype=np.float32)[None, :]


def _message(call: Call, data: np.ndarray) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(
        model_name=MODEL,
        id=str(int(data[0, 0])),
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="INPUT0", datatype="FP32", shape=list(data.shape)
            )
        ],
        raw_input_contents=[data.tobytes()],
    )
    if call.priority:
        message.parameters["priority"].int64_param = call.priority
    if call.timeout_us is not None:
        message.parameters["timeout"].int64_param = call.timeout_us
    return message


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(calls, min_size=1, max_size=24))
def test_every_request_gets_its_own_answer_or_its_status(server, stub, batch: list[Call]) -> None:
    model = GATED[MODEL]
    sent = []
    for call in batch:
        data = _inputs(call)
        future = stub.ModelInfer.future(_message(call, data), timeout=call.deadline_s)
        if call.cancel_after_s is not None:
            threading.Timer(call.cancel_after_s, future.cancel).start()
        sent.append((call, data, future))

    for call, data, future in sent:
        try:
            response = future.result(timeout=30)
        except grpc.FutureTimeoutError:
            pytest.fail(f"request {call} was lost: no answer in 30 s")
        except grpc.FutureCancelledError:
            assert call.cancel_after_s is not None
            continue
        except grpc.RpcError as error:
            code = error.code()
            if code == grpc.StatusCode.CANCELLED:
                assert call.cancel_after_s is not None, error.details()
            elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
                assert call.deadline_s is not None or call.timeout_us is not None, error.details()
                if call.deadline_s is None:
                    # Expired in the queue by its timeout parameter: never sent to the model.
                    seen = (
                        np.concatenate([b.ravel() for b in model.batches]) if model.batches else []
                    )
                    assert not np.isin(data.ravel(), seen).any(), f"expired {call} was sent"
            else:
                pytest.fail(f"{call}: unexpected {code}: {error.details()}")
            continue
        output = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(data.shape)
        np.testing.assert_array_equal(output, data * 2 + 1)
        assert response.id == str(int(data[0, 0]))

    counts = Counter(np.concatenate([batch.ravel() for batch in model.batches]).tolist())
    duplicates = [value for value, count in counts.items() if count > 1]
    assert not duplicates, f"sent to the model twice: {duplicates[:5]}"


def test_queue_drains(server, stub) -> None:
    served = server.application.repository.resolve(MODEL)
    assert served.batcher is not None
    assert server.run(_queued(served.batcher)) == 0


async def _queued(batcher) -> int:
    return batcher.queued
