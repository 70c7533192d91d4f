"""Prometheus metrics: a registry owned by the application, per-model instruments, and the
HTTP server that exposes them at /metrics.

Metric names, labels and buckets are a public interface (README, "Metrics"). Every update is
a few lock-protected additions on label children resolved at start-up (or once per status
code): constant time, nothing waits on a scrape.
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.process_collector import ProcessCollector

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


class Metrics:
    """The instruments of one Headrace process, in a registry of its own (not the global
    default), so that several servers in one process keep separate counts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
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
            "Requests waiting in the model's batcher now.",
            MODEL_LABELS,
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


class RequestMetrics:
    """Request counts and latency of one model version (or of unresolved requests)."""

    __slots__ = ("_by_code", "_duration", "_labels", "_requests")

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        self._requests = metrics.requests
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
            "Bytes in the capture spool now (not yet stored).",
            registry=registry,
        )
        self.upload_lag = Gauge(
            "headrace_capture_upload_lag_seconds",
            "Age of the oldest capture record not yet stored (0 when none is pending).",
            registry=registry,
        )
        self.upload_errors = Counter(
            "headrace_capture_upload_errors",
            "Failed attempts to store a spool segment (each retried later).",
            registry=registry,
        )

    def outcomes(self, model: str) -> dict[str, Counter]:
        """The label children of one model's record counts, made now (at zero)."""
        return {outcome: self.records.labels(model, outcome) for outcome in CAPTURE_OUTCOMES}


class MetricsServer:
    """The HTTP server answering scrapes at /metrics, on a thread of its own: started at
    start-up, shut down at exit."""

    def __init__(self, settings: MetricsSettings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
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
            self._server, self._thread = start_http_server(
                port, addr=host, registry=self._metrics.registry
            )
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
