"""One trace from the client through Headrace into Triton: a real tritonserver in OpenTelemetry
mode exports OTLP/HTTP to a test receiver, and its spans carry the client's trace id."""

from __future__ import annotations

import time

import grpc
import numpy as np

from headrace.launchers.triton import TritonServer, example_repository
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol import grpc_service_pb2_grpc as pb_grpc
from tests.telemetry.conftest import exporting_to, telemetry_server, traceparent
from tests.telemetry.receiver import OtlpHttpReceiver, OtlpReceiver


def test_tritons_spans_join_the_clients_trace() -> None:
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
                header, trace_id, _ = traceparent()
                features = np.ones((1, 6), dtype="<f4")
                with grpc.insecure_channel(gateway.address) as channel:
                    stub = pb_grpc.GRPCInferenceServiceStub(channel)
                    stub.ModelInfer(
                        pb.ModelInferRequest(
                            model_name="forecast_on_triton",
                            inputs=[
                                pb.ModelInferRequest.InferInputTensor(
                                    name="FEATURES", datatype="FP32", shape=[1, 6]
                                )
                            ],
                            raw_input_contents=[features.tobytes()],
                        ),
                        metadata=[("traceparent", header)],
                        timeout=30,
                    )
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and not (
                    triton_spans.in_trace(trace_id) and headrace_spans.named("headrace.backend")
                ):
                    time.sleep(0.1)
    from_triton = triton_spans.in_trace(trace_id)
    assert from_triton, "Triton exported no span in the client's trace"
    backend = [s for s in headrace_spans.in_trace(trace_id) if s.name == "headrace.backend"]
    assert len(backend) == 1
    # Triton's root span for the request hangs off Headrace's CLIENT span.
    assert backend[0].span_id in {span.parent_span_id for span in from_triton}
