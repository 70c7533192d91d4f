"""The `headrace` command as a user runs it: a real process, real signals."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton

LISTENING = re.compile(r"listening on \S+:(\d+),")


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
