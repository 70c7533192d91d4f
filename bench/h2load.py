"""Closed-loop unary load from h2load, nghttp2's HTTP/2 benchmarking tool (C++, Debian's
`nghttp2-client`), for scenarios where the Python clients' own CPU would take the cores the
server should get: h2load spends about 40 us of CPU per call (mostly the kernel's, on
loopback), the grpc.aio clients of `bench.loadgen` about 240 us, against about 400 us of
Headrace's.

A unary gRPC call is one HTTP/2 POST to `/package.Service/Method` with `content-type:
application/grpc` and `te: trailers`, whose body is the message in gRPC's framing (one byte
0: not compressed, four bytes of big-endian length, the serialized message). h2load sends the
same body on every stream, `-m` streams at once on each of its `-c` connections, spread over
`-t` threads, and logs each call's start time, HTTP status and duration (`--log-file`).

h2load reads neither replies nor trailers, and a gRPC error comes back as HTTP 200 with its
status in the trailers, so a run is checked on the server's side instead: one reply to the
same bytes (fetched with nghttp, from the same package) passes the scenario's reply check, and
the server's own request counters (its /metrics) must show every call h2load saw answered as
answered OK, and no other code. A run that fails either check raises; it is not a measurement.

The window is measured as in `bench.loadgen`'s closed loop: h2load runs for the warm-up, the
window and a tail; calls that complete inside the window count, their latency from send to
reply; the meter (a server's CPU), h2load's CPU and the server's metrics are read at the
window's start and end.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import server_metrics
from bench.loadgen import ClientTally, LoadError, LoadResult, LoadSpec, summarize
from bench.server_process import cpu_seconds

H2LOAD = "h2load"
NGHTTP = "nghttp"
DEBIAN_PACKAGE = "nghttp2-client"
"""Debian's package with both tools; `make bench-tools` installs it."""
GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")
TAIL_S = 1.0
"""h2load runs this long past the window, so that its start-up never shortens the window."""
EXIT_TIMEOUT_S = 30.0
"""How long h2load may take to stop after its run (it drops calls still in flight)."""
STREAM_FAILED = "STREAM_FAILED"
"""Error name of a call whose stream failed (h2load's status -1: reset, connection lost)."""
CHECK_TIMEOUT_S = 10.0

_SUMMARY_PATTERN = re.compile(r"requests: \d+ total, (\d+) started, (\d+) done")
_US_PER_S = 1_000_000
_NS_PER_US = 1_000


class ToolMissingError(LoadError):
    """h2load or nghttp is not installed."""


def find_tool(name: str) -> str:
    """The path of `name` (H2LOAD or NGHTTP) on PATH.

    Raises:
        ToolMissingError: not on PATH; the message says how to install it.
    """
    path = shutil.which(name)
    if path is None:
        raise ToolMissingError(
            f"{name} is not installed: `make bench-tools` installs it (Debian's "
            f"{DEBIAN_PACKAGE}: apt-get install {DEBIAN_PACKAGE}), or use `--client python`"
        )
    return path


AUTO = "auto"
PYTHON = "python"
CLIENTS = (AUTO, H2LOAD, PYTHON)
"""A scenario's `--client` choices: h2load, python (bench.loadgen's grpc.aio clients), or
auto (h2load when it is installed, else python)."""


def load_generator(choice: str) -> str:
    """H2LOAD or PYTHON for `--client` `choice`; auto is h2load when it is installed.

    Raises:
        ToolMissingError: h2load asked for and not installed.
        ValueError: not one of `CLIENTS`.
    """
    if choice not in CLIENTS:
        raise ValueError(f"--client must be one of {', '.join(CLIENTS)}, got {choice!r}")
    if choice == H2LOAD or (choice == AUTO and shutil.which(H2LOAD)):
        find_tool(H2LOAD)
        find_tool(NGHTTP)
        return H2LOAD
    return PYTHON


