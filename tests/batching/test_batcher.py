"""The batcher on its own, over the real in-process backend: when batches leave, what they
hold, priorities, deadlines, cancellation, back-pressure and failure isolation.

Timing is never asserted as an upper bound tighter than seconds; where order in time matters
the test compares two requests of the same batch, or uses a gate that holds the model."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from headrace.backends.local import LocalBackend
from headrace.batching import BatchPolicy, DynamicBatcher
from headrace.batching.batcher import RETRY_PUSHBACK_METADATA
from headrace.config import BatchingSettings, LocalBackendSettings, LocalModelSettings
from headrace.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    ModelExecutionError,
    ModelUnavailableError,
    ResourceExhaustedError,
)
from headrace.inference import InferenceRequest, InferenceResponse
from headrace.statistics import ModelStatistics
from tests.models import GATED, Gated

_counter = 0


async def _batcher(
    *, max_batch_size: int = 16, delay_s: float = 0.0, **batching: Any
) -> AsyncIterator[tuple[DynamicBatcher, Gated, ModelStatistics]]:
    global _counter
    _counter += 1
    key = f"batcher-{_counter}"
    settings = LocalModelSettings.model_validate(
        {
            "name": "gated",
            "entrypoint": "tests.models:gated",
            "init_args": {"key": key, "delay_s": delay_s},
            "max_batch_size": max_batch_size,
            "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1]}],
            "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [-1]}],
        }
    )
    backend = LocalBackend([settings], LocalBackendSettings(worker_threads=4))
    await backend.start()
    spec = backend.model_specs()[0]
    policy = BatchPolicy.resolve(BatchingSettings(**batching), spec)
    assert policy is not None
    statistics = ModelStatistics()
    batcher = DynamicBatcher(spec, backend, policy, [statistics])
    batcher.start()
    try:
        yield batcher, GATED[key], statistics
    finally:
        GATED[key].gate.set()
        await batcher.stop()
        await backend.stop()


@pytest.fixture
async def batcher_factory():
    generators = []

    async def make(**kwargs: Any) -> tuple[DynamicBatcher, Gated, ModelStatistics]:
        generator = _batcher(**kwargs)
        generators.append(generator)
        return await generator.__anext__()

    yield make
    for generator in generators:
        await generator.aclose()


def _request(
    values: list[float] | np.ndarray, rows: int = 1, **parameters: Any
) -> InferenceRequest:
    data = np.asarray(values, dtype=np.float32).reshape(rows, -1)
    return InferenceRequest("gated", "1", f"id-{data[0, 0]}", {"INPUT0": data}, (), parameters)


async def _submit(
    batcher: DynamicBatcher, request: InferenceRequest, **kwargs: Any
) -> InferenceResponse:
    return await batcher.submit(request, request.inputs["INPUT0"].shape[0], **kwargs)


def _check(response: InferenceResponse, request: InferenceRequest) -> None:
    np.testing.assert_array_equal(response.outputs["OUTPUT0"], request.inputs["INPUT0"] * 2 + 1)
    assert response.id == request.id


async def _until_running(model: Gated) -> None:
    # The model runs on a worker thread: wait for its threading.Event without blocking the loop.
    assert await asyncio.to_thread(model.running.wait, 10)


async def _hold(batcher: DynamicBatcher, model: Gated) -> asyncio.Task[InferenceResponse]:
    """Occupy the only in-flight slot with a batch the gate holds."""
    model.gate.clear()
    blocker = asyncio.ensure_future(_submit(batcher, _request([1000.0])))
    await _until_running(model)
    return blocker


async def test_dispatched_when_full(batcher_factory) -> None:
    batcher, model, statistics = await batcher_factory(
        max_batch_size=4, max_queue_delay_us=30_000_000
    )
    requests = [_request([float(i)]) for i in range(4)]
    started = time.monotonic()
    responses = await asyncio.wait_for(asyncio.gather(*(_submit(batcher, r) for r in requests)), 10)
    assert time.monotonic() - started < 10  # far below the 30 s window
    for response, request in zip(responses, requests, strict=True):
        _check(response, request)
    assert [len(batch) for batch in model.batches] == [4]
    assert statistics.execution_count == 1
    assert statistics.inference_count == 4
    assert list(statistics.batches) == [4]


async def test_dispatched_at_a_preferred_size(batcher_factory) -> None:
    batcher, model, _ = await batcher_factory(
        max_batch_size=16, max_queue_delay_us=30_000_000, preferred_batch_sizes=(3, 6)
    )
    requests = [_request([float(i)]) for i in range(3)]
    await asyncio.wait_for(asyncio.gather(*(_submit(batcher, r) for r in requests)), 10)
    assert [len(batch) for batch in model.batches] == [3]


async def test_largest_reachable_preferred_size_is_taken(batcher_factory) -> None:
    batcher, model, _ = await batcher_factory(
        max_batch_size=16, max_queue_delay_us=200_000, preferred_batch_sizes=(2, 4)
    )
    blocker = await _hold(batcher, model)
    pending = [asyncio.ensure_future(_submit(batcher, _request([float(i)]))) for i in range(5)]
    await asyncio.sleep(0.05)
    model.gate.set()
    await asyncio.wait_for(asyncio.gather(blocker, *pending), 10)
    # 5 queued behind the held batch: a batch of the preferred 4, then 1 after the window.
    assert [len(batch) for batch in model.batches] == [1, 4, 1]


async def test_window_runs_from_the_first_request(batcher_factory) -> None:
    window_s = 0.3
    batcher, model, _ = await batcher_factory(max_queue_delay_us=int(window_s * 1e6))
    first_started = time.monotonic()
    first = asyncio.ensure_future(_submit(batcher, _request([1.0])))
    await asyncio.sleep(window_s / 2)
    second_started = time.monotonic()
    second = asyncio.ensure_future(_submit(batcher, _request([2.0])))
    await asyncio.wait_for(asyncio.gather(first, second), 10)
    finished = time.monotonic()
    assert [len(batch) for batch in model.batches] == [2]
    assert finished - first_started >= window_s  # nothing left before the window closed
    # The window is the first request's: the second waited only what remained of it.
    assert finished - second_started < finished - first_started


async def test_multi_item_requests_are_concatenated_and_split(batcher_factory) -> None:
    batcher, model, statistics = await batcher_factory(
        max_batch_size=6, max_queue_delay_us=30_000_000
    )
    requests = [
        _request([1.0, 2.0], rows=1),
        _request(np.arange(6, dtype=np.float32) + 10, rows=3),
        _request([7.0, 8.0, 9.0, 10.0], rows=2),
    ]
    responses = await asyncio.wait_for(asyncio.gather(*(_submit(batcher, r) for r in requests)), 10)
    for response, request in zip(responses, requests, strict=True):
        _check(response, request)
    assert [batch.shape for batch in model.batches] == [(6, 2)]
    assert statistics.inference_count == 6


async def test_incompatible_shapes_form_their_own_batches(batcher_factory) -> None:
    batcher, model, _ = await batcher_factory(max_batch_size=4, max_queue_delay_us=100_000)
    requests = [_request([1.0, 2.0]), _request([3.0, 4.0, 5.0]), _request([6.0, 7.0])]
    responses = await asyncio.wait_for(asyncio.gather(*(_submit(batcher, r) for r in requests)), 10)
    for response, request in zip(responses, requests, strict=True):
        _check(response, request)
    assert sorted(batch.shape for batch in model.batches) == [(1, 3), (2, 2)]


async def test_priorities_higher_first_fifo_within_a_level(batcher_factory) -> None:
    batcher, model, _ = await batcher_factory(max_batch_size=1, priority_levels=3)
    blocker = await _hold(batcher, model)
    order = [(3, 1.0), (1, 2.0), (2, 3.0), (1, 4.0), (0, 5.0), (3, 6.0)]  # 0: default (3)
    pending = [
        asyncio.ensure_future(_submit(batcher, _request([value], priority=priority)))
        for priority, value in order
    ]
    await asyncio.sleep(0.05)
    model.gate.set()
    await asyncio.wait_for(asyncio.gather(blocker, *pending), 10)
    seen = [float(batch[0, 0]) for batch in model.batches[1:]]
    assert seen == [2.0, 4.0, 3.0, 1.0, 5.0, 6.0]


async def test_bad_priority_is_invalid_argument(batcher_factory) -> None:
    batcher, _, _ = await batcher_factory(priority_levels=2)
    with pytest.raises(
        InvalidArgumentError, match="'priority' is 3; model 'gated' has priority levels 1"
    ):
        await _submit(batcher, _request([1.0], priority=3))
    with pytest.raises(InvalidArgumentError, match="'timeout' must be an integer"):
        await _submit(batcher, _request([1.0], timeout="soon"))


async def test_cancelled_while_queued_never_reaches_the_model(batcher_factory) -> None:
    batcher, model, statistics = await batcher_factory(max_batch_size=4)
    blocker = await _hold(batcher, model)
    doomed = asyncio.ensure_future(_submit(batcher, _request([66.0])))
    survivor = asyncio.ensure_future(_submit(batcher, _request([77.0])))
    await asyncio.sleep(0.02)
    assert batcher.queued == 2
    doomed.cancel()
    await asyncio.sleep(0)
    assert batcher.queued == 1
    assert statistics.queue_depth == 1
    model.gate.set()
    _check(await asyncio.wait_for(survivor, 10), _request([77.0]))
    await blocker
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert 66.0 not in np.concatenate([batch.ravel() for batch in model.batches])


async def test_cancel_after_dispatch_leaves_the_batch_alone(batcher_factory) -> None:
    batcher, model, _ = await batcher_factory(max_batch_size=2, max_queue_delay_us=30_000_000)
    model.gate.clear()
    first = asyncio.ensure_future(_submit(batcher, _request([1.0])))
    second = asyncio.ensure_future(_submit(batcher, _request([2.0])))
    await _until_running(model)
    first.cancel()
    model.gate.set()
    _check(await asyncio.wait_for(second, 10), _request([2.0]))
    assert [len(batch) for batch in model.batches] == [2]
    # The batcher is not stalled by the abandoned answer (a full batch of 2 goes at once).
    full = _request([3.0, 4.0], rows=2)
    _check(await asyncio.wait_for(_submit(batcher, full), 10), full)


async def test_timeout_parameter_expires_a_queued_request(batcher_factory) -> None:
    batcher, model, _ = await batcher_factory()
    blocker = await _hold(batcher, model)
    with pytest.raises(DeadlineExceededError, match="passed its deadline before it was dispatched"):
        await asyncio.wait_for(_submit(batcher, _request([55.0], timeout=50_000)), 10)
    assert batcher.queued == 0
    model.gate.set()
    await blocker
    assert all(55.0 not in batch for batch in model.batches)


async def test_caller_deadline_expires_a_queued_request(batcher_factory) -> None:
    batcher, model, _ = await batcher_factory()
    blocker = await _hold(batcher, model)
    deadline = asyncio.get_running_loop().time() + 0.05
    with pytest.raises(DeadlineExceededError):
        await asyncio.wait_for(_submit(batcher, _request([56.0]), deadline=deadline), 10)
    past = asyncio.get_running_loop().time() - 1
    with pytest.raises(DeadlineExceededError):
        await _submit(batcher, _request([57.0]), deadline=past)
    model.gate.set()
    await blocker
    assert all(56.0 not in batch and 57.0 not in batch for batch in model.batches)


async def test_full_queue_refuses_at_once_with_a_retry_hint(batcher_factory) -> None:
    batcher, model, _ = await batcher_factory(max_batch_size=1, max_queue_size=3)
    blocker = await _hold(batcher, model)
    queued = [asyncio.ensure_future(_submit(batcher, _request([float(i)]))) for i in range(3)]
    await asyncio.sleep(0.02)
    with pytest.raises(
        ResourceExhaustedError, match=r"3 requests queued \(max_queue_size 3\)"
    ) as raised:
        await _submit(batcher, _request([9.0]))
    hint = int(raised.value.trailing_metadata[RETRY_PUSHBACK_METADATA])
    assert 1 <= hint <= 10_000
    model.gate.set()
    await asyncio.wait_for(asyncio.gather(blocker, *queued), 10)
    _check(await _submit(batcher, _request([9.0])), _request([9.0]))


async def test_retry_hint_counts_the_first_batch_time_in_full(batcher_factory) -> None:
    # Each execution sleeps 0.2 s, so a batch takes at least that: one batch finished, the
    # hint for a queue of two single-item batches is at least 2 x 0.2 s, not a fraction of it.
    batcher, model, _ = await batcher_factory(max_batch_size=1, max_queue_size=2, delay_s=0.2)
    _check(await _submit(batcher, _request([1.0])), _request([1.0]))
    blocker = await _hold(batcher, model)
    queued = [asyncio.ensure_future(_submit(batcher, _request([float(i)]))) for i in range(2)]
    await asyncio.sleep(0.02)
    with pytest.raises(ResourceExhaustedError) as raised:
        await _submit(batcher, _request([9.0]))
    assert int(raised.value.trailing_metadata[RETRY_PUSHBACK_METADATA]) >= 400
    model.gate.set()
    await asyncio.wait_for(asyncio.gather(blocker, *queued), 10)


async def test_failing_batch_fails_only_its_requests(batcher_factory) -> None:
    batcher, _, _ = await batcher_factory(max_batch_size=2, max_queue_delay_us=30_000_000)
    poisoned = [_submit(batcher, _request([-1.0])), _submit(batcher, _request([5.0]))]
    results = await asyncio.wait_for(asyncio.gather(*poisoned, return_exceptions=True), 10)
    assert all(isinstance(result, ModelExecutionError) for result in results)
    assert "poisoned input" in str(results[0])
    healthy = [_request([6.0]), _request([7.0])]
    responses = await asyncio.wait_for(asyncio.gather(*(_submit(batcher, r) for r in healthy)), 10)
    for response, request in zip(responses, healthy, strict=True):
        _check(response, request)


async def test_stop_fails_queued_and_dispatched_requests_with_unavailable(batcher_factory) -> None:
    # A window (1 ms) sends every request through the dispatcher.
    batcher, model, _ = await batcher_factory(max_batch_size=1, max_queue_delay_us=1000)
    model.gate.clear()
    running = asyncio.ensure_future(_submit(batcher, _request([7.0])))
    await _until_running(model)
    queued = asyncio.ensure_future(_submit(batcher, _request([8.0])))
    await asyncio.sleep(0.02)
    await batcher.stop()
    model.gate.set()
    for task in (running, queued):
        with pytest.raises(ModelUnavailableError, match="shutting down"):
            await task
    with pytest.raises(ModelUnavailableError):
        await _submit(batcher, _request([9.0]))


async def test_stop_lets_a_batch_dispatched_on_arrival_finish(batcher_factory) -> None:
    batcher, model, _ = await batcher_factory()
    alone = await _hold(batcher, model)  # no window, nothing queued: runs in its caller's task
    stopping = asyncio.ensure_future(batcher.stop())
    await asyncio.sleep(0.02)
    model.gate.set()
    await stopping
    _check(await asyncio.wait_for(alone, 10), _request([1000.0]))


async def test_in_flight_batches_are_bounded(batcher_factory) -> None:
    batcher, model, _ = await batcher_factory(
        max_batch_size=1, max_inflight_batches=2, delay_s=0.05
    )
    requests = [_request([float(i)]) for i in range(6)]
    await asyncio.wait_for(asyncio.gather(*(_submit(batcher, r) for r in requests)), 10)
    assert len(model.batches) == 6
