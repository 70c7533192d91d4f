"""A server under test in its own process: started, found by its port, metered, stopped.

Servers run as subprocesses so that they do not share a GIL or an event loop with the load
generator; their output goes to a log file rather than a pipe nobody drains.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

LISTENING_PATTERN = re.compile(r"listening on \S+?:(\d+),")
"""The start-up line both Headrace and the baseline server print, with the bound port."""
METRICS_PATTERN = re.compile(r"metrics on (http://\S+/metrics)")
"""Headrace's start-up line for its Prometheus endpoint (metrics on)."""

WORKERS_VARIABLE = "HEADRACE_SERVER__WORKERS"
SINGLE_PROCESS = {WORKERS_VARIABLE: "1"}
CAPTURE_OFF = {"HEADRACE_CAPTURE__ENABLED": "false"}
"""For scenarios that measure something else: the embedded default captures every call."""
"""Headrace runs one process per core by default; scenarios measure one process unless they
ask for more (and `cpu_seconds` counts a supervisor's workers too)."""
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
_POLL_INTERVAL_S = 0.05


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time process `pid` has used so far, all its threads and live
    child processes together (0 once it has exited)."""
    total = 0.0
    pending = [pid]
    while pending:
        pid = pending.pop()
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
            for task in tasks:
                pending += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:  # exited meanwhile
            continue
        # The command name (field 2) may hold spaces; the fields after its ')' do not.
        fields = stat[stat.rindex(")") + 2 :].split()
        user_ticks, system_ticks = int(fields[11]), int(fields[12])  # fields 14 and 15
        total += (user_ticks + system_ticks) / os.sysconf("SC_CLK_TCK")
    return total


class ServerProcess:
    """One server subprocess. Use as a context manager: `with ServerProcess(...) as server:`
    starts it (`server.port` is then bound) and always stops it, on errors and Ctrl-C too."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        environment: Mapping[str, str] | None = None,
        cpus: Sequence[int] = (),
    ) -> None:
        """`environment` is added to this process's own (HEADRACE_* settings overrides; a
        single Headrace process unless it sets HEADRACE_SERVER__WORKERS). `cpus`: pin the
        server and every process it starts to these CPUs (empty: no pinning)."""
        self.name = name
        self.argv = tuple(argv)
        self.log_path = log_path
        self.environment = {**SINGLE_PROCESS, **(environment or {})}
        self.cpus = tuple(cpus)
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._process.pid

    def start(self, timeout_s: float = START_TIMEOUT_S) -> int:
        """Start the server and wait for its listening line; returns the port.

        Raises:
            RuntimeError: the server exits or prints no listening line within `timeout_s`.
        """
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            pinning = ["taskset", "--cpu-list", ",".join(map(str, self.cpus))] if self.cpus else []
            self._process = subprocess.Popen(
                [*pinning, *self.argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.environment},
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = LISTENING_PATTERN.search(self.log_path.read_text(errors="replace"))
            if match:
                self.port = int(match.group(1))
                return self.port
            if self._process.poll() is not None:
                break
            time.sleep(_POLL_INTERVAL_S)
        self.stop()
        raise RuntimeError(f"{self.name} did not start; see {self.log_path}")

    def metrics_url(self) -> str:
        """The address of the server's /metrics, from its start-up log (Headrace logs it
        before its listening line).

        Raises:
            RuntimeError: the server is not running or serves no metrics.
        """
        match = METRICS_PATTERN.search(self.log_path.read_text(errors="replace"))
        if self._process is None or match is None:
            raise RuntimeError(f"{self.name} serves no metrics; see {self.log_path}")
        return match.group(1)

    def cpu_seconds(self) -> float:
        """User plus system CPU time the server has used so far, all its threads and live
        child processes (a supervisor's workers) together."""
        return cpu_seconds(self.pid)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, then SIGKILL if the server has not exited within `timeout_s`; idempotent."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
