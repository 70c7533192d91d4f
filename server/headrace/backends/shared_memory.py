"""Shared memory for large tensors between Headrace and a Triton on the same host.

A request whose largest input holds at least `shared_memory.min_tensor_bytes` is written into
one region (all its inputs, then room for its outputs, each at a 64-byte aligned offset): one
copy from the request's arrays. Triton reads the inputs from the region and writes the outputs
into it (request parameters `shared_memory_region`, `shared_memory_byte_size`,
`shared_memory_offset`), so neither crosses the gRPC connection. The outputs are copied out of
the region before it goes back to the pool: the response then outlives the call freely (the
batcher splits it, the front end encodes it later), and the copy costs what decoding the bytes
would have cost.

Regions live in a `SharedMemoryPool`, one per model and endpoint: created and registered with
that Triton when first needed, reused through a free list keyed by size class (powers of two,
at least 64 KiB), bounded by `shared_memory.pool_bytes` (free regions of other classes are
evicted to make room), unregistered and removed at backend stop. A request that finds no room,
or a model without shared memory for that endpoint, goes as bytes; a failed registration turns
shared memory off for the endpoint, with a warning.

System regions are files in /dev/shm (where Linux's shm_open puts them) created and mapped with
`os.open` + `mmap` rather than `multiprocessing.shared_memory.SharedMemory`: the latter (before
Python 3.13) registers every segment with the resource tracker, a hidden process that unlinks
"leaked" segments and warns at exit; here the pool alone owns the regions' lifetime.

The seam for CUDA shared memory: a `RegionAllocator` creates, registers, unregisters and
destroys regions, and a `Region` writes arrays in and reads arrays out at offsets. The pool and
the request layout never touch memory or RPCs themselves. A CUDA allocator (the `gpu` extra,
with cupy) would allocate device memory, register it with `CudaSharedMemoryRegister` (its IPC
handle from `cupy.cuda.runtime.ipcGetMemHandle`, device id, byte size) and unregister with
`CudaSharedMemoryUnregister`; its regions copy host arrays to the device and back. The request
parameters are the same for both kinds, so nothing else changes.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import mmap
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
import numpy as np

from headrace.config import SharedMemorySettings
from headrace.errors import ModelExecutionError
from headrace.inference import InferenceRequest, InferenceResponse
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol import grpc_service_pb2_grpc as pb_grpc
from headrace.protocol.converters import (
    parameter_to_proto,
    parameters_from_proto,
    response_from_proto,
)
from headrace.protocol.datatypes import DATATYPES, Datatype, datatype_of
from headrace.spec import ModelSpec

SYSTEM_SHARED_MEMORY = Path("/dev/shm")
MIN_REGION_BYTES = 64 * 1024
ALIGNMENT_BYTES = 64
REGISTRATION_TIMEOUT_S = 10.0

_logger = logging.getLogger(__name__)


class Region(Protocol):
    """A block of memory Triton can read inputs from and write outputs to."""

    name: str
    """The region's name in requests (`shared_memory_region`) and on Triton."""
    byte_size: int

    def write(self, offset: int, array: np.ndarray, datatype: Datatype) -> None:
        """Copy `array` into the region at `offset`, as `datatype` (little-endian)."""

    def read(self, offset: int, datatype: Datatype, shape: tuple[int, ...]) -> np.ndarray:
        """A copy of the tensor at `offset`."""


class RegionAllocator(Protocol):
    """Creates regions of one kind (system, CUDA) and registers them with one Triton."""

    def create(self, name: str, byte_size: int) -> Region: ...

    async def register(self, stub: pb_grpc.GRPCInferenceServiceAsyncStub, region: Region) -> None:
        """Raises grpc.aio.AioRpcError: Triton refused or did not answer."""

    async def unregister(
        self, stub: pb_grpc.GRPCInferenceServiceAsyncStub, region: Region
    ) -> None: ...

    def destroy(self, region: Region) -> None: ...


