"""Closed-loop load on one unary gRPC method, from several client processes.

Each client process owns one grpc.aio channel (one HTTP/2 connection) and runs its share of the
concurrency as coroutines that send the same pre-serialized request back to back. Requests and
replies stay bytes (the channel has no serializers), so client-side protobuf work is out of the
measurement. All processes share one schedule on the system-wide monotonic clock: a warm-up,
then a measurement window in which every completed request is counted.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import queue
import signal
import time
from collections import Counter
from collections.abc import Callable, Sequence
from ctypes import c_int64
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any

import grpc

ReplyCheck = Callable[[bytes, bytes], None]
"""Checks a reply against its request and raises ValueError if it is wrong. Must be a
module-level function: client processes receive it by its qualified name."""

CONNECT_TIMEOUT_S = 10.0
CLIENT_START_TIMEOUT_S = 60.0
"""Spawning a client process and importing grpc takes a while on a loaded machine."""
START_DELAY_S = 0.2
"""Between the last client reporting ready and the common start, so none starts late."""
DRAIN_TIMEOUT_S = 10.0
"""How long requests still in flight at the end of the window may take before they are
cancelled and counted as UNFINISHED."""
MAX_MESSAGE_BYTES = 128 * 1024 * 1024
"""Largest reply a client accepts: Headrace's default `server.max_message_bytes`."""
WRONG_REPLY = "WRONG_REPLY"
UNFINISHED = "UNFINISHED"

_POLL_INTERVAL_S = 0.2
_NS_PER_S = 1_000_000_000
_NS_PER_MS = 1_000_000


class LoadError(RuntimeError):
    """A client process failed, or did not report in time."""


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """One load run: what every client sends, where, how hard and for how long."""

    target: str
    """host:port of the server."""
    method: str
    """Full method path, `/package.Service/Method`."""
    request: bytes
    """The serialized request every call sends."""
    check: ReplyCheck
    concurrency: int
    """Requests in flight at any time, over all client processes together."""
    clients: int
    """Client processes."""
    warmup_s: float
    duration_s: float
    """Length of the measurement window."""

    def __post_init__(self) -> None:
        if not 1 <= self.clients <= self.concurrency:
            raise ValueError(
                f"need 1 <= clients <= concurrency, got {self.clients} and {self.concurrency}"
            )
        if self.warmup_s < 0 or self.duration_s <= 0:
            raise ValueError("warm-up must be >= 0 s and the window > 0 s")

    def shares(self) -> list[int]:
        """The concurrency of each client process, as even as integers allow."""
        base, extra = divmod(self.concurrency, self.clients)
        return [base + (index < extra) for index in range(self.clients)]


@dataclass(slots=True)
class ClientTally:
    """What one client process saw inside the window."""

    latencies_ns: list[int] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    error_latencies_ns: list[int] = field(default_factory=list)
    """How long each failed call took to fail (a refusal's speed)."""
    cpu_s: float = 0.0


@dataclass(frozen=True, slots=True)
class LoadResult:
    """A load run summed over its client processes. Latencies are None when nothing
    completed."""

    duration_s: float
    completed: int
    requests_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    errors: dict[str, int]
    """Failed requests in the window by gRPC status code name, plus WRONG_REPLY and
    UNFINISHED."""
    error_p99_ms: float | None
    """99th percentile of the time failed calls took to fail; None when none failed."""
    client_cpu_s: float
    """CPU time of all client processes during the window."""
    metered: float
    """How much the caller's meter (a server's CPU seconds) advanced during the window."""


def percentile(sorted_values: list[int], fraction: float) -> int:
    """The nearest-rank percentile of a non-empty ascending list (0 < fraction <= 1)."""
    return sorted_values[max(1, math.ceil(fraction * len(sorted_values))) - 1]


def run_load(spec: LoadSpec, meter: Callable[[], float]) -> LoadResult:
    """Run the load in `spec.clients` fresh processes and wait for it to finish. `meter` is
    read at the window's start and end (in this process).

    Raises:
        LoadError: a client could not connect, got a wrong reply at warm-up, crashed, or did
            not report in time.
    """
    # spawn, not fork: this process has imported grpc, whose threads do not survive a fork.
    context = multiprocessing.get_context("spawn")
    messages: Queue[tuple[str, Any]] = context.Queue()
    start_signal = context.Event()
    start_ns = context.Value("q", 0, lock=False)  # written once, before start_signal is set
    processes = [
        context.Process(
            target=_client_process,
            args=(spec, share, messages, start_signal, start_ns),
            name=f"bench-client-{index}",
            daemon=True,
        )
        for index, share in enumerate(spec.shares())
    ]
    try:
        for process in processes:
            process.start()
        _collect(messages, processes, "ready", CLIENT_START_TIMEOUT_S)
        start_ns.value = time.monotonic_ns() + int(START_DELAY_S * _NS_PER_S)
        start_signal.set()
        window_start_ns = start_ns.value + int(spec.warmup_s * _NS_PER_S)
        _sleep_until(window_start_ns)
        meter_start = meter()
        _sleep_until(window_start_ns + int(spec.duration_s * _NS_PER_S))
        metered = meter() - meter_start
        tallies: list[ClientTally] = _collect(
            messages, processes, "done", DRAIN_TIMEOUT_S + CONNECT_TIMEOUT_S
        )
        for process in processes:
            process.join(CONNECT_TIMEOUT_S)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join()
    return _summarize(spec.duration_s, tallies, metered)


def _sleep_until(monotonic_ns: int) -> None:
    time.sleep(max(0.0, (monotonic_ns - time.monotonic_ns()) / _NS_PER_S))


