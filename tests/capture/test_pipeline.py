"""The capture pipeline in a running server: what start-up finds in the spool is stored first,
a graceful shutdown stores everything spooled, and the metrics follow records to the store."""

from __future__ import annotations

import sys
from pathlib import Path

import grpc
import numpy as np
import yaml

from bench.server_process import ServerProcess
from headrace.capture.record import CaptureRecord
from headrace.capture.spool import OPEN_SUFFIX, Spool, frame
from headrace.config import load_settings
from headrace.protocol import grpc_service_pb2_grpc as pb_grpc
from tests.capture.conftest import (
    capturing_server,
    fp32_request,
    metric,
    stored_request_ids,
    wait_for,
)


def record(request_id: str) -> CaptureRecord:
    request = fp32_request("identity", np.ones((1, 2), np.float32), request_id)
    return CaptureRecord(
        request_id=request_id,
        model="identity",
        version="1",
        received_ns=1,
        responded_ns=2,
        latency_ns=1,
        status_code=0,
        status_message="",
        request=request.SerializeToString(),
    )


def test_graceful_shutdown_stores_everything_spooled(tmp_path: Path) -> None:
    ids = [f"g{index}" for index in range(30)]
    with capturing_server(tmp_path, segment_max_age_s=3600) as server:
        with grpc.insecure_channel(server.address) as channel:
            client = pb_grpc.GRPCInferenceServiceStub(channel)
            for request_id in ids:
                client.ModelInfer(fp32_request("identity", np.ones((1, 4), np.float32), request_id))
        assert stored_request_ids(tmp_path / "store") == []  # nothing sealed yet
        spool = server.application.capture.spool  # type: ignore[union-attr]
        assert spool is not None
    assert sorted(stored_request_ids(tmp_path / "store")) == sorted(ids)
    assert spool.size_bytes == 0
    assert not [p for p in spool.directory.iterdir() if p.stem.isdigit()]


def test_a_previous_runs_spool_is_stored_at_start_up(tmp_path: Path) -> None:
    directory = tmp_path / "spool" / "test-0"
    previous = Spool(directory, max_bytes=1 << 30, segment_max_bytes=1 << 20, segment_max_age_s=60)
    previous.append([record("sealed-1").encode(), record("sealed-2").encode()])
    previous.seal()
    previous.append([record("open-1").encode()])
    previous.close()  # a crash: the last segment stays open...
    (open_segment,) = directory.glob(f"*{OPEN_SUFFIX}")
    with open_segment.open("ab") as file:  # ...with its last write torn
        file.write(frame(record("torn").encode())[:-3])
    with capturing_server(tmp_path) as server:
        pass
    assert sorted(stored_request_ids(tmp_path / "store")) == ["open-1", "sealed-1", "sealed-2"]
    assert (
        metric(server, "headrace_capture_records_total", model="identity", outcome="written") == 3
    )
    assert metric(server, "headrace_capture_upload_errors_total") == 0


def test_metrics_follow_records_into_the_store(tmp_path: Path) -> None:
    with capturing_server(tmp_path, segment_max_age_s=3600) as server:
        with grpc.insecure_channel(server.address) as channel:
            client = pb_grpc.GRPCInferenceServiceStub(channel)
            for index in range(5):
                client.ModelInfer(
                    fp32_request("identity", np.ones((1, 4), np.float32), f"m{index}")
                )
        # The capture stage sets the gauges on its next look at the spool.
        wait_for(
            lambda: metric(server, "headrace_capture_upload_lag_seconds") > 0,
            10,
            "the spool gauges to be set",
        )
        framing = 5 * len(frame(b""))
        # The records' counts reach the metrics within COUNTS_FLUSH_S of their writes.
        wait_for(
            lambda: (
                metric(server, "headrace_capture_bytes_total", model="identity") + framing
                == metric(server, "headrace_capture_spool_bytes")
            ),
            10,
            "the spooled bytes to be counted",
        )
    assert (
        metric(server, "headrace_capture_records_total", model="identity", outcome="written") == 5
    )
    assert metric(server, "headrace_capture_spool_bytes") == 0
    assert metric(server, "headrace_capture_upload_lag_seconds") == 0


def test_each_worker_has_its_own_spool_and_writer_id(tmp_path: Path) -> None:
    tree = load_settings(None).model_dump(mode="json")
    tree["server"].update(host="127.0.0.1", port=0)
    tree["capture"] = {
        "enabled": True,
        "spool_dir": str(tmp_path / "spool"),
        "store": {"kind": "local", "path": str(tmp_path / "store")},
        "writer_id": "host",
    }
    config = tmp_path / "headrace.yaml"
    config.write_text(yaml.safe_dump(tree))
    argv = [sys.executable, "-m", "headrace", "serve", "--config", str(config)]
    sent = []
    log = tmp_path / "workers.log"
    with ServerProcess("workers", argv, log, {"HEADRACE_SERVER__WORKERS": "2"}) as server:
        wait_for(lambda: "worker 1 ready" in log.read_text(), 60, "both workers ready")
        # Many connections: the kernel spreads them over both workers.
        for connection in range(24):
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                client = pb_grpc.GRPCInferenceServiceStub(channel)
                request_id = f"w{connection}"
                client.ModelInfer(fp32_request("identity", np.ones((1, 2), np.float32), request_id))
                sent.append(request_id)
    assert sorted(stored_request_ids(tmp_path / "store")) == sorted(sent)
    writers = {path.name.rsplit("-", 2)[0] for path in (tmp_path / "store").rglob("*.parquet")}
    assert writers == {"host-0", "host-1"}
    assert sorted(p.name for p in (tmp_path / "spool").iterdir()) == ["host-0", "host-1"]
