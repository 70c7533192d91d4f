"""One trace from the client through Headrace into Triton: a real tritonserver in OpenTelemetry
mode exports OTLP/HTTP to a test receiver, and its spans carry the client's trace id.

Triton itself now and then starts a new trace for a call that carries a valid `traceparent`
(measured on direct calls to it, no Headrace in between: 3 of 88 calls under CPU contention,
8 calls to each of 11 fresh servers). So several calls are sent, each in a trace of its own:
every one that Triton joined must hang off Headrace's backend span (Triton's root span names
it as its parent), and Triton must have joined most of them. A Headrace that did not propagate
the context would have no call joined (trace ids are 128 random bits).
"""

from __future__ import annotations

import time

import grpc
import numpy as np

from headrace.launchers.triton import TritonServer, example_repository
from headrace.protocol import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import infer_request
from tests.telemetry.conftest import exporting_to, telemetry_server, traceparent
from tests.telemetry.receiver import OtlpHttpReceiver, OtlpReceiver

CALLS = 8
TRITON_ROOT_SPAN = "InferRequest"


def test_tritons_spans_join_the_clients_trace() -> None:
    trace_ids: list[str] = []
    with OtlpHttpReceiver() as triton_spans, OtlpReceiver() as headrace_spans:
        trace_flags = [
            "--trace-config=mode=opentelemetry",
            "--trace-config=rate=1",
            "--trace-config=level=TIMESTAMPS",
            f"--trace-config=opentelemetry,url={triton_spans.traces_url}",
            "--trace-config=opentelemetry,bsp_schedule_delay=100",
        ]
        with TritonServer(example_repository(), extra_arguments=trace_flags) as triton:
            model = {
                "name": "forecast_on_triton",
                "remote_name": "sales_forecast",
                "backend": "triton",
                "endpoints": [triton.address],
            }
            with telemetry_server(model, tracing=exporting_to(headrace_spans)) as gateway:
                request = infer_request("forecast_on_triton", FEATURES=np.ones((1, 6), "<f4"))
                with grpc.insecure_channel(gateway.address) as channel:
                    stub = pb_grpc.GRPCInferenceServiceStub(channel)
                    for _ in range(CALLS):
                        header, trace_id, _ = traceparent()
                        trace_ids.append(trace_id)
                        stub.ModelInfer(request, metadata=[("traceparent", header)], timeout=30)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and not (
                    len(triton_spans.named(TRITON_ROOT_SPAN)) >= CALLS
                    and len(headrace_spans.named("headrace.backend")) >= CALLS
                ):
                    time.sleep(0.1)
    roots = triton_spans.named(TRITON_ROOT_SPAN)
    assert len(roots) == CALLS, f"Triton exported {len(roots)} request spans for {CALLS} calls"
    joined = 0
    for trace_id in trace_ids:
        backend = [s for s in headrace_spans.in_trace(trace_id) if s.name == "headrace.backend"]
        assert len(backend) == 1
        from_triton = triton_spans.in_trace(trace_id)
        if from_triton:
            joined += 1
            # Triton's root span for the request hangs off Headrace's CLIENT span.
            (root,) = [span for span in from_triton if span.name == TRITON_ROOT_SPAN]
            assert root.parent_span_id == backend[0].span_id
    # Any trace id in common proves the propagation; most calls joined proves it is not luck.
    assert joined >= CALLS - 3, f"Triton joined {joined} of {CALLS} calls to the client's trace"
