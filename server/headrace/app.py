"""Building Headrace from settings: start-up order, shutdown in reverse, signals."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
from types import TracebackType
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from headrace.analysis.drift import Profile, ProfileError
from headrace.analysis.monitor import DriftMetrics, DriftMonitor
from headrace.analysis.shadow import CaptureSink, ShadowMetrics, ShadowMirror, shadow_candidate
from headrace.backends import Backend, LocalBackend
from headrace.backends.triton import TritonBackend
from headrace.batching import BatchPolicy, DynamicBatcher
from headrace.capture.pipeline import CapturePipeline
from headrace.config import (
    BatchingSettings,
    LocalModelSettings,
    ModelCaptureSettings,
    ModelSettings,
    Settings,
    TritonModelSettings,
)
from headrace.errors import ConfigError, StartupError
from headrace.frontend import FrontendServer, InferenceServicer
from headrace.frontend.auth import AuthInterceptor, TokenStore, open_methods
from headrace.frontend.shared_memory import SystemSharedMemoryRegistry
from headrace.repository import ModelRepository
from headrace.spec import ModelSpec
from headrace.telemetry import Metrics, MetricsServer, Tracing, TracingInterceptor, traced_methods

READINESS_INTERVAL_S = 1.0
"""How often health status is brought in line with the models' readiness."""

_logger = logging.getLogger(__name__)


