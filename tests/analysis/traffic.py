"""Traffic for the analysis tests: sales-forecast requests sent through a real Headrace, and
the capture records of the calls it answered."""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from headrace.capture.record import CaptureRecord
from headrace.capture.store import LocalStore
from headrace.capture.writer import CaptureFileWriter
from headrace.examples.sales_forecast import WEIGHTS_PATH
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import ServerThread

MODEL = "sales_forecast"
BIAS_SHIFT = 5.0
"""What the perturbed version adds to the network's output bias (units per week)."""


def perturbed_weights(directory: Path, bias_shift: float = BIAS_SHIFT) -> Path:
    """A copy of the example's weights with the output bias moved by `bias_shift`."""
    weights = json.loads(WEIGHTS_PATH.read_text())
    weights["output_bias"] += bias_shift
    path = directory / f"weights_{bias_shift:g}.json"
    path.write_text(json.dumps(weights))
    return path


def sales_version(version: str, weights_path: Path | None = None) -> dict[str, Any]:
    """A model entry for another version of the example sales forecast."""
    return {
        "name": MODEL,
        "version": version,
        "max_batch_size": 256,
        "inputs": [{"name": "FEATURES", "datatype": "FP32", "dims": [6]}],
        "outputs": [{"name": "FORECAST", "datatype": "FP32", "dims": [1]}],
        "entrypoint": "headrace.examples.sales_forecast:SalesForecast",
        "init_args": {"weights_path": str(weights_path)} if weights_path else {},
        "execution": "thread",
    }


def features_request(
    features: np.ndarray, model: str = MODEL, version: str = "1", request_id: str = ""
) -> pb.ModelInferRequest:
    features = np.ascontiguousarray(features, dtype=np.float32)
    return pb.ModelInferRequest(
        model_name=model,
        model_version=version,
        id=request_id,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="FEATURES", datatype="FP32", shape=features.shape
            )
        ],
        raw_input_contents=[features.tobytes()],
    )


def capture_calls(
    server: ServerThread, features: np.ndarray, rows_per_call: int, version: str = "1"
) -> list[CaptureRecord]:
    """Send `features` in calls of `rows_per_call` rows; the records of the answered calls,
    as the capture tee makes them (request and response bytes as on the wire)."""
    records = []
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for start in range(0, len(features), rows_per_call):
            request = features_request(
                features[start : start + rows_per_call],
                version=version,
                request_id=uuid.uuid4().hex,
            )
            received = time.time_ns()
            began = time.perf_counter_ns()
            response = stub.ModelInfer(request)
            latency = time.perf_counter_ns() - began
            records.append(
                CaptureRecord(
                    request_id=request.id,
                    model=MODEL,
                    version=response.model_version,
                    received_ns=received,
                    responded_ns=received + latency,
                    latency_ns=latency,
                    status_code=0,
                    status_message="",
                    request=request.SerializeToString(),
                    response=response.SerializeToString(),
                )
            )
    return records


def infer(server: ServerThread, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    with grpc.insecure_channel(server.address) as channel:
        response: pb.ModelInferResponse = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, timeout=30
        )
        return response


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(server: ServerThread) -> Samples:
    port = server.application.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample_value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path: Path) -> None:
    """The file is a PNG that PIL decodes to a non-empty image."""
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        assert image.size[0] > 100
        assert image.size[1] > 100


def write_captures(folder: Path, records: list[CaptureRecord], segment: int = 0) -> list[str]:
    """Store records as the capture stage does: partitioned Parquet files under `folder`."""
    return CaptureFileWriter(LocalStore(folder, fsync=False), "test").write_segment(
        segment, records
    )


class RecordSink:
    """Takes shadow records as the capture tee would (Application.capture_sink), keeping them."""

    def __init__(self) -> None:
        self.records: list[CaptureRecord] = []

    async def __call__(self, record: CaptureRecord) -> None:
        self.records.append(record)