def _collect(
    messages: Queue[tuple[str, Any]],
    processes: Sequence[BaseProcess],
    kind: str,
    timeout_s: float,
) -> list[Any]:
    """One `kind` payload from every process. A process that dies without reporting (a crash
    while spawning, say) fails the run at once rather than at the timeout."""
    deadline = time.monotonic() + timeout_s
    payloads: list[Any] = []
    while len(payloads) < len(processes):
        try:
            received, payload = messages.get(timeout=_POLL_INTERVAL_S)
        except queue.Empty:
            crashed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            if crashed:
                raise LoadError(f"a client process exited with code {crashed[0]}") from None
            if time.monotonic() > deadline:
                missing = len(processes) - len(payloads)
                raise LoadError(
                    f"{missing} client(s) did not report '{kind}' in {timeout_s} s"
                ) from None
            continue
        if received == "failed":
            raise LoadError(f"a client process failed: {payload}")
        payloads.append(payload)
    return payloads


def _summarize(duration_s: float, tallies: list[ClientTally], metered: float) -> LoadResult:
    latencies = sorted(latency for tally in tallies for latency in tally.latencies_ns)
    errors: Counter[str] = Counter()
    for tally in tallies:
        errors.update(tally.errors)
    completed = len(latencies)
    failed = sorted(latency for tally in tallies for latency in tally.error_latencies_ns)
    return LoadResult(
        duration_s=duration_s,
        completed=completed,
        requests_per_s=completed / duration_s,
        p50_ms=percentile(latencies, 0.50) / _NS_PER_MS if latencies else None,
        p99_ms=percentile(latencies, 0.99) / _NS_PER_MS if latencies else None,
        mean_ms=sum(latencies) / completed / _NS_PER_MS if latencies else None,
        errors=dict(sorted(errors.items())),
        error_p99_ms=percentile(failed, 0.99) / _NS_PER_MS if failed else None,
        client_cpu_s=sum(tally.cpu_s for tally in tallies),
        metered=metered,
    )


def _client_process(
    spec: LoadSpec,
    share: int,
    messages: Queue[tuple[str, Any]],
    start_signal: Event,
    start_ns: c_int64,
) -> None:
    # Ctrl-C reaches the whole process group; the benchmark process handles it and stops the
    # clients itself, so they need not print a traceback each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        tally = asyncio.run(_client(spec, share, messages, start_signal, start_ns))
    except Exception as exc:  # reported, not raised: the parent reads only the queue
        messages.put(("failed", f"{type(exc).__name__}: {exc}"))
    else:
        messages.put(("done", tally))


async def _client(
    spec: LoadSpec,
    share: int,
    messages: Queue[tuple[str, Any]],
    start_signal: Event,
    start_ns: c_int64,
) -> ClientTally:
    # Replies as large as the server may send (the shared_memory scenario's are 4 MiB, grpc's
    # default limit).
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    async with grpc.aio.insecure_channel(spec.target, options=options) as channel:
        call = channel.unary_unary(spec.method, request_serializer=None, response_deserializer=None)
        try:
            await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT_S)
        except TimeoutError:
            raise ConnectionError(f"cannot connect to {spec.target}") from None
        # One checked reply per client and trial: a server that answers wrongly cannot look
        # fast. Later replies are only compared with this one (both servers are deterministic).
        expected: bytes = await call(spec.request, timeout=CONNECT_TIMEOUT_S)
        spec.check(spec.request, expected)
        messages.put(("ready", None))
        if not await asyncio.to_thread(start_signal.wait, CLIENT_START_TIMEOUT_S):
            raise TimeoutError("no start signal from the benchmark process")
        # The schedule is on the monotonic clock all processes share; latencies are taken with
        # perf_counter, so translate the schedule once.
        offset_ns = time.perf_counter_ns() - time.monotonic_ns()
        started_ns = start_ns.value + offset_ns
        window_start_ns = started_ns + int(spec.warmup_s * _NS_PER_S)
        window_end_ns = window_start_ns + int(spec.duration_s * _NS_PER_S)
        await _sleep_until_perf(started_ns)
        tally = ClientTally()
        workers = [
            asyncio.create_task(
                _worker(call, spec.request, expected, window_start_ns, window_end_ns, tally)
            )
            for _ in range(share)
        ]
        await _sleep_until_perf(window_start_ns)
        cpu_start = time.process_time()
        await _sleep_until_perf(window_end_ns)
        tally.cpu_s = time.process_time() - cpu_start
        done, pending = await asyncio.wait(workers, timeout=DRAIN_TIMEOUT_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if pending:
            tally.errors[UNFINISHED] += len(pending)
        for task in done:
            task.result()  # a bug in the worker must not pass as a quiet trial
        return tally


async def _sleep_until_perf(perf_ns: int) -> None:
    await asyncio.sleep(max(0.0, (perf_ns - time.perf_counter_ns()) / _NS_PER_S))


async def _worker(
    call: Callable[..., Any],
    request: bytes,
    expected: bytes,
    window_start_ns: int,
    window_end_ns: int,
    tally: ClientTally,
) -> None:
    """One closed-loop stream of calls; counts those that complete inside the window."""
    latencies = tally.latencies_ns
    errors = tally.errors
    while (started := time.perf_counter_ns()) < window_end_ns:
        try:
            reply = await call(request)
        except grpc.aio.AioRpcError as exc:
            failed = time.perf_counter_ns()
            if window_start_ns <= failed < window_end_ns:
                errors[exc.code().name] += 1
                tally.error_latencies_ns.append(failed - started)
            continue
        finished = time.perf_counter_ns()
        if window_start_ns <= finished < window_end_ns:
            if reply == expected:
                latencies.append(finished - started)
            else:
                errors[WRONG_REPLY] += 1
