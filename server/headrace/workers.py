"""`headrace serve --workers N`: one supervisor process and N worker processes on one port.

One Python process uses one core. The supervisor reserves the gRPC port once (a socket bound
with SO_REUSEPORT that never listens, held until exit: with port 0 the kernel picks the number
once, for every worker), writes the resolved settings to a private temporary folder and starts
each worker as `python -m headrace.workers`. Every worker runs the whole Application on that
port with SO_REUSEPORT, and the kernel spreads new connections over the workers' listening
sockets (never to the supervisor's, which does not listen). A connection stays with the
worker that accepted it: HTTP/2 multiplexes all of a client's calls on it.

The supervisor
- says "listening on HOST:PORT" once every worker serves; a worker that cannot start (a model
  that does not load, Triton unreachable) stops the others and the supervisor exits with the
  worker's status (2: configuration, 1: start-up), instead of starting it again forever;
- starts a worker that exits unexpectedly again, after a back-off that doubles while its
  replacements keep failing;
- passes SIGTERM and SIGINT on as SIGTERM (each worker drains its in-flight requests within
  `server.shutdown_grace_period_s`) and SIGHUP (TLS files re-read) to the workers, and exits 0
  once all have stopped;
- serves /metrics for the host when metrics are on: the workers record into prometheus-client's
  multiprocess files (PROMETHEUS_MULTIPROC_DIR, in the temporary folder) and the supervisor
  sums them (`headrace.telemetry.metrics.HostMetrics`).

Each worker holds one end of a socket pair whose other end the supervisor keeps: it announces
readiness on it, and sees it close if the supervisor dies (even by SIGKILL), then stops as on
SIGTERM; no worker outlives its supervisor. Workers get HEADRACE_WORKER_ID (0 to N-1) in
their environment.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import math
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from headrace.app import WORKER_READY, serve
from headrace.config import ENV_WORKER_ID, Settings
from headrace.errors import ConfigError, StartupError
from headrace.telemetry import configure_logging
from headrace.telemetry.metrics import HostMetrics, MetricsServer

MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
"""Where prometheus-client in a worker writes its metric files (read at its import)."""
RESTART_BACKOFF_S = 0.5
"""Wait before starting a worker again after its first unexpected exit; doubles with each
replacement that fails soon again."""
RESTART_BACKOFF_MAX_S = 30.0
BACKOFF_RESET_S = 30.0
"""A worker that served this long before exiting is started again after the shortest wait."""
STOP_MARGIN_S = 5.0
"""On top of the grace period, how long stopping workers may take before they are killed."""
EXIT_CONFIG_ERROR = 2
EXIT_STARTUP_ERROR = 1

_logger = logging.getLogger(__name__)


CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cores(cgroup_root: Path = CGROUP_ROOT) -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota (a
    container's CPU limit), rounded up; at least 1."""
    cores = len(os.sched_getaffinity(0))
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return cores


