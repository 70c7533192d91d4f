"""The protocol every backend implements."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from headrace.inference import InferenceRequest, InferenceResponse
from headrace.spec import ModelSpec


class Backend(Protocol):
    """Runs models. Knows one kind of endpoint's wire protocol, nothing about batching.

    `start` and `stop` bracket the backend's life (thread pools, channels); `model_specs` is
    valid after `start`.

    Tracing seam: `infer` is always awaited with the `headrace.backend` CLIENT span current
    (when tracing is on), in the batch's trace. A remote backend passes the trace on by
    injecting the current context into its call's metadata with the global propagator,
    `opentelemetry.propagate.inject(carrier)` (W3C `traceparent`/`tracestate`), so the
    upstream's own spans (Triton's) join the trace; it may add attributes to that span
    (`rpc.*`, `server.address`) with `opentelemetry.trace.get_current_span()`. Work handed to
    threads must carry the context along (`contextvars.copy_context()`).
    """

    async def start(self) -> None:
        """Load or discover the models.

        Raises:
            ConfigError: a model cannot be loaded.
        """

    async def stop(self) -> None:
        """Release everything `start` acquired. Idempotent."""

    def model_specs(self) -> Sequence[ModelSpec]:
        """The model versions this backend serves."""
        ...

    def is_ready(self, spec: ModelSpec) -> bool:
        """Whether the model version can take requests now."""
        ...

    async def infer(
        self, spec: ModelSpec, request: InferenceRequest, timeout_s: float | None = None
    ) -> InferenceResponse:
        """Run one (validated, possibly batched) request within `timeout_s` seconds (None: no
        limit), which remote backends pass on as the call's deadline.

        Raises:
            HeadraceError: ModelExecutionError (INTERNAL) when the model fails,
                ModelUnavailableError (UNAVAILABLE) when it cannot run now, UpstreamError
                with the upstream's own code for remote backends.
        """
        ...
