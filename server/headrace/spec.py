"""What a served model declares (its signature) and checking requests and answers against it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from headrace.errors import InvalidArgumentError, ModelExecutionError
from headrace.inference import InferenceRequest
from headrace.protocol.datatypes import Datatype, datatype_of


def _format_shape(shape: tuple[int, ...] | list[int]) -> str:
    return "[" + ",".join(str(dim) for dim in shape) + "]"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One declared tensor. `dims` excludes the batch dimension of a batching model; -1 is a
    dimension of any size."""

    name: str
    datatype: Datatype
    dims: tuple[int, ...]
    optional: bool = False
    fixed_dims: tuple[tuple[int, int], ...] = field(init=False, repr=False, compare=False)
    """(position, size) of every dimension that is not -1; checked on every request."""

    def __post_init__(self) -> None:
        fixed = tuple((index, dim) for index, dim in enumerate(self.dims) if dim != -1)
        object.__setattr__(self, "fixed_dims", fixed)

    def matches(self, shape: tuple[int, ...]) -> bool:
        """Whether `shape` (without any batch dimension) fits the declared dims."""
        if len(shape) != len(self.dims):
            return False
        for index, dim in self.fixed_dims:  # noqa: SIM110 - no generator on the request path
            if shape[index] != dim:
                return False
        return True


@dataclass(frozen=True, slots=True)
class BatchingHints:
    """What a backend's own model configuration says about batching (Triton's
    dynamic_batching block); the batcher uses it where Headrace's config is silent."""

    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int | None = None
    max_inflight_batches: int | None = None
    """How many batches the backend can run at once (its instances or endpoints)."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A served model version's signature and identity.

    `max_batch_size` follows Triton: 0 means the model has no batch dimension; N > 0 means
    every tensor's first dimension is the batch, up to N, and `dims` exclude it.
    """

    name: str
    version: str
    platform: str
    backend: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 0
    parameters: Mapping[str, str] = field(default_factory=dict)
    batching_hints: BatchingHints = BatchingHints()
    inputs_by_name: Mapping[str, TensorSpec] = field(init=False, repr=False, compare=False)
    outputs_by_name: Mapping[str, TensorSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Derived once: validation looks inputs up by name on every request.
        object.__setattr__(self, "inputs_by_name", {spec.name: spec for spec in self.inputs})
        object.__setattr__(self, "outputs_by_name", {spec.name: spec for spec in self.outputs})

    def wire_shape(self, tensor: TensorSpec) -> tuple[int, ...]:
        """The tensor's shape as ModelMetadata reports it: with the batch dimension as -1."""
        return (-1, *tensor.dims) if self.max_batch_size > 0 else tensor.dims

    def validate_request(self, request: InferenceRequest) -> None:
        """Check a decoded request against this signature.

        Raises:
            InvalidArgumentError (INVALID_ARGUMENT): an unknown or missing input, a datatype or
                shape that differs from the declaration, inconsistent or too large batch sizes,
                or an unknown requested output. The message names the tensor.
        """
        inputs_by_name = self.inputs_by_name
        batch_size: int | None = None
        batch_owner = ""
        for name, array in request.inputs.items():
            spec = inputs_by_name.get(name)
            if spec is None:
                raise InvalidArgumentError(
                    f"unexpected input '{name}' for model '{self.name}'; "
                    f"the model's inputs are {sorted(inputs_by_name)}"
                )
            datatype = datatype_of(array)
            if datatype is not spec.datatype:
                sent = datatype.name if datatype else str(array.dtype)
                raise InvalidArgumentError(
                    f"input '{name}' for model '{self.name}' has datatype {sent}, "
                    f"the model expects {spec.datatype.name}"
                )
            shape = array.shape
            if self.max_batch_size > 0:
                if len(shape) == 0 or not spec.matches(shape[1:]):
                    raise InvalidArgumentError(
                        f"input '{name}' for model '{self.name}' has shape "
                        f"{_format_shape(shape)}, the model expects "
                        f"{_format_shape(self.wire_shape(spec))} (batch dimension first)"
                    )
                if not 1 <= shape[0] <= self.max_batch_size:
                    raise InvalidArgumentError(
                        f"input '{name}' for model '{self.name}' has batch size {shape[0]}, "
                        f"the model takes 1 to {self.max_batch_size}"
                    )
                if batch_size is None:
                    batch_size, batch_owner = shape[0], name
                elif shape[0] != batch_size:
                    raise InvalidArgumentError(
                        f"input '{name}' for model '{self.name}' has batch size {shape[0]} "
                        f"but input '{batch_owner}' has {batch_size}; all inputs share "
                        "the batch dimension"
                    )
            elif not spec.matches(shape):
                raise InvalidArgumentError(
                    f"input '{name}' for model '{self.name}' has shape {_format_shape(shape)}, "
                    f"the model expects {_format_shape(spec.dims)}"
                )
        if len(request.inputs) < len(self.inputs):
            for spec in self.inputs:
                if not spec.optional and spec.name not in request.inputs:
                    raise InvalidArgumentError(
                        f"missing input '{spec.name}' for model '{self.name}'"
                    )
        outputs_by_name = self.outputs_by_name
        for name in request.requested_outputs:
            if name not in outputs_by_name:
                raise InvalidArgumentError(
                    f"unknown requested output '{name}' for model '{self.name}'; "
                    f"the model's outputs are {sorted(outputs_by_name)}"
                )

    def batch_size(self, request: InferenceRequest) -> int:
        """The request's batch size: its inputs' first dimension, or 1 for a non-batching
        model. Call after `validate_request`."""
        if self.max_batch_size == 0 or not request.inputs:
            return 1
        return int(next(iter(request.inputs.values())).shape[0])

    def conform_outputs(
        self, outputs: Mapping[str, np.ndarray], batch_size: int
    ) -> dict[str, np.ndarray]:
        """Check a model's answer against the declared outputs and return it in declaration
        order, numeric outputs cast to their declared type where the cast loses no kind
        (float64 to FP32, say).

        Raises:
            ModelExecutionError (INTERNAL): a declared output is missing, or one has a
                datatype or shape the declaration rules out.
        """
        conformed: dict[str, np.ndarray] = {}
        for spec in self.outputs:
            value = outputs.get(spec.name)
            if value is None:
                raise ModelExecutionError(f"model '{self.name}' returned no output '{spec.name}'")
            array = np.asarray(value)
            datatype = datatype_of(array)
            if datatype is not spec.datatype:
                convertible = (
                    datatype is not None
                    and spec.datatype.name != "BYTES"
                    and datatype.name != "BYTES"
                    and np.can_cast(array.dtype, spec.datatype.dtype, casting="same_kind")
                )
                if not convertible:
                    sent = datatype.name if datatype else str(array.dtype)
                    raise ModelExecutionError(
                        f"model '{self.name}' returned {sent} for output '{spec.name}', "
                        f"declared {spec.datatype.name}"
                    )
                array = array.astype(spec.datatype.dtype, casting="same_kind")
            shape = array.shape
            if self.max_batch_size > 0:
                fits = len(shape) > 0 and shape[0] == batch_size and spec.matches(shape[1:])
            else:
                fits = spec.matches(shape)
            if not fits:
                raise ModelExecutionError(
                    f"model '{self.name}' returned shape {_format_shape(shape)} for output "
                    f"'{spec.name}', declared {_format_shape(self.wire_shape(spec))}"
                    + (f" with batch size {batch_size}" if self.max_batch_size > 0 else "")
                )
            conformed[spec.name] = array
        return conformed