class Application:
    """One Headrace server: telemetry, backends, model repository and gRPC front end.

    Start-up: tracing (tracer, span exporter process) -> metrics server -> backends (models
    loaded) -> repository -> capture (spool recovered, capture stage started) -> batchers ->
    front end bound and serving -> health SERVING once every model is ready.
    Shutdown, in reverse: health NOT_SERVING -> stop accepting -> in-flight requests (queued
    ones included) finish within the grace period -> batchers stop -> capture flushes what is
    spooled (within capture.shutdown_timeout_s) -> backends stop -> metrics server stops ->
    tracing sends what is queued to its exporter process, which exports it and exits.

    Usable as an async context manager: `async with Application(settings) as app: app.port`.

    `worker_id` is set when this is one of the worker processes of `headrace serve --workers
    N` (headrace.workers): the port is shared with the other workers (SO_REUSEPORT), and
    metrics are recorded for the supervisor, which serves /metrics for the host.
    """

    def __init__(self, settings: Settings, *, worker_id: int | None = None) -> None:
        self.settings = settings
        self.worker_id = worker_id
        local = [model for model in settings.models if isinstance(model, LocalModelSettings)]
        triton = [model for model in settings.models if isinstance(model, TritonModelSettings)]
        self._backends: list[Backend] = [LocalBackend(local, settings.local_backend)]
        if triton:
            self._backends.append(TritonBackend(triton, settings.triton))
        self._started: list[Backend] = []
        self._batchers: list[DynamicBatcher] = []
        self._frontend: FrontendServer | None = None
        self.repository: ModelRepository | None = None
        self.port = 0
        self._serving = False
        self._health_task: asyncio.Task[None] | None = None
        self.tracing: Tracing | None = None
        """The tracer and its span exporter process, from start-up until shutdown; None when
        tracing is off."""
        self.metrics: Metrics | None = Metrics(worker_id or 0) if settings.metrics.enabled else None
        self.shared_memory: SystemSharedMemoryRegistry | None = (
            SystemSharedMemoryRegistry() if settings.server.system_shared_memory else None
        )
        """Regions clients registered (Triton's system shared memory extension); None: off."""
        self._metrics_server: MetricsServer | None = None
        self.metrics_port = 0
        """The bound /metrics port once started (0: metrics are off)."""
        self.shadows: list[ShadowMirror] = []
        """Shadow mirrors of the models with `shadow` settings, once started."""
        self._drift_monitors: list[DriftMonitor] = []
        self.capture_sink: CaptureSink | None = None
        """Where shadow calls' records go when capture is off (tests observe them here);
        with capture on, the primary's capture tee takes them."""
        self.capture: CapturePipeline | None = None
        """The capture pipeline, from start-up until shutdown; None when capture is off."""
        self.tokens: TokenStore | None = None
        """The known bearer tokens once started; None when `server.auth` is off."""
        self.servicer: InferenceServicer | None = None

    async def start(self) -> int:
        """Start everything; returns the bound gRPC port.

        Raises:
            StartupError: a model cannot be loaded (ConfigError) or the port cannot be bound.
        """
        try:
            self._start_telemetry()
            for backend in self._backends:
                await backend.start()
                self._started.append(backend)
            self.repository = ModelRepository(self._backends)
            self._attach_telemetry(self.repository)
            self._start_capture(self.repository)
            self._start_batchers(self.repository)
            await self._start_analysis(self.repository)
            servicer = self.servicer = InferenceServicer(
                self.repository,
                self.settings.server.stream_max_inflight_requests,
                self.metrics.unresolved if self.metrics is not None else None,
                self.shared_memory,
                limits=self.settings.server.limits,
            )
            # Tracing goes first: its span is current when auth names the caller on it.
            interceptors: list[grpc.aio.ServerInterceptor[Any, Any]] = []
            tracing = (
                TracingInterceptor(
                    self.tracing.tracer,
                    self.tracing.propagator,
                    traced_methods(self.settings.tracing.trace_health),
                )
                if self.tracing is not None
                else None
            )
            auth = self.settings.server.auth
            if auth.enabled:
                self.tokens = TokenStore(auth)
                interceptors.append(AuthInterceptor(self.tokens, open_methods(auth)))
            self._frontend = FrontendServer(
                self.settings.server,
                servicer,
                interceptors,
                tracing=tracing,
                reuse_port=self.worker_id is not None,
            )
            self.port = await self._frontend.start()
        except BaseException:
            await self.stop(grace_s=0)
            raise
        # What start-up built (modules, models, servers) lives as long as the process: out
        # of the cyclic collector's sight, a full collection while serving walks only what
        # serving allocated since, instead of pausing every call for 40-50 ms (measured at
        # 3,000 calls/s: one such pause about every 20 s, 1% of a 5 s window's calls).
        gc.collect()
        gc.freeze()
        self._serving = self.repository.ready
        await self._frontend.set_serving(self._serving)
        self._health_task = asyncio.create_task(
            self._follow_readiness(self.repository, self._frontend), name="readiness"
        )
        models = ", ".join(
            f"{served.spec.name}:{served.spec.version}" for served in self.repository.models()
        )
        if self.worker_id is None:
            _logger.info(
                "listening on %s:%d, serving %s",
                self.settings.server.host,
                self.port,
                models or "-",
            )
        else:  # the supervisor says "listening" once every worker is
            _logger.info(
                "worker %d ready on %s:%d, serving %s",
                self.worker_id,
                self.settings.server.host,
                self.port,
                models or "-",
            )
        return self.port

    async def _follow_readiness(
        self, repository: ModelRepository, frontend: FrontendServer
    ) -> None:
        """Keep grpc.health.v1 in step with the models (Triton endpoints come and go)."""
        while True:
            await asyncio.sleep(READINESS_INTERVAL_S)
            ready = repository.ready
            if ready != self._serving:
                self._serving = ready
                _logger.warning("models %s", "ready: serving" if ready else "not ready")
                await frontend.set_serving(ready)

    def _model_settings(self, spec: ModelSpec) -> ModelSettings | None:
        # A Triton model entry without a version serves whichever version Triton reports.
        for model in self.settings.models:
            if model.name == spec.name and model.version in (spec.version, None):
                return model
        return None

    def _batching_settings(self, spec: ModelSpec) -> BatchingSettings:
        model = self._model_settings(spec)
        return model.batching if model is not None else BatchingSettings()

    def _start_capture(self, repository: ModelRepository) -> None:
        if not self.settings.capture.enabled:
            return
        self.capture = CapturePipeline(
            self.settings.capture,
            self.metrics.capture if self.metrics is not None else None,
            traced=self.tracing is not None,
        )
        try:
            self.capture.start()
        except OSError as exc:
            raise StartupError(f"capture: cannot use the spool: {exc}") from exc
        for served in repository.models():
            model = self._model_settings(served.spec)
            served.capture = self.capture.for_model(
                served.spec, model.capture if model is not None else ModelCaptureSettings()
            )

    async def _start_analysis(self, repository: ModelRepository) -> None:
        """Shadow mirrors and drift monitors of the models that configure them."""
        registry = self.metrics.registry if self.metrics is not None else CollectorRegistry()
        shadow_metrics: ShadowMetrics | None = None
        drift_metrics: DriftMetrics | None = None
        for served in repository.models():
            settings = self._model_settings(served.spec)
            if settings is None:
                continue
            answers = list(served.answers)
            if settings.drift is not None:
                try:
                    profile = Profile.load(settings.drift.profile_path)
                except ProfileError as exc:
                    raise ConfigError(f"model '{served.spec.name}' drift: {exc}") from exc
                drift_metrics = drift_metrics or DriftMetrics(registry)
                monitor = DriftMonitor(served.spec, settings.drift, profile, drift_metrics)
                monitor.start()
                self._drift_monitors.append(monitor)
                answers.append(monitor)
            if settings.shadow is not None:
                candidate, model, version = shadow_candidate(
                    served.spec, settings.shadow, repository
                )
                shadow_metrics = shadow_metrics or ShadowMetrics(registry)
                mirror = ShadowMirror(
                    served.spec,
                    settings.shadow,
                    candidate,
                    model,
                    version,
                    shadow_metrics,
                    served.capture.record_shadow
                    if served.capture is not None
                    else self.capture_sink,
                )
                await mirror.start()
                self.shadows.append(mirror)
                answers.append(mirror)
            served.answers = tuple(answers)

    def _start_telemetry(self) -> None:
        tracing = self.settings.tracing
        if tracing.exporter != "none":
            self.tracing = Tracing(tracing)
            _logger.info(
                "tracing: exporter %s to %s, sample ratio %g",
                tracing.exporter,
                tracing.endpoint or "its default endpoint",
                tracing.sample_ratio,
            )
        # A worker's metrics go to the multiprocess files the supervisor serves.
        if self.metrics is not None and self.worker_id is None:
            self._metrics_server = MetricsServer(self.settings.metrics, self.metrics.registry)
            self.metrics_port = self._metrics_server.start()

    def _attach_telemetry(self, repository: ModelRepository) -> None:
        if self.metrics is not None:
            for backend in self._backends:
                if isinstance(backend, TritonBackend):
                    for name in backend.model_names():
                        backend.pool(name).observe(self.metrics.for_endpoints(name))
        for served in repository.models():
            if self.metrics is not None:
                model_metrics = self.metrics.for_model(served.spec)
                served.requests = model_metrics
                served.observers = (model_metrics,)
            if self.tracing is not None:
                served.tracing = self.tracing.for_model(served.spec)

    def _start_batchers(self, repository: ModelRepository) -> None:
        for served in repository.models():
            spec = served.spec
            policy = BatchPolicy.resolve(self._batching_settings(spec), spec)
            if policy is not None:
                served.batcher = DynamicBatcher(
                    spec,
                    served.backend,
                    policy,
                    [served.statistics, *served.observers],
                    served.tracing,
                )
                served.batcher.start()
                self._batchers.append(served.batcher)

    async def stop(self, grace_s: float | None = None) -> None:
        """Shut down in reverse start-up order; idempotent. `grace_s` defaults to the
        configured shutdown grace period."""
        if grace_s is None:
            grace_s = self.settings.server.shutdown_grace_period_s
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
            self._health_task = None
        if self._frontend is not None:
            frontend, self._frontend = self._frontend, None
            await frontend.stop(grace_s)
        # Shadow calls to a local candidate go through its batcher: stop them first.
        while self.shadows:
            await self.shadows.pop().stop()
        while self._drift_monitors:
            self._drift_monitors.pop().stop()
        while self._batchers:
            await self._batchers.pop().stop()
        if self.shared_memory is not None:
            self.shared_memory.close()  # no request is left to read or write a region
        if self.capture is not None:
            capture, self.capture = self.capture, None
            await capture.drain()
            # Blocks for at most capture.shutdown_timeout_s, after the last request.
            capture.stop()
        while self._started:
            await self._started.pop().stop()
        if self._metrics_server is not None:
            metrics_server, self._metrics_server = self._metrics_server, None
            metrics_server.stop()
        if self.tracing is not None:
            tracing, self.tracing = self.tracing, None
            # Blocks for at most the export timeout, after the last request: nothing waits.
            tracing.shutdown()
        # What `start` froze can be collected again (cycles among it included).
        gc.unfreeze()

    def reload_tls(self) -> None:
        """Re-read the TLS certificate files (SIGHUP); open connections are kept."""
        if self._frontend is not None and self._frontend.tls is not None:
            self._frontend.tls.reload()

    def reload(self) -> None:
        """SIGHUP: re-read the TLS certificate files and the tokens file."""
        self.reload_tls()
        if self.tokens is not None:
            self.tokens.reload()

    async def __aenter__(self) -> Application:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()


