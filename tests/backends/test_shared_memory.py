"""Large tensors through system shared memory between Headrace and a real tritonserver on this
host: the same answers as the bytes path, regions registered once and reused, fallback to bytes
when the pool is full or the tensors are small, and nothing left in /dev/shm after stop."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from headrace.backends.shared_memory import (
    SharedMemoryLayout,
    SharedMemoryPool,
    leftover_regions,
    size_class,
)
from headrace.backends.triton import TritonBackend
from headrace.config import Settings, SharedMemorySettings
from headrace.inference import InferenceRequest
from headrace.launchers.triton import TritonServer, example_repository
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol import grpc_service_pb2_grpc as pb_grpc
from headrace.protocol.datatypes import DATATYPES
from headrace.spec import ModelSpec, TensorSpec
from tests.conftest import ServerThread

MIB = 1024 * 1024
LARGE = (1, MIB // 4)  # 1 MiB of FP32 ...
HUGE = (1, MIB)  # ... and 4 MiB
SHARED = {"enabled": True, "min_tensor_bytes": 65536, "max_output_bytes": 4 * MIB}


@pytest.fixture(scope="module")
def triton_server() -> Iterator[TritonServer]:
    with TritonServer(example_repository()) as server:
        yield server


def _settings(triton_address: str, **shared: Any) -> Settings:
    def entry(name: str, shared_memory: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": name,
            "backend": "triton",
            "remote_name": "identity",
            "endpoints": [triton_address],
            "batching": {"enabled": False},
            "shared_memory": shared_memory,
        }

    return Settings.model_validate(
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "triton": {"startup_timeout_s": 60, "max_inflight_per_endpoint": 8},
            "models": [entry("shared", {**SHARED, **shared}), entry("bytes", {})],
        }
    )


@pytest.fixture(scope="module")
def gateway(triton_server: TritonServer) -> Iterator[ServerThread]:
    with ServerThread(_settings(triton_server.address)) as running:
        yield running


def _backend(gateway: ServerThread) -> TritonBackend:
    backend = gateway.application.repository.resolve("shared").backend
    assert isinstance(backend, TritonBackend)
    return backend


def _only_pool(gateway: ServerThread) -> SharedMemoryPool:
    (pool,) = _backend(gateway).shared_memory_pools("shared").values()
    return pool


def _request(model: str, data: np.ndarray) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=model,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="FP32", shape=data.shape)
        ],
        raw_input_contents=[data.astype("<f4").tobytes()],
    )


def _infer(address: str, model: str, data: np.ndarray) -> np.ndarray:
    options = [("grpc.max_receive_message_length", 64 * MIB)]
    with grpc.insecure_channel(address, options=options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        reply = stub.ModelInfer(_request(model, data), timeout=60)
    assert [tuple(output.shape) for output in reply.outputs] == [data.shape]
    return np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(data.shape)


def _triton_regions(triton_server: TritonServer) -> dict[str, int]:
    with grpc.insecure_channel(triton_server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        status = stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=10)
    return {name: region.byte_size for name, region in status.regions.items()}


def test_4_mib_tensor_through_shared_memory_equals_the_bytes_path(
    gateway: ServerThread, triton_server: TritonServer
) -> None:
    data = np.random.default_rng(5).standard_normal(HUGE, dtype=np.float32)
    shared = _infer(gateway.address, "shared", data)
    np.testing.assert_array_equal(shared, data)
    np.testing.assert_array_equal(shared, _infer(gateway.address, "bytes", data))
    pool = _only_pool(gateway)
    assert pool.registrations >= 1
    regions = _triton_regions(triton_server)
    prefix = _backend(gateway).shared_memory_prefix
    assert regions
    assert all(name.startswith(prefix) for name in regions)
    assert max(regions.values()) >= 2 * 4 * MIB  # the input and room for the output


def test_regions_are_registered_once_then_reused(
    gateway: ServerThread, triton_server: TritonServer
) -> None:
    data = np.full(LARGE, 3.5, dtype=np.float32)
    _infer(gateway.address, "shared", data)
    pool = _only_pool(gateway)
    registrations, reuses = pool.registrations, pool.reuses
    regions = _triton_regions(triton_server)
    for index in range(5):
        np.testing.assert_array_equal(_infer(gateway.address, "shared", data + index), data + index)
    assert pool.registrations == registrations
    assert pool.reuses >= reuses + 5
    assert _triton_regions(triton_server) == regions


def test_concurrent_large_requests_use_several_regions(gateway: ServerThread) -> None:
    rows = [np.full(LARGE, index, dtype=np.float32) for index in range(6)]
    results: dict[int, np.ndarray] = {}
    barrier = threading.Barrier(len(rows))

    def client(index: int) -> None:
        barrier.wait()
        for _ in range(3):
            results[index] = _infer(gateway.address, "shared", rows[index])

    threads = [threading.Thread(target=client, args=(index,)) for index in range(len(rows))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for index, row in enumerate(rows):
        np.testing.assert_array_equal(results[index], row)
    assert _only_pool(gateway).regions >= 2


def test_small_tensors_go_as_bytes(gateway: ServerThread) -> None:
    pool = _only_pool(gateway)
    before = (pool.registrations, pool.reuses, pool.exhausted)
    data = np.arange(1000, dtype=np.float32).reshape(1, 1000)  # 4000 bytes < 64 KiB
    np.testing.assert_array_equal(_infer(gateway.address, "shared", data), data)
    assert (pool.registrations, pool.reuses, pool.exhausted) == before


def test_exhausted_pool_falls_back_to_bytes(triton_server: TritonServer) -> None:
    # Room for one 1 MiB request (input and output: the 2 MiB class), none for 4 MiB.
    settings = _settings(triton_server.address, pool_bytes=2 * MIB, max_output_bytes=MIB)
    with ServerThread(settings) as gateway:
        data = np.random.default_rng(1).standard_normal(HUGE, dtype=np.float32)
        np.testing.assert_array_equal(_infer(gateway.address, "shared", data), data)
        pool = _only_pool(gateway)
        assert pool.exhausted == 1
        assert pool.regions == 0
        small = np.full(LARGE, 2.0, dtype=np.float32)
        np.testing.assert_array_equal(_infer(gateway.address, "shared", small), small)
        assert pool.regions == 1


def test_stop_unregisters_and_removes_every_region(triton_server: TritonServer) -> None:
    with ServerThread(_settings(triton_server.address)) as gateway:
        data = np.ones(LARGE, dtype=np.float32)
        _infer(gateway.address, "shared", data)
        prefix = _backend(gateway).shared_memory_prefix
        assert list(leftover_regions(prefix))
        assert any(name.startswith(prefix) for name in _triton_regions(triton_server))
    assert not list(leftover_regions(prefix))
    assert not any(name.startswith(prefix) for name in _triton_regions(triton_server))


def test_a_region_triton_cannot_open_turns_shared_memory_off(
    triton_server: TritonServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from headrace.backends import shared_memory

    real_key = shared_memory.SystemRegion.key
    monkeypatch.setattr(
        shared_memory.SystemRegion, "key", property(lambda region: real_key.fget(region) + "x")
    )
    with ServerThread(_settings(triton_server.address)) as gateway:
        data = np.full(LARGE, 7.0, dtype=np.float32)
        np.testing.assert_array_equal(_infer(gateway.address, "shared", data), data)
        pool = _only_pool(gateway)
        assert not pool.enabled
        assert pool.regions == 0
        np.testing.assert_array_equal(_infer(gateway.address, "shared", data), data)
        prefix = _backend(gateway).shared_memory_prefix
    assert not list(leftover_regions(prefix))


def test_layout_plans_outputs_of_fixed_dims_exactly() -> None:
    fp32 = DATATYPES["FP32"]
    spec = ModelSpec(
        name="m",
        version="1",
        platform="python",
        backend="triton",
        inputs=(TensorSpec("X", fp32, (-1,)),),
        outputs=(TensorSpec("Y", fp32, (3,)), TensorSpec("B", DATATYPES["BYTES"], (1,))),
        max_batch_size=8,
    )
    request = InferenceRequest("m", "1", "", {"X": np.zeros((2, 20000), np.float32)})
    settings = SharedMemorySettings(enabled=True)
    layout = SharedMemoryLayout.plan(spec, request, settings)
    assert layout is not None
    assert not layout.outputs
    fixed = dataclasses.replace(spec, outputs=spec.outputs[:1])
    layout = SharedMemoryLayout.plan(fixed, request, settings)
    assert layout is not None
    assert [(p.name, p.offset, p.byte_size) for p in layout.inputs] == [("X", 0, 160000)]
    assert [(p.name, p.offset, p.byte_size) for p in layout.outputs] == [("Y", 160000, 24)]
    small = InferenceRequest("m", "1", "", {"X": np.zeros((2, 10), np.float32)})
    assert SharedMemoryLayout.plan(fixed, small, settings) is None


def test_size_classes_are_powers_of_two_from_64_kib() -> None:
    assert size_class(1) == 64 * 1024
    assert size_class(64 * 1024 + 1) == 128 * 1024
    assert size_class(8 * MIB) == 8 * MIB
