"""Metrics as Prometheus scrapes them: exact counts after a known workload, histograms that
agree with them, and one registry per server."""

from __future__ import annotations

import socket
import time
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from headrace.app import Application
from headrace.errors import StartupError
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol import grpc_service_pb2_grpc as pb_grpc
from headrace.telemetry import Metrics
from tests.conftest import ServerThread, gated_model, make_settings
from tests.models import GATED
from tests.telemetry.conftest import telemetry_server

MODEL = "metered_gated"
METRICS_ON = {"enabled": True, "host": "127.0.0.1", "port": 0}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _scrape(server: ServerThread) -> Samples:
    port = server.application.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def _message(value: float, model: str = MODEL, datatype: str = "FP32") -> pb.ModelInferRequest:
    dtype = "<f4" if datatype == "FP32" else "<i4"
    return pb.ModelInferRequest(
        model_name=model,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype=datatype, shape=[1, 1])
        ],
        raw_input_contents=[np.array([value], dtype=dtype).tobytes()],
    )


def _wait_for_queue(server: ServerThread, depth: int) -> None:
    batcher = server.application.repository.resolve(MODEL).batcher

    async def queued() -> int:
        return batcher.queued

    for _ in range(1000):
        if server.run(queued()) >= depth:
            return
        time.sleep(0.01)
    pytest.fail(f"the queue never reached {depth}")


def _buckets(samples: Samples, name: str, **labels: str) -> list[tuple[float, float]]:
    found = []
    for (sample, sample_labels), value in samples.items():
        as_dict = dict(sample_labels)
        bound = as_dict.pop("le", None)
        if sample == f"{name}_bucket" and as_dict == labels and bound is not None:
            found.append((float(bound), value))
    return sorted(found)


def _assert_histogram(samples: Samples, name: str, count: int, **labels: str) -> None:
    """Cumulative buckets never decrease and +Inf holds every observation."""
    buckets = _buckets(samples, name, **labels)
    assert buckets, name
    counts = [value for _, value in buckets]
    assert counts == sorted(counts), name
    assert buckets[-1] == (float("inf"), count), name
    assert _value(samples, f"{name}_count", **labels) == count, name


def test_a_known_workload_gives_exact_counts_and_consistent_histograms() -> None:
    server = telemetry_server(gated_model(MODEL, {}), metrics=METRICS_ON)
    with server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        before = _scrape(server)
        labels = {"model": MODEL, "version": "1"}
        assert _value(before, "headrace_requests_total", code="OK", **labels) == 0
        assert _value(before, "headrace_queue_depth", **labels) == 0

        # 5 OK: one holds the model, 4 queue behind it and leave as one batch.
        gated = GATED[MODEL]
        gated.gate.clear()
        gated.running.clear()
        try:
            held = stub.ModelInfer.future(_message(1.0))
            assert gated.running.wait(10)
            queued = [stub.ModelInfer.future(_message(float(i))) for i in range(4)]
            _wait_for_queue(server, 4)
            assert _value(_scrape(server), "headrace_queue_depth", **labels) == 4
        finally:
            gated.gate.set()
        for call in [held, *queued]:
            call.result(10)
        # 2 INVALID_ARGUMENT (wrong datatype), 1 NOT_FOUND, 2 OK on a model without batcher.
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as raised:
                stub.ModelInfer(_message(1.0, datatype="INT32"))
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelInfer(_message(1.0, model="no_such_model"))
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        for _ in range(2):
            stub.ModelInfer(_message(1.0, model="identity"))
        after = _scrape(server)

    assert [len(batch) for batch in gated.batches] == [1, 4]
    assert _value(after, "headrace_requests_total", code="OK", **labels) == 5
    assert _value(after, "headrace_requests_total", code="INVALID_ARGUMENT", **labels) == 2
    assert ("headrace_requests_total", (("code", "NOT_FOUND"), *sorted(labels.items()))) not in (
        after
    )
    assert _value(after, "headrace_requests_total", model="", version="", code="NOT_FOUND") == 1
    _assert_histogram(after, "headrace_request_duration_seconds", 7, **labels)
    # Only requests that reached the batcher waited in it, and 2 batches reached the model.
    _assert_histogram(after, "headrace_queue_duration_seconds", 5, **labels)
    _assert_histogram(after, "headrace_batch_size", 2, **labels)
    _assert_histogram(after, "headrace_backend_duration_seconds", 2, **labels)
    assert _value(after, "headrace_batch_size_sum", **labels) == 5
    assert _buckets(after, "headrace_batch_size", **labels)[0] == (1.0, 1)  # the lone one
    # The 4 queued requests waited while the model was held.
    assert _value(after, "headrace_queue_duration_seconds_sum", **labels) > 0
    assert _value(after, "headrace_queue_depth", **labels) == 0

    identity = {"model": "identity", "version": "1"}
    assert _value(after, "headrace_requests_total", code="OK", **identity) == 2
    _assert_histogram(after, "headrace_queue_duration_seconds", 2, **identity)
    assert _value(after, "headrace_queue_duration_seconds_sum", **identity) == 0
    assert _value(after, "headrace_batch_size_sum", **identity) == 2
    assert any(name == "process_cpu_seconds_total" for name, _ in after)


def test_servers_in_one_process_keep_their_own_counts() -> None:
    first = telemetry_server(metrics=METRICS_ON)
    second = telemetry_server(metrics=METRICS_ON)
    with first, second, grpc.insecure_channel(first.address) as channel:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_message(1.0, model="identity"))
        labels = {"model": "identity", "version": "1", "code": "OK"}
        assert first.application.metrics_port != second.application.metrics_port
        assert _value(_scrape(first), "headrace_requests_total", **labels) == 1
        assert _value(_scrape(second), "headrace_requests_total", **labels) == 0


async def test_a_taken_metrics_port_stops_start_up() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = make_settings(metrics={"enabled": True, "host": "127.0.0.1", "port": port})
        application = Application(settings)
        with pytest.raises(StartupError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            await application.start()


def test_metrics_are_off_by_default() -> None:
    server = telemetry_server()
    with server:
        assert server.application.metrics is None
        assert server.application.metrics_port == 0


def test_endpoint_series_follow_the_pool() -> None:
    metrics = Metrics()
    endpoints = metrics.for_endpoints("m")
    endpoints.endpoint_in_flight("a:1", 3)
    endpoints.endpoint_available("a:1", True)
    endpoints.endpoint_available("b:1", False)
    endpoints.endpoint_ejected("b:1")
    endpoints.endpoint_ejected("b:1")

    def scrape() -> Samples:
        text = generate_latest(metrics.registry).decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name.startswith("headrace_endpoint_")
        }

    samples = scrape()
    assert _value(samples, "headrace_endpoint_in_flight", model="m", endpoint="a:1") == 3
    assert _value(samples, "headrace_endpoint_up", model="m", endpoint="a:1") == 1
    assert _value(samples, "headrace_endpoint_up", model="m", endpoint="b:1") == 0
    assert _value(samples, "headrace_endpoint_ejections_total", model="m", endpoint="b:1") == 2
    endpoints.endpoint_removed("b:1")
    assert not any(dict(labels)["endpoint"] == "b:1" for _, labels in scrape())
