"""The servicer under overload: a call its model has no room for is refused before anything
else is done for it, with a retry hint a gRPC client's own retry policy follows."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest

from headrace.batching.batcher import RETRY_PUSHBACK_METADATA
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol import grpc_service_pb2_grpc as pb_grpc
from tests.capture.conftest import capturing_server, spooled
from tests.conftest import ServerThread, gated_model, server_with
from tests.models import GATED

MODEL = "servicer_gated"
"""Batches one at a time behind a queue of one: a held call and a queued one fill it."""
RETRY_POLICY = {
    "methodConfig": [
        {
            "name": [{"service": "inference.GRPCInferenceService"}],
            "retryPolicy": {
                "maxAttempts": 5,
                # Far above the server's hint: a retry that comes in time came on the hint.
                "initialBackoff": "10s",
                "maxBackoff": "10s",
                "backoffMultiplier": 1,
                "retryableStatusCodes": ["RESOURCE_EXHAUSTED"],
            },
        }
    ]
}
"""A client's service config (gRFC A6): retry RESOURCE_EXHAUSTED, waiting as the server's
`grpc-retry-pushback-ms` says."""


def _model(max_queue_delay_us: int = 0) -> dict[str, object]:
    batching = {
        "max_queue_size": 1,
        "max_inflight_batches": 1,
        "max_queue_delay_us": max_queue_delay_us,
    }
    return gated_model(MODEL, batching)


def _message(value: float) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=MODEL,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="FP32", shape=[1, 1])
        ],
        raw_input_contents=[np.array([value], dtype="<f4").tobytes()],
    )


def _answer(response: pb.ModelInferResponse) -> float:
    return float(np.frombuffer(response.raw_output_contents[0], dtype="<f4")[0])


def _wait_until(condition: Callable[[], bool]) -> None:
    for _ in range(3000):
        if condition():
            return
        time.sleep(0.01)
    pytest.fail("the server never got there")


@contextmanager
def _queue_full(
    server: ServerThread, stub: pb_grpc.GRPCInferenceServiceStub
) -> Iterator[list[Future[pb.ModelInferResponse]]]:
    """Hold the model on one call and queue another, until the block ends; yields both."""
    model = GATED[MODEL]
    batcher = server.application.repository.resolve(MODEL).batcher
    assert batcher is not None
    model.gate.clear()
    model.running.clear()
    with ThreadPoolExecutor(2) as pool:
        try:
            held = pool.submit(stub.ModelInfer, _message(1.0), timeout=30)
            assert model.running.wait(10)
            queued = pool.submit(stub.ModelInfer, _message(2.0), timeout=30)
            _wait_until(lambda: batcher.queued == 1)
            yield [held, queued]
        finally:
            model.gate.set()


def test_full_queue_refusal_comes_before_capture_and_names_the_limit(tmp_path: Path) -> None:
    with (
        capturing_server(tmp_path, extra_models=(_model(),)) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        statistics = server.application.repository.resolve(MODEL).statistics
        with _queue_full(server, stub) as parked:
            with pytest.raises(grpc.RpcError) as raised:
                stub.ModelInfer(_message(3.0), timeout=10)
            error = raised.value
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error.details() == (
                f"model '{MODEL}' version 1 has 1 requests queued (max_queue_size 1); retry later"
            )
            assert 1 <= int(dict(error.trailing_metadata())[RETRY_PUSHBACK_METADATA]) <= 10_000
        assert [_answer(call.result(10)) for call in parked] == [3.0, 5.0]
        # The server keeps serving once the queue drains.
        assert _answer(stub.ModelInfer(_message(4.0), timeout=10)) == 9.0
        assert statistics.fail.count == 1
        # Only the calls that were served left records: a refusal under overload is not
        # captured (it would turn the offered load into spool writes).
        records = [r for r in spooled(server) if r.model == MODEL]
        assert sorted(r.status_code for r in records) == [0, 0, 0]


def test_a_retry_policy_gets_through_after_the_pushback() -> None:
    options = [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(RETRY_POLICY)),
    ]
    # A queue delay of 1 s makes the hint about 1 s: the attempts cannot all be spent before
    # the model is released.
    with (
        server_with(_model(max_queue_delay_us=1_000_000)) as server,
        grpc.insecure_channel(server.address) as channel,
        grpc.insecure_channel(server.address, options=options) as retrying,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        statistics = server.application.repository.resolve(MODEL).statistics
        with _queue_full(server, stub) as parked:
            call = pb_grpc.GRPCInferenceServiceStub(retrying).ModelInfer.future(
                _message(3.0), timeout=60
            )
            # Refused at least once (the retry waits on the hint), then room is made.
            _wait_until(lambda: statistics.fail.count >= 1)
        assert _answer(call.result(60)) == 7.0
        assert [_answer(p.result(10)) for p in parked] == [3.0, 5.0]
