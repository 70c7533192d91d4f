"""`headrace serve --workers N` as a user runs it: a real supervisor process, real worker
processes on one port, real signals, /metrics scraped as Prometheus would."""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from headrace.config import ENV_WORKER_ID, load_settings
from headrace.errors import StartupError
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol import grpc_service_pb2_grpc as pb_grpc
from headrace.workers import available_cores, cgroup_cpu_quota, reserve_port
from tests.frontend.test_tls import Authority

LISTENING = re.compile(r"listening on \S+:(\d+), (\d+) workers \(pids ([\d, ]+)\)")
METRICS = re.compile(r"metrics on http://\S+:(\d+)/metrics")
WORKER_READY = re.compile(r"worker (\d+) ready on ")
CONNECTIONS = 24
"""Client connections: the kernel hashes each to a worker, so with 24 the chance that one
worker gets none is 2 * 2**-24."""
REQUESTS_PER_CONNECTION = 5
WAIT_S = 60.0
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Supervised:
    """A running `headrace serve --workers N` process and what its log said."""

    process: subprocess.Popen[str]
    metrics: bool
    lines: list[str] = field(default_factory=list)
    port: int = 0
    metrics_port: int = 0
    pids: list[int] = field(default_factory=list)
    _condition: threading.Condition = field(default_factory=threading.Condition)

    def follow(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._condition:
                self.lines.append(line)
                self._condition.notify_all()

    def wait_for(self, pattern: re.Pattern[str], after: int = 0) -> re.Match[str]:
        """The first log line from index `after` on matching `pattern`."""
        deadline = time.monotonic() + WAIT_S
        with self._condition:
            while True:
                for line in self.lines[after:]:
                    match = pattern.search(line)
                    if match:
                        return match
                remaining = deadline - time.monotonic()
                assert remaining > 0, "".join(self.lines)
                assert self.process.poll() is None, "".join(self.lines)
                self._condition.wait(min(remaining, 0.5))

    @property
    def log(self) -> str:
        with self._condition:
            return "".join(self.lines)


_workdir: list[Path] = []
"""Where the servers start (set by `_working_folder`)."""


@pytest.fixture(scope="module", autouse=True)
def _working_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The servers start in a temporary folder, so the embedded default's relative paths (its
    capture spool and store, ./headrace-captures) land there, not in the checkout. Module
    scope: autouse fixtures come before the module's server fixtures."""
    _workdir[:] = [tmp_path_factory.mktemp("workers-cwd")]


def _start(*arguments: str, metrics: bool = True, env: dict[str, str] | None = None) -> Supervised:
    environment = {**os.environ, **(env or {})}
    if metrics:
        environment |= {
            "HEADRACE_METRICS__ENABLED": "true",
            "HEADRACE_METRICS__HOST": "127.0.0.1",
            "HEADRACE_METRICS__PORT": "0",
        }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "headrace",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            *arguments,
        ],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        cwd=_workdir[0],
    )
    supervised = Supervised(process, metrics)
    threading.Thread(target=supervised.follow, daemon=True).start()
    return supervised


def _serving(supervised: Supervised) -> Supervised:
    match = supervised.wait_for(LISTENING)
    supervised.port = int(match.group(1))
    supervised.pids = [int(pid) for pid in match.group(3).split(", ")]
    if supervised.metrics:
        supervised.metrics_port = int(supervised.wait_for(METRICS).group(1))
    return supervised


