"""The request and response every stage after the protocol decoder works with."""

from __future__ import annotations

import itertools
import os
import uuid
from dataclasses import dataclass, field

import numpy as np

ParameterValue = bool | int | float | str
"""A request parameter's value, as the protocol's InferParameter carries it."""


@dataclass(slots=True)
class InferenceRequest:
    """One decoded inference request.

    `inputs` holds numpy arrays in the order the client sent them; arrays decoded from raw
    contents are read-only views of the wire bytes. BYTES tensors are object arrays of `bytes`.
    """

    model_name: str
    model_version: str
    id: str
    inputs: dict[str, np.ndarray]
    requested_outputs: tuple[str, ...] = ()
    """Names of the outputs to return; empty returns every output."""
    parameters: dict[str, ParameterValue] = field(default_factory=dict)


@dataclass(slots=True)
class InferenceResponse:
    """One model answer, before encoding. `model_version` is the version that answered.

    `endpoint` is set by the backend that answered; `batch_id` and `batch_size` by whoever
    made the backend call (the batcher, or the served model without one): capture records
    which backend call served each request.
    """

    model_name: str
    model_version: str
    id: str
    outputs: dict[str, np.ndarray]
    parameters: dict[str, ParameterValue] = field(default_factory=dict)
    endpoint: str = ""
    """The backend endpoint that answered ("local" for the in-process backend)."""
    batch_id: str = ""
    """Id of the backend call; shared by every request in a batch."""
    batch_size: int = 0
    """Items in that backend call."""


class BatchIds:
    """Ids of backend calls: a random prefix per instance and a counter, so ids are unique
    across processes and restarts without costing a UUID per call."""

    __slots__ = ("_next", "_prefix")

    def __init__(self) -> None:
        self._prefix = uuid.uuid4().hex[:16]
        self._next = itertools.count(1)

    def new(self) -> str:
        return f"{self._prefix}-{next(self._next)}"


class RequestIds:
    """Ids for requests whose client sent none: 32 lowercase hex digits, as a UUID's hex, made
    of 64 random bits drawn once per instance and a 64-bit counter. Unique across processes
    (workers) and restarts as random UUIDs are, at a fraction of a UUID's cost per call."""

    __slots__ = ("_next", "_prefix")

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._next = itertools.count(1)

    def new(self) -> str:
        return f"{self._prefix}{next(self._next):016x}"
