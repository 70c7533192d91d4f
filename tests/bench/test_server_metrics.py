"""Batching figures and request counts from Headrace's own metrics registry, as /metrics
exposes it: a window's figures are the difference of two scrapes."""

from __future__ import annotations

import grpc
import pytest
from prometheus_client import generate_latest

from bench.server_metrics import (
    BatchingFigures,
    RequestCounts,
    difference,
    parse,
    request_counts,
)
from headrace.telemetry.metrics import Metrics, RequestMetrics


def _page(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_window_means_are_the_difference_of_two_scrapes() -> None:
    metrics = Metrics()
    batch_size = metrics.batch_size.labels("gpu_sim", "1")
    queue = metrics.queue_duration.labels("gpu_sim", "1")
    backend = metrics.backend_duration.labels("gpu_sim", "1")
    batch_size.observe(100)  # before the window: must not count
    before = parse(_page(metrics))
    for size in (2, 4, 6):
        batch_size.observe(size)
        backend.observe(0.005)
    for wait_s in (0.001, 0.003):
        queue.observe(wait_s)
    # Another model's series add up with the first's.
    metrics.batch_size.labels("identity", "1").observe(4)
    metrics.backend_duration.labels("identity", "1").observe(0.001)
    after = parse(_page(metrics))
    figures = difference(before, after)
    assert figures.batches == 4
    assert figures.mean_batch_size == pytest.approx(4.0)
    assert figures.mean_queue_ms == pytest.approx(2.0)
    assert figures.mean_backend_ms == pytest.approx(4.0)
    assert figures.mean_request_ms is None


def test_an_idle_window_has_no_means() -> None:
    page = parse(_page(Metrics()))
    assert difference(page, page) == BatchingFigures(0, None, None, None, None)


def test_a_page_without_headrace_metrics_reads_as_zero() -> None:
    scrape = parse("# HELP other_total x\n# TYPE other_total counter\nother_total 3\n")
    assert set(scrape.values()) == {(0.0, 0.0)}


def test_request_counts_are_by_code_over_models_and_by_worker() -> None:
    metrics = Metrics(worker_id=1)
    identity = RequestMetrics(metrics, "identity", "1")
    forecast = RequestMetrics(metrics, "sales_forecast", "1")
    identity.record_request(grpc.StatusCode.OK, 1000)  # before the window: must not count
    before = request_counts(_page(metrics))
    assert before == RequestCounts({"OK": 1}, {"1": 1})
    for model in (identity, identity, forecast):
        model.record_request(grpc.StatusCode.OK, 1000)
    metrics.unresolved.record_request(grpc.StatusCode.NOT_FOUND, 1000)
    window = request_counts(_page(metrics)).since(before)
    assert window == RequestCounts({"NOT_FOUND": 1, "OK": 3}, {"1": 4})
    assert window.total == 4
    assert request_counts("") == RequestCounts({}, {})