def cgroup_cpu_quota(cgroup_root: Path = CGROUP_ROOT) -> float | None:
    """CPUs' worth of time per period the cgroup allows (cgroup v2 `cpu.max`, else v1
    `cpu/cpu.cfs_quota_us`); None without a limit or a readable cgroup."""
    with contextlib.suppress(OSError, ValueError):
        quota, period = (cgroup_root / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    with contextlib.suppress(OSError, ValueError):
        v1 = cgroup_root / "cpu"
        quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
        period_us = int((v1 / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    return None


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to `host:port` with SO_REUSEPORT that never listens: it holds the port
    (with 0, the one the kernel picked) for the workers, who bind it with SO_REUSEPORT too,
    and receives no connections itself. A wildcard host reserves the dual-stack IPv6 address,
    as grpc binds it, falling back to IPv4.

    Raises:
        StartupError: the port is in use (by anything, another Headrace included: a port is
            never shared silently) or the address is not this host's.
    """
    if host in ("0.0.0.0", "::", "", "[::]"):
        candidates = [(socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")]
    else:
        try:
            records = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except OSError as exc:
            raise StartupError(f"cannot listen on {host}:{port}: {exc}") from exc
        candidates = [(records[0][0], str(records[0][4][0]))]
    failure: OSError | None = None
    for family, address in candidates:
        try:
            if port:
                _check_free(family, address, port)
            reservation = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            failure = exc
            if exc.errno == errno.EADDRINUSE:
                break
            continue
        try:
            reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                reservation.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            reservation.bind((address, port))
        except OSError as exc:
            reservation.close()
            failure = exc
            continue
        return reservation
    reason = failure.strerror if failure is not None and failure.strerror else failure
    raise StartupError(f"cannot listen on {host}:{port}: {reason}")


def _check_free(family: socket.AddressFamily, address: str, port: int) -> None:
    """Raises OSError (EADDRINUSE) when something already holds the port, SO_REUSEPORT or
    not: a probe without SO_REUSEPORT cannot bind beside it."""
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        probe.bind((address, port))


@dataclass(slots=True)
class _Worker:
    index: int
    process: asyncio.subprocess.Process
    link: socket.socket
    """The supervisor's end of the socket pair."""
    started_s: float
    """loop.time() at start."""


class Supervisor:
    """Runs `workers` worker processes of the Application on one port; see the module
    docstring. `run()` returns the exit status."""

    def __init__(self, settings: Settings, workers: int) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.settings = settings
        self.workers = workers
        self.port = 0
        """The reserved port once `run()` has bound it."""
        self.metrics_port = 0
        """The host's /metrics port once started (0: metrics are off)."""
        self._stop = asyncio.Event()
        self._all_ready = asyncio.Event()
        self._ready: dict[int, _Worker] = {}
        self._live: dict[int, _Worker] = {}
        self._started_once: set[int] = set()
        self._failure: int | None = None
        self._settings_path = Path()
        self._metrics_dir: str | None = None
        self._host_metrics: HostMetrics | None = None

    async def run(self) -> int:
        """Start the workers, keep them running until SIGTERM/SIGINT, stop them.

        Raises:
            StartupError: the port or the metrics port cannot be bound.
        """
        loop = asyncio.get_running_loop()
        for signal_number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signal_number, self._request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        try:
            with tempfile.TemporaryDirectory(prefix="headrace-workers-") as directory:
                return await self._run_in(Path(directory))
        finally:
            for signal_number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signal_number)

    async def _run_in(self, directory: Path) -> int:
        server = self.settings.server
        with reserve_port(server.host, server.port) as reservation:
            self.port = int(reservation.getsockname()[1])
            worker_settings = self.settings.model_copy(
                update={"server": server.model_copy(update={"port": self.port, "workers": 1})}
            )
            self._settings_path = directory / "settings.json"
            self._settings_path.write_text(worker_settings.model_dump_json())
            metrics_server = self._start_metrics(directory)
            slots = [
                asyncio.create_task(self._keep_running(index), name=f"worker-{index}")
                for index in range(self.workers)
            ]
            try:
                await self._wait_started()
                if not self._stop.is_set():
                    pids = ", ".join(str(w.process.pid) for w in self._ready.values())
                    _logger.info(
                        "listening on %s:%d, %d workers (pids %s)",
                        server.host,
                        self.port,
                        self.workers,
                        pids,
                    )
                    await self._stop.wait()
                    _logger.info(
                        "shutting down: in-flight requests have %.1f s to finish",
                        server.shutdown_grace_period_s,
                    )
            finally:
                self._request_stop()
                await self._stop_workers(slots)
                if metrics_server is not None:
                    metrics_server.stop()
        if self._failure is not None:
            return self._failure
        _logger.info("stopped")
        return 0

    def _start_metrics(self, directory: Path) -> MetricsServer | None:
        if not self.settings.metrics.enabled:
            return None
        metrics_dir = directory / "metrics"
        metrics_dir.mkdir()
        self._metrics_dir = str(metrics_dir)
        host_metrics = HostMetrics(self._metrics_dir, self._worker_pids)
        self._host_metrics = host_metrics
        metrics_server = MetricsServer(self.settings.metrics, host_metrics.registry)
        self.metrics_port = metrics_server.start()
        return metrics_server

    def _worker_pids(self) -> dict[int, int]:
        # Called from the metrics server's thread: copy first (one step under the GIL).
        return {index: worker.process.pid for index, worker in dict(self._live).items()}

    async def _wait_started(self) -> None:
        ready = asyncio.create_task(self._all_ready.wait())
        stopped = asyncio.create_task(self._stop.wait())
        await asyncio.wait((ready, stopped), return_when=asyncio.FIRST_COMPLETED)
        for task in (ready, stopped):
            task.cancel()
        await asyncio.gather(ready, stopped, return_exceptions=True)

    def _request_stop(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._forward(signal.SIGTERM)

    def _forward(self, signal_number: int) -> None:
        # SIGHUP only reaches workers that serve (their handler is installed: SIGHUP's default
        # action would end one still starting); one starting later reads the new files anyway.
        workers = self._live if signal_number == signal.SIGTERM else self._ready
        for worker in workers.values():
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal_number)

    async def _keep_running(self, index: int) -> None:
        """Worker `index` until stop: started, and started again after each unexpected exit."""
        loop = asyncio.get_running_loop()
        failures = 0
        while not self._stop.is_set():
            worker = await self._spawn(index)
            ready = await self._wait_ready(worker)
            if ready:
                self._ready[index] = worker
                self._set_worker_gauge()
                if index not in self._started_once:
                    self._started_once.add(index)
                    if len(self._started_once) == self.workers:
                        self._all_ready.set()
            code = await worker.process.wait()
            self._forget(worker)
            if self._stop.is_set():
                return
            if not ready and index not in self._started_once:
                self._start_failed(index, code)
                return
            uptime_s = loop.time() - worker.started_s
            failures = 0 if ready and uptime_s >= BACKOFF_RESET_S else failures + 1
            delay_s = min(RESTART_BACKOFF_MAX_S, RESTART_BACKOFF_S * 2 ** max(0, failures - 1))
            _logger.warning(
                "worker %d (pid %d) %s; starting it again in %.1f s",
                index,
                worker.process.pid,
                _describe_exit(code),
                delay_s,
            )
            if self._host_metrics is not None:
                self._host_metrics.restarts.labels(str(index)).inc()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay_s)

    async def _spawn(self, index: int) -> _Worker:
        supervisor_end, worker_end = socket.socketpair()
        environment = {**os.environ, ENV_WORKER_ID: str(index)}
        if self._metrics_dir is not None:
            environment[MULTIPROCESS_DIR_VARIABLE] = self._metrics_dir
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "headrace.workers",
                "--settings",
                str(self._settings_path),
                "--worker-id",
                str(index),
                "--link-fd",
                str(worker_end.fileno()),
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(worker_end.fileno(),),
                env=environment,
            )
        except BaseException:
            supervisor_end.close()
            raise
        finally:
            worker_end.close()
        supervisor_end.setblocking(False)
        worker = _Worker(index, process, supervisor_end, asyncio.get_running_loop().time())
        self._live[index] = worker
        if self._stop.is_set():  # stop came while it was being started: SIGTERM missed it
            process.send_signal(signal.SIGTERM)
        return worker

    async def _wait_ready(self, worker: _Worker) -> bool:
        """True once the worker says it serves; False if it exits (its end closes) first."""
        loop = asyncio.get_running_loop()
        received = b""
        while not received.endswith(b"\n"):
            try:
                chunk = await loop.sock_recv(worker.link, len(WORKER_READY))
            except OSError:
                return False
            if not chunk:
                return False
            received += chunk
        return received == WORKER_READY

    def _forget(self, worker: _Worker) -> None:
        worker.link.close()
        if self._live.get(worker.index) is worker:
            del self._live[worker.index]
        if self._ready.get(worker.index) is worker:
            del self._ready[worker.index]
        if self._host_metrics is not None:
            self._host_metrics.worker_exited(worker.process.pid)
        self._set_worker_gauge()

    def _set_worker_gauge(self) -> None:
        if self._host_metrics is not None:
            self._host_metrics.workers.set(len(self._ready))

    def _start_failed(self, index: int, code: int) -> None:
        status = EXIT_CONFIG_ERROR if code == EXIT_CONFIG_ERROR else EXIT_STARTUP_ERROR
        _logger.error("worker %d could not start (%s); stopping", index, _describe_exit(code))
        if self._failure is None:
            self._failure = status
        self._request_stop()

    async def _stop_workers(self, slots: Sequence[asyncio.Task[None]]) -> None:
        timeout_s = self.settings.server.shutdown_grace_period_s + STOP_MARGIN_S
        _, pending = await asyncio.wait(slots, timeout=timeout_s)
        if pending:
            _logger.warning("%d worker(s) did not stop in %.1f s: killed", len(pending), timeout_s)
            for worker in list(self._live.values()):
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
            await asyncio.wait(pending)
        for slot in slots:
            if not slot.cancelled() and slot.exception() is not None:
                _logger.error("worker %s failed", slot.get_name(), exc_info=slot.exception())


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def worker_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of one worker process (`python -m headrace.workers`, started by the
    supervisor only); returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m headrace.workers")
    parser.add_argument("--settings", type=Path, required=True)
    parser.add_argument("--worker-id", type=int, required=True)
    parser.add_argument("--link-fd", type=int, required=True)
    arguments = parser.parse_args(argv)

    link = socket.socket(fileno=arguments.link_fd)
    try:
        settings = Settings.model_validate_json(arguments.settings.read_text())
        configure_logging(settings.logging)
        asyncio.run(serve(settings, worker_id=arguments.worker_id, supervisor=link))
    except ConfigError as exc:
        logging.getLogger("headrace").error("worker %d: %s", arguments.worker_id, exc)
        return EXIT_CONFIG_ERROR
    except StartupError as exc:
        logging.getLogger("headrace").error("worker %d: %s", arguments.worker_id, exc)
        return EXIT_STARTUP_ERROR
    finally:
        link.close()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