def grpc_frame(message: bytes) -> bytes:
    """`message` in gRPC's length-prefixed framing, uncompressed: an HTTP/2 request body."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


@dataclass(frozen=True, slots=True)
class Layout:
    """How h2load carries a `LoadSpec`: its client processes become threads, each with its
    connections, and the concurrency is spread evenly over all connections."""

    threads: int
    connections: int
    """All connections (h2load's -c), over all threads."""
    streams_per_connection: int
    """Calls in flight on each connection (h2load's -m)."""


def layout(spec: LoadSpec) -> Layout:
    """The h2load layout of `spec` (closed-loop unary only).

    Raises:
        ValueError: an open-loop or streaming spec, or a concurrency that the connections do
            not divide.
    """
    if spec.arrival_rate_per_s is not None or spec.streaming:
        raise ValueError("h2load runs closed-loop unary load only")
    connections = spec.clients * spec.connections
    streams, rest = divmod(spec.concurrency, connections)
    if rest or not streams:
        raise ValueError(
            f"--concurrency ({spec.concurrency}) must be a multiple of --clients x "
            f"--connections ({connections}): h2load keeps the same number of calls in flight "
            "on every connection"
        )
    return Layout(spec.clients, connections, streams)


def command(spec: LoadSpec, executable: str, body: Path, log: Path) -> list[str]:
    """The h2load command line of `spec`, run for its warm-up, window and `TAIL_S`."""
    shape = layout(spec)
    run_ms = round((spec.warmup_s + spec.duration_s + TAIL_S) * 1000)
    pinning = ["taskset", "--cpu-list", ",".join(map(str, spec.client_cpus))]
    headers = [argument for header in GRPC_HEADERS for argument in ("-H", header)]
    return [
        *(pinning if spec.client_cpus else []),
        executable,
        f"--threads={shape.threads}",
        f"--clients={shape.connections}",
        f"--max-concurrent-streams={shape.streams_per_connection}",
        f"--duration={run_ms}ms",
        f"--data={body}",
        *headers,
        f"--log-file={log}",
        f"http://{spec.target}{spec.method}",
    ]


@dataclass(frozen=True, slots=True)
class LoggedCall:
    """One row of h2load's log."""

    start_us: int
    """Send time, microseconds since the epoch."""
    status: int
    """HTTP status; -1 for a failed stream."""
    duration_us: int

    @property
    def end_us(self) -> int:
        return self.start_us + self.duration_us


def parse_log(text: str) -> list[LoggedCall]:
    """h2load's --log-file rows (tab-separated: start, status, duration; later columns, if a
    newer h2load adds any, ignored).

    Raises:
        ValueError: a row that is not of that form.
    """
    calls = []
    for line in text.splitlines():
        if line:
            start, status, duration = line.split("\t")[:3]
            calls.append(LoggedCall(int(start), int(status), int(duration)))
    return calls


def parse_summary(text: str) -> tuple[int, int]:
    """(calls started, calls done) from h2load's summary on stdout.

    Raises:
        ValueError: no summary line (h2load failed before its run).
    """
    match = _SUMMARY_PATTERN.search(text)
    if match is None:
        raise ValueError("no 'requests: ...' line in h2load's output")
    return int(match.group(1)), int(match.group(2))


def window_tally(calls: Sequence[LoggedCall], start_us: int, end_us: int) -> ClientTally:
    """The calls that completed inside [start_us, end_us): latencies of those answered with
    HTTP 200, the others counted by status (`HTTP_503`, or `STREAM_FAILED`)."""
    tally = ClientTally()
    for call in calls:
        if not start_us <= call.end_us < end_us:
            continue
        if call.status == 200:
            tally.latencies_ns.append(call.duration_us * _NS_PER_US)
            tally.completed_in_window += 1
        else:
            tally.errors[STREAM_FAILED if call.status < 0 else f"HTTP_{call.status}"] += 1
            tally.error_latencies_ns.append(call.duration_us * _NS_PER_US)
    return tally


def check_server_counts(counts: server_metrics.RequestCounts, answered: int, started: int) -> None:
    """`counts`, the server's requests over an h2load run, against h2load's: at least the
    `answered` calls (HTTP 200), at most the `started` ones (the rest were in flight when
    h2load stopped), every one OK.

    Raises:
        LoadError: another code than OK, or counts outside those bounds (HTTP 200 without a
            gRPC answer, or traffic that was not h2load's).
    """
    others = {code: count for code, count in counts.by_code.items() if code != "OK"}
    if others:
        raise LoadError(f"the server answered h2load's calls with errors: {others}")
    ok = counts.by_code.get("OK", 0)
    if not answered <= ok <= started:
        raise LoadError(
            f"the server answered {ok} calls OK, but h2load saw {answered} answered of "
            f"{started} started: its calls did not all reach Headrace"
        )


def check_one_reply(spec: LoadSpec, body: Path) -> None:
    """Send `body` once with nghttp (the same request as h2load's) and pass the reply
    message to `spec.check`.

    Raises:
        LoadError: nghttp failed, or the reply is missing, framed wrongly or wrong.
    """
    done = subprocess.run(
        [find_tool(NGHTTP), f"--data={body}"]
        + [argument for header in GRPC_HEADERS for argument in ("-H", header)]
        + [f"http://{spec.target}{spec.method}"],
        capture_output=True,
        timeout=CHECK_TIMEOUT_S,
        check=False,
    )
    reply = done.stdout
    if done.returncode != 0 or len(reply) < 5 or reply[0] != 0:
        raise LoadError(
            f"nghttp got no gRPC reply (exit {done.returncode}, {len(reply)} bytes): "
            f"{done.stderr.decode(errors='replace')[-500:]}"
        )
    message = reply[5:]
    if int.from_bytes(reply[1:5], "big") != len(message):
        raise LoadError("nghttp's reply is not one gRPC message")
    try:
        spec.check(spec.request, message)
    except Exception as exc:  # a check may also fail to decode the reply (DecodeError)
        raise LoadError(f"wrong reply to h2load's request: {exc!r}") from exc


def run_h2load(spec: LoadSpec, meter: Callable[[], float], metrics_url: str) -> LoadResult:
    """Run `spec` with h2load (closed loop, unary) against a Headrace server whose /metrics
    is at `metrics_url`, and wait for it to finish; like `bench.loadgen.run_load`, `meter`
    is read at the window's start and end. The result's errors are h2load's (HTTP statuses,
    failed streams); gRPC errors fail the run.

    Raises:
        ToolMissingError: h2load or nghttp is not installed.
        ValueError: a spec h2load cannot run (see `layout`).
        LoadError: a wrong reply, h2load failed or started late, or the server's counts do
            not match h2load's (see `check_server_counts`).
        OSError: `metrics_url` cannot be read.
    """
    executable = find_tool(H2LOAD)
    layout(spec)
    with tempfile.TemporaryDirectory(prefix="bench-h2load-") as folder:
        body = Path(folder) / "request.grpc"
        body.write_bytes(grpc_frame(spec.request))
        log = Path(folder) / "calls.tsv"
        check_one_reply(spec, body)
        counts_before = server_metrics.request_counts(server_metrics.read(metrics_url))
        launched_s = time.time()
        with subprocess.Popen(
            command(spec, executable, body, log),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        ) as process:
            try:
                window_start_s = launched_s + spec.warmup_s
                _sleep_until(window_start_s)
                meter_start, client_start = meter(), cpu_seconds(process.pid)
                scrape_start = server_metrics.scrape(metrics_url)
                _sleep_until(window_start_s + spec.duration_s)
                metered = meter() - meter_start
                client_cpu_s = cpu_seconds(process.pid) - client_start
                batching = server_metrics.difference(
                    scrape_start, server_metrics.scrape(metrics_url)
                )
                try:
                    output, _ = process.communicate(timeout=TAIL_S + EXIT_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    raise LoadError(f"h2load did not stop in {EXIT_TIMEOUT_S} s") from None
            finally:
                if process.poll() is None:
                    process.kill()
        summary = output.decode(errors="replace")
        counts = server_metrics.request_counts(server_metrics.read(metrics_url))
        if process.returncode != 0:
            raise LoadError(f"h2load exited with {process.returncode}: {summary[-2000:]}")
        calls = parse_log(log.read_text())
    try:
        started, done = parse_summary(summary)
    except ValueError as exc:
        raise LoadError(f"{exc}: {summary[-2000:]}") from exc
    answered = sum(call.status == 200 for call in calls)
    if len(calls) != done:
        raise LoadError(f"h2load logged {len(calls)} calls but reported {done} done")
    check_server_counts(counts.since(counts_before), answered, started)
    start_us = round(window_start_s * _US_PER_S)
    if not calls or min(call.start_us for call in calls) > start_us:
        raise LoadError(f"h2load sent nothing before the window: {summary[-2000:]}")
    tally = window_tally(calls, start_us, start_us + round(spec.duration_s * _US_PER_S))
    tally.cpu_s = client_cpu_s
    return summarize(spec, [tally], metered, batching)


def _sleep_until(wall_s: float) -> None:
    time.sleep(max(0.0, wall_s - time.time()))
