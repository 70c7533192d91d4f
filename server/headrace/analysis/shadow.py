"""Shadow traffic: a sample of a model's answered requests mirrored to a candidate.

The primary's request path only offers the answered request to `ShadowMirror.observe_answer`,
which samples it and puts it on a bounded queue without waiting (a full queue drops it and
counts it). Worker tasks, started at start-up and stopped at shutdown, call the candidate with a
timeout after the primary has answered; whatever the candidate does (slow, failing,
unreachable) reaches only the shadow's own record and metrics.

Each shadow call becomes a `CaptureRecord` with the primary's request id and the request
parameters `headrace_shadow` (True) and `headrace_shadow_of` (the primary's version), handed to
the capture sink (the capture pipeline's tee), so `headrace backtest --shadow` pairs primary and
shadow from the captures.

Metrics: `headrace_shadow_requests_total{model,version,result}` with result `ok`, `error`
(the candidate failed or timed out) or `dropped` (queue full), and
`headrace_shadow_duration_seconds{model,version}` of the shadow calls.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

from headrace.capture.record import SHADOW_OF_PARAMETER, SHADOW_PARAMETER, CaptureRecord
from headrace.config import ShadowSettings
from headrace.errors import ConfigError, HeadraceError, ModelNotFoundError
from headrace.inference import InferenceRequest, InferenceResponse, RequestIds
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol import grpc_service_pb2_grpc as pb_grpc
from headrace.protocol.converters import request_from_proto, request_to_proto, response_to_proto
from headrace.repository import ModelRepository
from headrace.spec import ModelSpec
from headrace.telemetry.metrics import LATENCY_BUCKETS_S

_logger = logging.getLogger(__name__)

CaptureSink = Callable[[CaptureRecord], Awaitable[None]]
"""Takes a finished shadow record (the capture tee's `ModelCapture.record_shadow`)."""

MAX_MESSAGE_BYTES = 128 * 1024 * 1024


class ShadowMetrics:
    """The shadow instruments, registered once per registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "headrace_shadow_requests",
            "Requests mirrored to a shadow candidate, by result: ok, error (failed or timed "
            "out), dropped (the shadow queue was full).",
            ("model", "version", "result"),
            registry=registry,
        )
        self.duration = Histogram(
            "headrace_shadow_duration_seconds",
            "Duration of shadow calls to the candidate.",
            ("model", "version"),
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )


class ShadowCandidate(Protocol):
    """Where shadow calls go."""

    description: str
    """For records and logs: `host:port`, or `local` for a model of this Headrace."""

    async def start(self) -> None: ...

    async def infer(self, message: pb.ModelInferRequest, timeout_s: float) -> bytes:
        """The serialized response. Raises grpc.aio.AioRpcError or HeadraceError."""
        ...

    async def stop(self) -> None: ...


class LocalCandidate:
    """A model version served by this Headrace (through its batcher, if it has one)."""

    description = "local"

    def __init__(self, repository: ModelRepository, model: str, version: str) -> None:
        self._served = repository.resolve(model, version)
        self.model = model
        self.version = self._served.spec.version

    async def start(self) -> None:
        return None

    async def infer(self, message: pb.ModelInferRequest, timeout_s: float) -> bytes:
        request = request_from_proto(message)
        spec = self._served.spec
        spec.validate_request(request)
        deadline = asyncio.get_running_loop().time() + timeout_s
        response = await self._served.infer(request, spec.batch_size(request), deadline)
        return response_to_proto(response).SerializeToString()

    async def stop(self) -> None:
        return None


class RemoteCandidate:
    """A model on any Open Inference Protocol endpoint (Triton, another Headrace)."""

    def __init__(self, endpoint: str, model: str, version: str) -> None:
        self.description = endpoint
        self.model = model
        self.version = version
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.GRPCInferenceServiceAsyncStub | None = None

    async def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(
            self.description,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        # AsyncStub exists only in the generated .pyi: the runtime stub is the same class.
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)

    async def infer(self, message: pb.ModelInferRequest, timeout_s: float) -> bytes:
        assert self._stub is not None, "start() first"
        response: pb.ModelInferResponse = await self._stub.ModelInfer(message, timeout=timeout_s)
        return response.SerializeToString()

    async def stop(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close(None)


_Item = tuple[str, InferenceRequest, int]


class ShadowMirror:
    """Mirrors a sample of one model version's answered requests to a candidate."""

    def __init__(
        self,
        spec: ModelSpec,
        settings: ShadowSettings,
        candidate: ShadowCandidate,
        candidate_model: str,
        candidate_version: str,
        metrics: ShadowMetrics,
        sink: CaptureSink | None = None,
        *,
        seed: int | None = None,
    ) -> None:
        self._spec = spec
        self._settings = settings
        self.candidate = candidate
        self._candidate_model = candidate_model
        self._candidate_version = candidate_version
        self.sink = sink
        """Where shadow records go; None: they are only counted (no capture configured)."""
        self._random = random.Random(seed)
        self._request_ids = RequestIds()
        self._queue: asyncio.Queue[_Item] | None = None
        self._workers: list[asyncio.Task[None]] = []
        labels = (spec.name, spec.version)
        self._ok = metrics.requests.labels(*labels, "ok")
        self._error = metrics.requests.labels(*labels, "error")
        self._dropped = metrics.requests.labels(*labels, "dropped")
        self._duration = metrics.duration.labels(*labels)

    def observe_answer(
        self, request: InferenceRequest, response: InferenceResponse, request_id: str
    ) -> None:
        """Offer an answered request; never blocks (unsampled or queue full: not mirrored)."""
        if self._queue is None:
            return
        rate = self._settings.sample_rate
        if rate < 1.0 and self._random.random() >= rate:
            return
        try:
            # Without an id (capture off, client sent none) the shadow record gets its own.
            self._queue.put_nowait((request_id or self._request_ids.new(), request, time.time_ns()))
        except asyncio.QueueFull:
            self._dropped.inc()

    async def start(self) -> None:
        await self.candidate.start()
        self._queue = asyncio.Queue(self._settings.max_queue_size)
        self._workers = [
            asyncio.create_task(self._work(self._queue), name=f"shadow-{self._spec.name}-{index}")
            for index in range(self._settings.max_concurrency)
        ]

    async def stop(self) -> None:
        """Cancel the shadow calls (queued ones are left) and close the candidate."""
        self._queue = None
        workers, self._workers = self._workers, []
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        await self.candidate.stop()

    async def _work(self, items: asyncio.Queue[_Item]) -> None:
        while True:
            request_id, request, received_ns = await items.get()
            try:
                await self._mirror(request_id, request, received_ns)
            except Exception:
                # A sink or encoding bug must not end the worker; the primary never sees it.
                _logger.exception("shadow call of model '%s' failed", self._spec.name)

    async def _mirror(self, request_id: str, request: InferenceRequest, received_ns: int) -> None:
        message = request_to_proto(request, self._candidate_model, self._candidate_version)
        message.id = request_id
        message.parameters[SHADOW_PARAMETER].bool_param = True
        message.parameters[SHADOW_OF_PARAMETER].string_param = self._spec.version
        started = time.perf_counter_ns()
        code, detail, response = grpc.StatusCode.OK, "", b""
        try:
            response = await asyncio.wait_for(
                self.candidate.infer(message, self._settings.timeout_s),
                self._settings.timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            code, detail = exc.code(), exc.details() or ""
        except HeadraceError as exc:
            code, detail = exc.code, exc.message
        except TimeoutError:
            code, detail = grpc.StatusCode.DEADLINE_EXCEEDED, "shadow call timed out"
        latency_ns = time.perf_counter_ns() - started
        self._duration.observe(latency_ns / 1e9)
        (self._ok if code == grpc.StatusCode.OK else self._error).inc()
        if self.sink is None:
            return
        version = self._candidate_version
        if response:
            version = pb.ModelInferResponse.FromString(response).model_version or version
        await self.sink(
            CaptureRecord(
                request_id=request_id,
                model=self._spec.name,
                version=version,
                received_ns=received_ns,
                responded_ns=time.time_ns(),
                latency_ns=latency_ns,
                status_code=code.value[0],
                status_message=detail,
                request=message.SerializeToString(),
                response=response,
                endpoint=self.candidate.description,
                parameters={
                    **request.parameters,
                    SHADOW_PARAMETER: True,
                    SHADOW_OF_PARAMETER: self._spec.version,
                },
            )
        )


def shadow_candidate(
    spec: ModelSpec, settings: ShadowSettings, repository: ModelRepository
) -> tuple[ShadowCandidate, str, str]:
    """The candidate a model's shadow settings name, with its model name and version.

    Raises:
        ConfigError: a local candidate this Headrace does not serve, or the primary itself.
    """
    model = settings.model or spec.name
    if settings.endpoint is not None:
        return RemoteCandidate(settings.endpoint, model, settings.version), model, settings.version
    try:
        candidate = LocalCandidate(repository, model, settings.version)
    except ModelNotFoundError as exc:
        raise ConfigError(
            f"model '{spec.name}' version {spec.version}: shadow candidate: {exc.message}"
        ) from exc
    if (model, candidate.version) == (spec.name, spec.version):
        raise ConfigError(
            f"model '{spec.name}' version {spec.version}: shadow names the model itself; set "
            "shadow.version, shadow.model or shadow.endpoint"
        )
    return candidate, model, candidate.version
