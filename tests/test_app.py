"""Start-up and graceful shutdown of the whole application."""

from __future__ import annotations

import asyncio
import gc

import grpc
import numpy as np
import pytest

from headrace.app import Application
from headrace.errors import ConfigError, StartupError
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import make_settings


def _slow_request() -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="slow",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="FP32", shape=[1, 2])
        ],
        raw_input_contents=[np.ones(2, dtype=np.float32).tobytes()],
    )


async def test_in_flight_request_finishes_during_shutdown() -> None:
    application = Application(make_settings())
    port = await application.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        in_flight = asyncio.ensure_future(stub.ModelInfer(_slow_request()))
        await asyncio.sleep(0.2)  # the slow model (0.5 s) is running now
        stopping = asyncio.ensure_future(application.stop(grace_s=5))
        response = await in_flight
        await stopping
    assert np.frombuffer(response.raw_output_contents[0], dtype="<f4").tolist() == [1, 1]


async def test_requests_after_shutdown_are_refused() -> None:
    application = Application(make_settings())
    port = await application.start()
    await application.stop(grace_s=0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ServerLive(pb.ServerLiveRequest(), timeout=2)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_grace_period_bounds_shutdown() -> None:
    application = Application(make_settings())
    port = await application.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        in_flight = asyncio.ensure_future(stub.ModelInfer(_slow_request()))
        await asyncio.sleep(0.2)
        await application.stop(grace_s=0)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await in_flight
    assert raised.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


async def test_model_that_fails_to_load_stops_start_up() -> None:
    settings = make_settings()
    broken = settings.model_dump(mode="json")
    broken["models"][0]["entrypoint"] = "headrace.examples.identity:NoSuchModel"
    application = Application(type(settings).model_validate(broken))
    with pytest.raises(ConfigError, match=r"model 'identity' version 1: entrypoint .*NoSuchModel"):
        await application.start()
    await application.stop()  # nothing left to stop; must not raise


async def test_port_in_use_is_reported() -> None:
    async with Application(make_settings()) as first:
        second = Application(make_settings(**{"server.port": first.port}))
        with pytest.raises(StartupError, match=f"cannot listen on 127.0.0.1:{first.port}"):
            await second.start()


async def test_start_up_objects_are_out_of_the_collectors_sight_while_serving() -> None:
    # A full collection while serving then walks only what serving allocated, not the
    # modules and servers built at start-up (a pause of 40-50 ms per collection otherwise).
    application = Application(make_settings())
    await application.start()
    try:
        assert gc.get_freeze_count() > 10_000
    finally:
        await application.stop(grace_s=0)
    assert gc.get_freeze_count() == 0
