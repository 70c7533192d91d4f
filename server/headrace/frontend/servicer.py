"""The thin servicer of inference.GRPCInferenceService: decode, resolve, run, encode.

Handlers receive requests from `tolerant_deserializer` (a message, or `MalformedMessage` for
bytes that are not one) and report every error through `StatusBoundary`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any, NamedTuple

import grpc

from headrace import __version__
from headrace.config import LimitsSettings
from headrace.errors import (
    HeadraceError,
    ModelNotFoundError,
    ModelUnavailableError,
    NotEnabledError,
    ResourceExhaustedError,
)
from headrace.frontend.auth import authorize_model, current_identity
from headrace.frontend.limits import InflightLimit, RequestLimits
from headrace.frontend.shared_memory import SystemSharedMemoryRegistry
from headrace.frontend.status import (
    MalformedMessage,
    StatusBoundary,
    WireMessage,
    require_message,
)
from headrace.inference import InferenceRequest, InferenceResponse, RequestIds
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol.converters import (
    output_placements,
    request_from_proto,
    request_to_proto,
    response_to_proto,
    stream_response_bytes,
)
from headrace.protocol.model_info import config_to_proto, metadata_to_proto, statistics_to_proto
from headrace.repository import ModelRepository, RequestObserver, ServedModel

if TYPE_CHECKING:
    from headrace.capture.tee import ModelCapture

SERVER_NAME = "headrace"
EXTENSIONS = ("model_configuration", "statistics")
"""Protocol extensions Headrace implements, as ServerMetadata reports them."""

_logger = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]


class InferenceServicer:
    """Implements the methods declared in proto/grpc_service.proto."""

    def __init__(
        self,
        repository: ModelRepository,
        stream_max_inflight_requests: int,
        unresolved_requests: RequestObserver | None = None,
        shared_memory: SystemSharedMemoryRegistry | None = None,
        *,
        limits: LimitsSettings | None = None,
    ) -> None:
        """`unresolved_requests` is told of inference requests that cannot be read or name
        no served model; each served model's own `requests` observer of the others.
        `shared_memory`: the regions clients register (None: the extension is off).
        `limits`: `server.limits` (default: its defaults)."""
        self._repository = repository
        self._stream_max_inflight = stream_max_inflight_requests
        self._unresolved_requests = unresolved_requests
        self._shared_memory = shared_memory
        self._extensions = (
            (*EXTENSIONS, "system_shared_memory") if shared_memory is not None else EXTENSIONS
        )
        limits = limits or LimitsSettings()
        self._limits = RequestLimits(limits)
        self.inflight = InflightLimit(limits.max_inflight_requests)
        """Inference requests in progress, and the cap on them."""
        self._request_ids = RequestIds()

    async def _infer(
        self, request: WireMessage[pb.ModelInferRequest] | MalformedMessage, context: Context
    ) -> pb.ModelInferResponse | bytes:
        """The answer: a message, or its serialized bytes when it was captured (serialized
        once, for the record and the wire)."""
        started = perf_counter_ns()
        received_ns = time.time_ns()
        served: ServedModel | None = None
        code = grpc.StatusCode.INTERNAL  # what StatusBoundary answers an unexpected error with
        try:
            with self.inflight.admit():
                wire = require_message(request)
                message = wire.message
                authorize_model(message.model_name)
                served = self._repository.resolve(message.model_name, message.model_version)
                _check_room(served, started)
                self._limits.check_message(message)
                capture = served.capture
                reply: pb.ModelInferResponse | bytes
                if capture is None or not capture.admit():
                    answered = await self._infer_served(
                        served, message, context, started, message.id
                    )
                    reply = answered.reply
                else:
                    reply = await self._infer_captured(
                        served, capture, wire, context, started, received_ns
                    )
                self.inflight.record_duration((perf_counter_ns() - started) / 1e9)
        except HeadraceError as exc:
            code = exc.code
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        else:
            code = grpc.StatusCode.OK
            return reply
        finally:
            observer = served.requests if served is not None else self._unresolved_requests
            if observer is not None:
                observer.record_request(code, perf_counter_ns() - started)

    async def _infer_captured(
        self,
        served: ServedModel,
        capture: ModelCapture,
        wire: WireMessage[pb.ModelInferRequest],
        context: Context,
        started: int,
        received_ns: int,
    ) -> bytes:
        """Run the call and spool its record (answer or error) before the answer leaves.

        Raises:
            ModelUnavailableError (UNAVAILABLE): the record could not be spooled and the
                model's policy refuses to serve uncaptured calls.
        """
        message = wire.message
        # One id for the record and whatever else observes the call (a shadow call's record
        # carries it too), generated here when the client sent none.
        request_id = message.id or self._request_ids.new()
        try:
            done = await self._infer_served(served, message, context, started, request_id)
        except HeadraceError as exc:
            await capture.record(
                wire=wire.data,
                message=message,
                metadata=context.invocation_metadata,
                identity=current_identity(),
                received_ns=received_ns,
                started_ns=started,
                code=exc.code.value[0],
                status_message=exc.message,
                response=None,
                reply=b"",
                request_id=request_id,
            )
            raise
        data = done.reply.SerializeToString()
        request_bytes, response_bytes = wire.data, data
        if self._shared_memory is not None and _uses_shared_memory(message):
            # Tensors in the client's shared memory are not in the wire bytes: the record
            # gets them as raw contents, as if they had been sent that way.
            request_bytes = _captured_request(message, done.request)
            response_bytes = response_to_proto(
                done.response, done.request.requested_outputs
            ).SerializeToString()
        spooled = await capture.record(
            wire=request_bytes,
            message=message,
            metadata=context.invocation_metadata,
            identity=current_identity(),
            received_ns=received_ns,
            started_ns=started,
            code=grpc.StatusCode.OK.value[0],
            status_message="",
            response=done.response,
            reply=response_bytes,
            request_id=request_id,
        )
        if not spooled:
            raise ModelUnavailableError(
                f"capture spool cannot take the record of model '{served.spec.name}'; "
                "it serves no uncaptured call; retry later"
            )
        return data

    async def _infer_served(
        self,
        served: ServedModel,
        message: pb.ModelInferRequest,
        context: Context,
        started: int,
        request_id: str,
    ) -> _Answered:
        statistics = served.statistics
        shared = self._shared_memory
        try:
            request = request_from_proto(message, shared)
            placements = output_placements(message, shared) if message.outputs else None
            spec = served.spec
            spec.validate_request(request)
            size = spec.batch_size(request)
            self._limits.check_batch_size(spec.name, size)
            decoded = perf_counter_ns()
            remaining = context.time_remaining()
            deadline = (
                asyncio.get_running_loop().time() + remaining if remaining is not None else None
            )
            response = await served.infer(request, size, deadline)
            answered = perf_counter_ns()
            reply = response_to_proto(response, request.requested_outputs, placements, shared)
        except HeadraceError:
            statistics.record_failure(perf_counter_ns() - started)
            raise
        for observer in served.answers:
            observer.observe_answer(request, response, request_id)
        finished = perf_counter_ns()
        statistics.record_success(
            total_ns=finished - started, input_ns=decoded - started, output_ns=finished - answered
        )
        return _Answered(reply, request, response)

    async def ModelInfer(
        self, request: WireMessage[pb.ModelInferRequest] | MalformedMessage, context: Context
    ) -> pb.ModelInferResponse | bytes:
        async with StatusBoundary(context, "ModelInfer"):
            return await self._infer(request, context)

    async def ModelStreamInfer(
        self,
        requests: AsyncIterable[WireMessage[pb.ModelInferRequest] | MalformedMessage],
        context: Context,
    ) -> AsyncIterator[pb.ModelStreamInferResponse | bytes]:
        """Answers each request as soon as it is done, so requests on one stream run (and
        batch) concurrently; an error answers its request with `error_message` and the stream
        goes on. At most `stream_max_inflight_requests` run at once; beyond that the stream
        stops reading."""
        answers: asyncio.Queue[pb.ModelStreamInferResponse | bytes | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self._stream_max_inflight)
        running: set[asyncio.Task[None]] = set()

        async def answer(wire: WireMessage[pb.ModelInferRequest]) -> None:
            reply: pb.ModelStreamInferResponse | bytes
            try:
                answered = await self._infer(wire, context)
                if isinstance(answered, bytes):
                    reply = stream_response_bytes(answered)
                else:
                    reply = pb.ModelStreamInferResponse(infer_response=answered)
            except HeadraceError as exc:
                reply = _stream_error(wire.message, exc.message)
            except Exception:
                _logger.exception("unexpected error in ModelStreamInfer")
                reply = _stream_error(wire.message, "internal error; see the server log")
            finally:
                slots.release()
            answers.put_nowait(reply)

        async def read() -> None:
            try:
                async for request in requests:
                    await slots.acquire()
                    if isinstance(request, MalformedMessage):
                        slots.release()
                        answers.put_nowait(
                            pb.ModelStreamInferResponse(error_message=request.error().message)
                        )
                        if self._unresolved_requests is not None:
                            self._unresolved_requests.record_request(
                                grpc.StatusCode.INVALID_ARGUMENT, 0
                            )
                        continue
                    task = asyncio.create_task(answer(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if running:
                    await asyncio.gather(*running)
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (reply := await answers.get()) is not None:
                yield reply
            await reader
        finally:
            reader.cancel()
            for task in running:
                task.cancel()

    async def ServerLive(
        self, request: pb.ServerLiveRequest | MalformedMessage, context: Context
    ) -> pb.ServerLiveResponse:
        async with StatusBoundary(context, "ServerLive"):
            require_message(request)
            return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest | MalformedMessage, context: Context
    ) -> pb.ServerReadyResponse:
        async with StatusBoundary(context, "ServerReady"):
            require_message(request)
            return pb.ServerReadyResponse(ready=self._repository.ready)

    async def ModelReady(
        self, request: pb.ModelReadyRequest | MalformedMessage, context: Context
    ) -> pb.ModelReadyResponse:
        """An unknown model is not ready (false, not NOT_FOUND): probes want a boolean."""
        async with StatusBoundary(context, "ModelReady"):
            message = require_message(request)
            authorize_model(message.name)
            try:
                served = self._repository.resolve(message.name, message.version)
            except ModelNotFoundError:
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=served.ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest | MalformedMessage, context: Context
    ) -> pb.ServerMetadataResponse:
        async with StatusBoundary(context, "ServerMetadata"):
            require_message(request)
            return pb.ServerMetadataResponse(
                name=SERVER_NAME, version=__version__, extensions=self._extensions
            )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest | MalformedMessage, context: Context
    ) -> pb.ModelMetadataResponse:
        async with StatusBoundary(context, "ModelMetadata"):
            message = require_message(request)
            authorize_model(message.name)
            served = self._repository.resolve(message.name, message.version)
            return metadata_to_proto(served.spec, self._repository.versions(message.name))

    async def ModelConfig(
        self, request: pb.ModelConfigRequest | MalformedMessage, context: Context
    ) -> pb.ModelConfigResponse:
        async with StatusBoundary(context, "ModelConfig"):
            message = require_message(request)
            authorize_model(message.name)
            served = self._repository.resolve(message.name, message.version)
            policy = served.batcher.policy if served.batcher is not None else None
            return pb.ModelConfigResponse(config=config_to_proto(served.spec, policy))

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest | MalformedMessage, context: Context
    ) -> pb.ModelStatisticsResponse:
        """An empty name reports every model; an empty version every version of the model."""
        async with StatusBoundary(context, "ModelStatistics"):
            message = require_message(request)
            if not message.name:
                models = list(self._repository.models())
            elif message.version:
                models = [self._repository.resolve(message.name, message.version)]
            else:
                self._repository.resolve(message.name)  # NOT_FOUND for an unknown name
                models = [
                    self._repository.resolve(message.name, version)
                    for version in self._repository.versions(message.name)
                ]
            return pb.ModelStatisticsResponse(
                model_stats=[statistics_to_proto(m.spec, m.statistics) for m in models]
            )

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest | MalformedMessage, context: Context
    ) -> pb.RepositoryIndexResponse:
        async with StatusBoundary(context, "RepositoryIndex"):
            message = require_message(request)
            entries = []
            for served in self._repository.models():
                ready = served.ready
                if message.ready and not ready:
                    continue
                entries.append(
                    pb.RepositoryIndexResponse.ModelIndex(
                        name=served.spec.name,
                        version=served.spec.version,
                        state="READY" if ready else "UNAVAILABLE",
                        reason="" if ready else "backend reports the model not ready",
                    )
                )
            return pb.RepositoryIndexResponse(models=entries)

    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest | MalformedMessage, context: Context
    ) -> pb.SystemSharedMemoryStatusResponse:
        """Raises INVALID_ARGUMENT for an unknown region name, UNIMPLEMENTED when off."""
        async with StatusBoundary(context, "SystemSharedMemoryStatus"):
            message = require_message(request)
            return self._registry().status(message.name)

    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest | MalformedMessage, context: Context
    ) -> pb.SystemSharedMemoryRegisterResponse:
        """Raises INVALID_ARGUMENT (bad key, range), ALREADY_EXISTS, UNIMPLEMENTED when off."""
        async with StatusBoundary(context, "SystemSharedMemoryRegister"):
            message = require_message(request)
            self._registry().register(message.name, message.key, message.offset, message.byte_size)
            return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest | MalformedMessage, context: Context
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        """An empty name unregisters every region. UNIMPLEMENTED when off."""
        async with StatusBoundary(context, "SystemSharedMemoryUnregister"):
            message = require_message(request)
            self._registry().unregister(message.name)
            return pb.SystemSharedMemoryUnregisterResponse()

    def _registry(self) -> SystemSharedMemoryRegistry:
        if self._shared_memory is None:
            raise NotEnabledError(
                "system shared memory is off on this server (server.system_shared_memory)"
            )
        return self._shared_memory


def _check_room(served: ServedModel, started: int) -> None:
    """Refuse a call its model's batcher has no room for, before anything else is done for
    it: the limits' walk over its tensors, decoding them, its capture record. Under overload
    most calls end here, so each refusal must cost little beyond grpc's own work for a call
    (and a refused call is not captured: recording every refusal would turn the offered load,
    not the served one, into spool writes, and a full spool then costs the records, or the
    answers, of the calls that are served). The model's statistics count it as failed.

    Raises:
        ResourceExhaustedError (RESOURCE_EXHAUSTED): the model's queue is full; trailing
            metadata `grpc-retry-pushback-ms` says when to retry.
    """
    batcher = served.batcher
    if batcher is None:
        return
    try:
        batcher.check_room()
    except ResourceExhaustedError:
        served.statistics.record_failure(perf_counter_ns() - started)
        raise


def _stream_error(message: pb.ModelInferRequest, text: str) -> pb.ModelStreamInferResponse:
    # Triton sends only error_message; the id and model let a client match it to its request.
    return pb.ModelStreamInferResponse(
        error_message=text,
        infer_response=pb.ModelInferResponse(
            model_name=message.model_name, model_version=message.model_version, id=message.id
        ),
    )


class _Answered(NamedTuple):
    reply: pb.ModelInferResponse
    request: InferenceRequest
    response: InferenceResponse


_SHARED_MEMORY_REGION = "shared_memory_region"


def _uses_shared_memory(message: pb.ModelInferRequest) -> bool:
    inputs = any(_SHARED_MEMORY_REGION in tensor.parameters for tensor in message.inputs)
    return inputs or any(_SHARED_MEMORY_REGION in tensor.parameters for tensor in message.outputs)


def _captured_request(message: pb.ModelInferRequest, request: InferenceRequest) -> bytes:
    """The request as captured when its inputs came through shared memory: every input in
    raw contents, the message's own id, parameters and requested outputs kept."""
    captured = request_to_proto(request, message.model_name, message.model_version)
    captured.id = message.id
    captured.parameters.clear()
    for key, value in message.parameters.items():
        captured.parameters[key].CopyFrom(value)
    captured.outputs.extend(
        pb.ModelInferRequest.InferRequestedOutputTensor(name=output.name)
        for output in message.outputs
    )
    return captured.SerializeToString()
