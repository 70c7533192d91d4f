"""A real Triton Inference Server on a loopback port, for tests, benchmarks and developers.

Where tritonserver comes from, first match wins: the `binary` argument, `$TRITONSERVER_BIN`,
else the `nvidia-pytriton` wheel installed with the running Python (`make test` installs it).
Production runs NVIDIA's Triton container; nothing else in Headrace depends on the wheel.

What the wheel needs, and the launcher does, to run python-backend models:

- The python backend's stub is a separate program per Python minor version, shipped beside the
  backends (`python_backend_stubs/3.X/`). The launcher copies the backends folder into a
  working directory of its own and puts the running Python's stub into `backends/python/`, so
  site-packages stays untouched.
- The stub embeds `libpython3.X.so.1.0`. It must be the running interpreter's (its `LIBDIR`),
  not whatever the system linker finds first (a Debian 3.11.2 under a pyenv 3.11.7 breaks model
  loading), and the copied stub no longer finds the wheel's bundled libraries through its
  relative RPATH. Both folders go first on `LD_LIBRARY_PATH`.
- The embedded interpreter runs isolated (PYTHONPATH, PYTHONHOME and the user site are
  ignored) and finds its environment from the first `python3` on PATH. The models' environment
  is a venv of the running Python with numpy<2 (`$TRITONSERVER_MODEL_PYTHON`, default
  `<sys.prefix>/triton-python`, which `make test` creates), put first on PATH: the stub's
  pybind11 predates numpy 2 and passes numpy 2 arrays as empty or zeroed tensors, silently.

With an explicit binary from a real install (`<root>/bin/tritonserver` with no
`python_backend_stubs/` beside it), `<root>/backends` is used as it is, with no copies and no
environment changes: its stub matches its own Python.

Ports: Triton binds `--grpc-port 0` to an ephemeral port but logs the address as `:0` and has
no other way to report it. Rather than "find a free port, then bind it later" (racy), the
launcher reads the port the process actually listens on from /proc (its socket inodes in
/proc/PID/fd matched against /proc/PID/net/tcp{,6}); HTTP and metrics are off, so gRPC is its
only listener. Nothing to retry: a port is never chosen before Triton binds it. The same check
with an explicit port makes sure it is this tritonserver that answers, not a server already
there.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import importlib.util
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

import grpc

from headrace.errors import TritonLaunchError
from headrace.protocol import grpc_service_pb2, grpc_service_pb2_grpc

ENV_BINARY = "TRITONSERVER_BIN"
ENV_MODEL_PYTHON = "TRITONSERVER_MODEL_PYTHON"
MODEL_PYTHON_FOLDER = "triton-python"
WHEEL_REQUIREMENT = "nvidia-pytriton==0.7.0"
STUB_NAME = "triton_python_backend_stub"
LOG_TAIL_LINES = 40
_POLL_INTERVAL_S = 0.05
# Triton's error lines ("E1127 21:45:00.909970 21360 main.cc:245] message"); the CUDA one is
# what every start on a machine without a GPU logs.
_LOG_ERROR = re.compile(r"^E\d{4} [\d:.]+ +\d+ \S+\] (.*)$", re.M)
_HARMLESS = "CudaDriverHelper has not been initialized"
_TCP_LISTEN_STATE = "0A"
_SHARED_MEMORY = "/dev/shm"
# A model that failed to load, and why (up to the first escaped newline of the message): its
# config cannot be read, or the model itself failed.
_FAILED_MODEL = re.compile(
    r"(?:Poll failed for model directory|failed to load) '([^']+)'(?: version \S+)?: "
    r"(.*?)(?:\\n|\"?$)",
    re.M,
)


def example_repository() -> Path:
    """The example model repository, configs/triton/models of the checkout Headrace is installed
    from in editable mode (`make` does). Not packaged: setuptools would take its model folders
    for Python packages, and production mounts it into NVIDIA's container from the checkout."""
    return Path(str(importlib.resources.files("headrace.configs").joinpath("triton", "models")))


