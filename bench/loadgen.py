"""Load on one gRPC method, from several client processes: closed loop or open loop.

Each client process owns one grpc.aio channel (one HTTP/2 connection; `connections` of them
for a server with several worker processes behind one port). Requests and replies stay bytes
(the channels have no serializers), so client-side protobuf work is out of the
measurement. All processes share one schedule on the system-wide monotonic clock: a warm-up,
then a measurement window.

- Closed loop (the default): each client runs its share of the concurrency as coroutines that
  send the same pre-serialized request back to back; every request completing inside the
  window is counted, its latency from send to reply.
- Open loop (`LoadSpec.arrival_rate_per_s`): each client sends at Poisson-distributed times
  (its share of the rate, a seeded schedule), whether or not earlier replies are back, with at
  most its share of `concurrency` in flight. Latency runs from the *scheduled* send time, so
  a server that falls behind shows its queueing in the percentiles instead of slowing the
  client down (coordinated omission). Every request scheduled inside the window is counted.
- Streaming (`LoadSpec.streaming`, closed loop only): each coroutine holds one bidirectional
  stream (ModelStreamInfer) and sends the next message when the previous reply is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
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

from bench import server_metrics
from bench.stats import latency_summary, poisson_arrivals, rate
from bench.stats import percentile as percentile  # the scenarios' import, kept

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
    arrival_rate_per_s: float | None = None
    """Open loop: Poisson arrivals at this mean rate over all clients; `concurrency` then caps
    the requests in flight. None: closed loop."""
    seed: int = 0
    """Seeds the open-loop schedule (each client draws from `seed` and its index)."""
    streaming: bool = False
    """`method` is a bidirectional streaming method (ModelStreamInfer): one stream per
    coroutine, one message in flight on it. Closed loop only."""
    connections: int = 1
    """Channels (HTTP/2 connections) per client process, its coroutines taking them in turn:
    a server of several processes on one port (SO_REUSEPORT) gets connections, not calls,
    spread over its processes."""
    client_cpus: tuple[int, ...] = ()
    """CPUs the client processes are pinned to (empty: no pinning), to keep them off the
    server's cores on a machine with more."""

    def __post_init__(self) -> None:
        if not 1 <= self.clients <= self.concurrency:
            raise ValueError(
                f"need 1 <= clients <= concurrency, got {self.clients} and {self.concurrency}"
            )
        if self.connections < 1:
            raise ValueError(f"need connections >= 1, got {self.connections}")
        if self.warmup_s < 0 or self.duration_s <= 0:
            raise ValueError("warm-up must be >= 0 s and the window > 0 s")
        if self.arrival_rate_per_s is not None and self.arrival_rate_per_s <= 0:
            raise ValueError("the arrival rate must be > 0 requests/s")
        if self.streaming and self.arrival_rate_per_s is not None:
            raise ValueError("streaming load is closed loop only")

    def shares(self) -> list[int]:
        """The concurrency of each client process, as even as integers allow."""
        base, extra = divmod(self.concurrency, self.clients)
        return [base + (index < extra) for index in range(self.clients)]

    def client_seed(self, index: int) -> int:
        """The open-loop schedule's seed of client `index`."""
        return self.seed * 1000 + index


@dataclass(slots=True)
class ClientTally:
    """What one client process saw inside the window."""

    latencies_ns: list[int] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    error_latencies_ns: list[int] = field(default_factory=list)
    """How long each failed call took to fail (a refusal's speed): from its send (closed
    loop) or its scheduled send time (open loop)."""
    cpu_s: float = 0.0
    completed_in_window: int = 0
    """Replies received inside the window (open loop; closed loop: len(latencies_ns))."""
    scheduled: int = 0
    """Open loop: sends scheduled inside the window."""


