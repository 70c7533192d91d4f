"""A Headrace process killed (SIGKILL) under steady load loses no record of a call it
answered: the next start stores what the spool kept, the torn tail of the killed write aside."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import yaml

from bench.server_process import ServerProcess
from headrace.config import load_settings
from headrace.protocol import grpc_service_pb2_grpc as pb_grpc
from tests.capture.conftest import fp32_request, stored_request_ids

CLIENTS = 4
LOAD_S = 1.5


def write_config(root: Path) -> Path:
    tree = load_settings(None).model_dump(mode="json")
    tree["server"].update(host="127.0.0.1", port=0, shutdown_grace_period_s=5)
    tree["capture"] = {
        "enabled": True,
        "spool_dir": str(root / "spool"),
        "store": {"kind": "local", "path": str(root / "store")},
        "writer_id": "crash",
        "segment_max_bytes": 64 * 1024,  # several segments: some stored, some not, at the kill
        "segment_max_age_s": 0.2,
    }
    path = root / "headrace.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def steady_load(address: str, client: int, answered: list[str], stop: threading.Event) -> None:
    """Send requests one after another until `stop` or the server dies; log every id that got
    an answer."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for index in range(1_000_000):
            if stop.is_set():
                return
            request_id = f"c{client}-{index}"
            values = np.full((1, 32), index, dtype=np.float32)
            try:
                stub.ModelInfer(fp32_request("identity", values, request_id), timeout=5)
            except grpc.RpcError:
                return  # killed: calls from here on got no answer
            answered.append(request_id)


def test_sigkill_under_load_loses_no_answered_call(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    argv = [sys.executable, "-m", "headrace", "serve", "--config", str(config)]
    answered: list[str] = []
    stop = threading.Event()
    with ServerProcess("killed", argv, tmp_path / "killed.log") as server:
        clients = [
            threading.Thread(
                target=steady_load, args=(f"127.0.0.1:{server.port}", n, answered, stop)
            )
            for n in range(CLIENTS)
        ]
        for client in clients:
            client.start()
        time.sleep(LOAD_S)
        os.kill(server.pid, signal.SIGKILL)
        for client in clients:
            client.join(30)
    stop.set()
    assert len(answered) > 100, (tmp_path / "killed.log").read_text()
    before_restart = set(stored_request_ids(tmp_path / "store"))
    assert before_restart < set(answered)  # the kill left records only in the spool

    # The next start stores the spool first; a graceful stop flushes the rest.
    with ServerProcess("restarted", argv, tmp_path / "restarted.log"):
        pass
    stored = stored_request_ids(tmp_path / "store")
    missing = set(answered) - set(stored)
    assert not missing, f"{len(missing)} answered calls not stored, e.g. {sorted(missing)[:5]}"
    assert len(stored) == len(set(stored)), "a record was stored twice"
    spool = tmp_path / "spool" / "crash-0"
    assert not [p for p in spool.iterdir() if p.suffix in (".seg", ".open")]
