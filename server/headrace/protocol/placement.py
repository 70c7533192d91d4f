"""Tensors that live outside the message: the shared-memory parameters of the protocol's
system shared memory extension (Triton's), parsed and checked."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from headrace.errors import InvalidArgumentError
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol.datatypes import Datatype

REGION_PARAMETER = "shared_memory_region"
BYTE_SIZE_PARAMETER = "shared_memory_byte_size"
OFFSET_PARAMETER = "shared_memory_offset"


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one tensor lives: `byte_size` bytes at `offset` within a registered region."""

    region: str
    byte_size: int
    offset: int = 0

    def to_parameters(self, parameters: Mapping[str, pb.InferParameter]) -> None:
        """Write this placement into a tensor's parameters (as Triton echoes them)."""
        parameters[REGION_PARAMETER].string_param = self.region
        parameters[BYTE_SIZE_PARAMETER].int64_param = self.byte_size
        if self.offset:
            parameters[OFFSET_PARAMETER].int64_param = self.offset


class SharedTensors(Protocol):
    """Where tensors placed in shared memory are read from and written to."""

    def read(self, tensor: str, placement: Placement, byte_size: int) -> bytes:
        """A copy of `byte_size` bytes at the placement.

        Raises:
            InvalidArgumentError (INVALID_ARGUMENT): unknown region, or out of its bounds.
        """
        ...

    def write(self, tensor: str, placement: Placement, data: bytes) -> None:
        """Copy `data` to the placement.

        Raises:
            InvalidArgumentError (INVALID_ARGUMENT): unknown region, or it does not fit.
        """
        ...


def placement_of(
    kind: str, name: str, parameters: Mapping[str, pb.InferParameter]
) -> Placement | None:
    """The shared-memory placement an input's or output's parameters name, or None.

    Raises:
        InvalidArgumentError (INVALID_ARGUMENT): the parameters are incomplete or of the wrong
            type; the message names the tensor and the parameter.
    """
    if REGION_PARAMETER not in parameters:
        return None
    region = parameters[REGION_PARAMETER]
    if region.WhichOneof("parameter_choice") != "string_param" or not region.string_param:
        raise InvalidArgumentError(
            f"{kind} '{name}': parameter '{REGION_PARAMETER}' must be a non-empty string"
        )
    if BYTE_SIZE_PARAMETER not in parameters:
        raise InvalidArgumentError(
            f"{kind} '{name}': parameter '{BYTE_SIZE_PARAMETER}' is required with "
            f"'{REGION_PARAMETER}'"
        )
    byte_size = _int_parameter(kind, name, BYTE_SIZE_PARAMETER, parameters)
    offset = (
        _int_parameter(kind, name, OFFSET_PARAMETER, parameters)
        if OFFSET_PARAMETER in parameters
        else 0
    )
    if byte_size < 0 or offset < 0:
        raise InvalidArgumentError(
            f"{kind} '{name}': '{BYTE_SIZE_PARAMETER}' and '{OFFSET_PARAMETER}' must be >= 0"
        )
    return Placement(region.string_param, byte_size, offset)


def placed_byte_size(datatype: Datatype, count: int, placement: Placement) -> int:
    """Bytes an input of `count` elements takes at its placement: fixed by the datatype, or
    the whole placement for BYTES (length-prefixed elements)."""
    return count * datatype.itemsize if datatype.itemsize else placement.byte_size


def _int_parameter(
    kind: str, name: str, key: str, parameters: Mapping[str, pb.InferParameter]
) -> int:
    parameter = parameters[key]
    choice = parameter.WhichOneof("parameter_choice")
    if choice == "int64_param":
        return int(parameter.int64_param)
    if choice == "uint64_param":
        return int(parameter.uint64_param)
    raise InvalidArgumentError(f"{kind} '{name}': parameter '{key}' must be an integer")
