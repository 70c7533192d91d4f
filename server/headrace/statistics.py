"""Cumulative per-model-version inference statistics, as ModelStatistics reports them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class Duration:
    """A count of events and their total time in nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass(slots=True)
class BatchDurations:
    """Time spent per phase by executions of one batch size."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class ModelStatistics:
    """Counters for one model version. Updated on the event loop only, so unlocked.

    Phases follow Triton: `queue` is time waiting before dispatch, `compute_input` decoding
    and validating, `compute_infer` the backend call, `compute_output` encoding.
    """

    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchDurations] = field(default_factory=dict)

    queue_depth: int = 0
    """Requests waiting in the batcher now."""

    def record_success(self, *, total_ns: int, input_ns: int, output_ns: int) -> None:
        """One request answered: `total_ns` from arrival to response, `input_ns` decoding
        and validating it, `output_ns` encoding its answer."""
        self.success.add(total_ns)
        self.compute_input.add(input_ns)
        self.compute_output.add(output_ns)

    def record_failure(self, total_ns: int) -> None:
        """One request failed after it reached its model."""
        self.fail.add(total_ns)

    def record_queued(self, queue_ns: int) -> None:
        """One request left the queue for the backend after `queue_ns` (0 unbatched)."""
        self.queue.add(queue_ns)

    def record_execution(
        self, *, batch_size: int, requests: int, input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        """One model execution of `batch_size` items made of `requests` requests:
        `input_ns` merging them, `infer_ns` in the backend, `output_ns` splitting the answer."""
        self.inference_count += batch_size
        self.execution_count += 1
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.compute_infer.add(infer_ns * requests, count=requests)
        batch = self.batches.get(batch_size)
        if batch is None:
            batch = self.batches[batch_size] = BatchDurations()
        batch.compute_input.add(input_ns)
        batch.compute_infer.add(infer_ns)
        batch.compute_output.add(output_ns)

    def set_queue_depth(self, depth: int) -> None:
        self.queue_depth = depth