@dataclass(frozen=True)
class TritonInstallation:
    """A tritonserver binary and what it needs around it to run python-backend models."""

    binary: Path
    backend_directory: Path | None
    """Passed as --backend-directory; None leaves Triton's default (/opt/tritonserver/backends)."""
    python_stub: Path | None
    """The wheel's stub for the running Python, copied into a private backends folder; None
    for a real install, whose backends folder already holds its stub."""
    library_directories: tuple[Path, ...] = ()
    """Put first on LD_LIBRARY_PATH: the running Python's libpython, the wheel's libraries."""
    model_python: Path | None = None
    """The Python environment the models run in; its bin/ is put first on PATH."""

    @classmethod
    def find(
        cls, binary: Path | str | None = None, environ: Mapping[str, str] | None = None
    ) -> TritonInstallation:
        """The installation of `binary`, else of `$TRITONSERVER_BIN`, else of the wheel.

        Raises:
            TritonLaunchError: no binary; the wheel has no stub for the running Python; the
                models' Python environment is missing or unfit (the message says how to fix it).
        """
        environ = os.environ if environ is None else environ
        if binary is None and environ.get(ENV_BINARY):
            binary, origin = environ[ENV_BINARY], f"${ENV_BINARY}"
        elif binary is not None:
            origin = "the binary given"
        else:
            binary, origin = _wheel_binary(), f"the {WHEEL_REQUIREMENT} wheel"
        path = Path(binary)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise TritonLaunchError(f"tritonserver from {origin}: {path} is not an executable file")
        root = path.resolve().parent.parent
        stubs = root / "python_backend_stubs"
        if not stubs.is_dir():
            backends = root / "backends"
            return cls(path, backends if backends.is_dir() else None, None)
        return cls._wheel(path, root, stubs, environ)

    @classmethod
    def _wheel(
        cls, binary: Path, root: Path, stubs: Path, environ: Mapping[str, str]
    ) -> TritonInstallation:
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = stubs / version / STUB_NAME
        if not stub.is_file():
            available = sorted(p.parent.name for p in stubs.glob(f"*/{STUB_NAME}"))
            raise TritonLaunchError(
                f"the python backend has no stub for Python {version} (this interpreter, "
                f"{sys.executable}): {stub} is missing; the wheel has stubs for "
                f"{', '.join(available) or 'no version'}. Run with one of those Pythons."
            )
        libraries = [Path(sysconfig.get_config_var("LIBDIR") or sys.base_prefix)]
        # The wheel's bundled libraries (auditwheel's folder), which the copied stub and
        # backend no longer reach through their $ORIGIN-relative RPATH.
        bundled = root.parent.parent / "nvidia_pytriton.libs"
        if bundled.is_dir():
            libraries.append(bundled)
        return cls(binary, root / "backends", stub, tuple(libraries), _model_python(environ))

    def environment(self, environ: Mapping[str, str]) -> dict[str, str]:
        """`environ` with this installation's library and executable folders put first."""
        result = dict(environ)
        for name, directories in (
            ("LD_LIBRARY_PATH", self.library_directories),
            ("PATH", (self.model_python / "bin",) if self.model_python else ()),
        ):
            if directories:
                entries = [str(directory) for directory in directories]
                if result.get(name):
                    entries.append(result[name])
                result[name] = os.pathsep.join(entries)
        return result


def _model_python(environ: Mapping[str, str]) -> Path:
    """The environment the wheel's stub will run models in, checked.

    The stub starts its embedded interpreter isolated (PYTHONPATH and PYTHONHOME ignored) with
    the program name `python3`, which Python looks up on PATH: the first `python3` there, via
    its pyvenv.cfg, decides sys.prefix and site-packages. So the models' environment is chosen
    by putting its bin/ first on PATH. It must be a venv of the running Python (whose libpython
    the stub loads), with numpy<2: the stub's pybind11 predates numpy 2, whose arrays it reads
    and writes as empty or zeros, silently.
    """
    if environ.get(ENV_MODEL_PYTHON):
        prefix, origin = Path(environ[ENV_MODEL_PYTHON]), f"${ENV_MODEL_PYTHON}"
    else:
        prefix = Path(sys.prefix) / MODEL_PYTHON_FOLDER
        origin = f"the default (${ENV_MODEL_PYTHON} unset)"
    fix = (
        f"`{sys.executable} -m venv --without-pip {prefix} && {sys.executable} -m pip --python "
        f"{prefix / 'bin' / 'python'} install 'numpy<2'` makes one (`make test` does)"
    )
    problem = _model_python_problem(prefix)
    if problem:
        raise TritonLaunchError(
            f"the Python environment for Triton's python-backend models, {prefix} from "
            f"{origin}, {problem}; {fix}"
        )
    return prefix


