"""Prometheus metrics: a registry owned by the application, per-model instruments, and the
HTTP server that exposes them at /metrics.

Metric names, labels and buckets are a public interface (README, "Metrics"). Every update is
a few lock-protected additions on label children resolved at start-up (or once per status
code): constant time, nothing waits on a scrape.

With `headrace serve --workers N` each worker records into prometheus-client's multiprocess
files (PROMETHEUS_MULTIPROC_DIR, set by the supervisor before the worker starts) and the
supervisor alone serves /metrics for the host (`HostMetrics`): counters and histograms summed
over workers, gauges as their `multiprocess_mode` says.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from headrace.config import MetricsSettings
from headrace.errors import StartupError
from headrace.spec import ModelSpec

_logger = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Upper bounds (seconds) of every latency histogram, 100 us to 10 s (+Inf implied)."""
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
"""Upper bounds (items) of the batch size histogram (+Inf implied)."""
UNRESOLVED = ""
"""`model` and `version` label of requests that name no served model, or cannot be read:
client-chosen names never become label values."""
MODEL_LABELS = ("model", "version")
ENDPOINT_LABELS = ("model", "endpoint")


class Metrics:
    """The instruments of one Headrace process, in a registry of its own (not the global
    default), so that several servers in one process keep separate counts. `worker_id` is
    the process's index under `headrace serve --workers N` (0 for a single process)."""

    def __init__(self, worker_id: int = 0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.worker_requests = Counter(
            "headrace_worker_requests",
            "Inference requests answered by each worker process of the host (all models and "
            "codes): shows how the kernel spread connections over `--workers`.",
            ["worker"],
            registry=registry,
        ).labels(str(worker_id))
        self.requests = Counter(
            "headrace_requests",
            "Inference requests (ModelInfer calls and ModelStreamInfer messages) answered, "
            "by model, version and gRPC status code.",
            [*MODEL_LABELS, "code"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "headrace_request_duration_seconds",
            "Time from a request's arrival in the servicer until its answer is ready.",
            MODEL_LABELS,
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.queue_duration = Histogram(
            "headrace_queue_duration_seconds",
            "Time a request waited in its model's batcher before dispatch (0 without one).",
            MODEL_LABELS,
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.backend_duration = Histogram(
            "headrace_backend_duration_seconds",
            "Duration of each backend call (one per batch).",
            MODEL_LABELS,
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.batch_size = Histogram(
            "headrace_batch_size",
            "Items (first-dimension rows) per backend call.",
            MODEL_LABELS,
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "headrace_queue_depth",
            "Requests waiting in the model's batcher now (summed over the host's workers).",
            MODEL_LABELS,
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.endpoint_in_flight = Gauge(
            "headrace_endpoint_in_flight",
            "Backend calls in flight on each endpoint of a model's pool (summed over the "
            "host's workers).",
            ENDPOINT_LABELS,
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.endpoint_up = Gauge(
            "headrace_endpoint_up",
            "1 while the endpoint takes calls (healthy and not ejected), else 0 (the minimum "
            "over the host's workers: 0 when any of them cannot use it).",
            ENDPOINT_LABELS,
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.endpoint_ejections = Counter(
            "headrace_endpoint_ejections",
            "Times the endpoint was ejected after consecutive failed calls.",
            ENDPOINT_LABELS,
            registry=registry,
        )
        self.capture = CaptureMetrics(registry)
        ProcessCollector(registry=registry)
        self.unresolved = RequestMetrics(self, UNRESOLVED, UNRESOLVED)
        """Requests that cannot be read or name no served model."""

    def for_model(self, spec: ModelSpec) -> ModelMetrics:
        """The instruments of one served model version, its label children made now (so
        its series exist, at zero, before its first request)."""
        return ModelMetrics(self, spec.name, spec.version)

    def for_endpoints(self, model: str) -> EndpointMetrics:
        """The instruments of one model's endpoint pool (a `PoolObserver`)."""
        return EndpointMetrics(self, model)


class RequestMetrics:
    """Request counts and latency of one model version (or of unresolved requests)."""

    __slots__ = ("_by_code", "_duration", "_labels", "_requests", "_worker_requests")

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        self._requests = metrics.requests
        self._worker_requests = metrics.worker_requests
        self._labels = (model, version)
        self._duration = metrics.request_duration.labels(model, version)
        self._by_code: dict[grpc.StatusCode, Counter] = {
            grpc.StatusCode.OK: metrics.requests.labels(model, version, grpc.StatusCode.OK.name)
        }

    def record_request(self, code: grpc.StatusCode, duration_ns: int) -> None:
        """One request answered with `code` after `duration_ns`."""
        counter = self._by_code.get(code)
        if counter is None:
            counter = self._by_code[code] = self._requests.labels(*self._labels, code.name)
        counter.inc()
        self._worker_requests.inc()
        self._duration.observe(duration_ns / 1e9)


class ModelMetrics(RequestMetrics):
    """The instruments of one model version: requests, and what its batcher (or its
    pass-through) reports as a `BatchObserver`."""

    __slots__ = ("_backend", "_batch_size", "_queue", "_queue_depth")

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        super().__init__(metrics, model, version)
        self._queue = metrics.queue_duration.labels(model, version)
        self._backend = metrics.backend_duration.labels(model, version)
        self._batch_size = metrics.batch_size.labels(model, version)
        self._queue_depth = metrics.queue_depth.labels(model, version)

    def record_queued(self, queue_ns: int) -> None:
        self._queue.observe(queue_ns / 1e9)

    def record_execution(
        self, *, batch_size: int, requests: int, input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        self._backend.observe(infer_ns / 1e9)
        self._batch_size.observe(batch_size)

    def set_queue_depth(self, depth: int) -> None:
        self._queue_depth.set(depth)


CAPTURE_OUTCOMES = ("queued", "spooled", "written", "dropped", "refused", "sampled_out")
"""What became of a call's capture record: `queued` for the spool, `spooled` (in the spool
before its answer left), `written` (stored in the object store), `dropped` (spool full or
unwritable), `refused` (the call was refused because the spool is full), `sampled_out`."""


class CaptureMetrics:
    """The capture pipeline's instruments (README, "Capture")."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.records = Counter(
            "headrace_capture_records",
            "Capture records by model and outcome: queued, spooled, written, dropped, "
            "refused, sampled_out.",
            ["model", "outcome"],
            registry=registry,
        )
        self.bytes = Counter(
            "headrace_capture_bytes",
            "Bytes of capture records written to the spool.",
            ["model"],
            registry=registry,
        )
        self.spool_bytes = Gauge(
            "headrace_capture_spool_bytes",
            "Bytes in the capture spool now, not yet stored (summed over the host's workers).",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.upload_lag = Gauge(
            "headrace_capture_upload_lag_seconds",
            "Age of the oldest capture record not yet stored, 0 when none is pending (the "
            "largest over the host's workers).",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.upload_errors = Counter(
            "headrace_capture_upload_errors",
            "Failed attempts to store a spool segment (each retried later).",
            registry=registry,
        )

    def outcomes(self, model: str) -> dict[str, Counter]:
        """The label children of one model's record counts, made now (at zero)."""
        return {outcome: self.records.labels(model, outcome) for outcome in CAPTURE_OUTCOMES}


class EndpointMetrics:
    """In-flight calls, availability and ejections of one model's endpoints; the series of
    an endpoint that leaves the pool (DNS) are removed with it."""

    __slots__ = ("_ejections", "_in_flight", "_model", "_up")

    def __init__(self, metrics: Metrics, model: str) -> None:
        self._model = model
        self._in_flight = metrics.endpoint_in_flight
        self._up = metrics.endpoint_up
        self._ejections = metrics.endpoint_ejections

    def endpoint_in_flight(self, address: str, in_flight: int) -> None:
        self._in_flight.labels(self._model, address).set(in_flight)

    def endpoint_available(self, address: str, available: bool) -> None:
        self._up.labels(self._model, address).set(1 if available else 0)

    def endpoint_ejected(self, address: str) -> None:
        self._ejections.labels(self._model, address).inc()

    def endpoint_removed(self, address: str) -> None:
        for family in (self._in_flight, self._up, self._ejections):
            with contextlib.suppress(KeyError):
                family.remove(self._model, address)


class WorkerProcessCollector(Collector):
    """CPU time and resident memory of each worker process, read from /proc at scrape time
    (the per-process `process_*` series cannot be summed over processes meaningfully)."""

    def __init__(self, pids: Callable[[], Mapping[int, int]]) -> None:
        """`pids`: worker index -> pid of the workers alive now."""
        self._pids = pids
        self._ticks_per_s = os.sysconf("SC_CLK_TCK")
        self._page_bytes = os.sysconf("SC_PAGE_SIZE")

    def collect(self) -> Iterator[Metric]:
        cpu = CounterMetricFamily(
            "headrace_worker_cpu_seconds",
            "User and system CPU time of each worker process (restarts from 0 with the worker).",
            labels=["worker"],
        )
        memory = GaugeMetricFamily(
            "headrace_worker_resident_memory_bytes",
            "Resident memory of each worker process.",
            labels=["worker"],
        )
        for index, pid in sorted(self._pids().items()):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:  # exited since
                continue
            # The command name (field 2) may hold spaces; the fields after its ')' do not.
            fields = stat[stat.rindex(")") + 2 :].split()
            ticks = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15
            cpu.add_metric([str(index)], ticks / self._ticks_per_s)
            memory.add_metric([str(index)], int(fields[21]) * self._page_bytes)  # rss: 24
        yield cpu
        yield memory


class HostMetrics:
    """What the supervisor of `headrace serve --workers N` serves at /metrics: every worker's
    instruments read from the multiprocess directory `path` (summed over workers; gauges by
    their `multiprocess_mode`), the supervisor's own (live workers, restarts) and each
    worker's CPU and memory (`worker_pids`: worker index -> pid, called at scrape time)."""

    def __init__(self, path: str, worker_pids: Callable[[], Mapping[int, int]]) -> None:
        self.path = path
        self.registry = CollectorRegistry(auto_describe=True)
        MultiProcessCollector(self.registry, path=path)  # type: ignore[no-untyped-call]
        self.registry.register(WorkerProcessCollector(worker_pids))
        self.workers = Gauge(
            "headrace_workers",
            "Worker processes serving now (started and not yet exited).",
            registry=self.registry,
        )
        self.restarts = Counter(
            "headrace_worker_restarts",
            "Workers started again after they exited unexpectedly, by worker index.",
            ["worker"],
            registry=self.registry,
        )

    def worker_exited(self, pid: int) -> None:
        """Forget the live gauges of a worker process that exited (its counters stay, so the
        host's totals never go down)."""
        mark_process_dead(pid, self.path)  # type: ignore[no-untyped-call]


class MetricsServer:
    """The HTTP server answering scrapes at /metrics, on a thread of its own: started at
    start-up, shut down at exit."""

    def __init__(self, settings: MetricsSettings, registry: CollectorRegistry) -> None:
        self._settings = settings
        self._registry = registry
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def start(self) -> int:
        """Bind and serve; returns the bound port (useful with port 0).

        Raises:
            StartupError: the address cannot be bound.
        """
        host, port = self._settings.host, self._settings.port
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self._registry)
        except OSError as exc:
            raise StartupError(
                f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
            ) from exc
        self.port = self._server.server_port
        _logger.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def stop(self) -> None:
        """Stop serving and join the server's thread; idempotent."""
        server, self._server = self._server, None
        thread, self._thread = self._thread, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join()