def _stop(supervised: Supervised, signal_number: int = signal.SIGTERM) -> int:
    if supervised.process.poll() is None:
        supervised.process.send_signal(signal_number)
    try:
        return supervised.process.wait(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        supervised.process.kill()
        supervised.process.wait()
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent has not collected it yet.
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def _wait_gone(pids: list[int]) -> list[int]:
    """The pids still alive after waiting up to WAIT_S for all to exit."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.05)
    return [pid for pid in pids if _alive(pid)]


def _request(values: np.ndarray) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="identity",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="INPUT0", datatype="FP32", shape=[1, values.size]
            )
        ],
        raw_input_contents=[values.astype("<f4").tobytes()],
    )


def _send_over_connections(port: int, connections: int, per_connection: int) -> int:
    """Answered requests, each connection a channel of its own (grpc would otherwise share
    one connection between channels to the same address)."""

    def one_connection(index: int) -> int:
        options = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for number in range(per_connection):
                values = np.array([index, number], dtype=np.float32)
                reply = stub.ModelInfer(_request(values), timeout=30)
                answered = np.frombuffer(reply.raw_output_contents[0], dtype="<f4")
                np.testing.assert_array_equal(answered, values)
        return per_connection

    with ThreadPoolExecutor(max_workers=8) as pool:
        return sum(pool.map(one_connection, range(connections)))


def _scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _by_worker(samples: Samples) -> dict[str, float]:
    return {
        dict(labels)["worker"]: value
        for (name, labels), value in samples.items()
        if name == "headrace_worker_requests_total"
    }


@pytest.fixture(scope="module")
def two_workers() -> Iterator[Supervised]:
    supervised = _serving(_start("--workers", "2"))
    try:
        yield supervised
    finally:
        assert _stop(supervised) == 0, supervised.log


def test_load_reaches_every_worker_and_metrics_sum_over_them(two_workers: Supervised) -> None:
    assert len(two_workers.pids) == 2
    before = _scrape(two_workers.metrics_port)
    sent = _send_over_connections(two_workers.port, CONNECTIONS, REQUESTS_PER_CONNECTION)
    after = _scrape(two_workers.metrics_port)

    per_worker = {
        worker: count - _by_worker(before).get(worker, 0.0)
        for worker, count in _by_worker(after).items()
    }
    assert sorted(per_worker) == ["0", "1"]
    assert all(count > 0 for count in per_worker.values()), per_worker
    assert sum(per_worker.values()) == sent
    # The host's series: summed over both workers' multiprocess files, no pid label.
    ok = {"model": "identity", "version": "1", "code": "OK"}
    assert (
        _value(after, "headrace_requests_total", **ok)
        - _value(before, "headrace_requests_total", **ok)
        == sent
    )
    model = {"model": "identity", "version": "1"}
    duration = "headrace_request_duration_seconds_count"
    assert _value(after, duration, **model) - _value(before, duration, **model) == sent
    assert _value(after, "headrace_workers") == 2
    for worker in ("0", "1"):
        assert _value(after, "headrace_worker_cpu_seconds_total", worker=worker) > 0
        assert _value(after, "headrace_worker_resident_memory_bytes", worker=worker) > 0
    # A live-summed gauge: one series for the host, not one per process.
    depth = [key for key in after if key[0] == "headrace_queue_depth"]
    assert depth
    assert all("pid" not in dict(labels) for _, labels in depth)


def test_each_worker_knows_its_index(two_workers: Supervised) -> None:
    indexes = set()
    for pid in two_workers.pids:
        environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        values = [entry.split(b"=", 1)[1] for entry in environment if b"=" in entry]
        names = [entry.split(b"=", 1)[0] for entry in environment if b"=" in entry]
        indexes.add(values[names.index(ENV_WORKER_ID.encode())].decode())
    assert indexes == {"0", "1"}


def test_a_killed_worker_is_replaced_and_counts_survive(two_workers: Supervised) -> None:
    before = _scrape(two_workers.metrics_port)
    victim = two_workers.pids[0]
    mark = len(two_workers.lines)
    os.kill(victim, signal.SIGKILL)
    restarted = two_workers.wait_for(re.compile(r"worker (\d+) \(pid (\d+)\) was killed"), mark)
    assert int(restarted.group(2)) == victim
    index = restarted.group(1)
    ready = two_workers.wait_for(re.compile(rf"worker {index} ready on "), mark)
    assert ready
    assert not _alive(victim)

    sent = _send_over_connections(two_workers.port, CONNECTIONS, REQUESTS_PER_CONNECTION)
    after = _scrape(two_workers.metrics_port)
    assert _value(after, "headrace_worker_restarts_total", worker=index) == 1
    assert _value(after, "headrace_workers") == 2
    # The dead worker's counts stay in the host's totals: counters never go down.
    ok = {"model": "identity", "version": "1", "code": "OK"}
    assert _value(after, "headrace_requests_total", **ok) == (
        _value(before, "headrace_requests_total", **ok) + sent
    )
    per_worker = _by_worker(after)
    assert sum(per_worker.values()) - sum(_by_worker(before).values()) == sent


def test_sigterm_stops_every_worker_and_exits_zero() -> None:
    supervised = _serving(_start("--workers", "2", metrics=False))
    assert _send_over_connections(supervised.port, 4, 2) == 8
    assert _stop(supervised) == 0, supervised.log
    assert _wait_gone(supervised.pids) == []
    assert "worker 0 stopped" in supervised.log
    assert "worker 1 stopped" in supervised.log
    # The port is free again: nothing holds it.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", supervised.port))


def test_sigint_also_stops_every_worker() -> None:
    supervised = _serving(_start("--workers", "2", metrics=False))
    assert _stop(supervised, signal.SIGINT) == 0, supervised.log
    assert _wait_gone(supervised.pids) == []


def _live_over_tls(port: int, trusted_ca: bytes) -> bool:
    credentials = grpc.ssl_channel_credentials(trusted_ca)
    options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        return stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live


def test_sighup_reloads_tls_in_every_worker(tmp_path: Path) -> None:
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    first = Authority("first CA")
    issued = first.issue("headrace", server=True)
    cert.write_bytes(issued.cert)
    key.write_bytes(issued.key)
    config = tmp_path / "tls.yaml"
    config.write_text(f"server:\n  tls: {{cert_file: {cert}, key_file: {key}}}\n")
    supervised = _serving(_start("--workers", "2", "--config", str(config), metrics=False))
    try:
        assert _live_over_tls(supervised.port, first.pem)
        renewed = Authority("renewed CA")
        issued = renewed.issue("headrace", server=True)
        cert.write_bytes(issued.cert)
        key.write_bytes(issued.key)
        mark = len(supervised.lines)
        supervised.process.send_signal(signal.SIGHUP)
        reloaded = re.compile(r"TLS certificate reloaded")
        supervised.wait_for(reloaded, mark)
        deadline = time.monotonic() + WAIT_S
        while len(reloaded.findall("".join(supervised.lines[mark:]))) < 2:  # one per worker
            assert time.monotonic() < deadline, supervised.log
            time.sleep(0.05)
        # New connections, wherever the kernel puts them, get the new certificate.
        assert all(_live_over_tls(supervised.port, renewed.pem) for _ in range(CONNECTIONS))
        with pytest.raises(grpc.RpcError):
            _live_over_tls(supervised.port, first.pem)
    finally:
        assert _stop(supervised) == 0, supervised.log


def test_workers_stop_when_the_supervisor_is_killed() -> None:
    supervised = _serving(_start("--workers", "2", metrics=False))
    supervised.process.kill()
    supervised.process.wait()
    # Each worker sees its link to the supervisor close and shuts down as on SIGTERM.
    assert _wait_gone(supervised.pids) == []


def test_a_worker_that_cannot_start_stops_all_and_exits_nonzero(tmp_path: Path) -> None:
    config = tmp_path / "bad_model.yaml"
    config.write_text(
        "models:\n  - name: broken\n    entrypoint: no_such_module_anywhere:Model\n"
        "    inputs: [{name: X, datatype: FP32, dims: [1]}]\n"
        "    outputs: [{name: Y, datatype: FP32, dims: [1]}]\n"
    )
    supervised = _start("--workers", "2", "--config", str(config), metrics=False)
    code = supervised.process.wait(timeout=WAIT_S)
    time.sleep(0.2)  # the log thread drains what is left
    assert code == 2, supervised.log
    assert "could not start (exited with status 2); stopping" in supervised.log
    assert "no_such_module_anywhere" in supervised.log
    assert "listening on" not in supervised.log


def test_workers_1_is_a_single_process_without_supervisor() -> None:
    supervised = _start("--workers", "1", metrics=False)
    port = int(supervised.wait_for(re.compile(r"listening on \S+:(\d+), serving")).group(1))
    assert _send_over_connections(port, 2, 1) == 2
    assert _stop(supervised) == 0
    assert "headrace.workers" not in supervised.log


def test_a_port_in_use_is_refused_not_shared() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(StartupError, match=f"cannot listen on 127.0.0.1:{port}"):
            reserve_port("127.0.0.1", port)
    # Another supervisor's reservation (SO_REUSEPORT) is refused as well.
    with reserve_port("127.0.0.1", 0) as first:
        port = first.getsockname()[1]
        with pytest.raises(StartupError, match="in use"):
            reserve_port("127.0.0.1", port)


def test_the_supervisor_reports_a_port_in_use_and_exits_1() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        command = [sys.executable, "-m", "headrace", "serve", "--workers", "2"]
        result = subprocess.run(
            [*command, "--host", "127.0.0.1", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=WAIT_S,
            cwd=_workdir[0],
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr


def test_available_cores_is_within_the_affinity() -> None:
    assert 1 <= available_cores() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_a_container_cpu_limit_caps_the_default_workers(
    tmp_path: Path, files: dict[str, str], quota: float | None
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_quota(tmp_path) == quota
    cores = len(os.sched_getaffinity(0))
    expected = cores if quota is None else min(cores, math.ceil(quota))
    assert available_cores(tmp_path) == expected


def test_the_worker_id_variable_is_not_a_settings_override() -> None:
    settings = load_settings(None, environ={ENV_WORKER_ID: "3", "HEADRACE_SERVER__WORKERS": "3"})
    assert settings.server.workers == 3