def _model_python_problem(prefix: Path) -> str | None:
    if not (prefix / "bin" / "python3").exists():
        return "has no bin/python3"
    home = None
    config = prefix / "pyvenv.cfg"
    if config.is_file():
        for line in config.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "home":
                home = Path(value.strip())
    python_home = Path(sysconfig.get_config_var("BINDIR") or sys.base_prefix)
    if home is None or home.resolve() != python_home.resolve():
        return f"is not a virtual environment of this Python ({python_home})"
    site = sysconfig.get_paths(vars={"base": prefix, "platbase": prefix})
    search = dict.fromkeys([site["purelib"], site["platlib"]])
    numpy = next(iter(importlib.metadata.distributions(name="numpy", path=list(search))), None)
    if numpy is None:
        return "has no numpy"
    if int(numpy.version.split(".")[0]) >= 2:
        return f"has numpy {numpy.version}; the wheel's stub needs numpy<2"
    return None


def _wheel_binary() -> Path:
    # find_spec locates the package without importing it (pytriton's own Python code needs
    # dependencies the --no-deps install leaves out).
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonLaunchError(
            f"tritonserver not found: the nvidia-pytriton wheel is not installed for "
            f"{sys.executable} (`{sys.executable} -m pip install --no-deps {WHEEL_REQUIREMENT}`; "
            f"`make test` does it) and ${ENV_BINARY} is not set"
        )
    return (
        Path(next(iter(spec.submodule_search_locations))) / "tritonserver" / "bin" / "tritonserver"
    )


