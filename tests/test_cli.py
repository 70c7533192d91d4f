"""The `headrace` command as a user runs it: a real process, real signals."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import yaml

from headrace.capture.reader import read_records
from headrace.frontend.auth import hash_token
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol import grpc_service_pb2_grpc as pb_grpc

TEST_MODELS = Path(__file__).with_name("models.py")

LISTENING = re.compile(r"listening on \S+:(\d+),")


@pytest.fixture(autouse=True)
def _in_a_temporary_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Commands run in a temporary folder, so the embedded default's relative paths (its
    capture spool and store, ./headrace-captures) land there, not in the checkout."""
    monkeypatch.chdir(tmp_path)


def _start(
    *arguments: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], int, list[str]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "headrace", *arguments],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert process.stderr is not None
    lines: list[str] = []
    port = 0
    for line in process.stderr:
        lines.append(line)
        match = LISTENING.search(line)
        if match:
            port = int(match.group(1))
            break
    assert port, "".join(lines)
    # Keep draining the log so the server never blocks on a full pipe.
    threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True).start()
    return process, port, lines


def test_serve_without_arguments_answers_and_exits_zero_on_sigterm() -> None:
    # No arguments: the embedded default config. The environment moves it to an ephemeral
    # loopback port so the test never depends on 8800 being free.
    process, port, lines = _start(
        "serve", env={"HEADRACE_SERVER__PORT": "0", "HEADRACE_SERVER__HOST": "127.0.0.1"}
    )
    try:
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.is_server_ready()
        data = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
        tensor = triton.InferInput("INPUT0", [1, 3], "FP32")
        tensor.set_data_from_numpy(data)
        np.testing.assert_array_equal(client.infer("identity", [tensor]).as_numpy("OUTPUT0"), data)
        client.close()
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    assert code == 0, "".join(lines)
    assert any("stopped" in line for line in lines)


def test_sigint_also_exits_zero(tmp_path: Path) -> None:
    process, _, lines = _start("serve", "--port", "0", "--host", "127.0.0.1")
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 0, "".join(lines)


def test_config_error_names_file_and_field(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(
        "server:\n  port: 99999\nmodels:\n  - name: m\n    entrypoint: a.b:C\n"
        "    inputs: [{name: X, datatype: FP33, dims: [1]}]\n"
        "    outputs: [{name: Y, datatype: FP32, dims: [1]}]\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "headrace", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert f"{config}: server.port: Input should be less than or equal to 65535" in result.stderr
    assert f"{config}: models[0].inputs[0].datatype: Value error, unknown datatype 'FP33'" in (
        result.stderr
    )


def test_config_command_prints_effective_settings() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "headrace", "config", "--port", "9100"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "HEADRACE_LOGGING__LEVEL": "DEBUG"},
    )
    assert result.returncode == 0, result.stderr
    assert "port: 9100" in result.stdout
    assert "level: DEBUG" in result.stdout
    assert "name: identity" in result.stdout


