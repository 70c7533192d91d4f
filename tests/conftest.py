"""Shared fixtures: a real Headrace server on an ephemeral loopback port, started through the
public API (`headrace.app.Application`) in a thread of its own so blocking clients
(tritonclient.grpc) and asyncio clients can both call it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from headrace.app import Application
from headrace.config import Settings, load_settings
from headrace.launchers.seaweedfs import SeaweedFS
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol.datatypes import DATATYPES, datatype_of

TEST_MODELS = Path(__file__).with_name("models.py")


def _model(name: str, entrypoint: str, **fields: Any) -> dict[str, Any]:
    model: dict[str, Any] = {
        "name": name,
        "entrypoint": entrypoint,
        "execution": "inline",
        "max_batch_size": 8,
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [-1]}],
    }
    model.update(fields)
    return model


def served_test_models() -> list[dict[str, Any]]:
    """The models the front-end tests are served: one echo model per datatype, and models
    with two inputs, fixed shapes, several versions, failures and slowness."""
    identity = "headrace.examples.identity:Identity"
    models = [
        _model(
            f"echo_{name.lower()}",
            identity,
            inputs=[{"name": "INPUT0", "datatype": name, "dims": [-1]}],
            outputs=[{"name": "OUTPUT0", "datatype": name, "dims": [-1]}],
        )
        for name in DATATYPES
    ]
    models += [
        _model(
            "add_sub",
            f"{TEST_MODELS}:AddSub",
            max_batch_size=0,
            inputs=[
                {"name": "INPUT0", "datatype": "INT32", "dims": [16]},
                {"name": "INPUT1", "datatype": "INT32", "dims": [16]},
            ],
            outputs=[
                {"name": "OUTPUT0", "datatype": "INT32", "dims": [16]},
                {"name": "OUTPUT1", "datatype": "INT32", "dims": [16]},
            ],
        ),
        _model(
            "add_sub_batched",
            f"{TEST_MODELS}:AddSub",
            max_batch_size=4,
            inputs=[
                {"name": "INPUT0", "datatype": "FP32", "dims": [1]},
                {"name": "INPUT1", "datatype": "FP32", "dims": [1]},
            ],
            outputs=[
                {"name": "OUTPUT0", "datatype": "FP32", "dims": [1]},
                {"name": "OUTPUT1", "datatype": "FP32", "dims": [1]},
            ],
        ),
        _model(
            "fixed",
            identity,
            max_batch_size=0,
            inputs=[{"name": "INPUT0", "datatype": "FP32", "dims": [2, 3]}],
            outputs=[{"name": "OUTPUT0", "datatype": "FP32", "dims": [2, 3]}],
        ),
        _model("scaled", f"{TEST_MODELS}:Scale", version="1", init_args={"factor": 1.0}),
        _model("scaled", f"{TEST_MODELS}:Scale", version="2", init_args={"factor": 2.0}),
        _model("failing", f"{TEST_MODELS}:Failing"),
        _model("wrong_output", f"{TEST_MODELS}:WrongOutput"),
        _model(
            "slow",
            f"{TEST_MODELS}:Slow",
            init_args={"delay_s": 0.5},
            execution="thread",
        ),
    ]
    return models


def gated_model(name: str, batching: dict[str, Any], delay_s: float = 0.0) -> dict[str, Any]:
    """A batching FP32 model computing 2x + 1 that a test can hold (tests.models.Gated),
    registered in tests.models.GATED under its name."""
    return _model(
        name,
        "tests.models:gated",
        init_args={"key": name, "delay_s": delay_s},
        execution="thread",
        batching=batching,
    )


def server_with(*models: dict[str, Any]) -> ServerThread:
    """A server for the default and test models plus `models`."""
    tree = make_settings().model_dump(mode="json")
    tree["models"] += list(models)
    return ServerThread(Settings.model_validate(tree))


def make_settings(**overrides: Any) -> Settings:
    """The embedded default config on 127.0.0.1:0, plus the test models, plus overrides
    (dotted paths)."""
    base = load_settings(None).model_dump(mode="json")
    base["server"].update(host="127.0.0.1", port=0, shutdown_grace_period_s=5)
    base["capture"] = {"enabled": False}  # tests that capture say where to
    base["models"] += served_test_models()
    settings = Settings.model_validate(base)
    if overrides:
        tree = settings.model_dump(mode="json")
        for dotted, value in overrides.items():
            node = tree
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node[part]
            node[leaf] = value
        settings = Settings.model_validate(tree)
    return settings


class ServerThread:
    """An Application running on an event loop in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.application = Application(settings)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="headrace-test")
        self.port = 0

    def run(self, coroutine: Any, timeout_s: float = 30) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        return self.run_in_background(coroutine).result(timeout_s)

    def run_in_background(self, coroutine: Any) -> Future[Any]:
        """Start a coroutine on the server's loop; the caller waits on the future."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self._thread.start()
        try:
            self.port = self.run(self.application.start())
        except BaseException:
            # A failed start-up must not leave the loop thread running: pytest would wait
            # for it forever at exit.
            self._end_loop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.run(self.application.stop(grace_s=1))
        finally:
            self._end_loop()

    def _end_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    """One Headrace server per test module, serving the default and test models."""
    with ServerThread(make_settings()) as running:
        yield running


@pytest.fixture(scope="session")
def seaweedfs() -> Iterator[SeaweedFS]:
    """One real SeaweedFS S3 store for the whole test session, with a bucket
    (`seaweedfs.bucket`). `seaweedfs.store(prefix)` gives an S3Store with its keys;
    `seaweedfs.environ()` the AWS variables for the credential chain; `stop()` / `start()`
    take it down and bring it back on the same ports and data (a test that stops it must
    start it again). Use a prefix of your own: other tests share the bucket."""
    with SeaweedFS() as running:
        yield running


def infer_request(model: str, **inputs: np.ndarray) -> pb.ModelInferRequest:
    """A ModelInferRequest for `model` with numeric `inputs` (name=array) as raw contents."""
    request = pb.ModelInferRequest(model_name=model)
    for name, array in inputs.items():
        datatype = datatype_of(array)
        assert datatype is not None, array.dtype
        assert datatype.name != "BYTES", "BYTES inputs need their length prefixes"
        request.inputs.add(name=name, datatype=datatype.name, shape=array.shape)
        request.raw_input_contents.append(array.astype(datatype.dtype).tobytes())
    return request