class TritonServer:
    """One tritonserver process serving a model repository over gRPC on a loopback port.

    `with TritonServer(repository) as triton: triton.address` starts it and waits until it is
    ready (every model loaded), and stops it on exit: SIGTERM, then SIGKILL for its whole
    process group after `stop_timeout_s`. HTTP and metrics are off. Triton's output (and its
    models') goes to `log_path`, by default a file in a private working directory that is
    removed on stop.

    Args:
        model_repository: a Triton model repository (folders of config.pbtxt + version/).
        grpc_port: 0 (default) for an ephemeral port, read back from the process once bound.
        host: the gRPC listen address.
        binary: tritonserver to run (default `$TRITONSERVER_BIN`, else the wheel's).
        log_path: where Triton's output goes (appended); default: removed on stop.
        log_verbose: Triton's --log-verbose level.
        startup_timeout_s: how long start() waits for every model to load and gRPC to answer.
        stop_timeout_s: how long stop() waits after SIGTERM before SIGKILL.
        environ: the environment for tritonserver (default os.environ), before the launcher's
            additions; also where `$TRITONSERVER_BIN` and `$TRITONSERVER_MODEL_PYTHON` are read.
    """

    def __init__(
        self,
        model_repository: Path | str,
        *,
        grpc_port: int = 0,
        host: str = "127.0.0.1",
        binary: Path | str | None = None,
        log_path: Path | str | None = None,
        log_verbose: int = 0,
        startup_timeout_s: float = 60.0,
        stop_timeout_s: float = 10.0,
        environ: Mapping[str, str] | None = None,
        extra_arguments: Sequence[str] = (),
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str | None = None,
    ) -> None:
        """`extra_arguments` go to tritonserver as they are (e.g. `--trace-config ...`).
        `credentials` (and `server_name`, the name its certificate holds when that is not
        `host`) are for the readiness check when they turn on TLS (`--grpc-use-ssl`)."""
        self._extra_arguments = tuple(extra_arguments)
        self._credentials = credentials
        self._server_name = server_name
        self.model_repository = Path(model_repository).resolve()
        self.host = host
        self.grpc_port = grpc_port
        self.log_path = Path(log_path).resolve() if log_path is not None else None
        self._requested_port = grpc_port
        self._binary = binary
        self._log_verbose = log_verbose
        self._startup_timeout_s = startup_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._environ = dict(os.environ if environ is None else environ)
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._workdir: Path | None = None
        self._exit_code: int | None = None
        self._log_offset = 0

    @property
    def address(self) -> str:
        """`host:port` of the gRPC endpoint, once started."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def exit_code(self) -> int | None:
        """The process's exit status once it has exited; None while it runs (or before start)."""
        return self._exit_code if self._process is None else self._process.poll()

    def start(self) -> int:
        """Start tritonserver and wait until it is ready; returns the gRPC port.

        Raises:
            TritonLaunchError: no binary or stub; the repository is missing; tritonserver exited
                (a model failed to load: the message names it; the port is taken) or was not
                ready within `startup_timeout_s`. The message ends with the log's tail.
        """
        if self._process is not None:
            raise RuntimeError("TritonServer already started")
        if not self.model_repository.is_dir():
            raise TritonLaunchError(f"model repository {self.model_repository} is not a folder")
        installation = TritonInstallation.find(self._binary, self._environ)
        try:
            self._launch(installation)
            deadline = time.monotonic() + self._startup_timeout_s
            self.grpc_port = self._wait_for_port(deadline)
            self._wait_until_ready(deadline)
        except BaseException:
            self.stop()
            raise
        return self.grpc_port

    def _launch(self, installation: TritonInstallation) -> None:
        self._workdir = Path(tempfile.mkdtemp(prefix="headrace-triton-"))
        backend_directory = installation.backend_directory
        if installation.python_stub is not None and backend_directory is not None:
            private = self._workdir / "backends"
            shutil.copytree(backend_directory, private)
            shutil.copy2(installation.python_stub, private / "python" / STUB_NAME)
            backend_directory = private
        if self.log_path is None:
            self.log_path = self._workdir / "tritonserver.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        arguments = [
            str(installation.binary),
            f"--model-repository={self.model_repository}",
            "--allow-http=false",
            "--allow-metrics=false",
            "--allow-grpc=true",
            f"--grpc-address={self.host}",
            f"--grpc-port={self._requested_port}",
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--exit-timeout-secs={max(1, math.ceil(self._stop_timeout_s) - 1)}",
            f"--log-verbose={self._log_verbose}",
            # The python backend's shared-memory regions (/dev/shm) are named by this prefix
            # and a UUID: ours, so stop() can remove what a killed server leaves behind.
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix()}",
        ]
        if backend_directory is not None:
            arguments.append(f"--backend-directory={backend_directory}")
        arguments += self._extra_arguments
        self._log = self.log_path.open("ab")
        self._log_offset = self._log.tell()  # an appended log: this run's part starts here
        # A session of its own: a terminal's Ctrl-C reaches only the launcher, which stops
        # Triton in order, and the python-backend stubs share Triton's process group, so a
        # SIGKILL for the group leaves none behind.
        self._process = subprocess.Popen(
            arguments,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=installation.environment(self._environ),
            cwd=self._workdir,
            start_new_session=True,
        )

    def _shm_prefix(self) -> str:
        assert self._workdir is not None
        return f"{self._workdir.name}-"

    def _wait_for_port(self, deadline: float) -> int:
        assert self._process is not None
        while True:
            self._check_running()
            ports = _listening_ports(self._process.pid)
            if self._requested_port:
                if self._requested_port in ports:
                    return self._requested_port
            elif len(ports) == 1:
                return ports.pop()
            elif len(ports) > 1:
                raise self.error(f"tritonserver listens on several ports {sorted(ports)}")
            self._check_deadline(deadline, "did not listen for gRPC")
            time.sleep(_POLL_INTERVAL_S)

    def _wait_until_ready(self, deadline: float) -> None:
        # Loopback: a proxy from the environment (http_proxy, grpc_proxy) must not apply.
        options: list[tuple[str, str | int]] = [("grpc.enable_http_proxy", 0)]
        if self._server_name is not None:
            options.append(("grpc.ssl_target_name_override", self._server_name))
        channel = (
            grpc.secure_channel(self.address, self._credentials, options=options)
            if self._credentials is not None
            else grpc.insecure_channel(self.address, options=options)
        )
        with channel:
            stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            while True:
                self._check_running()
                try:
                    timeout_s = max(0.1, min(1.0, deadline - time.monotonic()))
                    reply = stub.ServerReady(
                        grpc_service_pb2.ServerReadyRequest(), timeout=timeout_s
                    )
                    if reply.ready:
                        return
                except grpc.RpcError:
                    pass  # not answering yet: the deadline below decides
                self._check_deadline(deadline, "was not ready")
                time.sleep(_POLL_INTERVAL_S)

    def _check_running(self) -> None:
        code = self.exit_code
        if code is not None:
            raise self.error(f"tritonserver exited with code {code} before it was ready")

    def _check_deadline(self, deadline: float, what: str) -> None:
        if time.monotonic() > deadline:
            raise self.error(f"tritonserver {what} within {self._startup_timeout_s:g} s")

    def error(self, headline: str) -> TritonLaunchError:
        """A launch error: `headline`, the models that failed to load, the log's tail."""
        log = self.log_text()
        failed = {name: reason for name, reason in _FAILED_MODEL.findall(log)}
        lines = [f"{headline} (model repository {self.model_repository})"]
        if failed:
            lines.append(
                "models that failed to load: "
                + "; ".join(f"{name}: {reason}" for name, reason in failed.items())
            )
        else:
            errors = [m.group(1) for m in _LOG_ERROR.finditer(log) if _HARMLESS not in m.group(1)]
            if errors:
                lines.append(f"last error: {errors[-1]}")
        tail = [line for line in log.splitlines() if line.strip() and not line.startswith("+")]
        lines.append(f"--- last lines of the log ({self.log_path}) ---")
        lines.extend(tail[-LOG_TAIL_LINES:])
        return TritonLaunchError("\n".join(lines))

    def log_text(self) -> str:
        """What tritonserver (and its models) wrote so far in this run."""
        if self.log_path is None or not self.log_path.is_file():
            return ""
        with self.log_path.open("rb") as log:
            log.seek(self._log_offset)
            return log.read().decode(errors="replace")

    def kill(self, signum: int = signal.SIGKILL) -> None:
        """Send `signum` to tritonserver and its model processes at once, as a crash would
        (failover tests); `stop` still cleans up after it."""
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signum)
            self._process.wait()

    def stop(self) -> None:
        """Stop tritonserver (SIGTERM; SIGKILL to its process group after `stop_timeout_s`)
        and remove the working directory; idempotent."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(self._stop_timeout_s)
                except subprocess.TimeoutExpired:
                    # Still unreaped, so its pid is still its group's: the stubs go with it.
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            self._exit_code = process.returncode
            # Triton removes its regions on a clean exit; not after a crash or SIGKILL.
            for region in Path(_SHARED_MEMORY).glob(f"{self._shm_prefix()}*"):
                region.unlink(missing_ok=True)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._workdir is not None:
            if self.log_path is not None and self.log_path.is_relative_to(self._workdir):
                self.log_path = None
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _listening_ports(pid: int) -> set[int]:
    """TCP ports process `pid` listens on: its socket inodes matched against the kernel's
    socket tables (which are per network namespace, hence the pid's own view)."""
    inodes: set[str] = set()
    try:
        for descriptor in os.scandir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(descriptor.path)
            except OSError:
                continue  # closed meanwhile
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    except FileNotFoundError:
        return set()  # exited
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[3] == _TCP_LISTEN_STATE and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def run_until_signal(server: TritonServer, announce: Callable[[TritonServer], None]) -> int:
    """Start `server`, call `announce` once it is ready, and serve until SIGINT or SIGTERM;
    returns 0. A signal while it starts stops it as well.

    Raises:
        TritonLaunchError: it cannot start, or tritonserver exited by itself while serving
            (the message carries the log's tail).
    """
    serving = threading.Event()
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        if not serving.is_set():
            raise KeyboardInterrupt  # unwinds start(), which stops what it started
        stop_requested.set()

    previous = {
        signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        try:
            server.start()
        except KeyboardInterrupt:
            return 0
        serving.set()
        try:
            announce(server)
            while not stop_requested.wait(0.2):
                code = server.exit_code
                if code is not None:
                    raise server.error(f"tritonserver exited with code {code} while serving")
            return 0
        finally:
            # A second Ctrl-C must not cut the orderly stop short (it has its own deadline).
            for signum in previous:
                signal.signal(signum, signal.SIG_IGN)
            server.stop()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
