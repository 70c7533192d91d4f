"""System shared memory from clients on the same host, through tritonclient's own utilities:
registration, inputs read from and outputs written to regions, and every error a client can
cause answered with a status naming the field."""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from headrace.frontend.shared_memory import SystemSharedMemoryRegistry
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol import grpc_service_pb2_grpc as pb_grpc
from headrace.protocol.converters import request_from_proto
from tests.conftest import ServerThread, make_settings

ELEMENTS = 1024
BYTE_SIZE = ELEMENTS * 4


def _key(label: str) -> str:
    return f"/headrace-test-{os.getpid()}-{label}"


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread(make_settings(**{"server.system_shared_memory": True})) as running:
        yield running


@pytest.fixture
def client(server: ServerThread) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(server.address)
    yield client
    client.unregister_system_shared_memory()
    client.close()


@pytest.fixture
def regions() -> Iterator[dict[str, object]]:
    handles = {
        "in": shm.create_shared_memory_region("in", _key("in"), BYTE_SIZE),
        "out": shm.create_shared_memory_region("out", _key("out"), BYTE_SIZE),
    }
    yield handles
    for handle in handles.values():
        shm.destroy_shared_memory_region(handle)


def _data(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, ELEMENTS)).astype(np.float32)


def test_inputs_and_outputs_through_regions(
    client: triton.InferenceServerClient, regions: dict[str, object]
) -> None:
    assert "system_shared_memory" in client.get_server_metadata().extensions
    client.register_system_shared_memory("in", _key("in"), BYTE_SIZE)
    client.register_system_shared_memory("out", _key("out"), BYTE_SIZE)
    status = client.get_system_shared_memory_status()
    assert {name: region.byte_size for name, region in status.regions.items()} == {
        "in": BYTE_SIZE,
        "out": BYTE_SIZE,
    }
    for seed in range(3):  # regions are reused across requests
        data = _data(seed)
        shm.set_shared_memory_region(regions["in"], [data])
        tensor = triton.InferInput("INPUT0", list(data.shape), "FP32")
        tensor.set_shared_memory("in", BYTE_SIZE)
        output = triton.InferRequestedOutput("OUTPUT0")
        output.set_shared_memory("out", BYTE_SIZE)
        result = client.infer("identity", [tensor], outputs=[output])
        answered = result.get_output("OUTPUT0")
        assert answered.parameters["shared_memory_region"].string_param == "out"
        assert list(answered.shape) == [1, ELEMENTS]
        assert not result.get_response().raw_output_contents
        written = shm.get_contents_as_numpy(regions["out"], np.float32, [1, ELEMENTS])
        np.testing.assert_array_equal(written, data)
    client.unregister_system_shared_memory("in")
    assert set(client.get_system_shared_memory_status().regions) == {"out"}


