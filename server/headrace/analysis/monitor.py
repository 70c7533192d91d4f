"""Live drift: PSI and KS distance of a served model's features over a sliding window.

The request path hands references to the call's input and output arrays to a bounded queue
(`observe_answer`, never blocking: a full queue drops the call and counts it); one worker
thread per monitor, started at start-up and stopped at shutdown, appends them to per-tensor
ring buffers and recomputes the distances every `update_interval_s`, in numpy.

Metrics (labels model, version, feature):
`headrace_drift_psi`, `headrace_drift_ks`; per model version: `headrace_drift_window_rows`
(rows of the window's smallest tensor), `headrace_drift_rows_total` (rows taken into the
gauges) and `headrace_drift_dropped_total`.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Mapping

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge

from headrace.analysis.drift import FeatureProfile, Profile, tensor_rows
from headrace.config import DriftSettings
from headrace.inference import InferenceRequest, InferenceResponse
from headrace.spec import ModelSpec

_logger = logging.getLogger(__name__)

_Item = tuple[float, Mapping[str, np.ndarray], Mapping[str, np.ndarray]]


class DriftMetrics:
    """The drift instruments, registered once per registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("model", "version", "feature")
        self.psi = Gauge(
            "headrace_drift_psi",
            "Population stability index of the feature over the sliding window against the "
            "reference profile (< 0.1 stable, > 0.25 major shift).",
            labels,
            registry=registry,
            # Each worker of `serve --workers` keeps its own window: one series per live worker.
            multiprocess_mode="liveall",
        )
        self.ks = Gauge(
            "headrace_drift_ks",
            "Two-sample Kolmogorov-Smirnov distance of the feature over the sliding window "
            "from the reference sample (0 to 1).",
            labels,
            registry=registry,
            # Each worker of `serve --workers` keeps its own window: one series per live worker.
            multiprocess_mode="liveall",
        )
        self.window_rows = Gauge(
            "headrace_drift_window_rows",
            "Rows in the drift window (the smallest of the model's tensors).",
            ("model", "version"),
            registry=registry,
            # Each worker of `serve --workers` keeps its own window: one series per live worker.
            multiprocess_mode="liveall",
        )
        self.rows = Counter(
            "headrace_drift_rows",
            "Tensor rows (of the model's first profiled tensor) taken into the drift gauges.",
            ("model", "version"),
            registry=registry,
        )
        self.dropped = Counter(
            "headrace_drift_dropped",
            "Answered calls left out of the drift window because its worker was behind.",
            ("model", "version"),
            registry=registry,
        )


class _Window:
    """The last `capacity` rows of one tensor, with their arrival times."""

    def __init__(self, capacity: int, columns: int) -> None:
        self.rows = np.empty((capacity, columns))
        self.times = np.full(capacity, -math.inf)
        self.position = 0
        self.filled = 0

    def append(self, rows: np.ndarray, now: float) -> None:
        capacity = len(self.rows)
        if len(rows) >= capacity:
            rows = rows[-capacity:]
        count = len(rows)
        end = self.position + count
        if end <= capacity:
            self.rows[self.position : end] = rows
            self.times[self.position : end] = now
        else:
            first = capacity - self.position
            self.rows[self.position :] = rows[:first]
            self.rows[: count - first] = rows[first:]
            self.times[self.position :] = now
            self.times[: count - first] = now
        self.position = end % capacity
        self.filled = min(self.filled + count, capacity)

    def current(self, since: float) -> np.ndarray:
        return self.rows[self.times >= since]


class DriftMonitor:
    """Drift of one served model version against its reference profile."""

    def __init__(
        self, spec: ModelSpec, settings: DriftSettings, profile: Profile, metrics: DriftMetrics
    ) -> None:
        self._spec = spec
        self._settings = settings
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._queued = 0
        self._queued_lock = threading.Lock()
        self._labels = (spec.name, spec.version)
        self._dropped = metrics.dropped.labels(*self._labels)
        self._window_rows = metrics.window_rows.labels(*self._labels)
        self._rows = metrics.rows.labels(*self._labels)
        self._new_rows = 0
        """Rows of the first tensor appended since the gauges were last set."""
        self._tensors: dict[tuple[str, str], list[tuple[FeatureProfile, Gauge, Gauge]]] = {}
        self._windows: dict[tuple[str, str], _Window] = {}
        for (kind, tensor), features in profile.tensors().items():
            self._tensors[(kind, tensor)] = [
                (
                    feature,
                    metrics.psi.labels(*self._labels, name),
                    metrics.ks.labels(*self._labels, name),
                )
                for name, feature in features
            ]
            self._windows[(kind, tensor)] = _Window(settings.window_rows, len(features))
        self._thread: threading.Thread | None = None

    def observe_answer(
        self, request: InferenceRequest, response: InferenceResponse, request_id: str
    ) -> None:
        """Hand the call's tensors to the worker; never blocks (a full queue drops)."""
        with self._queued_lock:
            if self._queued >= self._settings.max_queue_size:
                self._dropped.inc()
                return
            self._queued += 1
        self._queue.put((time.monotonic(), request.inputs, response.outputs))

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"drift-{self._spec.name}-{self._spec.version}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker (what is queued is left); idempotent."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()

    def _run(self) -> None:
        interval = self._settings.update_interval_s
        next_update = time.monotonic() + interval
        changed = False
        while True:
            try:
                item = self._queue.get(timeout=max(next_update - time.monotonic(), 0.0))
            except queue.Empty:
                pass  # time for an update
            else:
                if item is None:
                    return
                with self._queued_lock:
                    self._queued -= 1
                self._append(item)
                changed = True
            if time.monotonic() >= next_update:
                if changed:
                    try:
                        self._update()
                    except Exception:
                        _logger.exception("drift update of model '%s' failed", self._spec.name)
                    changed = False
                next_update = time.monotonic() + interval

    def _append(self, item: _Item) -> None:
        arrived, inputs, outputs = item
        for index, ((kind, tensor), window) in enumerate(self._windows.items()):
            array = (inputs if kind == "input" else outputs).get(tensor)
            if array is None:
                continue
            rows = tensor_rows(array)
            if rows is None or rows.shape[1] != window.rows.shape[1]:
                continue
            window.append(rows, arrived)
            if index == 0:
                self._new_rows += len(rows)

    def _update(self) -> None:
        window_s = self._settings.window_s
        since = time.monotonic() - window_s if window_s is not None else -math.inf
        smallest: int | None = None
        for key, window in self._windows.items():
            rows = window.current(since)
            smallest = len(rows) if smallest is None else min(smallest, len(rows))
            if len(rows) < self._settings.min_rows:
                continue
            for column, (feature, psi_gauge, ks_gauge) in enumerate(self._tensors[key]):
                values = rows[:, column]
                psi_gauge.set(feature.psi(values))
                ks_gauge.set(feature.ks(values))
        self._window_rows.set(smallest or 0)
        # Last, so a reader who sees the count also sees the gauges computed with those rows.
        self._rows.inc(self._new_rows)
        self._new_rows = 0