def test_triton_command_prints_the_address_and_stops_on_sigterm(tmp_path: Path) -> None:
    from headrace.launchers.triton import example_repository

    repository = tmp_path / "models"
    shutil.copytree(
        example_repository() / "identity",
        repository / "identity",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    log = tmp_path / "triton.log"
    arguments = ["--grpc-port", "0", "--repository", str(repository), "--log-file", str(log)]
    process = subprocess.Popen(
        [sys.executable, "-m", "headrace", "triton", *arguments],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        announcement = process.stdout.readline()
        match = re.search(r" on (127\.0\.0\.1:\d+) \(gRPC\)", announcement)
        assert match, announcement
        assert f"triton serving {repository} on " in announcement
        client = triton.InferenceServerClient(match.group(1))
        data = np.array([[1.0, 2.0]], dtype=np.float32)
        tensor = triton.InferInput("INPUT0", [1, 2], "FP32")
        tensor.set_data_from_numpy(data)
        np.testing.assert_array_equal(client.infer("identity", [tensor]).as_numpy("OUTPUT0"), data)
        client.close()
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    assert code == 0
    assert "successfully unloaded 'identity'" in log.read_text()


def test_triton_command_exits_1_when_it_cannot_start(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "headrace", "triton", "--repository", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert f"headrace triton: model repository {tmp_path / 'none'} is not a folder" in (
        result.stderr
    )


def test_token_create_prints_the_token_once_and_its_entry() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "headrace", "token", "create", "ci", "--models", "sales_*", "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    token = next(line for line in lines if line.startswith("hr_"))
    entry = yaml.safe_load("\n".join(line for line in lines if not line.startswith(("#", "hr_"))))
    assert entry == [
        {"name": "ci", "sha256": hash_token(token), "models": ["sales_*", "x"], "admin": False}
    ]
    assert result.stdout.count(token) == 1


def _infer(stub: pb_grpc.GRPCInferenceServiceStub, value: int) -> pb.ModelInferResponse:
    request = pb.ModelInferRequest(
        model_name="recorded",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="FP32", shape=[1, 1])
        ],
        raw_input_contents=[np.array([value], dtype="<f4").tobytes()],
    )
    return stub.ModelInfer(request, timeout=30)


def test_sigterm_under_load_fails_no_accepted_request(tmp_path: Path) -> None:
    """SIGTERM while 16 clients keep a batched model busy: the server stops accepting,
    answers every request it accepted (queued in the batcher or running in the model), and
    exits 0. Clients see UNAVAILABLE only for calls refused before they reached Headrace
    (connection refused, GOAWAY), never "Cancelling all calls" (an accepted call cut off).
    Capture is flushed on the way out: the store holds exactly the calls answered OK."""
    record = tmp_path / "ran.txt"
    config = tmp_path / "headrace.yaml"
    store = tmp_path / "captures"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"host": "127.0.0.1", "port": 0, "shutdown_grace_period_s": 20},
                "capture": {
                    "enabled": True,
                    "spool_dir": str(tmp_path / "spool"),
                    "store": {"kind": "local", "path": str(store)},
                },
                "models": [
                    {
                        "name": "recorded",
                        "entrypoint": f"{TEST_MODELS}:Recording",
                        "init_args": {"path": str(record), "delay_s": 0.05},
                        "max_batch_size": 4,
                        "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [1]}],
                        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [1]}],
                        "batching": {"max_inflight_batches": 1},
                    }
                ],
            }
        )
    )
    process, port, lines = _start("serve", "--config", str(config))
    outcomes: dict[int, tuple[grpc.StatusCode, str, bool]] = {}
    """value -> (code, details, answered after SIGTERM)"""
    terminated = threading.Event()
    numbers = iter(range(1, 1_000_000))
    lock = threading.Lock()

    def client() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while True:
                with lock:
                    value = next(numbers)
                try:
                    reply = _infer(stub, value)
                except grpc.RpcError as exc:
                    outcomes[value] = (exc.code(), exc.details() or "", terminated.is_set())
                    return  # the server is going: this client is done
                echoed = np.frombuffer(reply.raw_output_contents[0], "<f4")
                assert echoed.tolist() == [value]
                outcomes[value] = (grpc.StatusCode.OK, "", terminated.is_set())

    try:
        with ThreadPoolExecutor(16) as pool:
            clients = [pool.submit(client) for _ in range(16)]
            while sum(code == grpc.StatusCode.OK for code, _, _ in list(outcomes.values())) < 40:
                time.sleep(0.01)
            process.send_signal(signal.SIGTERM)
            terminated.set()
            for running in clients:
                running.result(timeout=60)
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert code == 0, "".join(lines)
    failures = {v: o for v, o in outcomes.items() if o[0] != grpc.StatusCode.OK}
    ran = {int(line) for line in record.read_text().split()}
    for value, (status, details, _) in failures.items():
        # Refused before Headrace's handler saw it: the connection refused or sent away
        # (UNAVAILABLE), or, in a narrow race, received by grpc but not yet handed to
        # Headrace when it stopped accepting (CANCELLED). Never an accepted call cut off at
        # the grace period ("Cancelling all calls") or failed by a stopping batcher.
        assert status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), (
            value,
            status,
            details,
        )
        assert "Cancelling all calls" not in details, (value, details)
        assert "shutting down" not in details, (value, details)
        assert value not in ran
    # Every request the model ran was answered OK (none was run, then lost).
    assert ran <= {v for v, o in outcomes.items() if o[0] == grpc.StatusCode.OK}
    # Requests in flight at SIGTERM were drained: answered OK after it.
    assert any(o[0] == grpc.StatusCode.OK and o[2] for o in outcomes.values())
    assert failures  # and the clients did go on until the server refused them
    captured = [
        (row.status, float(row.inputs["INPUT0"].ravel()[0]))
        for row in read_records(str(store), "recorded")
    ]
    answered = sorted(v for v, o in outcomes.items() if o[0] == grpc.StatusCode.OK)
    assert sorted(value for _, value in captured) == answered
    assert {status for status, _ in captured} == {"OK"}
