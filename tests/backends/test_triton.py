"""The Triton backend against real tritonserver processes (the nvidia-pytriton binary, started
by Headrace's launcher on loopback ports): discovery, round trips, batching, spreading over
two servers, Triton's own status codes, and a server killed under load."""

from __future__ import annotations

import shutil
import signal
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from prometheus_client.parser import text_string_to_metric_families

from headrace.app import Application
from headrace.backends.triton import TritonBackend
from headrace.config import MetricsSettings, Settings
from headrace.errors import StartupError
from headrace.examples.sales_forecast import SalesForecast, synthetic_sales
from headrace.launchers.triton import TritonServer, example_repository
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol import grpc_service_pb2_grpc as pb_grpc
from tests.capture.conftest import spooled
from tests.conftest import ServerThread

TEST_MODELS = Path(__file__).with_name("triton_models")
FAST_HEALTH = {"health_check_interval_s": 0.25, "ejection_s": 1.0, "startup_timeout_s": 60}


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example Triton models plus the test-only ones."""
    path = tmp_path_factory.mktemp("triton-models")
    shutil.copytree(example_repository(), path, dirs_exist_ok=True)
    shutil.copytree(TEST_MODELS, path, dirs_exist_ok=True)
    return path


def _start_pair(repository: Path) -> list[TritonServer]:
    servers = [TritonServer(repository) for _ in range(2)]
    threads = [threading.Thread(target=server.start) for server in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for server in servers:
        if server.exit_code is not None or not server.grpc_port:
            for other in servers:
                other.stop()
            server.start()  # raises the launcher's own explanation
    return servers


def _settings(models: list[dict[str, Any]], **triton_settings: Any) -> Settings:
    return Settings.model_validate(
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "triton": {**FAST_HEALTH, **triton_settings},
            "models": models,
        }
    )


@pytest.fixture(scope="module")
def tritons(repository: Path) -> Iterator[list[TritonServer]]:
    servers = _start_pair(repository)
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def gateway(tritons: list[TritonServer]) -> Iterator[ServerThread]:
    both = [server.address for server in tritons]
    models = [
        {"name": "sales_forecast", "backend": "triton", "endpoints": both},
        {"name": "gpu_sim", "backend": "triton", "endpoints": both},
        {
            "name": "echo",
            "backend": "triton",
            "remote_name": "identity",
            "endpoints": [tritons[0].address],
            "batching": {"enabled": False},
        },
        {"name": "fails_with", "backend": "triton", "endpoints": [tritons[0].address]},
    ]
    with ServerThread(_settings(models)) as running:
        yield running


def _backend(gateway: ServerThread) -> TritonBackend:
    backend = gateway.application.repository.resolve("gpu_sim").backend
    assert isinstance(backend, TritonBackend)
    return backend


def test_models_are_described_by_triton(gateway: ServerThread) -> None:
    client = triton.InferenceServerClient(gateway.address)
    metadata = client.get_model_metadata("sales_forecast", as_json=True)
    assert metadata["inputs"] == [{"name": "FEATURES", "datatype": "FP32", "shape": ["-1", "6"]}]
    assert metadata["platform"] == "python"
    config = client.get_model_config("gpu_sim").config
    assert config.max_batch_size > 1
    # Headrace batches; it reports its own batcher, in-flight bound from the endpoints.
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    served = gateway.application.repository.resolve("gpu_sim")
    assert served.batcher is not None
    # One batch per Triton instance (gpu_sim has one) on each of the two endpoints.
    assert served.batcher.policy.max_inflight_batches == 2 * 1
    assert client.get_model_metadata("echo", as_json=True)["name"] == "echo"


def test_round_trips_match_the_local_models(gateway: ServerThread) -> None:
    client = triton.InferenceServerClient(gateway.address)
    features, _ = synthetic_sales(7, seed=11)
    tensor = triton.InferInput("FEATURES", list(features.shape), "FP32")
    tensor.set_data_from_numpy(features)
    forecast = client.infer("sales_forecast", [tensor]).as_numpy("FORECAST")
    np.testing.assert_allclose(
        forecast, SalesForecast()({"FEATURES": features})["FORECAST"], rtol=1e-6
    )
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    tensor = triton.InferInput("INPUT0", [3, 4], "FP32")
    tensor.set_data_from_numpy(data)
    result = client.infer("echo", [tensor], request_id="abc")
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)
    assert result.get_response().model_name == "echo"
    assert result.get_response().id == "abc"


def test_batches_spread_over_both_servers(gateway: ServerThread) -> None:
    before = {e.address: e.calls for e in _backend(gateway).pool("gpu_sim").endpoints}
    with grpc.insecure_channel(gateway.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        futures = []
        for index in range(300):
            data = np.full((1, 3), index, dtype="<f4")
            futures.append(stub.ModelInfer.future(_request("gpu_sim", data)))
        for index, future in enumerate(futures):
            output = np.frombuffer(future.result(30).raw_output_contents[0], "<f4")
            assert output.tolist() == [index] * 3
    calls = {
        e.address: e.calls - before[e.address] for e in _backend(gateway).pool("gpu_sim").endpoints
    }
    assert all(count > 0 for count in calls.values()), calls
    assert sum(calls.values()) < 300  # requests were batched


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (1, grpc.StatusCode.NOT_FOUND),
        (2, grpc.StatusCode.INVALID_ARGUMENT),
        (4, grpc.StatusCode.INTERNAL),
    ],
)
def test_tritons_codes_reach_the_client(
    gateway: ServerThread, value: int, code: grpc.StatusCode
) -> None:
    with grpc.insecure_channel(gateway.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelInfer(_request("fails_with", np.array([[value]], dtype="<i4")), timeout=30)
        assert raised.value.code() == code
        assert "fails_with asked for" in raised.value.details()
        answer = stub.ModelInfer(
            _request("fails_with", np.array([[0, 5]], dtype="<i4")), timeout=30
        )
        assert np.frombuffer(answer.raw_output_contents[0], "<i4").tolist() == [0, 5]


async def test_unknown_model_on_triton_stops_start_up(tritons: list[TritonServer]) -> None:
    settings = _settings(
        [{"name": "ghost", "backend": "triton", "endpoints": [tritons[0].address]}]
    )
    application = Application(settings)  # start() cleans up after itself when it fails
    with pytest.raises(StartupError, match=r"model 'ghost': Triton at .* does not serve 'ghost'"):
        await application.start()


def test_unknown_model_through_headrace_is_not_found(gateway: ServerThread) -> None:
    with grpc.insecure_channel(gateway.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelInfer(_request("ghost", np.zeros((1, 1), "<f4")), timeout=10)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_killed_server_costs_clients_nothing(repository: Path) -> None:
    pair = _start_pair(repository)
    try:
        models = [{"name": "gpu_sim", "backend": "triton", "endpoints": [s.address for s in pair]}]
        settings = _settings(models).model_copy(
            update={"metrics": MetricsSettings(enabled=True, host="127.0.0.1", port=0)}
        )
        with ServerThread(settings) as gateway:
            pool = _backend(gateway).pool("gpu_sim")
            outcomes: Counter[str] = Counter()
            stop = threading.Event()

            def client(worker: int) -> None:
                with grpc.insecure_channel(gateway.address) as channel:
                    stub = pb_grpc.GRPCInferenceServiceStub(channel)
                    value = 0
                    while not stop.is_set():
                        value += 1
                        data = np.full((1, 2), worker * 100_000 + value, dtype="<f4")
                        try:
                            reply = stub.ModelInfer(_request("gpu_sim", data), timeout=30)
                            ok = np.frombuffer(reply.raw_output_contents[0], "<f4").tolist()
                            outcomes["ok" if ok == data.ravel().tolist() else "wrong"] += 1
                        except grpc.RpcError as error:
                            outcomes[error.code().name] += 1

            workers = [threading.Thread(target=client, args=(i,)) for i in range(8)]
            for worker in workers:
                worker.start()
            try:
                time.sleep(1.5)
                victim = pair[1]
                port = victim.grpc_port
                _kill(victim)
                time.sleep(3.0)  # steady load while one server is gone
                served_while_down = outcomes["ok"]
                endpoints_while_down = _endpoint_metrics(gateway)
                # Restart on the same port: traffic must come back to it within seconds.
                pair[1] = TritonServer(repository, grpc_port=port)
                pair[1].start()
                address = pair[1].address
                calls_at_restart = _calls(pool, address)
                deadline = time.monotonic() + 20
                while _calls(pool, address) <= calls_at_restart + 5 and time.monotonic() < deadline:
                    time.sleep(0.1)
                returned = _calls(pool, address) > calls_at_restart + 5
                endpoints_after = _endpoint_metrics(gateway)
            finally:
                stop.set()
                for worker in workers:
                    worker.join(60)
            assert set(outcomes) == {"ok"}, dict(outcomes)
            assert served_while_down > 0
            assert returned, f"no traffic back to {address} within 20 s of its restart"
            survivor = pair[0].address
            assert endpoints_while_down[("headrace_endpoint_up", address)] == 0
            assert endpoints_while_down[("headrace_endpoint_up", survivor)] == 1
            assert endpoints_after[("headrace_endpoint_up", address)] == 1
            assert ("headrace_endpoint_ejections_total", survivor) not in endpoints_after
    finally:
        for server in pair:
            server.stop()


def _endpoint_metrics(gateway: ServerThread) -> dict[tuple[str, str], float]:
    """The gpu_sim pool's endpoint series scraped from /metrics: (sample name, address) ->
    value."""
    port = gateway.application.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (sample.name, sample.labels["endpoint"]): sample.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("headrace_endpoint_")
        for sample in family.samples
        if sample.labels.get("model") == "gpu_sim"
    }


def _calls(pool: Any, address: str) -> int:
    return sum(e.calls for e in pool.endpoints if e.address == address)


def _kill(server: TritonServer) -> None:
    server.kill(signal.SIGKILL)


def _request(model: str, data: np.ndarray) -> pb.ModelInferRequest:
    datatype = {"<f4": "FP32", "<i4": "INT32"}[data.dtype.str]
    return pb.ModelInferRequest(
        model_name=model,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="INPUT0", datatype=datatype, shape=data.shape
            )
        ],
        raw_input_contents=[data.tobytes()],
    )


def test_batching_twice_is_warned_about(
    tritons: list[TritonServer], caplog: pytest.LogCaptureFixture
) -> None:
    model = {
        "name": "gpu_sim_triton_batched",
        "backend": "triton",
        "endpoints": [tritons[0].address],
    }
    with (
        caplog.at_level("WARNING", logger="headrace.backends.triton"),
        ServerThread(_settings([model])) as gateway,
    ):
        client = triton.InferenceServerClient(gateway.address)
        config = client.get_model_config("gpu_sim_triton_batched")
    assert "Triton's dynamic batcher is on as well as Headrace's" in caplog.text
    assert config.config.WhichOneof("scheduling_choice") == "dynamic_batching"


def test_captured_calls_name_their_batch_and_the_endpoint_that_answered(
    tritons: list[TritonServer], tmp_path: Path
) -> None:
    both = [server.address for server in tritons]
    settings = _settings([{"name": "gpu_sim", "backend": "triton", "endpoints": both}])
    tree = settings.model_dump(mode="json")
    tree["capture"] = {
        "enabled": True,
        "spool_dir": str(tmp_path / "spool"),
        "store": {"kind": "local", "path": str(tmp_path / "store")},
        "segment_max_age_s": 3600,  # records stay in the spool, where the test reads them
    }
    with ServerThread(Settings.model_validate(tree)) as gateway:
        with grpc.insecure_channel(gateway.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            futures = [
                stub.ModelInfer.future(_request("gpu_sim", np.full((1, 3), i, dtype="<f4")))
                for i in range(100)
            ]
            for future in futures:
                future.result(30)
        records = spooled(gateway)
    assert len(records) == 100
    assert {record.endpoint for record in records} <= set(both)
    by_batch = Counter(record.batch_id for record in records)
    assert len(by_batch) < 100  # requests were batched
    for record in records:
        # Every request of a batch was captured: the batch's size is its records' count.
        assert record.batch_size == by_batch[record.batch_id]
