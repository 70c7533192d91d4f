"""A model's effective batching policy, and the per-request scheduling parameters."""

from __future__ import annotations

from dataclasses import dataclass

from headrace.config import BatchingSettings
from headrace.errors import InvalidArgumentError
from headrace.inference import InferenceRequest
from headrace.spec import ModelSpec

PRIORITY_PARAMETER = "priority"
"""Request parameter choosing a priority level: 1 is the highest; 0 means the default."""
TIMEOUT_PARAMETER = "timeout"
"""Request parameter: how long the request may wait in the queue, in microseconds (0: no
limit beyond the gRPC deadline)."""


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """How one model version's requests are batched, with every default resolved."""

    max_batch_size: int
    max_queue_delay_s: float
    preferred_batch_sizes: tuple[int, ...]
    """Ascending, each at most max_batch_size."""
    max_inflight_batches: int
    max_queue_size: int
    priority_levels: int
    default_priority_level: int

    @classmethod
    def resolve(cls, settings: BatchingSettings, spec: ModelSpec) -> BatchPolicy | None:
        """The policy for `spec`, or None when its requests go straight to the backend
        (batching off, or a model without a batch dimension). Settings win over the
        backend's hints (spec.batching_hints), which win over the defaults."""
        if not settings.enabled or spec.max_batch_size == 0:
            return None
        hints = spec.batching_hints
        max_batch_size = settings.max_batch_size or spec.max_batch_size
        preferred = settings.preferred_batch_sizes
        if preferred is None:
            preferred = hints.preferred_batch_sizes
        delay_us = settings.max_queue_delay_us
        if delay_us is None:
            delay_us = hints.max_queue_delay_us or 0
        return cls(
            max_batch_size=max_batch_size,
            max_queue_delay_s=delay_us / 1e6,
            preferred_batch_sizes=tuple(sorted({s for s in preferred if s <= max_batch_size})),
            max_inflight_batches=settings.max_inflight_batches or hints.max_inflight_batches or 1,
            max_queue_size=settings.max_queue_size,
            priority_levels=settings.priority_levels,
            default_priority_level=settings.default_priority_level or settings.priority_levels,
        )

    def level_of(self, request: InferenceRequest, model: str) -> int:
        """The request's priority level as a 0-based index (0 = highest).

        Raises:
            InvalidArgumentError (INVALID_ARGUMENT): the priority parameter is not an integer
                in 0..priority_levels.
        """
        value = request.parameters.get(PRIORITY_PARAMETER)
        if value is None:
            return self.default_priority_level - 1
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidArgumentError(
                f"parameter '{PRIORITY_PARAMETER}' must be an integer >= 0, got {value!r}"
            )
        if value > self.priority_levels:
            raise InvalidArgumentError(
                f"parameter '{PRIORITY_PARAMETER}' is {value}; model '{model}' has priority "
                f"levels 1 (highest) to {self.priority_levels}"
            )
        return (value or self.default_priority_level) - 1


def queue_timeout_s(request: InferenceRequest) -> float | None:
    """The request's `timeout` parameter in seconds, or None when it sets none.

    Raises:
        InvalidArgumentError (INVALID_ARGUMENT): the parameter is not an integer >= 0.
    """
    value = request.parameters.get(TIMEOUT_PARAMETER)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgumentError(
            f"parameter '{TIMEOUT_PARAMETER}' must be an integer number of microseconds >= 0, "
            f"got {value!r}"
        )
    return value / 1e6 if value else None
