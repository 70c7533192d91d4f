"""The request and response every stage after the protocol decoder works with."""

from __future__ import annotations

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
    """One model answer, before encoding. `model_version` is the version that answered."""

    model_name: str
    model_version: str
    id: str
    outputs: dict[str, np.ndarray]
    parameters: dict[str, ParameterValue] = field(default_factory=dict)
