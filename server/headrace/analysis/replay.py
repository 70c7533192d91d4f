"""Replaying captured calls against an Open Inference Protocol endpoint (Triton, Headrace).

Calls stream from their source in chunks read off the event loop; calls whose inputs have the
same names, datatypes and non-batch dimensions are joined along the first dimension into one
request of up to `batch_size` rows (when the candidate model batches), and at most
`concurrency` requests are in flight. Memory is bounded by the batches in flight and the
partial batches waiting to fill.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass

import grpc
import numpy as np

from headrace.analysis.calls import CapturedCall
from headrace.errors import HeadraceError
from headrace.inference import InferenceRequest
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol import grpc_service_pb2_grpc as pb_grpc
from headrace.protocol.converters import request_to_proto, response_from_proto

MAX_MESSAGE_BYTES = 128 * 1024 * 1024
READ_CHUNK_CALLS = 512
"""Calls read from the source per trip off the event loop."""
MAX_OPEN_GROUPS = 64
"""Partial batches (distinct input signatures) waiting to fill at most; beyond, the fullest
is sent as it is."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where the calls are replayed."""

    address: str
    """`host:port`."""
    model: str
    version: str = ""
    credentials: grpc.ChannelCredentials | None = None
    """TLS; None: plaintext."""
    timeout_s: float = 60.0


@dataclass(slots=True)
class ReplayResult:
    """One replayed request: the calls it carried and what came back for each (or why not)."""

    calls: list[CapturedCall]
    outputs: list[dict[str, np.ndarray]] | None
    """Each call's slice of the candidate's outputs; None when the call failed."""
    latency_s: float
    error_code: str = ""
    error_message: str = ""


def open_channel(target: Target) -> grpc.aio.Channel:
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]
    if target.credentials is not None:
        return grpc.aio.secure_channel(target.address, target.credentials, options=options)
    return grpc.aio.insecure_channel(target.address, options=options)


async def max_batch_size(stub: pb_grpc.GRPCInferenceServiceAsyncStub, target: Target) -> int:
    """The candidate model's max_batch_size (0: no batch dimension), from ModelConfig.

    Raises:
        grpc.aio.AioRpcError: the endpoint is unreachable or does not serve the model.
    """
    response: pb.ModelConfigResponse = await stub.ModelConfig(
        pb.ModelConfigRequest(name=target.model, version=target.version), timeout=30
    )
    return int(response.config.max_batch_size)


def _signature(call: CapturedCall) -> Hashable:
    return tuple(
        (name, array.dtype.str, array.shape[1:]) for name, array in sorted(call.inputs.items())
    )


def _rows(call: CapturedCall) -> int:
    first = next(iter(call.inputs.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


def batches(calls: Iterable[CapturedCall], batch_size: int) -> Iterator[list[CapturedCall]]:
    """Group calls with the same input signature into batches of up to `batch_size` rows
    (a call larger than that goes alone); 1 leaves every call alone."""
    if batch_size <= 1:
        for call in calls:
            yield [call]
        return
    open_groups: dict[Hashable, tuple[list[CapturedCall], int]] = {}
    for call in calls:
        key = _signature(call)
        rows = _rows(call)
        group, group_rows = open_groups.get(key, ([], 0))
        if group and group_rows + rows > batch_size:
            yield group
            group, group_rows = [], 0
        group.append(call)
        group_rows += rows
        if group_rows >= batch_size:
            open_groups.pop(key, None)
            yield group
            continue
        open_groups[key] = (group, group_rows)
        if len(open_groups) > MAX_OPEN_GROUPS:
            fullest = max(open_groups, key=lambda k: open_groups[k][1])
            yield open_groups.pop(fullest)[0]
    for group, _ in open_groups.values():
        yield group


def _request(calls: list[CapturedCall], target: Target) -> pb.ModelInferRequest:
    if len(calls) == 1:
        inputs = dict(calls[0].inputs)
    else:
        inputs = {
            name: np.concatenate([call.inputs[name] for call in calls]) for name in calls[0].inputs
        }
    request = InferenceRequest(target.model, target.version, calls[0].request_id, inputs)
    return request_to_proto(request, target.model, target.version)


def _split(
    calls: list[CapturedCall], outputs: dict[str, np.ndarray]
) -> list[dict[str, np.ndarray]] | None:
    if len(calls) == 1:
        return [outputs]
    sizes = [_rows(call) for call in calls]
    total = sum(sizes)
    if any(array.ndim == 0 or array.shape[0] != total for array in outputs.values()):
        return None
    boundaries = np.cumsum(sizes)[:-1]
    parts: list[dict[str, np.ndarray]] = [{} for _ in calls]
    for name, array in outputs.items():
        for part, piece in zip(parts, np.split(array, boundaries), strict=True):
            part[name] = piece
    return parts


async def replay(
    calls: Iterable[CapturedCall],
    target: Target,
    on_result: Callable[[ReplayResult], None],
    *,
    concurrency: int = 8,
    batch_size: int = 1,
) -> None:
    """Replay every call against `target`, telling `on_result` of each replayed request (on
    the event loop, in completion order).

    Raises:
        grpc.aio.AioRpcError: the candidate's ModelConfig failed (unreachable, unknown model).
    """
    channel = open_channel(target)
    try:
        # AsyncStub exists only in the generated .pyi: the runtime stub is the same class.
        stub: pb_grpc.GRPCInferenceServiceAsyncStub = pb_grpc.GRPCInferenceServiceStub(channel)
        model_batch = await max_batch_size(stub, target)
        rows_per_request = min(batch_size, model_batch) if model_batch > 0 else 1
        pending: asyncio.Queue[list[CapturedCall] | None] = asyncio.Queue(concurrency * 2)

        async def produce() -> None:
            grouped = batches(calls, rows_per_request)

            def read_chunk() -> list[list[CapturedCall]]:
                chunk: list[list[CapturedCall]] = []
                count = 0
                for group in grouped:
                    chunk.append(group)
                    count += len(group)
                    if count >= READ_CHUNK_CALLS:
                        break
                return chunk

            try:
                while chunk := await asyncio.to_thread(read_chunk):
                    for group in chunk:
                        await pending.put(group)
            finally:
                for _ in range(concurrency):
                    await pending.put(None)

        async def work() -> None:
            while (group := await pending.get()) is not None:
                message = _request(group, target)
                started = time.perf_counter()
                try:
                    response: pb.ModelInferResponse = await stub.ModelInfer(
                        message, timeout=target.timeout_s
                    )
                except grpc.aio.AioRpcError as exc:
                    latency = time.perf_counter() - started
                    on_result(
                        ReplayResult(group, None, latency, exc.code().name, exc.details() or "")
                    )
                    continue
                latency = time.perf_counter() - started
                try:
                    outputs = _split(group, response_from_proto(response).outputs)
                except HeadraceError as exc:
                    on_result(ReplayResult(group, None, latency, exc.code.name, exc.message))
                    continue
                if outputs is None:
                    on_result(
                        ReplayResult(
                            group, None, latency, "BATCH_MISMATCH", "outputs do not split by call"
                        )
                    )
                else:
                    on_result(ReplayResult(group, outputs, latency))

        producer = asyncio.create_task(produce())
        workers = [asyncio.create_task(work()) for _ in range(concurrency)]
        try:
            await asyncio.gather(producer, *workers)
        finally:
            for task in (producer, *workers):
                task.cancel()
            await asyncio.gather(producer, *workers, return_exceptions=True)
    finally:
        await channel.close(None)
