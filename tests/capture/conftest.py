"""Helpers of the capture tests: servers that capture, and reading what they spooled."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pyarrow import dataset

from headrace.capture.record import CaptureRecord
from headrace.capture.spool import read_entries
from headrace.config import Settings
from headrace.protocol import grpc_service_pb2 as pb
from tests.conftest import ServerThread, make_settings


def capturing_server(
    root: Path,
    *,
    store: dict[str, Any] | None = None,
    models: dict[str, dict[str, Any]] | None = None,
    extra_models: tuple[dict[str, Any], ...] = (),
    tracing: dict[str, Any] | None = None,
    auth: dict[str, Any] | None = None,
    **capture: Any,
) -> ServerThread:
    """A server for the default and test models that captures under `root` (spool in
    root/spool, files in root/store unless `store` says otherwise); `models` maps model names
    to their `capture` sections; metrics on (port 0)."""
    tree = make_settings().model_dump(mode="json")
    tree["models"] += list(extra_models)
    tree["capture"] = {
        "enabled": True,
        "spool_dir": str(root / "spool"),
        "writer_id": "test",
        "store": store or {"kind": "local", "path": str(root / "store")},
        **capture,
    }
    tree["metrics"] = {"enabled": True, "host": "127.0.0.1", "port": 0}
    if tracing is not None:
        tree["tracing"] = tracing
    if auth is not None:
        tree["server"]["auth"] = auth
    for model in tree["models"]:
        if model["name"] in (models or {}):
            model["capture"] = (models or {})[model["name"]]
    return ServerThread(Settings.model_validate(tree))


def spooled(server: ServerThread) -> list[CaptureRecord]:
    """Every record in the server's spool now, open segment included, in order."""
    capture = server.application.capture
    assert capture is not None
    assert capture.spool is not None
    paths = sorted(p for p in capture.spool.directory.iterdir() if p.stem.isdigit())
    return [CaptureRecord.decode(entry) for path in paths for entry in read_entries(path)]


def metric(server: ServerThread, name: str, **labels: str) -> float:
    metrics = server.application.metrics
    assert metrics is not None
    value = metrics.registry.get_sample_value(name, labels)
    return value if value is not None else 0.0


def fp32_request(
    model: str, values: np.ndarray, request_id: str = "", **parameters: pb.InferParameter
) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=model,
        id=request_id,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="INPUT0", datatype="FP32", shape=list(values.shape)
            )
        ],
        raw_input_contents=[values.astype("<f4").tobytes()],
        parameters=parameters,
    )


def stored_request_ids(store: Path) -> list[str]:
    """The request ids of every row stored under a local store's folder (duplicates kept)."""
    if not store.exists():
        return []
    files = dataset.dataset(store, format="parquet", partitioning="hive")
    return [str(value) for value in files.to_table(columns=["request_id"])["request_id"]]


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout_s:g} s")
        time.sleep(0.05)
