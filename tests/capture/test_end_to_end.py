"""Capture end to end to a real S3 store (SeaweedFS): every call becomes exactly one row with
the tensors sent and answered and the trace it ran in; an outage of the store under load
never pauses serving, loses nothing, and the backlog drains when the store returns."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from headrace.capture.parquet import CaptureRow
from headrace.capture.reader import read_records
from headrace.launchers.seaweedfs import SeaweedFS
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol import grpc_service_pb2_grpc as pb_grpc
from headrace.protocol.converters import encode_bytes_elements
from tests.capture.conftest import capturing_server, fp32_request, metric, wait_for
from tests.conftest import ServerThread
from tests.telemetry.conftest import exporting_to, traceparent
from tests.telemetry.receiver import OtlpReceiver

OUTAGE_S = float(os.environ.get("HEADRACE_TEST_STORE_OUTAGE_S", "10"))
"""How long the store is down in the outage test (the issue's scenario says 30 s; the suite
uses 10 to stay fast: the backlog, retries and drain are the same)."""
DRAIN_TIMEOUT_S = 120.0
DRAINED_LAG_S = 2.0
PAUSE_WINDOW_S = 2.0


@pytest.fixture
def s3(seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Store settings for a prefix of this test's own; the AWS variables in the environment
    (the capture worker process inherits them: credentials never sit in settings)."""
    for key, value in seaweedfs.environ().items():
        monkeypatch.setenv(key, value)
    return {
        "kind": "s3",
        "endpoint": seaweedfs.endpoint,
        "scheme": "http",
        "region": seaweedfs.region,
        "bucket": seaweedfs.bucket,
        "prefix": f"test-{uuid.uuid4().hex[:8]}",
        "max_attempts": 2,
        "initial_backoff_s": 0.05,
        "connect_timeout_s": 1,
        "request_timeout_s": 10,
    }


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


def rows(seaweedfs: SeaweedFS, s3: dict[str, Any], model: str) -> list[CaptureRow]:
    return list(read_records(seaweedfs.store(s3["prefix"]), model))


def bytes_request(model: str, elements: list[bytes], request_id: str) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=model,
        id=request_id,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="INPUT0", datatype="BYTES", shape=[1, len(elements)]
            )
        ],
        raw_input_contents=[encode_bytes_elements(np.array(elements, dtype=object))],
    )


def test_n_calls_become_n_rows_with_their_tensors_and_traces(
    tmp_path: Path, seaweedfs: SeaweedFS, s3: dict[str, Any], receiver: OtlpReceiver
) -> None:
    rng = np.random.default_rng(7)
    sent: dict[str, np.ndarray] = {}
    traces: dict[str, str] = {}
    with (
        capturing_server(
            tmp_path, store=s3, tracing=exporting_to(receiver), segment_max_age_s=0.2
        ) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        client = pb_grpc.GRPCInferenceServiceStub(channel)
        for index in range(30):
            request_id = f"u{index}"
            values = rng.random((1, 1 + index % 7), dtype=np.float32)
            header, trace_id, _ = traceparent()
            client.ModelInfer(
                fp32_request("identity", values, request_id),
                metadata=(("traceparent", header),),
            )
            sent[request_id], traces[request_id] = values, trace_id
        for index in range(10):
            request_id = f"b{index}"
            elements = [f"text {index}".encode(), bytes([0, 255, index])]
            client.ModelInfer(bytes_request("echo_bytes", elements, request_id))
            sent[request_id] = np.array([elements], dtype=object)
        stream = [
            fp32_request("identity", rng.random((1, 3), dtype=np.float32), f"s{i}")
            for i in range(10)
        ]
        header, stream_trace, _ = traceparent()
        replies = list(client.ModelStreamInfer(iter(stream), metadata=(("traceparent", header),)))
        assert not any(reply.error_message for reply in replies)
        for request in stream:
            sent[request.id] = np.frombuffer(request.raw_input_contents[0], "<f4").reshape(1, 3)
            traces[request.id] = stream_trace
    stored = rows(seaweedfs, s3, "identity") + rows(seaweedfs, s3, "echo_bytes")
    assert sorted(row.request_id for row in stored) == sorted(sent)  # exactly one row per call
    server_spans = {
        span.trace_id: span.span_id
        for span in receiver.spans
        if span.name.startswith("inference.GRPCInferenceService/ModelInfer")
        or span.name.startswith("inference.GRPCInferenceService/ModelStreamInfer")
    }
    for row in stored:
        expected = sent[row.request_id]
        assert row.status_code == 0
        np.testing.assert_array_equal(row.inputs["INPUT0"], expected)
        np.testing.assert_array_equal(row.outputs["OUTPUT0"], expected)  # identity echoes
        assert row.batch_size == 1
        assert row.endpoint == "local"
        if row.request_id in traces:
            assert row.trace_id == traces[row.request_id]
            assert row.span_id == server_spans[row.trace_id]


class SteadyLoad:
    """Client threads sending one call after another, logging every answered id and every
    failure, and when each answer came."""

    def __init__(self, address: str, clients: int = 2) -> None:
        self.answered: list[tuple[float, str]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(address, n)) for n in range(clients)
        ]

    def _run(self, address: str, client: int) -> None:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            index = 0
            while not self._stop.is_set():
                request_id = f"c{client}-{index}"
                index += 1
                try:
                    stub.ModelInfer(
                        fp32_request("identity", np.full((1, 16), index, np.float32), request_id),
                        timeout=10,
                    )
                except grpc.RpcError as exc:
                    self.failures.append(f"{request_id}: {exc.code().name}")
                    continue
                self.answered.append((time.monotonic(), request_id))
                time.sleep(0.002)

    def __enter__(self) -> SteadyLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def answered_between(self, start: float, end: float) -> int:
        return sum(1 for moment, _ in self.answered if start <= moment < end)


