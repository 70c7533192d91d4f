"""Translation between the protocol's messages and Headrace's `InferenceRequest` /
`InferenceResponse`: tensors to and from numpy, parameters to and from Python values.

Decoding checks everything that can be checked without knowing the model (datatype names,
shapes, raw lengths, typed-contents counts and ranges); `ModelSpec.validate_request` checks the
rest. Raw contents decode to read-only views of the wire bytes; nothing is copied there.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from headrace.errors import InvalidArgumentError, ModelExecutionError
from headrace.inference import InferenceRequest, InferenceResponse, ParameterValue
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol.datatypes import DATATYPES, Datatype, datatype_of
from headrace.protocol.placement import (
    Placement,
    SharedTensors,
    placed_byte_size,
    placement_of,
)

_LENGTH_PREFIX_BYTES = 4
_MAX_BYTES_ELEMENT = 2**32 - 1


def _shape_of(name: str, shape: Sequence[int], kind: str = "input") -> tuple[int, ...]:
    dims = tuple(shape)
    if dims and min(dims) < 0:
        raise InvalidArgumentError(
            f"{kind} '{name}' has shape {list(dims)}; dimensions must be >= 0"
        )
    return dims


def _element_count(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _reshaped(array: np.ndarray, name: str, shape: tuple[int, ...], kind: str) -> np.ndarray:
    """`array` in `shape`; numpy refuses shapes it cannot represent (more than its maximum
    dimensions, or a size overflowing even with a zero among the dimensions)."""
    try:
        return array.reshape(shape)
    except ValueError as exc:
        raise InvalidArgumentError(
            f"{kind} '{name}' has shape {list(shape)}, which cannot be represented: {exc}"
        ) from exc


def decode_bytes_elements(name: str, raw: bytes, count: int) -> np.ndarray:
    """Split raw BYTES contents (each element a 4-byte little-endian length, then the bytes)
    into a flat object array of `count` bytes elements.

    Raises:
        InvalidArgumentError (INVALID_ARGUMENT): the lengths do not add up to `count` elements
            exactly filling `raw`.
    """
    end = len(raw)
    if count * _LENGTH_PREFIX_BYTES > end:
        # Checked before anything is allocated: a 20-byte request must not make the server
        # allocate an object array for the billions of elements its shape claims.
        raise InvalidArgumentError(
            f"raw contents of BYTES input '{name}' hold {end} bytes, too few for the "
            f"{count} elements its shape declares ({_LENGTH_PREFIX_BYTES} bytes each at least)"
        )
    elements = np.empty(count, dtype=object)
    view = memoryview(raw)
    offset = 0
    for index in range(count):
        if offset + _LENGTH_PREFIX_BYTES > end:
            raise InvalidArgumentError(
                f"raw contents of BYTES input '{name}' end after {index} of {count} elements"
            )
        length = int.from_bytes(view[offset : offset + _LENGTH_PREFIX_BYTES], "little")
        offset += _LENGTH_PREFIX_BYTES
        if offset + length > end:
            raise InvalidArgumentError(
                f"raw contents of BYTES input '{name}': element {index} declares {length} bytes "
                f"but only {end - offset} remain"
            )
        elements[index] = bytes(view[offset : offset + length])
        offset += length
    if offset != end:
        raise InvalidArgumentError(
            f"raw contents of BYTES input '{name}' hold {end - offset} bytes after its "
            f"{count} elements"
        )
    return elements


def encode_bytes_elements(array: np.ndarray) -> bytes:
    """Serialize a BYTES tensor (bytes or str elements) to raw contents, row-major.

    Raises:
        ModelExecutionError (INTERNAL): an element is neither bytes nor str, or is too long.
    """
    parts: list[bytes] = []
    for element in array.flat:
        if isinstance(element, str):
            data = element.encode()
        elif isinstance(element, bytes | bytearray | memoryview | np.bytes_):
            data = bytes(element)
        else:
            raise ModelExecutionError(
                f"BYTES output element of type {type(element).__name__} is not bytes or str"
            )
        if len(data) > _MAX_BYTES_ELEMENT:
            raise ModelExecutionError("BYTES output element exceeds 4 GiB")
        parts.append(len(data).to_bytes(_LENGTH_PREFIX_BYTES, "little"))
        parts.append(data)
    return b"".join(parts)


def _decode_raw(
    name: str, datatype: Datatype, shape: tuple[int, ...], raw: bytes, kind: str = "input"
) -> np.ndarray:
    count = _element_count(shape)
    if datatype.name == "BYTES":
        return _reshaped(decode_bytes_elements(name, raw, count), name, shape, kind)
    expected = count * datatype.itemsize
    if len(raw) != expected:
        raise InvalidArgumentError(
            f"raw contents of {kind} '{name}' hold {len(raw)} bytes; shape "
            f"{list(shape)} of {datatype.name} needs {expected}"
        )
    return _reshaped(np.frombuffer(raw, dtype=datatype.dtype), name, shape, kind)


def _decode_typed(
    name: str, datatype: Datatype, shape: tuple[int, ...], contents: pb.InferTensorContents
) -> np.ndarray:
    field = datatype.contents_field
    if field is None:
        raise InvalidArgumentError(
            f"input '{name}' is {datatype.name}, which has no typed contents field; "
            "send it in raw_input_contents"
        )
    values: Any = getattr(contents, field)
    count = _element_count(shape)
    if len(values) != count:
        raise InvalidArgumentError(
            f"contents.{field} of input '{name}' hold {len(values)} values; shape "
            f"{list(shape)} needs {count}"
        )
    for other in _CONTENT_FIELDS:
        if other != field and len(getattr(contents, other)):
            raise InvalidArgumentError(
                f"input '{name}' is {datatype.name} but sets contents.{other}; use contents.{field}"
            )
    if datatype.name == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return _reshaped(array, name, shape, "input")
    if datatype.dtype.kind in "iu" and datatype.dtype.itemsize < 8:
        # int_contents / uint_contents are 32-bit on the wire; narrower types must fit.
        wide = np.array(values, dtype=np.int64)
        info = np.iinfo(datatype.dtype)  # type: ignore[type-var]
        if count and (wide.min() < info.min or wide.max() > info.max):
            raise InvalidArgumentError(
                f"contents.{field} of input '{name}' hold values outside the range of "
                f"{datatype.name} [{info.min}, {info.max}]"
            )
        return _reshaped(wide.astype(datatype.dtype), name, shape, "input")
    return _reshaped(np.array(values, dtype=datatype.dtype), name, shape, "input")


_CONTENT_FIELDS = tuple(pb.InferTensorContents.DESCRIPTOR.fields_by_name)


def _has_contents(contents: pb.InferTensorContents) -> bool:
    return any(len(getattr(contents, field)) for field in _CONTENT_FIELDS)


def parameters_from_proto(parameters: Mapping[str, pb.InferParameter]) -> dict[str, ParameterValue]:
    """Protocol parameters as plain Python values."""
    decoded: dict[str, ParameterValue] = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is not None:
            decoded[key] = getattr(parameter, choice)
    return decoded


def parameter_to_proto(value: ParameterValue) -> pb.InferParameter:
    """One Python value as a protocol parameter (bool, int64, double or string)."""
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        if value >= 2**63:
            return pb.InferParameter(uint64_param=value)
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    return pb.InferParameter(string_param=str(value))


def request_from_proto(
    message: pb.ModelInferRequest, shared: SharedTensors | None = None
) -> InferenceRequest:
    """Decode a ModelInferRequest. Inputs whose parameters place them in shared memory are
    read from `shared` (copied); the others take raw contents in order, or typed contents.

    Raises:
        InvalidArgumentError (INVALID_ARGUMENT): an unknown datatype, a negative or
            inconsistent shape, raw contents that do not match shape x datatype, both raw and
            typed contents for one input, a missing or duplicate input, typed values out of
            range, or a shared-memory placement that is malformed, unknown or out of bounds
            (or shared memory without `shared`). The message names the input.
    """
    raw_contents = message.raw_input_contents
    input_messages = message.inputs
    placements = [
        placement_of("input", tensor.name, tensor.parameters) if tensor.parameters else None
        for tensor in input_messages
    ]
    in_message = len(input_messages) - sum(p is not None for p in placements)
    if raw_contents and len(raw_contents) != in_message:
        raise InvalidArgumentError(
            f"raw_input_contents has {len(raw_contents)} entries for {in_message} "
            "inputs not in shared memory; send raw contents for every such input or for none"
        )
    inputs: dict[str, np.ndarray] = {}
    raw_index = 0
    for tensor, placement in zip(input_messages, placements, strict=True):
        name = tensor.name
        datatype = DATATYPES.get(tensor.datatype)
        if datatype is None:
            raise InvalidArgumentError(
                f"input '{name}' has unknown datatype '{tensor.datatype}'; expected one of "
                f"{', '.join(DATATYPES)}"
            )
        if name in inputs:
            raise InvalidArgumentError(f"input '{name}' appears more than once")
        shape = _shape_of(name, tensor.shape)
        if placement is not None:
            if shared is None:
                raise InvalidArgumentError(
                    f"input '{name}' is placed in shared memory region '{placement.region}', "
                    "but this server does not accept shared memory "
                    "(server.system_shared_memory is off)"
                )
            size = placed_byte_size(datatype, _element_count(shape), placement)
            inputs[name] = _decode_raw(name, datatype, shape, shared.read(name, placement, size))
        elif raw_contents:
            if tensor.HasField("contents") and _has_contents(tensor.contents):
                raise InvalidArgumentError(
                    f"input '{name}' has both raw_input_contents and typed contents"
                )
            inputs[name] = _decode_raw(name, datatype, shape, raw_contents[raw_index])
            raw_index += 1
        else:
            inputs[name] = _decode_typed(name, datatype, shape, tensor.contents)
    return InferenceRequest(
        model_name=message.model_name,
        model_version=message.model_version,
        id=message.id,
        inputs=inputs,
        requested_outputs=(
            tuple(output.name for output in message.outputs) if message.outputs else ()
        ),
        parameters=parameters_from_proto(message.parameters) if message.parameters else {},
    )


def output_placements(
    message: pb.ModelInferRequest, shared: SharedTensors | None
) -> dict[str, Placement]:
    """The requested outputs the request places in shared memory, by name.

    Raises:
        InvalidArgumentError (INVALID_ARGUMENT): a malformed placement, or one without
            `shared`; the message names the output.
    """
    placements: dict[str, Placement] = {}
    for output in message.outputs:
        if not output.parameters:
            continue
        placement = placement_of("output", output.name, output.parameters)
        if placement is None:
            continue
        if shared is None:
            raise InvalidArgumentError(
                f"output '{output.name}' is placed in shared memory region "
                f"'{placement.region}', but this server does not accept shared memory "
                "(server.system_shared_memory is off)"
            )
        placements[output.name] = placement
    return placements


def _raw_bytes(array: np.ndarray, datatype: Datatype) -> bytes:
    if datatype.name == "BYTES":
        return encode_bytes_elements(array)
    if array.dtype != datatype.dtype:  # big-endian host, or a non-native view
        array = array.astype(datatype.dtype)
    return array.tobytes()


def response_to_proto(
    response: InferenceResponse,
    requested: Collection[str] = (),
    placements: Mapping[str, Placement] | None = None,
    shared: SharedTensors | None = None,
) -> pb.ModelInferResponse:
    """Encode a response with every output in raw_output_contents, as Triton does.

    `requested` limits the outputs to those names (in the response's order); empty keeps all.
    Outputs in `placements` are written to `shared` instead: their tensors carry datatype,
    shape and the placement's parameters, and an empty raw entry (only when some other
    output has raw contents, so a client's raw indices stay those of the outputs).

    Raises:
        ModelExecutionError (INTERNAL): an output has no protocol datatype.
        InvalidArgumentError (INVALID_ARGUMENT): an output does not fit its placement.
    """
    wanted = set(requested) if requested else None
    outputs = []
    raw = []
    in_message = 0
    for name, array in response.outputs.items():
        if wanted is not None and name not in wanted:
            continue
        datatype = _tensor_datatype(name, array, "output")
        tensor = pb.ModelInferResponse.InferOutputTensor(
            name=name, datatype=datatype.name, shape=array.shape
        )
        placement = placements.get(name) if placements else None
        if placement is not None and shared is not None:
            shared.write(name, placement, _raw_bytes(array, datatype))
            placement.to_parameters(tensor.parameters)
            raw.append(b"")
        else:
            raw.append(_raw_bytes(array, datatype))
            in_message += 1
        outputs.append(tensor)
    if not in_message:
        raw = []
    message = pb.ModelInferResponse(
        model_name=response.model_name,
        model_version=response.model_version,
        id=response.id,
        outputs=outputs,
        raw_output_contents=raw,
    )
    for key, value in response.parameters.items():
        message.parameters[key].CopyFrom(parameter_to_proto(value))
    return message


def _tensor_datatype(name: str, array: np.ndarray, kind: str) -> Datatype:
    datatype = datatype_of(array)
    if datatype is None:
        raise ModelExecutionError(
            f"{kind} '{name}' has numpy dtype {array.dtype}, which has no protocol datatype"
        )
    return datatype


def request_to_proto(
    request: InferenceRequest, model_name: str, model_version: str
) -> pb.ModelInferRequest:
    """Encode a request for an upstream server (Triton), every input in raw contents, asking
    for every output."""
    inputs = []
    raw = []
    for name, array in request.inputs.items():
        datatype = _tensor_datatype(name, array, "input")
        inputs.append(
            pb.ModelInferRequest.InferInputTensor(
                name=name, datatype=datatype.name, shape=array.shape
            )
        )
        raw.append(_raw_bytes(array, datatype))
    message = pb.ModelInferRequest(
        model_name=model_name,
        model_version=model_version,
        id=request.id,
        inputs=inputs,
        raw_input_contents=raw,
    )
    for key, value in request.parameters.items():
        message.parameters[key].CopyFrom(parameter_to_proto(value))
    return message


def response_from_proto(message: pb.ModelInferResponse) -> InferenceResponse:
    """Decode an upstream server's (Triton's) response; raw outputs become read-only views.

    Raises:
        ModelExecutionError (INTERNAL): the response is inconsistent (unknown datatype, raw
            length not matching the shape, raw entries not matching the outputs).
    """
    try:
        outputs = _decode_outputs(message)
    except InvalidArgumentError as exc:
        raise ModelExecutionError(
            f"model '{message.model_name}' answered with a malformed response: {exc.message}"
        ) from exc
    return InferenceResponse(
        model_name=message.model_name,
        model_version=message.model_version,
        id=message.id,
        outputs=outputs,
        parameters=parameters_from_proto(message.parameters) if message.parameters else {},
    )


def _decode_outputs(message: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    raw_contents = message.raw_output_contents
    if raw_contents and len(raw_contents) != len(message.outputs):
        raise InvalidArgumentError(
            f"{len(raw_contents)} raw_output_contents for {len(message.outputs)} outputs"
        )
    outputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(message.outputs):
        datatype = DATATYPES.get(tensor.datatype)
        if datatype is None:
            raise InvalidArgumentError(
                f"output '{tensor.name}' has unknown datatype '{tensor.datatype}'"
            )
        # Checked like an input's: a negative dimension made BYTES decoding fail with a bare
        # ValueError (a negative element count) instead of this error.
        shape = _shape_of(tensor.name, tensor.shape, "output")
        if raw_contents:
            outputs[tensor.name] = _decode_raw(
                tensor.name, datatype, shape, raw_contents[index], "output"
            )
        else:
            outputs[tensor.name] = _decode_typed(tensor.name, datatype, shape, tensor.contents)
    return outputs


_STREAM_INFER_RESPONSE_TAG = b"\x12"
"""ModelStreamInferResponse.infer_response: field 2, length-delimited."""


def stream_response_bytes(infer_response: bytes) -> bytes:
    """A serialized ModelStreamInferResponse holding `infer_response` (a serialized
    ModelInferResponse), built without parsing or serializing the inner message again."""
    length = len(infer_response)
    prefix = bytearray(_STREAM_INFER_RESPONSE_TAG)
    while length >= 0x80:
        prefix.append((length & 0x7F) | 0x80)
        length >>= 7
    prefix.append(length)
    return bytes(prefix) + infer_response
