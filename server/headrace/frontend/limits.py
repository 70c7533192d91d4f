"""Per-request limits checked before a request is decoded, and the server-wide cap on
inference requests in progress.

Checks read only the message's declared shapes and content lengths, so a hostile shape
(`[2**40]`, forty dimensions) is refused before anything is allocated for it. Every refusal
names the limit and its config key.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

from headrace.batching.batcher import RETRY_PUSHBACK_METADATA
from headrace.config import LimitsSettings
from headrace.errors import InvalidArgumentError, ResourceExhaustedError
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol.datatypes import DATATYPES
from headrace.protocol.placement import REGION_PARAMETER

KEY_PREFIX = "server.limits."
_LATENCY_WEIGHT = 0.05
"""Weight of the newest request in the moving average behind the retry hint."""
_MAX_RETRY_HINT_MS = 10_000


def _bytes_per_element(datatype: str) -> int:
    known = DATATYPES.get(datatype)
    # BYTES (and unknown datatypes, refused later) are counted by their contents instead.
    return known.itemsize if known is not None else 0


class RequestLimits:
    """`server.limits` as applied to one ModelInferRequest."""

    def __init__(self, settings: LimitsSettings) -> None:
        self.settings = settings

    def check_message(self, message: pb.ModelInferRequest) -> None:
        """Refuse a request whose declared tensors exceed the limits.

        Raises:
            InvalidArgumentError (INVALID_ARGUMENT): an input's rank, or the request's element
                or byte count, is over its limit; the message names the input and the key.
        """
        limits = self.settings
        total_elements = 0
        total_bytes = 0
        raw = message.raw_input_contents
        raw_index = 0  # raw contents belong to the inputs not placed in shared memory, in order
        for tensor in message.inputs:
            in_message = REGION_PARAMETER not in tensor.parameters
            shape = tensor.shape
            if len(shape) > limits.max_tensor_rank:
                raise InvalidArgumentError(
                    f"input '{tensor.name}' has {len(shape)} dimensions; the limit is "
                    f"{limits.max_tensor_rank} ({KEY_PREFIX}max_tensor_rank)"
                )
            # A dimension alone over the element limit is refused even next to a zero, so no
            # later step ever sees it.
            largest = max(shape, default=0)
            elements = math.prod(shape) if largest <= limits.max_request_elements else largest
            total_elements += max(elements, 0)
            if total_elements > limits.max_request_elements:
                raise InvalidArgumentError(
                    f"input '{tensor.name}' brings the request to {total_elements} tensor "
                    f"elements; the limit is {limits.max_request_elements} "
                    f"({KEY_PREFIX}max_request_elements)"
                )
            if in_message and raw_index < len(raw):
                size = len(raw[raw_index])
                raw_index += 1
            else:
                size = max(elements, 0) * _bytes_per_element(tensor.datatype)
                if tensor.datatype == "BYTES":
                    size = sum(len(value) for value in tensor.contents.bytes_contents)
            total_bytes += size
            if total_bytes > limits.max_request_bytes:
                raise InvalidArgumentError(
                    f"input '{tensor.name}' brings the request to {total_bytes} bytes of "
                    f"tensor data; the limit is {limits.max_request_bytes} "
                    f"({KEY_PREFIX}max_request_bytes)"
                )

    def check_batch_size(self, model: str, size: int) -> None:
        """Refuse a request of more items than `max_request_batch_size`.

        Raises:
            InvalidArgumentError (INVALID_ARGUMENT): over the limit.
        """
        limit = self.settings.max_request_batch_size
        if limit is not None and size > limit:
            raise InvalidArgumentError(
                f"request to model '{model}' has batch size {size}; the limit is {limit} "
                f"({KEY_PREFIX}max_request_batch_size)"
            )


class InflightLimit:
    """Counts inference requests in progress and refuses those over the limit."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.inflight = 0
        self._average_s: float | None = None
        """Moving average of a request's duration, for the retry hint; it starts at the
        first request's duration (None until then)."""

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Hold one slot for the body's duration.

        Raises:
            ResourceExhaustedError (RESOURCE_EXHAUSTED): every slot is taken; trailing
                metadata `grpc-retry-pushback-ms` says when to retry (about one request's
                recent duration).
        """
        if self.limit is not None and self.inflight >= self.limit:
            raise ResourceExhaustedError(
                f"{self.inflight} inference requests are in progress; the limit is "
                f"{self.limit} ({KEY_PREFIX}max_inflight_requests); retry later",
                trailing_metadata={RETRY_PUSHBACK_METADATA: str(self.retry_hint_ms())},
            )
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    def record_duration(self, seconds: float) -> None:
        """Feed a finished request's duration into the retry hint."""
        average = self._average_s
        self._average_s = (
            seconds if average is None else average + _LATENCY_WEIGHT * (seconds - average)
        )

    def retry_hint_ms(self) -> int:
        """`grpc-retry-pushback-ms` of a refusal: the time the requests in progress take to
        finish (their recent mean duration), 1 to 10,000 ms."""
        return max(1, min(_MAX_RETRY_HINT_MS, round((self._average_s or 0.0) * 1000)))