class SystemRegion:
    """A POSIX shared-memory segment (/dev/shm/NAME), mapped into this process."""

    __slots__ = ("_memory", "byte_size", "name", "path")

    def __init__(self, name: str, byte_size: int) -> None:
        self.name = name
        self.byte_size = byte_size
        self.path = SYSTEM_SHARED_MEMORY / name
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(descriptor, byte_size)
            self._memory = mmap.mmap(descriptor, byte_size)
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        finally:
            os.close(descriptor)  # the mapping keeps the segment

    @property
    def key(self) -> str:
        """What Triton passes to shm_open."""
        return f"/{self.name}"

    def write(self, offset: int, array: np.ndarray, datatype: Datatype) -> None:
        target = np.ndarray(array.shape, datatype.dtype, buffer=self._memory, offset=offset)
        np.copyto(target, array, casting="unsafe")
        del target  # no view may outlive the call: close() needs none left

    def read(self, offset: int, datatype: Datatype, shape: tuple[int, ...]) -> np.ndarray:
        return np.ndarray(shape, datatype.dtype, buffer=self._memory, offset=offset).copy()

    def close(self) -> None:
        self._memory.close()
        self.path.unlink(missing_ok=True)


class SystemSharedMemory:
    """`RegionAllocator` for system shared memory (Triton's SystemSharedMemory* methods)."""

    def create(self, name: str, byte_size: int) -> Region:
        return SystemRegion(name, byte_size)

    async def register(self, stub: pb_grpc.GRPCInferenceServiceAsyncStub, region: Region) -> None:
        assert isinstance(region, SystemRegion)
        await stub.SystemSharedMemoryRegister(
            pb.SystemSharedMemoryRegisterRequest(
                name=region.name, key=region.key, offset=0, byte_size=region.byte_size
            ),
            timeout=REGISTRATION_TIMEOUT_S,
        )

    async def unregister(self, stub: pb_grpc.GRPCInferenceServiceAsyncStub, region: Region) -> None:
        await stub.SystemSharedMemoryUnregister(
            pb.SystemSharedMemoryUnregisterRequest(name=region.name),
            timeout=REGISTRATION_TIMEOUT_S,
        )

    def destroy(self, region: Region) -> None:
        assert isinstance(region, SystemRegion)
        region.close()


def size_class(byte_size: int) -> int:
    """The region size that serves `byte_size`: the next power of two, at least 64 KiB."""
    return max(MIN_REGION_BYTES, 1 << max(0, byte_size - 1).bit_length())