def test_a_store_outage_under_load_pauses_nothing_and_loses_nothing(
    tmp_path: Path, seaweedfs: SeaweedFS, s3: dict[str, Any]
) -> None:
    def spooled_bytes(server: ServerThread) -> float:
        return metric(server, "headrace_capture_spool_bytes")

    with (
        capturing_server(
            tmp_path, store=s3, segment_max_age_s=0.2, upload_retry_max_s=1.0
        ) as server,
        SteadyLoad(server.address) as load,
    ):
        wait_for(lambda: len(load.answered) > 50, 30, "50 answered calls")
        wait_for(
            lambda: (
                metric(
                    server, "headrace_capture_records_total", model="identity", outcome="written"
                )
                > 0
            ),
            30,
            "a first upload",
        )
        seaweedfs.stop()
        try:
            down = time.monotonic()
            time.sleep(OUTAGE_S)
            up = time.monotonic()
            # Serving went on: calls were answered all through the outage (in every window of
            # a couple of seconds, loose enough for a loaded machine), none failed.
            windows = int(OUTAGE_S // PAUSE_WINDOW_S)
            for window in range(windows):
                start = down + window * PAUSE_WINDOW_S
                assert load.answered_between(start, start + PAUSE_WINDOW_S) > 0, window
            assert load.failures == []
            assert metric(server, "headrace_capture_upload_errors_total") > 0
            assert spooled_bytes(server) > 0
            assert metric(server, "headrace_capture_upload_lag_seconds") > OUTAGE_S / 2
        finally:
            seaweedfs.start()
        # Drained: under steady load the spool never empties, but its oldest record is young.
        wait_for(
            lambda: metric(server, "headrace_capture_upload_lag_seconds") < DRAINED_LAG_S,
            DRAIN_TIMEOUT_S,
            "the backlog to drain",
        )
        assert load.answered_between(up, time.monotonic()) > 0
    answered = {request_id for _, request_id in load.answered}
    stored = [row.request_id for row in rows(seaweedfs, s3, "identity")]
    assert len(stored) == len(set(stored)), "a record was stored twice"
    assert answered <= set(stored), f"{len(answered - set(stored))} answered calls not stored"
    written = metric(server, "headrace_capture_records_total", model="identity", outcome="written")
    assert written == len(stored)
    assert (
        metric(server, "headrace_capture_records_total", model="identity", outcome="dropped") == 0
    )
