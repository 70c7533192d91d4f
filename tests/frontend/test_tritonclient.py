"""tritonclient, unchanged, against a live Headrace server: every protocol call it makes and
ModelInfer round trips for every datatype, with raw and typed contents."""

from __future__ import annotations

import queue

import grpc
import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import service_pb2 as triton_pb
from tritonclient.grpc import service_pb2_grpc as triton_pb_grpc
from tritonclient.utils import InferenceServerException

from headrace import __version__
from headrace.protocol.datatypes import DATATYPES

SAMPLES: dict[str, np.ndarray] = {
    "BOOL": np.array([True, False, True]),
    "UINT8": np.array([0, 7, 255], dtype=np.uint8),
    "UINT16": np.array([0, 7, 65535], dtype=np.uint16),
    "UINT32": np.array([0, 7, 2**32 - 1], dtype=np.uint32),
    "UINT64": np.array([0, 7, 2**64 - 1], dtype=np.uint64),
    "INT8": np.array([-128, 0, 127], dtype=np.int8),
    "INT16": np.array([-(2**15), 0, 2**15 - 1], dtype=np.int16),
    "INT32": np.array([-(2**31), 0, 2**31 - 1], dtype=np.int32),
    "INT64": np.array([-(2**63), 0, 2**63 - 1], dtype=np.int64),
    "FP16": np.array([-0.0, 1.5, np.inf, 65504], dtype=np.float16),
    "FP32": np.array([-0.0, 1.25, -np.inf, 3.4e38], dtype=np.float32),
    "FP64": np.array([-0.0, 1e-300, np.inf, np.pi], dtype=np.float64),
    "BF16": np.array([-0.0, 1.5, -2.0, 3.0e38], dtype=ml_dtypes.bfloat16),
    "BYTES": np.array([b"", b"forecast", b"\x00\xff\x00", "né".encode()], dtype=object),
}


def _batch(values: np.ndarray) -> np.ndarray:
    """Two items of the sample: shape [2, n] (echo models batch, dims [-1])."""
    return np.stack([values, values[::-1]])


def test_samples_cover_every_datatype() -> None:
    assert set(SAMPLES) == set(DATATYPES)


def test_server_calls(server) -> None:
    client = triton.InferenceServerClient(server.address)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("identity")
    assert client.is_model_ready("scaled", "2")
    assert not client.is_model_ready("no_such_model")
    metadata = client.get_server_metadata(as_json=True)
    assert metadata["name"] == "headrace"
    assert metadata["version"] == __version__
    assert "statistics" in metadata["extensions"]


def test_model_metadata_and_config(server) -> None:
    client = triton.InferenceServerClient(server.address)
    metadata = client.get_model_metadata("identity", as_json=True)
    assert metadata["name"] == "identity"
    assert metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": ["-1", "-1"]}]
    assert metadata["outputs"] == [{"name": "OUTPUT0", "datatype": "FP32", "shape": ["-1", "-1"]}]
    config = client.get_model_config("sales_forecast").config
    assert config.name == "sales_forecast"
    assert config.max_batch_size == 256
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("FEATURES", triton.model_config_pb2.TYPE_FP32, [6])
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("FORECAST", triton.model_config_pb2.TYPE_FP32, [1])
    ]
    versions = client.get_model_metadata("scaled", as_json=True)["versions"]
    assert versions == ["1", "2"]


def test_statistics_count_requests(server) -> None:
    client = triton.InferenceServerClient(server.address)
    before = client.get_inference_statistics("echo_int16").model_stats[0]
    data = _batch(SAMPLES["INT16"])
    tensor = triton.InferInput("INPUT0", list(data.shape), "INT16")
    tensor.set_data_from_numpy(data)
    client.infer("echo_int16", [tensor])
    stats = client.get_inference_statistics("echo_int16").model_stats[0]
    assert stats.inference_count == before.inference_count + 2
    assert stats.execution_count == before.execution_count + 1
    assert stats.inference_stats.success.count == before.inference_stats.success.count + 1
    assert stats.inference_stats.success.ns > before.inference_stats.success.ns
    assert stats.last_inference > 0
    assert [b.batch_size for b in stats.batch_stats] == [2]
    every = client.get_inference_statistics().model_stats
    assert {(s.name, s.version) for s in every} >= {("scaled", "1"), ("scaled", "2")}