class SharedMemoryPool:
    """The regions of one model on one endpoint. Used from the event loop only."""

    def __init__(
        self,
        allocator: RegionAllocator,
        stub: pb_grpc.GRPCInferenceServiceAsyncStub,
        *,
        address: str,
        prefix: str,
        capacity_bytes: int,
    ) -> None:
        self.address = address
        self.capacity_bytes = capacity_bytes
        self.enabled = True
        """False once a registration failed: the endpoint cannot see our regions."""
        self._allocator = allocator
        self._stub = stub
        self._prefix = prefix
        self._numbers = itertools.count()
        self._free: dict[int, list[Region]] = {}
        self._regions: dict[str, Region] = {}
        self._registered: set[str] = set()
        self.reserved_bytes = 0
        """Bytes of every region, in use or free, plus those being created."""
        self.registrations = 0
        """Regions registered with Triton so far."""
        self.reuses = 0
        """Acquisitions served from the free list."""
        self.exhausted = 0
        """Acquisitions refused for want of room (the request went as bytes)."""

    @property
    def regions(self) -> int:
        return len(self._regions)

    async def acquire(self, byte_size: int) -> Region | None:
        """A registered region of at least `byte_size` bytes, or None: use bytes instead."""
        if not self.enabled:
            return None
        wanted = size_class(byte_size)
        free = self._free.get(wanted)
        region = free.pop() if free else None
        if region is None:
            if not await self._make_room(wanted):
                self.exhausted += 1
                return None
            self.reserved_bytes += wanted
            try:
                region = self._allocator.create(f"{self._prefix}{next(self._numbers)}", wanted)
            except BaseException:
                self.reserved_bytes -= wanted
                raise
            self._regions[region.name] = region
        else:
            self.reuses += 1
        if region.name not in self._registered:
            try:
                await self._allocator.register(self._stub, region)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.ALREADY_EXISTS:  # ours from before: fine
                    self._discard(region)
                    if exc.code() not in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                    ):
                        self.enabled = False
                        _logger.warning(
                            "shared memory off for %s: registering region %s failed (%s: %s); "
                            "tensors go as bytes",
                            self.address,
                            region.name,
                            exc.code().name,
                            exc.details(),
                        )
                    return None
            except BaseException:
                self._discard(region)
                raise
            self._registered.add(region.name)
            self.registrations += 1
        return region

    def release(self, region: Region) -> None:
        """Return a region taken with `acquire`; it serves later requests of its size class."""
        if region.name in self._regions:
            self._free.setdefault(region.byte_size, []).append(region)

    def forget_registrations(self) -> None:
        """The endpoint may have restarted: register regions again before their next use."""
        self._registered.clear()

    async def close(self) -> None:
        """Unregister every region (best effort: Triton may be gone) and remove it."""
        regions = list(self._regions.values())
        for region in regions:
            if region.name in self._registered:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await self._allocator.unregister(self._stub, region)
            self._discard(region)
        self.enabled = False

    async def _make_room(self, byte_size: int) -> bool:
        if byte_size > self.capacity_bytes:
            return False
        while self.reserved_bytes + byte_size > self.capacity_bytes:
            victims = [free for free in self._free.values() if free]
            if not victims:
                return False
            region = victims[0].pop()
            if region.name in self._registered:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await self._allocator.unregister(self._stub, region)
            self._discard(region)
        return True

    def _discard(self, region: Region) -> None:
        if self._regions.pop(region.name, None) is None:
            return
        self._registered.discard(region.name)
        self.reserved_bytes -= region.byte_size
        self._allocator.destroy(region)


@dataclass(frozen=True, slots=True)
class _Placement:
    name: str
    datatype: Datatype
    offset: int
    byte_size: int