def test_input_in_a_region_output_in_the_message(
    client: triton.InferenceServerClient, regions: dict[str, object]
) -> None:
    data = _data(7)
    shm.set_shared_memory_region(regions["in"], [data], offset=0)
    client.register_system_shared_memory("half", _key("in"), BYTE_SIZE // 2, offset=BYTE_SIZE // 2)
    half = data[:, ELEMENTS // 2 :]
    shm.set_shared_memory_region(regions["in"], [np.ascontiguousarray(half)], offset=BYTE_SIZE // 2)
    tensor = triton.InferInput("INPUT0", list(half.shape), "FP32")
    tensor.set_shared_memory("half", BYTE_SIZE // 2)
    result = client.infer("identity", [tensor])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), half)


def _code(error: InferenceServerException) -> str:
    return str(error.status())


def test_registration_errors_name_the_field(
    client: triton.InferenceServerClient, regions: dict[str, object]
) -> None:
    with pytest.raises(InferenceServerException) as missing:
        client.register_system_shared_memory("x", _key("missing"), 64)
    assert "INVALID_ARGUMENT" in _code(missing.value)
    assert "'key'" in missing.value.message()
    with pytest.raises(InferenceServerException) as beyond:
        client.register_system_shared_memory("x", _key("in"), BYTE_SIZE, offset=8)
    assert "INVALID_ARGUMENT" in _code(beyond.value)
    assert "exceeds" in beyond.value.message()
    with pytest.raises(InferenceServerException) as escape:
        client.register_system_shared_memory("x", "/../etc/passwd", 8)
    assert "INVALID_ARGUMENT" in _code(escape.value)
    client.register_system_shared_memory("in", _key("in"), BYTE_SIZE)
    with pytest.raises(InferenceServerException) as twice:
        client.register_system_shared_memory("in", _key("in"), BYTE_SIZE)
    assert "ALREADY_EXISTS" in _code(twice.value)
    with pytest.raises(InferenceServerException) as unknown:
        client.get_system_shared_memory_status("nope")
    assert "INVALID_ARGUMENT" in _code(unknown.value)


def test_inference_errors_name_the_tensor(
    client: triton.InferenceServerClient, regions: dict[str, object]
) -> None:
    client.register_system_shared_memory("in", _key("in"), BYTE_SIZE)
    client.register_system_shared_memory("out", _key("out"), 16)
    data = _data(1)

    def infer(region: str, byte_size: int, output_region: str | None = None) -> None:
        tensor = triton.InferInput("INPUT0", list(data.shape), "FP32")
        tensor.set_shared_memory(region, byte_size)
        outputs = None
        if output_region is not None:
            output = triton.InferRequestedOutput("OUTPUT0")
            output.set_shared_memory(output_region, 16)
            outputs = [output]
        client.infer("identity", [tensor], outputs=outputs)

    cases = [
        (("nope", BYTE_SIZE), "input 'INPUT0'", "unable to find"),
        (("in", BYTE_SIZE - 4), "input 'INPUT0'", "shared_memory_byte_size"),
        (("in", BYTE_SIZE, "out"), "output 'OUTPUT0'", "shared_memory_byte_size"),
    ]
    for arguments, tensor, detail in cases:
        with pytest.raises(InferenceServerException) as error:
            infer(*arguments)  # type: ignore[arg-type]
        assert "INVALID_ARGUMENT" in _code(error.value)
        assert tensor in error.value.message()
        assert detail in error.value.message()
    infer("in", BYTE_SIZE)  # and the server goes on serving


def test_off_by_default_says_which_setting() -> None:
    with ServerThread(make_settings()) as server:
        client = triton.InferenceServerClient(server.address)
        try:
            assert "system_shared_memory" not in client.get_server_metadata().extensions
            with pytest.raises(InferenceServerException) as refused:
                client.register_system_shared_memory("x", _key("x"), 64)
            assert "UNIMPLEMENTED" in _code(refused.value)
            assert "server.system_shared_memory" in refused.value.message()
            tensor = triton.InferInput("INPUT0", [1, 4], "FP32")
            tensor.set_shared_memory("x", 16)
            with pytest.raises(InferenceServerException) as rejected:
                client.infer("identity", [tensor])
            assert "INVALID_ARGUMENT" in _code(rejected.value)
            assert "input 'INPUT0'" in rejected.value.message()
        finally:
            client.close()


def test_bytes_and_mixed_inputs_decode_from_a_region() -> None:
    """BYTES elements (length-prefixed) read from a region; raw contents of the other inputs
    keep their order when one input is in shared memory, as tritonclient sends them."""
    words = np.array([b"alpha", b"", b"\x00\xff"], dtype=object)
    serialized = b"".join(len(w).to_bytes(4, "little") + w for w in words)
    handle = shm.create_shared_memory_region("words", _key("words"), 64)
    registry = SystemSharedMemoryRegistry()
    try:
        shm.set_shared_memory_region(handle, [np.frombuffer(serialized, np.uint8)])
        registry.register("words", _key("words"), 0, 64)
        message = pb.ModelInferRequest(model_name="m")
        message.inputs.add(name="A", datatype="INT32", shape=[2])
        words_tensor = message.inputs.add(name="W", datatype="BYTES", shape=[3])
        words_tensor.parameters["shared_memory_region"].string_param = "words"
        words_tensor.parameters["shared_memory_byte_size"].int64_param = len(serialized)
        message.inputs.add(name="C", datatype="FP32", shape=[1])
        message.raw_input_contents.extend(
            [np.array([1, 2], "<i4").tobytes(), np.array([0.5], "<f4").tobytes()]
        )
        request = request_from_proto(message, registry)
        assert request.inputs["W"].tolist() == words.tolist()
        assert request.inputs["A"].tolist() == [1, 2]
        assert request.inputs["C"].tolist() == [0.5]
    finally:
        registry.close()
        shm.destroy_shared_memory_region(handle)


def test_raw_grpc_status_codes(server: ServerThread) -> None:
    """The same errors through a plain grpc stub: codes, not strings."""
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.SystemSharedMemoryRegister(
                pb.SystemSharedMemoryRegisterRequest(name="", key=_key("in"), byte_size=4)
            )
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "'name'" in (error.value.details() or "")
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="never"))
