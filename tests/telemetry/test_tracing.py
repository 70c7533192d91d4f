"""Traces as an OTLP receiver sees them: server spans joining the caller's trace, queue and
batch spans, batch links, backend spans and what they pass on, and what is left untraced."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from opentelemetry.sdk.trace import SpanLimits
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol import grpc_service_pb2_grpc as pb_grpc
from headrace.spec import ModelSpec
from headrace.telemetry.spans import FinishedSpan, LeanTracer, current_context, end_current
from headrace.telemetry.tracing import (
    SPAN_BACKEND,
    SPAN_BATCH,
    SPAN_BATCH_REQUEST,
    SPAN_QUEUE,
    ModelTracing,
)
from tests.conftest import ServerThread, gated_model
from tests.models import GATED, PROPAGATING
from tests.telemetry.conftest import exporting_to, telemetry_server, traceparent
from tests.telemetry.receiver import OtlpReceiver, ReceivedSpan

INFER_SPAN = "inference.GRPCInferenceService/ModelInfer"
GATED_MODEL = "traced_gated"


def _message(value: float, model: str = GATED_MODEL) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=model,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="FP32", shape=[1, 1])
        ],
        raw_input_contents=[np.array([value], dtype="<f4").tobytes()],
    )


def _wait_for_queue(server: ServerThread, model: str, depth: int) -> None:
    batcher = server.application.repository.resolve(model).batcher

    async def queued() -> int:
        return batcher.queued

    for _ in range(1000):
        if server.run(queued()) >= depth:
            return
        time.sleep(0.01)
    pytest.fail(f"the queue never reached {depth}")


def _one(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    matching = [span for span in spans if span.name == name]
    assert len(matching) == 1, f"{name}: {matching}"
    return matching[0]


def test_batched_requests_join_their_callers_traces_and_share_a_linked_batch_span(
    receiver: OtlpReceiver,
) -> None:
    callers = [traceparent() for _ in range(3)]
    server = telemetry_server(gated_model(GATED_MODEL, {}), tracing=exporting_to(receiver))
    with server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        gated = GATED[GATED_MODEL]
        gated.gate.clear()
        gated.running.clear()
        try:
            held = stub.ModelInfer.future(_message(0.0))
            assert gated.running.wait(10)
            calls = [
                stub.ModelInfer.future(_message(float(i)), metadata=[("traceparent", header)])
                for i, (header, _, _) in enumerate(callers)
            ]
            _wait_for_queue(server, GATED_MODEL, len(calls))
        finally:
            gated.gate.set()
        held.result(10)
        for call in calls:
            call.result(10)
        assert [len(batch) for batch in gated.batches] == [1, 3]
    # Shutdown flushed every span.

    server_spans = []
    for _, trace_id, parent_span_id in callers:
        spans = receiver.in_trace(trace_id)
        server_span = _one(spans, INFER_SPAN)
        assert server_span.parent_span_id == parent_span_id
        assert server_span.kind == Span.SPAN_KIND_SERVER
        assert server_span.attributes["rpc.system"] == "grpc"
        assert server_span.attributes["rpc.service"] == "inference.GRPCInferenceService"
        assert server_span.attributes["rpc.method"] == "ModelInfer"
        assert server_span.attributes["rpc.grpc.status_code"] == 0
        assert server_span.attributes["network.peer.address"] in ("127.0.0.1", "::1")
        assert server_span.status_code == Status.STATUS_CODE_UNSET
        assert server_span.resource["service.name"] == "headrace"
        queue = _one(spans, SPAN_QUEUE)
        part = _one(spans, SPAN_BATCH_REQUEST)
        for child in (queue, part):
            assert child.parent_span_id == server_span.span_id
            assert child.kind == Span.SPAN_KIND_INTERNAL
        assert queue.attributes["headrace.model.name"] == GATED_MODEL
        assert queue.attributes["headrace.request.items"] == 1
        server_spans.append(server_span)

    batches = [
        span
        for span in receiver.named(SPAN_BATCH)
        if span.attributes["headrace.batch.requests"] == 3
    ]
    assert len(batches) == 1
    batch = batches[0]
    assert set(batch.links) == {(span.trace_id, span.span_id) for span in server_spans}
    assert batch.attributes["headrace.batch.items"] == 3
    # The batch continues the first caller's trace; every caller's part links back to it.
    assert (batch.trace_id, batch.parent_span_id) == (
        server_spans[0].trace_id,
        server_spans[0].span_id,
    )
    for _, trace_id, _ in callers:
        part = _one(receiver.in_trace(trace_id), SPAN_BATCH_REQUEST)
        assert part.links == [(batch.trace_id, batch.span_id)]
    backend = [
        span for span in receiver.named(SPAN_BACKEND) if span.parent_span_id == batch.span_id
    ]
    assert len(backend) == 1
    assert backend[0].kind == Span.SPAN_KIND_CLIENT
    assert backend[0].trace_id == batch.trace_id


def test_backend_call_runs_with_its_client_span_current(receiver: OtlpReceiver) -> None:
    """What a remote backend would inject into its call is the CLIENT span's context, in the
    caller's trace, batched or not."""
    propagating = {
        "name": "traced_propagating",
        "entrypoint": "tests.models:propagating",
        "init_args": {"key": "traced_propagating"},
        "execution": "inline",
        "max_batch_size": 8,
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [-1]}],
    }
    unbatched = {**propagating, "name": "traced_passthrough", "batching": {"enabled": False}}
    unbatched["init_args"] = {"key": "traced_passthrough"}
    header, trace_id, _ = traceparent()
    server = telemetry_server(propagating, unbatched, tracing=exporting_to(receiver))
    with server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for model in ("traced_propagating", "traced_passthrough"):
            stub.ModelInfer(_message(1.0, model), metadata=[("traceparent", header)])
    spans = receiver.in_trace(trace_id)
    backends = {span.span_id: span for span in spans if span.name == SPAN_BACKEND}
    assert len(backends) == 2
    for model in ("traced_propagating", "traced_passthrough"):
        (carrier,) = PROPAGATING[model].injected
        _, injected_trace, injected_span, _ = carrier["traceparent"].split("-")
        assert injected_trace == trace_id
        assert backends[injected_span].kind == Span.SPAN_KIND_CLIENT
        assert backends[injected_span].attributes["headrace.model.name"] == model
    # Without a batcher the backend span is the server span's child.
    passthrough = next(
        span
        for span in backends.values()
        if span.attributes["headrace.model.name"] == "traced_passthrough"
    )
    server_spans = {span.span_id for span in spans if span.name == INFER_SPAN}
    assert passthrough.parent_span_id in server_spans


