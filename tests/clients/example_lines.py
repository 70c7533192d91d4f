"""What the Node and C++ examples must print: one JSON object per line (liveness, the metadata
of three models, one inference per model), every number equal to what the server reports and
the model computes."""

from __future__ import annotations

import base64
import json
from typing import Any

import grpc
import numpy as np

from headrace.examples.identity import Identity
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol import grpc_service_pb2_grpc as pb_grpc

MODELS = ("identity", "echo_int64", "echo_bytes")

# The examples' inputs: float32 values that decimal literals only approximate (0.1) and the
# extremes; int64 values a double cannot hold; BYTES that are empty, UTF-8, and not text at all.
EXPECTED_INPUTS: dict[str, np.ndarray] = {
    "identity": np.array(
        [0.1, -1.5, 3.25, 1e-8, -65504.125, np.finfo(np.float32).max], dtype=np.float32
    ).reshape(2, 3),
    "echo_int64": np.array(
        [0, -1, 2**53 + 1, np.iinfo(np.int64).min, np.iinfo(np.int64).max, 42], dtype=np.int64
    ).reshape(2, 3),
    "echo_bytes": np.array(
        [b"hello", b"", "grüße, 世界".encode(), b"\x00\xff\n"], dtype=np.object_
    ).reshape(2, 2),
}


def decode(tensor: dict[str, Any]) -> np.ndarray:
    """A printed tensor as numpy, checking that FP32 values are exactly float32 values."""
    shape = tensor["shape"]
    data = tensor["data"]
    if tensor["datatype"] == "FP32":
        widened = np.array(data, dtype=np.float64)
        narrowed = widened.astype(np.float32)
        assert np.array_equal(narrowed.astype(np.float64), widened), f"not float32: {data}"
        return narrowed.reshape(shape)
    if tensor["datatype"] == "INT64":
        assert all(type(value) is int for value in data), data
        return np.array(data, dtype=np.int64).reshape(shape)
    assert tensor["datatype"] == "BYTES", tensor["datatype"]
    elements = [base64.b64decode(value, validate=True) for value in data]
    return np.array(elements, dtype=np.object_).reshape(shape)


def check_example_output(stdout: str, address: str) -> None:
    """Every line the example printed, against the server's metadata and the model's output."""
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert [line["kind"] for line in lines] == ["live"] + ["metadata"] * 3 + ["infer"] * 3
    live, metadata, infers = lines[0], lines[1:4], lines[4:]
    assert live == {"kind": "live", "live": True}

    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for model, printed in zip(MODELS, metadata, strict=True):
            served = stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=10)
            assert printed == {
                "kind": "metadata",
                "name": served.name,
                "versions": list(served.versions),
                "platform": served.platform,
                "inputs": [_signature(tensor) for tensor in served.inputs],
                "outputs": [_signature(tensor) for tensor in served.outputs],
            }
    datatypes = {"identity": "FP32", "echo_int64": "INT64", "echo_bytes": "BYTES"}
    for model, printed in zip(MODELS, metadata, strict=True):
        signature = {"datatype": datatypes[model], "shape": [-1, -1]}
        assert printed["inputs"] == [{"name": "INPUT0", **signature}]
        assert printed["outputs"] == [{"name": "OUTPUT0", **signature}]

    for model, infer in zip(MODELS, infers, strict=True):
        assert infer["model"] == model
        (sent,) = infer["inputs"]
        inputs = decode(sent)
        expected_inputs = EXPECTED_INPUTS[model]
        assert sent["name"] == "INPUT0"
        assert sent["datatype"] == datatypes[model]
        assert sent["shape"] == list(expected_inputs.shape)
        assert inputs.tolist() == expected_inputs.tolist()
        computed = Identity()({"INPUT0": expected_inputs})
        assert [output["name"] for output in infer["outputs"]] == list(computed)
        for output in infer["outputs"]:
            value = computed[output["name"]]
            assert output["datatype"] == sent["datatype"]
            assert output["shape"] == list(value.shape)
            assert decode(output).tolist() == value.tolist()


def _signature(tensor: pb.ModelMetadataResponse.TensorMetadata) -> dict[str, Any]:
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