WORKER_READY = b"ready\n"
"""What a worker sends its supervisor once it serves."""


async def serve(
    settings: Settings,
    *,
    worker_id: int | None = None,
    supervisor: socket.socket | None = None,
) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully.

    As worker `worker_id` of `headrace serve --workers N`, `supervisor` is the worker's end of
    a socket pair with its supervisor: `WORKER_READY` goes to it once serving, and its
    closing (the supervisor died, even by SIGKILL) stops the worker as SIGTERM does, so no
    worker outlives its supervisor.
    """
    application = Application(settings, worker_id=worker_id)
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop_requested.set)
    loop.add_signal_handler(signal.SIGHUP, application.reload)
    if supervisor is not None:
        # The supervisor never writes: readable means end of file.
        loop.add_reader(supervisor.fileno(), stop_requested.set)
    try:
        await application.start()
        if supervisor is not None:
            supervisor.sendall(WORKER_READY)
        await stop_requested.wait()
        _logger.info(
            "shutting down: in-flight requests have %.1f s to finish",
            settings.server.shutdown_grace_period_s,
        )
    finally:
        await application.stop()
        if supervisor is not None:
            loop.remove_reader(supervisor.fileno())
        for signal_number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signal_number)
    if worker_id is None:
        _logger.info("stopped")
    else:
        _logger.info("worker %d stopped", worker_id)