@pytest.mark.parametrize("datatype", list(SAMPLES))
def test_raw_round_trip_every_datatype(server, datatype: str) -> None:
    client = triton.InferenceServerClient(server.address)
    data = _batch(SAMPLES[datatype])
    tensor = triton.InferInput("INPUT0", list(data.shape), datatype)
    tensor.set_data_from_numpy(data)
    result = client.infer(f"echo_{datatype.lower()}", [tensor], request_id="r-1")
    output = result.as_numpy("OUTPUT0")
    assert result.get_response().id == "r-1"
    assert result.get_output("OUTPUT0").datatype == datatype
    assert output.shape == data.shape
    if datatype == "BYTES":
        assert output.tolist() == data.tolist()
    else:
        assert output.view(np.uint8).tobytes() == data.view(np.uint8).tobytes()


TYPED_FIELDS = {name: dt.contents_field for name, dt in DATATYPES.items() if dt.contents_field}


@pytest.mark.parametrize("datatype", list(TYPED_FIELDS))
def test_typed_contents_round_trip(server, datatype: str) -> None:
    """Typed contents go through Triton's own generated stub, as another language's client
    would send them."""
    data = _batch(SAMPLES[datatype])
    request = triton_pb.ModelInferRequest(model_name=f"echo_{datatype.lower()}")
    tensor = request.inputs.add(name="INPUT0", datatype=datatype, shape=data.shape)
    getattr(tensor.contents, TYPED_FIELDS[datatype]).extend(data.flatten().tolist())
    with grpc.insecure_channel(server.address) as channel:
        response = triton_pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    result = triton.InferResult(response)
    output = result.as_numpy("OUTPUT0")
    if datatype == "BYTES":
        assert output.tolist() == data.tolist()
    else:
        assert output.dtype == data.dtype
        assert output.view(np.uint8).tobytes() == data.view(np.uint8).tobytes()


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_typed_contents_for_raw_only_datatypes(server, datatype: str) -> None:
    request = triton_pb.ModelInferRequest(model_name=f"echo_{datatype.lower()}")
    request.inputs.add(name="INPUT0", datatype=datatype, shape=[1, 1])
    with grpc.insecure_channel(server.address) as channel:
        stub = triton_pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelInfer(request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'INPUT0'" in raised.value.details()
    assert "raw_input_contents" in raised.value.details()


def test_two_inputs_and_requested_outputs(server) -> None:
    client = triton.InferenceServerClient(server.address)
    a = np.arange(16, dtype=np.int32)
    b = np.full(16, 3, dtype=np.int32)
    inputs = [
        triton.InferInput("INPUT0", [16], "INT32"),
        triton.InferInput("INPUT1", [16], "INT32"),
    ]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer("add_sub", inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    only = client.infer("add_sub", inputs, outputs=[triton.InferRequestedOutput("OUTPUT1")])
    assert [o.name for o in only.get_response().outputs] == ["OUTPUT1"]
    np.testing.assert_array_equal(only.as_numpy("OUTPUT1"), a - b)


def test_versions_are_routed(server) -> None:
    client = triton.InferenceServerClient(server.address)
    data = np.ones((1, 4), dtype=np.float32)
    tensor = triton.InferInput("INPUT0", [1, 4], "FP32")
    tensor.set_data_from_numpy(data)
    latest = client.infer("scaled", [tensor])
    assert latest.get_response().model_version == "2"
    np.testing.assert_array_equal(latest.as_numpy("OUTPUT0"), data * 2)
    first = client.infer("scaled", [tensor], model_version="1")
    np.testing.assert_array_equal(first.as_numpy("OUTPUT0"), data)


def test_sales_forecast_answers_like_the_model(server) -> None:
    from headrace.examples.sales_forecast import SalesForecast, synthetic_sales

    features, _ = synthetic_sales(5, seed=3)
    client = triton.InferenceServerClient(server.address)
    tensor = triton.InferInput("FEATURES", list(features.shape), "FP32")
    tensor.set_data_from_numpy(features)
    forecast = client.infer("sales_forecast", [tensor]).as_numpy("FORECAST")
    np.testing.assert_array_equal(forecast, SalesForecast()({"FEATURES": features})["FORECAST"])
    assert forecast.shape == (5, 1)


def test_stream_infer_several_requests(server) -> None:
    client = triton.InferenceServerClient(server.address)
    results: queue.Queue[tuple[object, object]] = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        sent = {}
        for index in range(8):
            data = np.full((1, 3), index, dtype=np.float32)
            tensor = triton.InferInput("INPUT0", [1, 3], "FP32")
            tensor.set_data_from_numpy(data)
            client.async_stream_infer("identity", [tensor], request_id=str(index))
            sent[str(index)] = data
        # An error on the stream answers its own request; the stream goes on.
        bad = triton.InferInput("INPUT0", [1, 3], "INT32")
        bad.set_data_from_numpy(np.zeros((1, 3), dtype=np.int32))
        client.async_stream_infer("identity", [bad], request_id="bad")
        received = {}
        errors = []
        for _ in range(9):
            result, error = results.get(timeout=10)
            if error is not None:
                errors.append(error)
            else:
                response = result.get_response()
                received[response.id] = result.as_numpy("OUTPUT0")
    finally:
        client.stop_stream()
    assert set(received) == set(sent)
    for request_id, data in sent.items():
        np.testing.assert_array_equal(received[request_id], data)
    assert len(errors) == 1
    assert "input 'INPUT0'" in str(errors[0])
    assert "INT32" in str(errors[0])


async def test_aio_client(server) -> None:
    async with triton_aio.InferenceServerClient(server.address) as client:
        assert await client.is_server_live()
        assert await client.is_server_ready()
        assert (await client.get_model_metadata("identity")).name == "identity"
        assert (await client.get_model_config("identity")).config.max_batch_size == 1024
        data = np.arange(12, dtype=np.float32).reshape(3, 4)
        tensor = triton_aio.InferInput("INPUT0", [3, 4], "FP32")
        tensor.set_data_from_numpy(data)
        result = await client.infer("identity", [tensor])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)
        stats = await client.get_inference_statistics("identity")
        assert stats.model_stats[0].inference_count >= 3


async def test_aio_stream(server) -> None:
    async def requests():
        for index in range(5):
            data = np.full((2, 2), index, dtype=np.float32)
            tensor = triton_aio.InferInput("INPUT0", [2, 2], "FP32")
            tensor.set_data_from_numpy(data)
            yield {"model_name": "identity", "inputs": [tensor], "request_id": str(index)}

    async with triton_aio.InferenceServerClient(server.address) as client:
        seen = set()
        async for result, error in client.stream_infer(requests()):
            assert error is None
            request_id = result.get_response().id
            np.testing.assert_array_equal(
                result.as_numpy("OUTPUT0"), np.full((2, 2), int(request_id), dtype=np.float32)
            )
            seen.add(request_id)
            if len(seen) == 5:
                break
    assert seen == {"0", "1", "2", "3", "4"}


def test_unknown_model_is_not_found(server) -> None:
    client = triton.InferenceServerClient(server.address)
    with pytest.raises(InferenceServerException) as raised:
        client.get_model_metadata("no_such_model")
    assert raised.value.status() == "StatusCode.NOT_FOUND"
    assert "no_such_model" in raised.value.message()
