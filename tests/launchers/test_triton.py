"""The Triton launcher against a real tritonserver (the nvidia-pytriton wheel `make test`
installs), serving the example repository configs/triton/models, checked with tritonclient."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton

from headrace.errors import TritonLaunchError
from headrace.examples.sales_forecast import WEIGHTS_PATH, SalesForecast, synthetic_sales
from headrace.launchers.triton import (
    ENV_BINARY,
    ENV_MODEL_PYTHON,
    MODEL_PYTHON_FOLDER,
    TritonServer,
    example_repository,
)

EXAMPLE_MODELS = {"identity", "sales_forecast", "gpu_sim", "gpu_sim_triton_batched"}
GPU_SIM_LAUNCH_S = 0.005

# Reports where the models' Python comes from: the launcher promises a venv with numpy<2.
PROBE_CONFIG = """
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ 1 ] } ]
output [ { name: "ENVIRONMENT", data_type: TYPE_STRING, dims: [ 2 ] } ]
instance_group [ { kind: KIND_CPU } ]
"""
PROBE_MODEL = """
import sys
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        environment = np.array([sys.prefix, np.__version__], dtype=object)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("ENVIRONMENT", environment)])
                for _ in requests]
"""
IDENTITY_MODEL_STUB = """
class TritonPythonModel:
    pass