@dataclass(frozen=True, slots=True)
class LoadResult:
    """A load run summed over its client processes. Latencies are None when nothing
    completed."""

    duration_s: float
    completed: int
    """Closed loop: replies received inside the window. Open loop: replies (any time before
    the drain ends) to the requests scheduled inside it; the latencies are theirs."""
    requests_per_s: float
    """Replies received inside the window per second (open loop: the achieved rate)."""
    p50_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    errors: dict[str, int]
    """Failed requests in the window by gRPC status code name, plus WRONG_REPLY and
    UNFINISHED."""
    client_cpu_s: float
    """CPU time of all client processes during the window."""
    metered: float
    """How much the caller's meter (a server's CPU seconds) advanced during the window."""
    p90_ms: float | None = None
    p999_ms: float | None = None
    offered_per_s: float | None = None
    """Open loop: requests scheduled inside the window per second (None: closed loop)."""
    client_cpu_ms_per_request: float | None = None
    server_cpu_ms_per_request: float | None = None
    """`metered` per request completed in the window, when the meter is a server's CPU."""
    batching: server_metrics.BatchingFigures | None = None
    """From the server's /metrics, when `run_load` was given its address."""
    error_p99_ms: float | None = None
    """99th percentile of the time failed calls took to fail (open loop: from their scheduled
    send time); None when none failed."""
    error_p50_ms: float | None = None
    """Their median, likewise."""


