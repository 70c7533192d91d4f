"""Bad input gets a precise status naming the field, and the server keeps serving."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol import grpc_service_pb2_grpc as pb_grpc

INFER = "/inference.GRPCInferenceService/ModelInfer"


def _request(model: str = "identity", **fields) -> pb.ModelInferRequest:
    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    defaults = {
        "model_name": model,
        "inputs": [
            pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="FP32", shape=[2, 3])
        ],
        "raw_input_contents": [data.tobytes()],
    }
    defaults.update(fields)
    return pb.ModelInferRequest(**defaults)


def _tensor(name: str = "INPUT0", datatype: str = "FP32", shape=(2, 3)):
    return pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _assert_still_serving(stub) -> None:
    response = stub.ModelInfer(_request())
    assert np.frombuffer(response.raw_output_contents[0], dtype="<f4").tolist() == [
        0,
        1,
        2,
        3,
        4,
        5,
    ]


CASES = {
    "raw length": (
        _request(raw_input_contents=[b"\x00" * 20]),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input 'INPUT0'", "20 bytes", "needs 24"],
    ),
    "shape vs declared": (
        _request(model="fixed", inputs=[_tensor(shape=(3, 2))]),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input 'INPUT0'", "shape [3,2]", "expects [2,3]"],
    ),
    "rank vs declared": (
        _request(inputs=[_tensor(shape=(6,))], raw_input_contents=[b"\x00" * 24]),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input 'INPUT0'", "shape [6]", "expects [-1,-1]"],
    ),
    "batch too large": (
        _request(
            model="echo_fp32",
            inputs=[_tensor(shape=(9, 1))],
            raw_input_contents=[b"\x00" * 36],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input 'INPUT0'", "batch size 9", "1 to 8"],
    ),
    "unknown input": (
        _request(inputs=[_tensor(name="INPUT9")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["unexpected input 'INPUT9'", "'INPUT0'"],
    ),
    "missing input": (
        pb.ModelInferRequest(
            model_name="add_sub",
            inputs=[_tensor(datatype="INT32", shape=(16,))],
            raw_input_contents=[b"\x00" * 64],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["missing input 'INPUT1'", "'add_sub'"],
    ),
    "datatype mismatch": (
        _request(inputs=[_tensor(datatype="INT32")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input 'INPUT0'", "datatype INT32", "expects FP32"],
    ),
    "unknown datatype": (
        _request(inputs=[_tensor(datatype="FP8")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input 'INPUT0'", "unknown datatype 'FP8'"],
    ),
    "negative dimension": (
        _request(inputs=[_tensor(shape=(2, -3))]),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input 'INPUT0'", "dimensions must be >= 0"],
    ),
    "raw count vs inputs": (
        _request(raw_input_contents=[b"\x00" * 24, b"\x00" * 24]),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["raw_input_contents has 2 entries for 1 inputs"],
    ),
    "typed count vs shape": (
        pb.ModelInferRequest(
            model_name="identity",
            inputs=[
                pb.ModelInferRequest.InferInputTensor(
                    name="INPUT0",
                    datatype="FP32",
                    shape=[2, 3],
                    contents=pb.InferTensorContents(fp32_contents=[1, 2, 3]),
                )
            ],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["contents.fp32_contents of input 'INPUT0'", "hold 3 values", "needs 6"],
    ),
    "typed field vs datatype": (
        pb.ModelInferRequest(
            model_name="identity",
            inputs=[
                pb.ModelInferRequest.InferInputTensor(
                    name="INPUT0",
                    datatype="FP32",
                    shape=[1, 2],
                    contents=pb.InferTensorContents(fp32_contents=[1, 2], int_contents=[1]),
                )
            ],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input 'INPUT0'", "contents.int_contents", "use contents.fp32_contents"],
    ),
    "typed value out of range": (
        pb.ModelInferRequest(
            model_name="echo_int8",
            inputs=[
                pb.ModelInferRequest.InferInputTensor(
                    name="INPUT0",
                    datatype="INT8",
                    shape=[1, 2],
                    contents=pb.InferTensorContents(int_contents=[1, 300]),
                )
            ],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input 'INPUT0'", "outside the range of INT8"],
    ),
    "raw and typed": (
        _request(
            inputs=[
                pb.ModelInferRequest.InferInputTensor(
                    name="INPUT0",
                    datatype="FP32",
                    shape=[2, 3],
                    contents=pb.InferTensorContents(fp32_contents=[0] * 6),
                )
            ]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input 'INPUT0'", "both raw_input_contents and typed contents"],
    ),
    "bytes element overruns": (
        pb.ModelInferRequest(
            model_name="echo_bytes",
            inputs=[_tensor(datatype="BYTES", shape=(1, 2))],
            raw_input_contents=[b"\x02\x00\x00\x00ab\x09\x00\x00\x00abc"],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["BYTES input 'INPUT0'", "element 1 declares 9 bytes"],
    ),
    "bytes trailing": (
        pb.ModelInferRequest(
            model_name="echo_bytes",
            inputs=[_tensor(datatype="BYTES", shape=(1, 1))],
            raw_input_contents=[b"\x01\x00\x00\x00aXYZ"],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["BYTES input 'INPUT0'", "3 bytes after"],
    ),
    "duplicate input": (
        _request(inputs=[_tensor(), _tensor()], raw_input_contents=[b"\x00" * 24] * 2),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input 'INPUT0' appears more than once"],
    ),
    "inconsistent batch": (
        pb.ModelInferRequest(
            model_name="add_sub_batched",
            inputs=[_tensor(shape=(2, 1)), _tensor(name="INPUT1", shape=(3, 1))],
            raw_input_contents=[b"\x00" * 8, b"\x00" * 12],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input 'INPUT1'", "batch size 3", "input 'INPUT0' has 2"],
    ),
    "unknown requested output": (
        _request(outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="OUTPUT7")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["unknown requested output 'OUTPUT7'", "'OUTPUT0'"],
    ),
    "unknown model": (
        _request(model="no_such_model"),
        grpc.StatusCode.NOT_FOUND,
        ["unknown model 'no_such_model'"],
    ),
    "unknown version": (
        _request(model="scaled", model_version="7", inputs=[_tensor(shape=(2, 3))]),
        grpc.StatusCode.NOT_FOUND,
        ["model 'scaled' has no version '7'", "1, 2"],
    ),
    "no model name": (
        _request(model=""),
        grpc.StatusCode.NOT_FOUND,
        ["no model name"],
    ),
    "model raises": (
        _request(model="failing", inputs=[_tensor(shape=(2, 3))]),
        grpc.StatusCode.INTERNAL,
        ["model 'failing'", "ValueError: weights are corrupt"],
    ),
    "model breaks its signature": (
        _request(model="wrong_output", inputs=[_tensor(shape=(2, 3))]),
        grpc.StatusCode.INTERNAL,
        ["model 'wrong_output'", "BYTES for output 'OUTPUT0'", "declared FP32"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_error_status_names_the_field(stub, case: str) -> None:
    request, code, fragments = CASES[case]
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(request)
    assert raised.value.code() == code, raised.value.details()
    for fragment in fragments:
        assert fragment in raised.value.details()
    _assert_still_serving(stub)


MALFORMED = [
    pytest.param(b"\xff\xff\xff\xff", id="truncated varint"),
    pytest.param(b"\x0a\x64abc", id="length past end"),
    pytest.param(b"\x2a\x05\x0a\x03\xff\xfe\xfd", id="invalid utf-8 in nested string"),
    pytest.param(b"\x07", id="invalid wire type"),
]


@pytest.mark.parametrize("payload", MALFORMED)
def test_malformed_bytes_are_invalid_argument(server, stub, payload: bytes) -> None:
    with grpc.insecure_channel(server.address) as channel:
        raw = channel.unary_unary(INFER, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as raised:
            raw(payload)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid inference.ModelInferRequest" in raised.value.details()
    _assert_still_serving(stub)


def test_malformed_bytes_on_other_methods(server, stub) -> None:
    with grpc.insecure_channel(server.address) as channel:
        raw = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelMetadata",
            request_serializer=None,
            response_deserializer=None,
        )
        with pytest.raises(grpc.RpcError) as raised:
            raw(b"\x0a\x64abc")
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inference.ModelMetadataRequest" in raised.value.details()
    _assert_still_serving(stub)


def test_malformed_bytes_on_a_stream(server, stub) -> None:
    good = _request(id="good").SerializeToString()
    with grpc.insecure_channel(server.address) as channel:
        raw = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=None,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        replies = list(raw(iter([b"\xff\xff\xff", good])))
    errors = [r.error_message for r in replies if r.error_message]
    answered = [r.infer_response.id for r in replies if not r.error_message]
    assert len(errors) == 1
    assert "not a valid inference.ModelInferRequest" in errors[0]
    assert answered == ["good"]
    _assert_still_serving(stub)


@pytest.mark.parametrize(
    "method",
    # SystemSharedMemoryStatus is declared in Headrace's proto (it calls it on Triton) but not
    # served to Headrace's own clients.
    ["CudaSharedMemoryStatus", "SystemSharedMemoryStatus"],
)
def test_unimplemented_triton_method(server, method: str) -> None:
    with grpc.insecure_channel(server.address) as channel:
        raw = channel.unary_unary(
            f"/inference.GRPCInferenceService/{method}",
            request_serializer=None,
            response_deserializer=None,
        )
        with pytest.raises(grpc.RpcError) as raised:
            raw(b"")
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