"""
BROKEN_MODEL = """
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("weights file missing")
"""


def _add_model(repository: Path, name: str, config: str, model: str) -> None:
    (repository / name / "1").mkdir(parents=True)
    (repository / name / "config.pbtxt").write_text(config)
    (repository / name / "1" / "model.py").write_text(model)


def _repository_with_identity(path: Path) -> Path:
    shutil.copytree(
        example_repository() / "identity",
        path / "identity",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return path


def _input(name: str, data: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput(name, list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    return tensor


def _execution_count(client: triton.InferenceServerClient, model: str) -> int:
    statistics = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(statistics.get("execution_count", 0))


@pytest.fixture(scope="module")
def triton_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    log_path = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    with TritonServer(example_repository(), log_path=log_path) as server:
        yield server


@pytest.fixture(scope="module")
def client(triton_server: TritonServer) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(triton_server.address)
    yield client
    client.close()


def test_server_is_ready_with_every_example_model(
    triton_server: TritonServer, client: triton.InferenceServerClient
) -> None:
    assert triton_server.address == f"127.0.0.1:{triton_server.grpc_port}"
    assert triton_server.exit_code is None
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.get_server_metadata().version == "2.51.0"
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {model["name"]: model["state"] for model in index} == dict.fromkeys(
        EXAMPLE_MODELS, "READY"
    )


@pytest.mark.parametrize(
    ("model", "max_batch_size", "inputs", "outputs"),
    [
        ("identity", 1024, [("INPUT0", "FP32", ["-1", "-1"])], [("OUTPUT0", "FP32", ["-1", "-1"])]),
        (
            "sales_forecast",
            256,
            [("FEATURES", "FP32", ["-1", "6"])],
            [("FORECAST", "FP32", ["-1", "1"])],
        ),
        ("gpu_sim", 256, [("INPUT0", "FP32", ["-1", "-1"])], [("OUTPUT0", "FP32", ["-1", "-1"])]),
        (
            "gpu_sim_triton_batched",
            256,
            [("INPUT0", "FP32", ["-1", "-1"])],
            [("OUTPUT0", "FP32", ["-1", "-1"])],
        ),
    ],
)
def test_model_metadata_and_config(
    client: triton.InferenceServerClient,
    model: str,
    max_batch_size: int,
    inputs: list[tuple[str, str, list[str]]],
    outputs: list[tuple[str, str, list[str]]],
) -> None:
    metadata = client.get_model_metadata(model, as_json=True)
    assert metadata["platform"] == "python"
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == inputs
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["outputs"]] == outputs
    config = client.get_model_config(model, as_json=True)["config"]
    assert config["backend"] == "python"
    assert config["max_batch_size"] == max_batch_size
    assert [group["kind"] for group in config["instance_group"]] == ["KIND_CPU"]
    assert ("dynamic_batching" in config) == (model == "gpu_sim_triton_batched")


def test_gpu_sim_costs_are_parameters(client: triton.InferenceServerClient) -> None:
    for model in ("gpu_sim", "gpu_sim_triton_batched"):
        parameters = client.get_model_config(model, as_json=True)["config"]["parameters"]
        assert parameters["launch_delay_us"]["string_value"] == "5000"
        assert parameters["per_item_delay_us"]["string_value"] == "10"


def test_identity_round_trip(client: triton.InferenceServerClient) -> None:
    data = np.array([[1.5, -2.0, np.inf], [0.0, 3.25, -0.0]], dtype=np.float32)
    result = client.infer("identity", [_input("INPUT0", data)])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)


def test_sales_forecast_weights_are_the_local_models() -> None:
    copy = example_repository() / "sales_forecast" / "1" / "sales_forecast_weights.json"
    assert copy.read_bytes() == WEIGHTS_PATH.read_bytes(), f"copy {WEIGHTS_PATH} to {copy}"


def test_sales_forecast_matches_the_local_model(client: triton.InferenceServerClient) -> None:
    features, _ = synthetic_sales(5)
    result = client.infer("sales_forecast", [_input("FEATURES", features)])
    forecast = result.as_numpy("FORECAST")
    expected = SalesForecast()({"FEATURES": features})["FORECAST"]
    assert forecast.dtype == np.float32
    assert forecast.shape == (5, 1)
    # Same float32 math; numpy versions differ (the models run numpy<2), so allow rounding.
    np.testing.assert_allclose(forecast, expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("model", ["gpu_sim", "gpu_sim_triton_batched"])
def test_gpu_sim_echoes_a_batch_after_its_launch_delay(
    client: triton.InferenceServerClient, model: str
) -> None:
    data = np.arange(24, dtype=np.float32).reshape(8, 3)
    started = time.perf_counter()
    result = client.infer(model, [_input("INPUT0", data)])
    assert time.perf_counter() - started >= GPU_SIM_LAUNCH_S
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)


def test_only_tritons_batcher_merges_concurrent_gpu_sim_requests(
    triton_server: TritonServer,
) -> None:
    requests = 8

    def infer(model: str, index: int) -> None:
        client = triton.InferenceServerClient(triton_server.address)
        data = np.full((1, 4), index, dtype=np.float32)
        result = client.infer(model, [_input("INPUT0", data)])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)
        client.close()

    statistics = triton.InferenceServerClient(triton_server.address)
    executions = {}
    for model in ("gpu_sim", "gpu_sim_triton_batched"):
        before = _execution_count(statistics, model)
        with ThreadPoolExecutor(requests) as pool:
            list(pool.map(infer, [model] * requests, range(requests)))
        executions[model] = _execution_count(statistics, model) - before
    statistics.close()
    # One instance, batcher off: every request is a launch of its own.
    assert executions["gpu_sim"] == requests
    # Requests queued behind a running launch share the next one.
    assert executions["gpu_sim_triton_batched"] < requests


def test_two_launchers_at_once_get_different_ports_and_the_model_environment(
    triton_server: TritonServer, tmp_path: Path
) -> None:
    repository = _repository_with_identity(tmp_path / "models")
    _add_model(repository, "probe", PROBE_CONFIG, PROBE_MODEL)
    with TritonServer(repository, log_path=tmp_path / "triton.log") as second:
        assert second.grpc_port != triton_server.grpc_port
        for server in (triton_server, second):
            client = triton.InferenceServerClient(server.address)
            data = np.array([[7.0]], dtype=np.float32)
            result = client.infer("identity", [_input("INPUT0", data)])
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)
            client.close()
        client = triton.InferenceServerClient(second.address)
        result = client.infer("probe", [_input("INPUT0", np.zeros(1, dtype=np.float32))])
        prefix, numpy_version = (value.decode() for value in result.as_numpy("ENVIRONMENT"))
        client.close()
    assert Path(prefix) == Path(sys.prefix) / MODEL_PYTHON_FOLDER
    assert int(numpy_version.split(".")[0]) < 2
    assert second.exit_code == 0


def test_broken_models_are_named_with_the_log_tail(tmp_path: Path) -> None:
    repository = _repository_with_identity(tmp_path / "models")
    identity_config = (example_repository() / "identity" / "config.pbtxt").read_text()
    _add_model(repository, "broken", identity_config, BROKEN_MODEL)
    _add_model(repository, "unparsable", "backend: python", IDENTITY_MODEL_STUB)
    server = TritonServer(repository, log_path=tmp_path / "triton.log")
    with pytest.raises(TritonLaunchError) as caught:
        server.start()
    message = str(caught.value)
    assert message.startswith("tritonserver exited with code 1 before it was ready")
    failed = message.splitlines()[1]
    assert failed.startswith("models that failed to load: ")
    assert "broken: Internal: RuntimeError: weights file missing" in failed
    assert f"unparsable: failed to read text proto from {repository / 'unparsable'}" in failed
    assert f"--- last lines of the log ({tmp_path / 'triton.log'}) ---" in message
    assert "successfully loaded 'identity'" in message
    assert server.exit_code == 1


def test_a_taken_port_is_reported_not_mistaken_for_ready(
    triton_server: TritonServer, tmp_path: Path
) -> None:
    # A server already answers on that port: readiness must come from our own process.
    repository = _repository_with_identity(tmp_path / "models")
    server = TritonServer(repository, grpc_port=triton_server.grpc_port)
    with pytest.raises(TritonLaunchError, match="exited with code 1") as caught:
        server.start()
    assert f"Socket '127.0.0.1:{triton_server.grpc_port}' already in use" in str(caught.value)


def test_missing_binary_names_the_variable(tmp_path: Path) -> None:
    server = TritonServer(
        example_repository(), environ={**os.environ, ENV_BINARY: str(tmp_path / "tritonserver")}
    )
    with pytest.raises(TritonLaunchError) as caught:
        server.start()
    assert str(caught.value) == (
        f"tritonserver from ${ENV_BINARY}: {tmp_path / 'tritonserver'} is not an executable file"
    )


def test_model_environment_with_numpy_2_is_refused() -> None:
    # Headrace's own environment has numpy 2, which the wheel's stub garbles.
    server = TritonServer(
        example_repository(), environ={**os.environ, ENV_MODEL_PYTHON: sys.prefix}
    )
    with pytest.raises(TritonLaunchError) as caught:
        server.start()
    message = str(caught.value)
    assert f"models, {sys.prefix} from ${ENV_MODEL_PYTHON}, has numpy 2." in message
    assert "the wheel's stub needs numpy<2" in message
    assert "install 'numpy<2'` makes one (`make test` does)" in message


def test_model_environment_without_numpy_is_refused(tmp_path: Path) -> None:
    environment = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", environment], check=True)
    server = TritonServer(
        example_repository(), environ={**os.environ, ENV_MODEL_PYTHON: str(environment)}
    )
    with pytest.raises(TritonLaunchError, match=f"models, {environment} from .* has no numpy;"):
        server.start()


def test_wheel_without_a_stub_for_this_python(tmp_path: Path) -> None:
    # The wheel's layout, with stubs for other Pythons only.
    root = tmp_path / "pytriton" / "tritonserver"
    binary = root / "bin" / "tritonserver"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\nexit 1\n")
    binary.chmod(0o755)
    (root / "python_backend_stubs" / "3.8").mkdir(parents=True)
    (root / "python_backend_stubs" / "3.8" / "triton_python_backend_stub").touch()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    missing = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    with pytest.raises(TritonLaunchError) as caught:
        TritonServer(example_repository(), binary=binary).start()
    assert str(caught.value) == (
        f"the python backend has no stub for Python {version} (this interpreter, "
        f"{sys.executable}): {missing} is missing; the wheel has stubs for 3.8. "
        "Run with one of those Pythons."
    )


def test_missing_repository(tmp_path: Path) -> None:
    with pytest.raises(TritonLaunchError, match="is not a folder"):
        TritonServer(tmp_path / "nothing").start()