def test_failures_set_the_status_code_and_server_errors_the_span_status(
    receiver: OtlpReceiver,
) -> None:
    failing_header, failing_trace, _ = traceparent()
    missing_header, missing_trace, _ = traceparent()
    server = telemetry_server(tracing=exporting_to(receiver))
    with server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for model, header in (("failing", failing_header), ("no_such_model", missing_header)):
            with pytest.raises(grpc.RpcError):
                stub.ModelInfer(_message(1.0, model), metadata=[("traceparent", header)])
    failing = _one(receiver.in_trace(failing_trace), INFER_SPAN)
    assert failing.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INTERNAL.value[0]
    assert failing.status_code == Status.STATUS_CODE_ERROR
    assert "weights are corrupt" in failing.status_message
    backend = _one(receiver.in_trace(failing_trace), SPAN_BACKEND)
    assert backend.status_code == Status.STATUS_CODE_ERROR
    missing = _one(receiver.in_trace(missing_trace), INFER_SPAN)
    assert missing.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert missing.status_code == Status.STATUS_CODE_UNSET  # the client's error, not ours


def test_concurrent_calls_each_join_their_own_callers_trace(receiver: OtlpReceiver) -> None:
    """Each call's span reads the metadata grpc.aio read to find its handler (in that call's
    own context): 64 calls in flight at once, each with its own traceparent, each server span
    the child of its own caller's span."""
    headers = [traceparent() for _ in range(64)]
    server = telemetry_server(tracing=exporting_to(receiver))

    async def call_all() -> None:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            await asyncio.gather(
                *(
                    stub.ModelInfer(_message(1.0, "identity"), metadata=[("traceparent", header)])
                    for header, _, _ in headers
                )
            )

    with server:
        asyncio.run(call_all())
    for _, trace_id, parent_id in headers:
        server_span = _one(receiver.in_trace(trace_id), INFER_SPAN)
        assert server_span.parent_span_id == parent_id


def test_an_unsampled_caller_is_not_recorded(receiver: OtlpReceiver) -> None:
    header, trace_id, _ = traceparent(sampled=False)
    server = telemetry_server(tracing=exporting_to(receiver))
    with server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelInfer(_message(1.0, "identity"), metadata=[("traceparent", header)])
        stub.ServerLive(pb.ServerLiveRequest())
    assert receiver.in_trace(trace_id) == []
    assert receiver.named("inference.GRPCInferenceService/ServerLive")


