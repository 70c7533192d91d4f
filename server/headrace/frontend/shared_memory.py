"""System shared memory that clients on the same host register with Headrace, as with Triton.

A client creates a POSIX shared-memory object (shm_open), registers part of it under a name
(`SystemSharedMemoryRegister`: name, key, offset, byte_size), then names the region in an
input's or requested output's parameters (`shared_memory_region`, `shared_memory_byte_size`,
`shared_memory_offset`) instead of sending tensor bytes: the inputs are read from the region and
the outputs written into it, so large tensors never cross gRPC. tritonclient's
`utils.shared_memory` works unchanged.

Inputs are copied out of the region when the request is decoded: the client may reuse or
unregister a region as soon as its answer arrives, and a batch may outlive neither. Used from
the event loop only.
"""

from __future__ import annotations

import mmap
import os
import stat
from pathlib import Path

from headrace.errors import AlreadyExistsError, InvalidArgumentError
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol.placement import BYTE_SIZE_PARAMETER, OFFSET_PARAMETER, Placement

SYSTEM_SHARED_MEMORY = Path("/dev/shm")


class _Region:
    __slots__ = ("byte_size", "key", "memory", "name", "offset")

    def __init__(self, name: str, key: str, offset: int, byte_size: int, memory: mmap.mmap):
        self.name = name
        self.key = key
        self.offset = offset
        self.byte_size = byte_size
        self.memory = memory


class SystemSharedMemoryRegistry:
    """The regions registered by clients, by name."""

    def __init__(self) -> None:
        self._regions: dict[str, _Region] = {}

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Map `byte_size` bytes at `offset` of the shared-memory object `key`.

        Raises:
            InvalidArgumentError (INVALID_ARGUMENT): empty name, a key that is not a shared
                memory object's name, a negative offset, a non-positive size, or a range
                beyond the object's end.
            AlreadyExistsError (ALREADY_EXISTS): a region by that name is registered.
        """
        if not name:
            raise InvalidArgumentError("shared memory region 'name' must not be empty")
        if name in self._regions:
            raise AlreadyExistsError(f"shared memory region '{name}' is already registered")
        object_name = key.removeprefix("/")
        if not object_name or "/" in object_name or object_name in (".", ".."):
            raise InvalidArgumentError(
                f"shared memory region '{name}': 'key' {key!r} is not a shared memory object "
                "name (expected '/NAME', as given to shm_open)"
            )
        if offset < 0 or byte_size <= 0:
            raise InvalidArgumentError(
                f"shared memory region '{name}': 'offset' must be >= 0 and 'byte_size' > 0 "
                f"(got offset {offset}, byte_size {byte_size})"
            )
        path = SYSTEM_SHARED_MEMORY / object_name
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as exc:
            raise InvalidArgumentError(
                f"shared memory region '{name}': cannot open 'key' {key!r}: {exc.strerror or exc}"
            ) from exc
        try:
            info = os.fstat(descriptor)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidArgumentError(
                    f"shared memory region '{name}': 'key' {key!r} is not a shared memory object"
                )
            if offset + byte_size > info.st_size:
                raise InvalidArgumentError(
                    f"shared memory region '{name}': 'offset' {offset} + 'byte_size' "
                    f"{byte_size} exceeds the {info.st_size} bytes of {key!r}"
                )
            memory = mmap.mmap(descriptor, offset + byte_size)
        finally:
            os.close(descriptor)  # the mapping keeps the object
        self._regions[name] = _Region(name, key, offset, byte_size, memory)

    def unregister(self, name: str) -> None:
        """Forget the region `name`, or every region when `name` is empty. Unknown names are
        not an error (Triton's behaviour)."""
        names = [name] if name else list(self._regions)
        for each in names:
            region = self._regions.pop(each, None)
            if region is not None:
                region.memory.close()

    def status(self, name: str) -> pb.SystemSharedMemoryStatusResponse:
        """The region `name`, or every region when `name` is empty.

        Raises:
            InvalidArgumentError (INVALID_ARGUMENT): no region is registered by that name.
        """
        regions = [self._region(name)] if name else list(self._regions.values())
        response = pb.SystemSharedMemoryStatusResponse()
        for region in regions:
            response.regions[region.name].CopyFrom(
                pb.SystemSharedMemoryStatusResponse.RegionStatus(
                    name=region.name,
                    key=region.key,
                    offset=region.offset,
                    byte_size=region.byte_size,
                )
            )
        return response

    def read(self, tensor: str, placement: Placement, byte_size: int) -> bytes:
        """A copy of `byte_size` bytes of the placement (an input's contents).

        Raises:
            InvalidArgumentError (INVALID_ARGUMENT): unknown region, or the placement cannot
                hold `byte_size` bytes; the message names the tensor.
        """
        start = self._checked_start(f"input '{tensor}'", placement, byte_size)
        memory = self._regions[placement.region].memory
        return memory[start : start + byte_size]

    def write(self, tensor: str, placement: Placement, data: bytes) -> None:
        """Copy an output's bytes into its placement.

        Raises:
            InvalidArgumentError (INVALID_ARGUMENT): unknown region, or the output does not fit.
        """
        start = self._checked_start(f"output '{tensor}'", placement, len(data))
        self._regions[placement.region].memory[start : start + len(data)] = data

    def close(self) -> None:
        self.unregister("")

    def _region(self, name: str) -> _Region:
        region = self._regions.get(name)
        if region is None:
            raise InvalidArgumentError(f"unable to find shared memory region '{name}'")
        return region

    def _checked_start(self, tensor: str, placement: Placement, byte_size: int) -> int:
        region = self._regions.get(placement.region)
        if region is None:
            raise InvalidArgumentError(
                f"{tensor}: unable to find shared memory region '{placement.region}'"
            )
        if byte_size > placement.byte_size:
            raise InvalidArgumentError(
                f"{tensor} needs {byte_size} bytes but its '{BYTE_SIZE_PARAMETER}' "
                f"is {placement.byte_size}"
            )
        if placement.offset < 0 or placement.offset + placement.byte_size > region.byte_size:
            raise InvalidArgumentError(
                f"{tensor}: '{OFFSET_PARAMETER}' {placement.offset} + "
                f"'{BYTE_SIZE_PARAMETER}' {placement.byte_size} exceeds shared memory region "
                f"'{region.name}' of {region.byte_size} bytes"
            )
        return region.offset + placement.offset