def run_load(
    spec: LoadSpec,
    meter: Callable[[], float],
    metrics_url: str | None = None,
) -> LoadResult:
    """Run the load in `spec.clients` fresh processes and wait for it to finish. `meter` is
    read at the window's start and end (in this process); pass a server's CPU seconds
    (`ServerProcess.cpu_seconds`) to get `server_cpu_ms_per_request`. With `metrics_url` (a
    Headrace /metrics address), its batching histograms are read at the same two moments.

    Raises:
        LoadError: a client could not connect, got a wrong reply at warm-up, crashed, or did
            not report in time.
        OSError: `metrics_url` cannot be read.
    """
    # spawn, not fork: this process has imported grpc, whose threads do not survive a fork.
    context = multiprocessing.get_context("spawn")
    messages: Queue[tuple[str, Any]] = context.Queue()
    start_signal = context.Event()
    start_ns = context.Value("q", 0, lock=False)  # written once, before start_signal is set
    processes = [
        context.Process(
            target=_client_process,
            args=(spec, index, share, messages, start_signal, start_ns),
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
        scrape_start = server_metrics.scrape(metrics_url) if metrics_url else None
        _sleep_until(window_start_ns + int(spec.duration_s * _NS_PER_S))
        metered = meter() - meter_start
        batching = (
            server_metrics.difference(scrape_start, server_metrics.scrape(metrics_url))
            if metrics_url and scrape_start is not None
            else None
        )
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
    return summarize(spec, tallies, metered, batching)


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


def summarize(
    spec: LoadSpec,
    tallies: Sequence[ClientTally],
    metered: float,
    batching: server_metrics.BatchingFigures | None = None,
) -> LoadResult:
    """The clients' tallies of one run, summed: rates over the window, percentiles over all
    latencies, errors by code, CPU per request."""
    latencies = [latency for tally in tallies for latency in tally.latencies_ns]
    errors: Counter[str] = Counter()
    for tally in tallies:
        errors.update(tally.errors)
    in_window = sum(tally.completed_in_window for tally in tallies)
    open_loop = spec.arrival_rate_per_s is not None
    client_cpu_s = sum(tally.cpu_s for tally in tallies)
    latency = latency_summary(latencies)
    failed = sorted(latency for tally in tallies for latency in tally.error_latencies_ns)
    return LoadResult(
        duration_s=spec.duration_s,
        completed=len(latencies),
        requests_per_s=rate(in_window, spec.duration_s),
        p50_ms=latency["p50_ms"],
        p99_ms=latency["p99_ms"],
        mean_ms=latency["mean_ms"],
        errors=dict(sorted(errors.items())),
        client_cpu_s=client_cpu_s,
        metered=metered,
        p90_ms=latency["p90_ms"],
        p999_ms=latency["p999_ms"],
        offered_per_s=(
            rate(sum(tally.scheduled for tally in tallies), spec.duration_s) if open_loop else None
        ),
        client_cpu_ms_per_request=client_cpu_s * 1000 / in_window if in_window else None,
        server_cpu_ms_per_request=metered * 1000 / in_window if in_window else None,
        batching=batching,
        error_p99_ms=percentile(failed, 0.99) / 1e6 if failed else None,
        error_p50_ms=percentile(failed, 0.5) / 1e6 if failed else None,
    )


def _client_process(
    spec: LoadSpec,
    index: int,
    share: int,
    messages: Queue[tuple[str, Any]],
    start_signal: Event,
    start_ns: c_int64,
) -> None:
    # Ctrl-C reaches the whole process group; the benchmark process handles it and stops the
    # clients itself, so they need not print a traceback each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if spec.client_cpus:
            os.sched_setaffinity(0, spec.client_cpus)
        tally = asyncio.run(_client(spec, index, share, messages, start_signal, start_ns))
    except Exception as exc:  # reported, not raised: the parent reads only the queue
        messages.put(("failed", f"{type(exc).__name__}: {exc}"))
    else:
        messages.put(("done", tally))


Call = Callable[[bytes], Any]
"""Sends one request, returns (an awaitable of) the reply's bytes."""


async def _client(
    spec: LoadSpec,
    index: int,
    share: int,
    messages: Queue[tuple[str, Any]],
    start_signal: Event,
    start_ns: c_int64,
) -> ClientTally:
    # Replies as large as the server may send (the shared_memory scenario's are 4 MiB, grpc's
    # default limit); a subchannel pool per channel, or grpc would share one connection.
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    async with contextlib.AsyncExitStack() as stack:
        channels = []
        for _ in range(spec.connections):
            channel = await stack.enter_async_context(
                grpc.aio.insecure_channel(spec.target, options=options)
            )
            try:
                await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT_S)
            except TimeoutError:
                raise ConnectionError(f"cannot connect to {spec.target}") from None
            channels.append(channel)
        # Coroutines take the connections in turn.
        streams: list[_StreamCaller] = []
        if spec.streaming:
            for number in range(share):
                stream = channels[number % len(channels)].stream_stream(
                    spec.method, request_serializer=None, response_deserializer=None
                )
                # Called with no request iterator: messages are written one at a time.
                streams.append(_StreamCaller(lambda stream=stream: stream(None)))
            calls: list[Call] = [caller.call for caller in streams]
            checked = calls[: len(channels)]
        else:
            unaries = [
                channel.unary_unary(
                    spec.method, request_serializer=None, response_deserializer=None
                )
                for channel in channels
            ]
            calls = [unaries[number % len(unaries)] for number in range(share)]
            checked = list(unaries)
        # One checked reply per connection and trial (each may reach another server process):
        # a server that answers wrongly cannot look fast. Later replies are only compared
        # with the first (the servers are deterministic).
        expected: bytes = await asyncio.wait_for(calls[0](spec.request), CONNECT_TIMEOUT_S)
        spec.check(spec.request, expected)
        for call in checked[1:]:
            spec.check(spec.request, await asyncio.wait_for(call(spec.request), CONNECT_TIMEOUT_S))
        messages.put(("ready", None))
        if not await asyncio.to_thread(start_signal.wait, CLIENT_START_TIMEOUT_S):
            raise TimeoutError("no start signal from the benchmark process")
        # The schedule is on the monotonic clock all processes share; latencies are taken with
        # perf_counter, so translate the schedule once.
        offset_ns = time.perf_counter_ns() - time.monotonic_ns()
        started_ns = start_ns.value + offset_ns
        window = _Window(
            started_ns + int(spec.warmup_s * _NS_PER_S),
            started_ns + int((spec.warmup_s + spec.duration_s) * _NS_PER_S),
        )
        await _sleep_until_perf(started_ns)
        tally = ClientTally()
        if spec.arrival_rate_per_s is None:
            workers = [
                asyncio.create_task(_worker(call, spec.request, expected, window, tally))
                for call in calls
            ]
        else:
            schedule = poisson_arrivals(
                spec.arrival_rate_per_s / spec.clients,
                spec.warmup_s + spec.duration_s,
                spec.client_seed(index),
            )
            workers = [
                asyncio.create_task(
                    _open_loop(
                        calls[0], spec.request, expected, started_ns, schedule, share, window, tally
                    )
                )
            ]
        await _sleep_until_perf(window.start_ns)
        cpu_start = time.process_time()
        await _sleep_until_perf(window.end_ns)
        tally.cpu_s = time.process_time() - cpu_start
        done, pending = await asyncio.wait(workers, timeout=DRAIN_TIMEOUT_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if pending and spec.arrival_rate_per_s is None:
            tally.errors[UNFINISHED] += len(pending)
        for task in done:
            task.result()  # a bug in the worker must not pass as a quiet trial
        if spec.streaming:
            for caller in streams:
                await caller.close()
        return tally


@dataclass(frozen=True, slots=True)
class _Window:
    """The measurement window on this process's perf_counter clock."""

    start_ns: int
    end_ns: int

    def __contains__(self, moment_ns: int) -> bool:
        return self.start_ns <= moment_ns < self.end_ns


class _StreamCaller:
    """One bidirectional stream used as a call: write a message, read its reply. A stream
    that fails is replaced by a new one (the error is the caller's to count)."""

    def __init__(self, open_stream: Callable[[], Any]) -> None:
        self._open_stream = open_stream
        self._call = open_stream()

    async def call(self, request: bytes) -> bytes:
        try:
            await self._call.write(request)
            reply = await self._call.read()
        except grpc.aio.AioRpcError:
            self._call = self._open_stream()
            raise
        if reply is grpc.aio.EOF:  # type: ignore[attr-defined]  # missing from grpc-stubs
            raise ConnectionError("the server ended the stream")
        return reply  # type: ignore[no-any-return]

    async def close(self) -> None:
        """Half-close (the server ends the stream cleanly), then drop it. A stream whose call
        was cancelled at the drain cannot be half-closed; it is only dropped."""
        with contextlib.suppress(grpc.aio.UsageError, grpc.RpcError, asyncio.InvalidStateError):
            await self._call.done_writing()
        self._call.cancel()


async def _sleep_until_perf(perf_ns: int) -> None:
    await asyncio.sleep(max(0.0, (perf_ns - time.perf_counter_ns()) / _NS_PER_S))


async def _worker(
    call: Call,
    request: bytes,
    expected: bytes,
    window: _Window,
    tally: ClientTally,
) -> None:
    """One closed-loop stream of calls; counts those that complete inside the window."""
    latencies = tally.latencies_ns
    errors = tally.errors
    while (started := time.perf_counter_ns()) < window.end_ns:
        try:
            reply = await call(request)
        except grpc.aio.AioRpcError as exc:
            failed = time.perf_counter_ns()
            if failed in window:
                errors[exc.code().name] += 1
                tally.error_latencies_ns.append(failed - started)
            continue
        finished = time.perf_counter_ns()
        if finished in window:
            if reply == expected:
                latencies.append(finished - started)
                tally.completed_in_window += 1
            else:
                errors[WRONG_REPLY] += 1


async def _open_loop(
    call: Call,
    request: bytes,
    expected: bytes,
    started_ns: int,
    schedule: Sequence[float],
    in_flight_cap: int,
    window: _Window,
    tally: ClientTally,
) -> None:
    """Sends at the scheduled times (seconds after `started_ns`), at most `in_flight_cap` at
    once; a send the cap holds back keeps its scheduled time, so its wait is latency. Waits
    for every request it started."""
    slots = asyncio.Semaphore(in_flight_cap)
    running: dict[asyncio.Task[None], bool] = {}
    """Started and not yet done, each with whether it was scheduled inside the window."""

    async def one(scheduled_ns: int) -> None:
        measured = scheduled_ns in window
        async with slots:
            try:
                reply = await call(request)
            except grpc.aio.AioRpcError as exc:
                if measured:
                    tally.errors[exc.code().name] += 1
                    tally.error_latencies_ns.append(time.perf_counter_ns() - scheduled_ns)
                return
        finished = time.perf_counter_ns()
        if finished in window:
            tally.completed_in_window += 1
        if measured:
            if reply == expected:
                tally.latencies_ns.append(finished - scheduled_ns)
            else:
                tally.errors[WRONG_REPLY] += 1

    try:
        for offset_s in schedule:
            scheduled_ns = started_ns + int(offset_s * _NS_PER_S)
            if scheduled_ns in window:
                tally.scheduled += 1
            await _sleep_until_perf(scheduled_ns)
            task = asyncio.create_task(one(scheduled_ns))
            running[task] = scheduled_ns in window
            task.add_done_callback(running.pop)
        while running:
            await asyncio.gather(*running)
    finally:
        for task, measured in list(running.items()):
            task.cancel()
            tally.errors[UNFINISHED] += measured
