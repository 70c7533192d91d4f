"""Figures read from a Headrace server's Prometheus endpoint around a measurement window:
mean batch size and where a request's time went (batcher queue vs backend call), and requests
answered by gRPC status code and by worker process.

Read by the text parser of prometheus_client, from the same /metrics a deployment scrapes, so
the bench measures what operators see. Histograms are cumulative: a window's figures are the
difference of two scrapes.
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

BATCH_SIZE = "headrace_batch_size"
QUEUE_DURATION = "headrace_queue_duration_seconds"
BACKEND_DURATION = "headrace_backend_duration_seconds"
REQUEST_DURATION = "headrace_request_duration_seconds"
HISTOGRAMS = (BATCH_SIZE, QUEUE_DURATION, BACKEND_DURATION, REQUEST_DURATION)
REQUESTS = "headrace_requests"
"""Requests answered, by model, version and gRPC status code name (`code`)."""
WORKER_REQUESTS = "headrace_worker_requests"
"""Requests answered, by worker process (`worker`) of `headrace serve --workers N`."""
SCRAPE_TIMEOUT_S = 5.0

Scrape = dict[str, tuple[float, float]]
"""Histogram name -> (sum, count), over all models and versions."""


def parse(text: str) -> Scrape:
    """The sums and counts of Headrace's batching histograms in a /metrics page (missing
    histograms read as zero)."""
    totals = {name: [0.0, 0.0] for name in HISTOGRAMS}
    for family in text_string_to_metric_families(text):
        if family.name not in totals:
            continue
        for sample in family.samples:
            if sample.name == f"{family.name}_sum":
                totals[family.name][0] += sample.value
            elif sample.name == f"{family.name}_count":
                totals[family.name][1] += sample.value
    return {name: (total[0], total[1]) for name, total in totals.items()}


def read(url: str) -> str:
    """GET `url` (a /metrics address): the page's text.

    Raises:
        OSError: the endpoint cannot be read.
    """
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
        return str(response.read().decode())


def scrape(url: str) -> Scrape:
    """GET `url` (a /metrics address) and parse it.

    Raises:
        OSError: the endpoint cannot be read.
    """
    return parse(read(url))


@dataclass(frozen=True, slots=True)
class RequestCounts:
    """Requests a server has answered (cumulative, or a window's when differenced)."""

    by_code: dict[str, int]
    """gRPC status code name -> requests, over all models."""
    by_worker: dict[str, int]
    """Worker index -> requests, all codes (one worker, "0", for a single process)."""

    @property
    def total(self) -> int:
        return sum(self.by_code.values())

    def since(self, before: RequestCounts) -> RequestCounts:
        """The requests answered between `before` and these counts (zeros left out)."""

        def minus(after: dict[str, int], earlier: dict[str, int]) -> dict[str, int]:
            changed = {key: value - earlier.get(key, 0) for key, value in after.items()}
            return {key: value for key, value in sorted(changed.items()) if value}

        return RequestCounts(
            minus(self.by_code, before.by_code), minus(self.by_worker, before.by_worker)
        )


def request_counts(text: str) -> RequestCounts:
    """The request counters in a /metrics page, summed over models and versions (counters
    missing from the page read as none)."""
    by_code: dict[str, int] = {}
    by_worker: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        if family.name == REQUESTS:
            counts, label = by_code, "code"
        elif family.name == WORKER_REQUESTS:
            counts, label = by_worker, "worker"
        else:
            continue
        for sample in family.samples:
            if sample.name == f"{family.name}_total":
                key = sample.labels[label]
                counts[key] = counts.get(key, 0) + round(sample.value)
    return RequestCounts(by_code, by_worker)


@dataclass(frozen=True, slots=True)
class BatchingFigures:
    """What the server did between two scrapes. Means are None when nothing was observed."""

    batches: int
    """Backend calls (one per batch; one per request without a batcher)."""
    mean_batch_size: float | None
    """Items per backend call."""
    mean_queue_ms: float | None
    """Time a request waited in its batcher before dispatch."""
    mean_backend_ms: float | None
    """Duration of a backend call."""
    mean_request_ms: float | None
    """Arrival in the servicer to answer ready; the rest of a client's latency is gRPC and
    the network."""


def difference(before: Scrape, after: Scrape) -> BatchingFigures:
    """The figures of the window between scrapes `before` and `after`."""

    def mean(name: str, scale: float) -> float | None:
        total = after[name][0] - before[name][0]
        count = after[name][1] - before[name][1]
        return total / count * scale if count > 0 else None

    return BatchingFigures(
        batches=round(after[BATCH_SIZE][1] - before[BATCH_SIZE][1]),
        mean_batch_size=mean(BATCH_SIZE, 1.0),
        mean_queue_ms=mean(QUEUE_DURATION, 1000.0),
        mean_backend_ms=mean(BACKEND_DURATION, 1000.0),
        mean_request_ms=mean(REQUEST_DURATION, 1000.0),
    )