def _aligned(offset: int) -> int:
    return -(-offset // ALIGNMENT_BYTES) * ALIGNMENT_BYTES


class SharedMemoryLayout:
    """Where one request's tensors go in a region, or None from `plan` when it goes as bytes."""

    __slots__ = ("byte_size", "inputs", "outputs")

    def __init__(self, inputs: list[_Placement], outputs: list[_Placement], byte_size: int):
        self.inputs = inputs
        self.outputs = outputs
        self.byte_size = byte_size

    @classmethod
    def plan(
        cls, spec: ModelSpec, request: InferenceRequest, settings: SharedMemorySettings
    ) -> SharedMemoryLayout | None:
        """A layout when the request is large enough and every tensor has a fixed-width type;
        outputs get room when their size is known (fixed dims, or `max_output_bytes`)."""
        arrays = request.inputs
        if not arrays or max(a.nbytes for a in arrays.values()) < settings.min_tensor_bytes:
            return None
        offset = 0
        inputs = []
        for name, array in arrays.items():
            datatype = datatype_of(array)
            if datatype is None or not datatype.itemsize:
                return None  # BYTES (variable width) or an unknown dtype: the bytes path
            size = array.size * datatype.itemsize
            inputs.append(_Placement(name, datatype, offset, size))
            offset = _aligned(offset + size)
        outputs: list[_Placement] = []
        batch = next(iter(arrays.values())).shape[:1] if spec.max_batch_size > 0 else ()
        for tensor in spec.outputs:
            itemsize = tensor.datatype.itemsize
            if not itemsize:
                outputs = []
                break
            if -1 in tensor.dims:
                if settings.max_output_bytes is None:
                    outputs = []
                    break
                size = settings.max_output_bytes
            else:
                size = math.prod((*batch, *tensor.dims)) * itemsize
            outputs.append(_Placement(tensor.name, tensor.datatype, offset, size))
            offset = _aligned(offset + size)
        byte_size = offset
        if not outputs:  # inputs only: the region ends after the last one
            byte_size = inputs[-1].offset + inputs[-1].byte_size
        return cls(inputs, outputs, max(1, byte_size))

    def write(self, region: Region, request: InferenceRequest) -> None:
        """Copy the request's inputs into `region`."""
        for placement in self.inputs:
            region.write(placement.offset, request.inputs[placement.name], placement.datatype)

    def message(
        self, region: Region, request: InferenceRequest, model_name: str, model_version: str
    ) -> pb.ModelInferRequest:
        """The request for Triton: inputs in `region`, no raw contents; outputs into it."""
        message = pb.ModelInferRequest(
            model_name=model_name, model_version=model_version, id=request.id
        )
        for placement in self.inputs:
            tensor = message.inputs.add(
                name=placement.name,
                datatype=placement.datatype.name,
                shape=request.inputs[placement.name].shape,
            )
            _point_at(tensor.parameters, region, placement)
        for placement in self.outputs:
            _point_at(message.outputs.add(name=placement.name).parameters, region, placement)
        for key, value in request.parameters.items():
            message.parameters[key].CopyFrom(parameter_to_proto(value))
        return message

    def response(self, region: Region, reply: pb.ModelInferResponse) -> InferenceResponse:
        """Triton's response with the outputs it wrote into `region` copied out of it.

        Raises:
            ModelExecutionError (INTERNAL): an output Triton names is not where it was asked
                to be, or larger than its room.
        """
        if not self.outputs:
            return response_from_proto(reply)
        placements = {placement.name: placement for placement in self.outputs}
        outputs: dict[str, np.ndarray] = {}
        for tensor in reply.outputs:
            placement = placements.get(tensor.name)
            datatype = DATATYPES.get(tensor.datatype)
            shape = tuple(tensor.shape)
            if placement is None or datatype is None or not datatype.itemsize:
                raise ModelExecutionError(
                    f"model '{reply.model_name}' answered output '{tensor.name}' "
                    f"({tensor.datatype}) that was not asked for in shared memory"
                )
            size = math.prod(shape) * datatype.itemsize
            if size > placement.byte_size:
                raise ModelExecutionError(
                    f"model '{reply.model_name}': output '{tensor.name}' of {size} bytes "
                    f"exceeds its {placement.byte_size} bytes of shared memory"
                )
            outputs[tensor.name] = region.read(placement.offset, datatype, shape)
        return InferenceResponse(
            model_name=reply.model_name,
            model_version=reply.model_version,
            id=reply.id,
            outputs=outputs,
            parameters=parameters_from_proto(reply.parameters) if reply.parameters else {},
        )


def _point_at(
    parameters: Mapping[str, pb.InferParameter], region: Region, placement: _Placement
) -> None:
    parameters["shared_memory_region"].string_param = region.name
    parameters["shared_memory_byte_size"].int64_param = placement.byte_size
    if placement.offset:
        parameters["shared_memory_offset"].int64_param = placement.offset


def leftover_regions(prefix: str) -> Iterable[Path]:
    """Segments in /dev/shm whose names start with `prefix` (tests, clean-up checks)."""
    return sorted(SYSTEM_SHARED_MEMORY.glob(f"{prefix}*"))


__all__ = [
    "Region",
    "RegionAllocator",
    "SharedMemoryLayout",
    "SharedMemoryPool",
    "SystemRegion",
    "SystemSharedMemory",
    "leftover_regions",
    "size_class",
]
