"""Per-model drop and hash rules applied to records before they are stored."""

from __future__ import annotations

import hashlib

import numpy as np

from headrace.capture.record import CaptureRecord
from headrace.capture.rules import CaptureRules
from headrace.config import ModelCaptureSettings
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol.converters import decode_bytes_elements, encode_bytes_elements

SALT = b"pepper"


def digest(value: bytes) -> str:
    return hashlib.sha256(SALT + value).hexdigest()


def tensor(name: str, datatype: str, shape: list[int]) -> pb.ModelInferRequest.InferInputTensor:
    return pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)


def make_record() -> CaptureRecord:
    request = pb.ModelInferRequest(
        model_name="m",
        inputs=[tensor("TEXT", "BYTES", [1, 2]), tensor("IMAGE", "UINT8", [1, 4])],
        raw_input_contents=[
            encode_bytes_elements(np.array([b"alice@example.com", b"bob"], dtype=object)),
            bytes([1, 2, 3, 4]),
        ],
        parameters={"customer": pb.InferParameter(string_param="c-42")},
    )
    response = pb.ModelInferResponse(
        model_name="m",
        outputs=[
            pb.ModelInferResponse.InferOutputTensor(name="SCORE", datatype="FP32", shape=[1]),
            pb.ModelInferResponse.InferOutputTensor(name="EMBEDDING", datatype="FP32", shape=[1]),
        ],
        raw_output_contents=[b"\0\0\x80?", b"\0\0\0@"],
    )
    return CaptureRecord(
        request_id="r",
        model="m",
        version="1",
        received_ns=1,
        responded_ns=2,
        latency_ns=1,
        status_code=0,
        status_message="",
        request=request.SerializeToString(),
        response=response.SerializeToString(),
        headers={"x-user": "alice", "x-tenant": "acme"},
        parameters={"customer": "c-42"},
    )


def test_no_rules_leave_the_record_as_it_is() -> None:
    record = make_record()
    assert CaptureRules(ModelCaptureSettings(), SALT).apply(record) is record


def test_dropped_tensors_are_gone_with_their_contents() -> None:
    rules = CaptureRules(ModelCaptureSettings(drop=("inputs.IMAGE", "outputs.EMBEDDING")), SALT)
    record = rules.apply(make_record())
    request = pb.ModelInferRequest.FromString(record.request)
    response = pb.ModelInferResponse.FromString(record.response)
    assert [t.name for t in request.inputs] == ["TEXT"]
    assert len(request.raw_input_contents) == 1
    assert [t.name for t in response.outputs] == ["SCORE"]
    assert list(response.raw_output_contents) == [b"\0\0\x80?"]


def test_hashed_values_are_salted_sha256_everywhere_they_appear() -> None:
    rules = CaptureRules(
        ModelCaptureSettings(hash=("headers.X-User", "parameters.customer", "inputs.TEXT")), SALT
    )
    record = rules.apply(make_record())
    assert record.headers == {"x-user": digest(b"alice"), "x-tenant": "acme"}
    assert record.parameters == {"customer": digest(b"c-42")}
    request = pb.ModelInferRequest.FromString(record.request)
    assert request.parameters["customer"].string_param == digest(b"c-42")
    text = decode_bytes_elements("TEXT", request.raw_input_contents[0], 2)
    assert text.tolist() == [digest(b"alice@example.com").encode(), digest(b"bob").encode()]
    assert request.raw_input_contents[1] == bytes([1, 2, 3, 4])  # not named: untouched


def test_typed_bytes_contents_are_hashed_too() -> None:
    request = pb.ModelInferRequest(
        model_name="m",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="TEXT",
                datatype="BYTES",
                shape=[1],
                contents=pb.InferTensorContents(bytes_contents=[b"secret"]),
            )
        ],
    )
    record = CaptureRecord("r", "m", "1", 1, 2, 1, 0, "", request.SerializeToString())
    hashed = CaptureRules(ModelCaptureSettings(hash=("inputs.TEXT",)), SALT).apply(record)
    contents = pb.ModelInferRequest.FromString(hashed.request).inputs[0].contents
    assert list(contents.bytes_contents) == [digest(b"secret").encode()]
