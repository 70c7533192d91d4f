"""Tensor and parameter translation, without a server."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from headrace.errors import InvalidArgumentError, ModelExecutionError
from headrace.inference import InferenceResponse
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol.converters import (
    decode_bytes_elements,
    encode_bytes_elements,
    parameters_from_proto,
    request_from_proto,
    response_from_proto,
    response_to_proto,
)
from headrace.protocol.datatypes import DATATYPES, datatype_of


def _raw_request(datatype: str, shape: list[int], raw: bytes) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="m",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="X", datatype=datatype, shape=shape)],
        raw_input_contents=[raw],
    )


def test_raw_contents_decode_to_a_read_only_view() -> None:
    data = np.arange(12, dtype="<f4").reshape(3, 4)
    message = _raw_request("FP32", [3, 4], data.tobytes())
    array = request_from_proto(message).inputs["X"]
    np.testing.assert_array_equal(array, data)
    assert not array.flags.writeable
    assert not array.flags.owndata  # a view of the wire bytes, not a copy
    root = array
    while isinstance(root, np.ndarray):
        root = root.base
    assert isinstance(root, bytes)


@pytest.mark.parametrize("datatype", [name for name in DATATYPES if name != "BYTES"])
def test_every_fixed_size_datatype_round_trips(datatype: str) -> None:
    dtype = DATATYPES[datatype].dtype
    data = (np.arange(6) % 2).astype(dtype).reshape(2, 3)
    request = request_from_proto(_raw_request(datatype, [2, 3], data.tobytes()))
    array = request.inputs["X"]
    assert datatype_of(array) is DATATYPES[datatype]
    message = response_to_proto(InferenceResponse("m", "1", "", {"Y": array}))
    assert message.outputs[0].datatype == datatype
    assert list(message.outputs[0].shape) == [2, 3]
    assert message.raw_output_contents[0] == data.tobytes()


def test_big_endian_outputs_are_sent_little_endian() -> None:
    data = np.array([1.5, -2.0], dtype=">f4")
    message = response_to_proto(InferenceResponse("m", "1", "", {"Y": data}))
    assert message.outputs[0].datatype == "FP32"
    assert message.raw_output_contents[0] == data.astype("<f4").tobytes()


def test_bytes_elements_round_trip() -> None:
    elements = np.array([b"", b"abc", bytes(range(256))], dtype=object)
    raw = encode_bytes_elements(elements)
    assert raw[:4] == b"\x00\x00\x00\x00"
    assert decode_bytes_elements("X", raw, 3).tolist() == elements.tolist()


def test_bytes_outputs_accept_str_and_fixed_width() -> None:
    text = np.array(["né", "b"], dtype=object)
    assert encode_bytes_elements(text) == b"\x03\x00\x00\x00n\xc3\xa9\x01\x00\x00\x00b"
    fixed = np.array([b"ab", b"c"])
    message = response_to_proto(InferenceResponse("m", "1", "", {"Y": fixed}))
    assert message.outputs[0].datatype == "BYTES"
    assert message.raw_output_contents[0] == b"\x02\x00\x00\x00ab\x01\x00\x00\x00c"


def test_bytes_output_of_wrong_type() -> None:
    with pytest.raises(ModelExecutionError, match="of type int is not bytes or str"):
        encode_bytes_elements(np.array([1, b"x"], dtype=object))


def test_output_without_protocol_datatype() -> None:
    with pytest.raises(ModelExecutionError, match="output 'Y' has numpy dtype complex64"):
        response_to_proto(InferenceResponse("m", "1", "", {"Y": np.zeros(2, np.complex64)}))


def test_bytes_count_mismatch() -> None:
    raw = encode_bytes_elements(np.array([b"abcdefgh"], dtype=object))
    with pytest.raises(InvalidArgumentError, match="end after 1 of 2 elements"):
        decode_bytes_elements("X", raw, 2)


def test_bytes_shape_beyond_the_contents_is_refused_before_allocating() -> None:
    """Found by fuzzing: a shape of 2**40 BYTES elements with no contents made the decoder
    allocate an object array for all of them."""
    with pytest.raises(InvalidArgumentError, match="hold 0 bytes, too few for the 1099511627776"):
        request_from_proto(_raw_request("BYTES", [1, 2**40], b""))


@pytest.mark.parametrize("datatype", ["FP32", "BYTES", "FP64"])
def test_unrepresentable_zero_sized_shapes_are_invalid(datatype: str) -> None:
    """Found by fuzzing: numpy refuses [0, 2**62] even with no elements."""
    with pytest.raises(
        InvalidArgumentError, match=r"input 'X' has shape \[1, 0, 4611686018427387904\]"
    ):
        request_from_proto(_raw_request(datatype, [1, 0, 2**62], b""))


def test_zero_sized_tensors() -> None:
    request = request_from_proto(_raw_request("INT64", [0, 3], b""))
    assert request.inputs["X"].shape == (0, 3)
    request = request_from_proto(_raw_request("BYTES", [2, 0], b""))
    assert request.inputs["X"].shape == (2, 0)


def test_typed_uint_range_is_checked() -> None:
    message = pb.ModelInferRequest(
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="X",
                datatype="UINT8",
                shape=[2],
                contents=pb.InferTensorContents(uint_contents=[255, 256]),
            )
        ]
    )
    with pytest.raises(InvalidArgumentError, match=r"outside the range of UINT8 \[0, 255\]"):
        request_from_proto(message)


def test_bf16_raw_values() -> None:
    data = np.array([1.0, -0.5, 3.0e38], dtype=ml_dtypes.bfloat16)
    request = request_from_proto(_raw_request("BF16", [3], data.tobytes()))
    assert request.inputs["X"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(request.inputs["X"].astype(np.float32), data.astype(np.float32))


def test_parameters_both_ways() -> None:
    message = pb.ModelInferRequest(id="7")
    message.parameters["priority"].uint64_param = 2
    message.parameters["timeout"].int64_param = 5000
    message.parameters["tag"].string_param = "a"
    message.parameters["sampled"].bool_param = True
    message.parameters["weight"].double_param = 0.5
    request = request_from_proto(message)
    assert request.parameters == {
        "priority": 2,
        "timeout": 5000,
        "tag": "a",
        "sampled": True,
        "weight": 0.5,
    }
    reply = response_to_proto(
        InferenceResponse("m", "1", "7", {}, parameters={"big": 2**63, "n": -1, "ok": False})
    )
    assert parameters_from_proto(reply.parameters) == {"big": 2**63, "n": -1, "ok": False}
    assert reply.parameters["big"].WhichOneof("parameter_choice") == "uint64_param"


def test_requested_outputs_filter_keeps_order() -> None:
    outputs = {name: np.zeros(1, np.float32) for name in ("A", "B", "C")}
    message = response_to_proto(InferenceResponse("m", "1", "", outputs), ("C", "A"))
    assert [output.name for output in message.outputs] == ["A", "C"]
    assert len(message.raw_output_contents) == 2


@pytest.mark.parametrize("datatype", ["BYTES", "FP32"])
def test_response_with_a_negative_dimension_is_malformed(datatype: str) -> None:
    """Found by comparing capture conversions: a BYTES output of shape [-1, 4] made decoding
    fail with numpy's ValueError instead of the malformed-response error."""
    message = pb.ModelInferResponse(
        model_name="m",
        outputs=[
            pb.ModelInferResponse.InferOutputTensor(name="Y", datatype=datatype, shape=[-1, 4])
        ],
        raw_output_contents=[b"\x00" * 16],
    )
    with pytest.raises(
        ModelExecutionError, match=r"output 'Y' has shape \[-1, 4\]; dimensions must be >= 0"
    ):
        response_from_proto(message)