def test_the_stream_has_one_server_span_and_each_request_its_queue_span(
    receiver: OtlpReceiver,
) -> None:
    header, trace_id, _ = traceparent()
    server = telemetry_server(tracing=exporting_to(receiver))
    with server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        replies = list(
            stub.ModelStreamInfer(
                iter([_message(1.0, "echo_fp32"), _message(2.0, "echo_fp32")]),
                metadata=[("traceparent", header)],
            )
        )
    assert len(replies) == 2
    spans = receiver.in_trace(trace_id)
    stream = _one(spans, "inference.GRPCInferenceService/ModelStreamInfer")
    assert stream.attributes["rpc.grpc.status_code"] == 0
    queues = [span for span in spans if span.name == SPAN_QUEUE]
    assert len(queues) == 2
    assert {span.parent_span_id for span in queues} == {stream.span_id}


@pytest.mark.parametrize("trace_health", [False, True])
def test_health_and_reflection_are_traced_only_when_asked(
    receiver: OtlpReceiver, trace_health: bool
) -> None:
    server = telemetry_server(tracing=exporting_to(receiver, trace_health=trace_health))
    with server, grpc.insecure_channel(server.address) as channel:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest())
    assert receiver.named("inference.GRPCInferenceService/ServerLive")
    assert bool(receiver.named("grpc.health.v1.Health/Check")) == trace_health


def test_tracing_is_off_by_default(receiver: OtlpReceiver) -> None:
    server = telemetry_server()
    with server:
        assert server.application.tracing is None


def test_a_request_that_expires_in_the_queue_has_an_error_queue_span(
    receiver: OtlpReceiver,
) -> None:
    header, trace_id, _ = traceparent()
    server = telemetry_server(gated_model("traced_expiring", {}), tracing=exporting_to(receiver))
    with server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        gated = GATED["traced_expiring"]
        gated.gate.clear()
        gated.running.clear()
        try:
            held = stub.ModelInfer.future(_message(0.0, "traced_expiring"))
            assert gated.running.wait(10)
            expiring = _message(1.0, "traced_expiring")
            expiring.parameters["timeout"].int64_param = 50_000  # microseconds
            with pytest.raises(grpc.RpcError) as raised:
                stub.ModelInfer(expiring, metadata=[("traceparent", header)])
            assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        finally:
            gated.gate.set()
        held.result(10)
    spans = receiver.in_trace(trace_id)
    queue = _one(spans, SPAN_QUEUE)
    assert queue.status_code == Status.STATUS_CODE_ERROR
    assert "DeadlineExceededError" in queue.status_message
    assert queue.parent_span_id == _one(spans, INFER_SPAN).span_id
    assert not [span for span in spans if span.name in (SPAN_BATCH, SPAN_BATCH_REQUEST)]
    server_span = _one(spans, INFER_SPAN)
    assert server_span.attributes["rpc.grpc.status_code"] == 4
    assert server_span.status_code == Status.STATUS_CODE_ERROR


@pytest.mark.parametrize("sampled", [True, False])
def test_a_batchs_backend_span_is_the_batch_spans_child_and_current(sampled: bool) -> None:
    """Sampled or not (then nothing is recorded), the backend call of a batch runs with a
    span of the batch span's trace current, and the context is restored after."""
    finished: list[FinishedSpan] = []
    tracer = LeanTracer(1.0, finished.append, SpanLimits())
    model = ModelTracing(tracer, ModelSpec("m", "1", "m", "local", (), ()))
    caller = SpanContext(0xABC, 0xDEF, True, TraceFlags(0x01 if sampled else 0x00))
    context = trace.set_span_in_context(NonRecordingSpan(caller))
    before = current_context()
    batch = model.start_batch([(context, 0.001, 1), (context, 0.002, 2)])
    span, token = batch.start_backend()
    assert trace.get_current_span() is span
    assert span.is_recording() is sampled
    assert span.get_span_context().trace_id == 0xABC
    end_current(span, token, None)
    assert current_context() is before
    batch.end(None)
    if not sampled:
        assert finished == []
        return
    by_name = {record[0]: record for record in finished}
    assert sorted(by_name) == [SPAN_BACKEND, SPAN_BATCH, SPAN_BATCH_REQUEST, SPAN_QUEUE]
    batch_span = by_name[SPAN_BATCH]
    assert by_name[SPAN_BACKEND][4] == batch_span[2]  # the backend span's parent
    assert by_name[SPAN_BATCH_REQUEST][11][0][:2] == (0xABC, batch_span[2])  # its link
