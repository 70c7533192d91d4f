"""Joining compatible requests into one batch along the first dimension, and splitting the
batch's answer back by each request's size."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from headrace.batching.policy import PRIORITY_PARAMETER, TIMEOUT_PARAMETER
from headrace.errors import ModelExecutionError
from headrace.inference import InferenceRequest, InferenceResponse

_SCHEDULING_PARAMETERS = frozenset({PRIORITY_PARAMETER, TIMEOUT_PARAMETER})


def compatibility_key(request: InferenceRequest) -> Hashable:
    """Requests with equal keys can share a batch: same input names, dtypes and non-batch
    dimensions, and the same parameters apart from the scheduling ones (priority, timeout)
    that the batcher consumes."""
    inputs = request.inputs
    signature = tuple((name, array.dtype, array.shape[1:]) for name, array in inputs.items())
    if len(signature) > 1:
        signature = tuple(sorted(signature, key=lambda entry: entry[0]))
    parameters = request.parameters
    if parameters and parameters.keys() - _SCHEDULING_PARAMETERS:
        kept = tuple(
            sorted(
                ((k, v) for k, v in parameters.items() if k not in _SCHEDULING_PARAMETERS),
                key=lambda item: item[0],
            )
        )
        return (signature, kept)
    return signature


def merge(requests: Sequence[InferenceRequest]) -> InferenceRequest:
    """One request whose inputs are the given requests' inputs concatenated along the first
    dimension, in order. A single request is returned as it is (no copy)."""
    first = requests[0]
    if len(requests) == 1:
        return first
    inputs = {
        name: np.concatenate([request.inputs[name] for request in requests])
        for name in first.inputs
    }
    parameters = {k: v for k, v in first.parameters.items() if k not in _SCHEDULING_PARAMETERS}
    return InferenceRequest(
        model_name=first.model_name,
        model_version=first.model_version,
        id=first.id,
        inputs=inputs,
        parameters=parameters,
    )


def split(
    response: InferenceResponse, requests: Sequence[InferenceRequest], sizes: Sequence[int]
) -> list[InferenceResponse]:
    """The batch's answer cut back into one response per request (views, no copies).

    Raises:
        ModelExecutionError (INTERNAL): an output's first dimension is not the batch's size.
    """
    if len(requests) == 1:
        response.id = requests[0].id
        return [response]
    total = sum(sizes)
    for name, array in response.outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise ModelExecutionError(
                f"model '{response.model_name}' returned output '{name}' with shape "
                f"{list(array.shape)} for a batch of {total}"
            )
    parts = []
    start = 0
    for request, size in zip(requests, sizes, strict=True):
        end = start + size
        parts.append(
            InferenceResponse(
                model_name=response.model_name,
                model_version=response.model_version,
                id=request.id,
                outputs={name: array[start:end] for name, array in response.outputs.items()},
                parameters=dict(response.parameters),
                endpoint=response.endpoint,
            )
        )
        start = end
    return parts
