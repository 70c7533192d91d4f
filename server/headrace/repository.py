"""The served models: name and version to the backend that runs them, plus their statistics."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from time import perf_counter_ns
from typing import TYPE_CHECKING, Protocol

import grpc

from headrace.backends.base import Backend
from headrace.batching import DynamicBatcher
from headrace.batching.batcher import BatchObserver
from headrace.batching.policy import queue_timeout_s
from headrace.errors import (
    DeadlineExceededError,
    ModelNotFoundError,
    ModelUnavailableError,
    StartupError,
)
from headrace.inference import BatchIds, InferenceRequest, InferenceResponse
from headrace.spec import ModelSpec
from headrace.statistics import ModelStatistics
from headrace.telemetry.spans import end_current

if TYPE_CHECKING:
    from headrace.capture.tee import ModelCapture
    from headrace.telemetry.tracing import ModelTracing


class RequestObserver(Protocol):
    """What is told of every inference request answered (metrics)."""

    def record_request(self, code: grpc.StatusCode, duration_ns: int) -> None: ...


class AnswerObserver(Protocol):
    """What is handed every answered request with its response (shadow traffic, drift):
    references only, off the request path; must not block or raise."""

    def observe_answer(
        self, request: InferenceRequest, response: InferenceResponse, request_id: str
    ) -> None: ...


@dataclass(slots=True, eq=False)
class ServedModel:
    """One model version, the backend that runs it, its batcher (None: requests go straight
    to the backend), its statistics, and what else observes its executions (metrics) and
    traces its backend calls."""

    spec: ModelSpec
    backend: Backend
    statistics: ModelStatistics = field(default_factory=ModelStatistics)
    batcher: DynamicBatcher | None = None
    observers: tuple[BatchObserver, ...] = ()
    """Told of every execution, as the batcher tells its observers; `statistics` always is."""
    tracing: ModelTracing | None = None
    requests: RequestObserver | None = None
    """Told of every request to this model version the servicer answers."""
    answers: tuple[AnswerObserver, ...] = ()
    """Handed every successfully answered request and its response."""
    capture: ModelCapture | None = None
    """Captures this model's calls (None: capture is off)."""
    _batch_ids: BatchIds = field(default_factory=BatchIds)

    @property
    def ready(self) -> bool:
        return self.backend.is_ready(self.spec)

    async def infer(
        self, request: InferenceRequest, size: int, deadline: float | None = None
    ) -> InferenceResponse:
        """Run a validated request of `size` items, through the batcher when there is one.
        `deadline` is the caller's deadline on the event loop's clock; the request's
        `timeout` parameter can shorten it.

        Raises:
            ModelUnavailableError (UNAVAILABLE): the model is not ready.
            DeadlineExceededError (DEADLINE_EXCEEDED): the deadline passed before dispatch.
            HeadraceError: the batcher's or the backend's error, with its code.
        """
        if not self.backend.is_ready(self.spec):
            raise ModelUnavailableError(
                f"model '{self.spec.name}' version {self.spec.version} is not ready"
            )
        if self.batcher is not None:
            return await self.batcher.submit(request, size, deadline)
        now = asyncio.get_running_loop().time()
        timeout_s = queue_timeout_s(request)
        if deadline is not None:
            timeout_s = min(deadline - now, timeout_s or math.inf)
            if timeout_s <= 0:
                raise DeadlineExceededError(
                    f"request {request.id!r} to model '{self.spec.name}' passed its deadline"
                )
        observers = (self.statistics, *self.observers)
        for observer in observers:
            observer.record_queued(0)
        started = perf_counter_ns()
        if self.tracing is None:
            response = await self.backend.infer(self.spec, request, timeout_s)
        else:
            span, token = self.tracing.start_backend()
            try:
                response = await self.backend.infer(self.spec, request, timeout_s)
            except BaseException as exc:
                end_current(span, token, exc)
                raise
            end_current(span, token, None)
        infer_ns = perf_counter_ns() - started
        response.batch_id = self._batch_ids.new()
        response.batch_size = size
        for observer in observers:
            observer.record_execution(
                batch_size=size, requests=1, input_ns=0, infer_ns=infer_ns, output_ns=0
            )
        return response


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), version) if version.isdigit() else (-1, version)


class ModelRepository:
    """Looks up served model versions. Built once the backends have started."""

    def __init__(self, backends: Iterable[Backend]) -> None:
        self._by_name: dict[str, dict[str, ServedModel]] = {}
        for backend in backends:
            for spec in backend.model_specs():
                versions = self._by_name.setdefault(spec.name, {})
                if spec.version in versions:
                    raise StartupError(
                        f"model '{spec.name}' version {spec.version} is served by two "
                        "backends; rename one (a Triton model can keep its name there with "
                        "remote_name)"
                    )
                versions[spec.version] = ServedModel(spec, backend)
        self._latest = {
            name: versions[max(versions, key=_version_key)]
            for name, versions in self._by_name.items()
        }

    def resolve(self, name: str, version: str = "") -> ServedModel:
        """The model version a request addresses; an empty version means the highest.

        Raises:
            ModelNotFoundError (NOT_FOUND): no such model, or no such version of it.
        """
        if not version:
            latest = self._latest.get(name)
            if latest is not None:
                return latest
        else:
            versions = self._by_name.get(name)
            if versions is not None:
                served = versions.get(version)
                if served is not None:
                    return served
                raise ModelNotFoundError(
                    f"model '{name}' has no version '{version}'; served versions: "
                    f"{', '.join(sorted(versions, key=_version_key))}"
                )
        if not name:
            raise ModelNotFoundError("no model name given")
        raise ModelNotFoundError(f"unknown model '{name}'")

    def versions(self, name: str) -> list[str]:
        """The served versions of `name`, lowest first (empty if unknown)."""
        return sorted(self._by_name.get(name, {}), key=_version_key)

    def models(self) -> Sequence[ServedModel]:
        """Every served model version, by name then version."""
        return [
            self._by_name[name][version]
            for name in sorted(self._by_name)
            for version in self.versions(name)
        ]

    @property
    def ready(self) -> bool:
        """Whether every served model version can take requests."""
        return all(served.ready for served in self.models())
