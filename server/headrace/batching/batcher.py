"""The dynamic batcher of one model version.

Requests wait in a bounded queue, grouped by compatibility (same input names, dtypes and
non-batch dimensions) and, within a group, by priority level (FIFO within a level). One
long-lived dispatcher task forms batches: a group is dispatched when it holds
`max_batch_size` items, when it reaches a preferred size, or when its oldest request has
waited `max_queue_delay` (measured from that request's arrival, on the loop's monotonic
clock), and only while fewer than `max_inflight_batches` batches are running.

The batcher owns every request's future: it answers, fails or expires each one exactly once
(checking `done()` first), drops cancelled and expired requests before dispatch, and fails a
batch's requests with the backend's own error without touching any other batch.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
from collections import deque
from collections.abc import Hashable, Sequence
from time import perf_counter_ns
from typing import TYPE_CHECKING, Protocol

from headrace.backends.base import Backend
from headrace.batching.merge import compatibility_key, merge, split
from headrace.batching.policy import BatchPolicy, queue_timeout_s
from headrace.errors import (
    DeadlineExceededError,
    HeadraceError,
    ModelExecutionError,
    ModelUnavailableError,
    ResourceExhaustedError,
)
from headrace.inference import BatchIds, InferenceRequest, InferenceResponse
from headrace.spec import ModelSpec
from headrace.telemetry.spans import end_current

if TYPE_CHECKING:
    from opentelemetry.context import Context

    from headrace.telemetry.tracing import BatchTrace, ModelTracing

RETRY_PUSHBACK_METADATA = "grpc-retry-pushback-ms"
"""Trailing metadata with RESOURCE_EXHAUSTED: milliseconds to wait before retrying (the key
gRPC's own retry policy reads, gRFC A6)."""

_logger = logging.getLogger(__name__)


class BatchObserver(Protocol):
    """What the batcher reports (statistics, metrics)."""

    def record_queued(self, queue_ns: int) -> None: ...

    def record_execution(
        self, *, batch_size: int, requests: int, input_ns: int, infer_ns: int, output_ns: int
    ) -> None: ...

    def set_queue_depth(self, depth: int) -> None: ...


class _State(enum.Enum):
    QUEUED = 1
    DISPATCHED = 2
    REMOVED = 3


class _Entry:
    __slots__ = (
        "deadline",
        "enqueued",
        "future",
        "group",
        "level",
        "request",
        "size",
        "state",
        "timer",
        "trace_context",
    )

    def __init__(
        self,
        request: InferenceRequest,
        size: int,
        level: int,
        group: _Group,
        future: asyncio.Future[InferenceResponse],
        enqueued: float,
        deadline: float | None,
        trace_context: Context | None = None,
    ) -> None:
        self.request = request
        self.size = size
        self.level = level
        self.group = group
        self.future = future
        self.enqueued = enqueued
        self.deadline = deadline
        self.timer: asyncio.TimerHandle | None = None
        self.state = _State.QUEUED
        self.trace_context = trace_context
        """The submitter's trace context: the batch runs in another task, not in its own."""


class _Group:
    """Queued requests that can share a batch, one FIFO per priority level."""

    __slots__ = ("items", "key", "levels")

    def __init__(self, key: Hashable, levels: int) -> None:
        self.key = key
        self.levels: list[deque[_Entry]] = [deque() for _ in range(levels)]
        self.items = 0

    def head(self) -> _Entry:
        for level in self.levels:
            if level:
                return level[0]
        raise LookupError("empty group")

    def oldest(self) -> float:
        return min(level[0].enqueued for level in self.levels if level)


_NO_GROUP = _Group(None, 0)
"""The group of requests dispatched on arrival, which never queue."""


class DynamicBatcher:
    """Batches one model version's requests in front of its backend.

    `start` creates the dispatcher task; `stop` ends it and everything it started. With
    `tracing`, each request's queue wait and part in its batch, each batch and each backend
    call get spans (`headrace.telemetry.tracing`).
    """

    def __init__(
        self,
        spec: ModelSpec,
        backend: Backend,
        policy: BatchPolicy,
        observers: Sequence[BatchObserver] = (),
        tracing: ModelTracing | None = None,
    ) -> None:
        self.spec = spec
        self.policy = policy
        self._backend = backend
        self._observers = tuple(observers)
        self._tracing = tracing
        self._groups: dict[Hashable, _Group] = {}
        self._queued = 0
        self._inflight = 0
        self._batches: set[asyncio.Task[None]] = set()
        self._wakeup: asyncio.Future[None] | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._closed = False
        self._batch_ids = BatchIds()
        self._batch_seconds: float | None = None
        """Moving average of a batch's time in the backend, for the retry hint; it starts
        at the first batch's time (None until then), so the first refusals after start-up
        do not tell clients to come back at once."""

    def start(self) -> None:
        """Start the dispatcher task on the running loop."""
        if self._dispatcher is None:
            self._dispatcher = asyncio.create_task(
                self._dispatch_forever(), name=f"batcher-{self.spec.name}-{self.spec.version}"
            )

    async def stop(self) -> None:
        """Refuse new requests, fail the queued ones with UNAVAILABLE, cancel the batches the
        dispatcher started (their requests get UNAVAILABLE) and end the dispatcher. A batch
        dispatched on arrival runs in its caller's task and finishes there. Called after the
        front end has drained, so normally nothing is left."""
        self._closed = True
        self._fail_queued(ModelUnavailableError(self._shutting_down()))
        tasks = [*self._batches, *([self._dispatcher] if self._dispatcher else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._dispatcher = None

    @property
    def queued(self) -> int:
        """Requests waiting now."""
        return self._queued

    def check_room(self) -> None:
        """Refuse at once when the queue is full: the servicer asks before decoding a request,
        so under overload a refusal costs little (`submit` checks again).

        Raises:
            ResourceExhaustedError (RESOURCE_EXHAUSTED): the queue is full; trailing metadata
                `grpc-retry-pushback-ms` says when to retry.
        """
        policy = self.policy
        if self._queued >= policy.max_queue_size:
            raise ResourceExhaustedError(
                f"model '{self.spec.name}' version {self.spec.version} has "
                f"{self._queued} requests queued (max_queue_size {policy.max_queue_size}); "
                "retry later",
                trailing_metadata={RETRY_PUSHBACK_METADATA: str(self._retry_hint_ms())},
            )

    async def submit(
        self, request: InferenceRequest, size: int, deadline: float | None = None
    ) -> InferenceResponse:
        """Queue a validated request of `size` items and wait for its own answer.

        `deadline` is the caller's (gRPC) deadline on the loop's clock; the request's
        `timeout` parameter can shorten it. Cancelling the caller removes a queued request;
        once dispatched, its batch runs on and only its answer is dropped.

        Raises:
            ResourceExhaustedError (RESOURCE_EXHAUSTED): the queue is full; trailing metadata
                `grpc-retry-pushback-ms` says when to retry.
            DeadlineExceededError (DEADLINE_EXCEEDED): the deadline passed before dispatch.
            InvalidArgumentError (INVALID_ARGUMENT): bad priority or timeout parameter.
            ModelUnavailableError (UNAVAILABLE): the batcher is shutting down.
            HeadraceError: the backend's error for the batch, with its code.
        """
        if self._closed:
            raise ModelUnavailableError(self._shutting_down())
        policy = self.policy
        level = policy.level_of(request, self.spec.name)
        loop = asyncio.get_running_loop()
        now = loop.time()
        timeout_s = queue_timeout_s(request)
        if timeout_s is not None and (deadline is None or now + timeout_s < deadline):
            deadline = now + timeout_s
        self.check_room()
        if deadline is not None and deadline <= now:
            raise DeadlineExceededError(self._expired(request))
        trace_context = self._tracing.current() if self._tracing is not None else None
        if (
            not self._queued
            and self._inflight < policy.max_inflight_batches
            and not policy.max_queue_delay_s
        ):
            return await self._run_alone(request, size, level, deadline, now, loop, trace_context)
        key = compatibility_key(request)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(key, policy.priority_levels)
        future: asyncio.Future[InferenceResponse] = loop.create_future()
        entry = _Entry(request, size, level, group, future, now, deadline, trace_context)
        group.levels[level].append(entry)
        group.items += size
        self._queued += 1
        self._report_depth()
        if deadline is not None:
            entry.timer = loop.call_at(deadline, self._expire, entry)
        self._wake()
        try:
            return await future
        except asyncio.CancelledError:
            if entry.state is _State.QUEUED:
                self._remove(entry)
            raise
        finally:
            if self._tracing is not None and entry.state is _State.REMOVED:
                self._trace_undispatched(entry, loop)

    async def _run_alone(
        self,
        request: InferenceRequest,
        size: int,
        level: int,
        deadline: float | None,
        now: float,
        loop: asyncio.AbstractEventLoop,
        trace_context: Context | None,
    ) -> InferenceResponse:
        """Dispatch on arrival: nothing waits, a slot is free and there is no window to
        fill, so the request is a batch of one, run in the caller's task (no hand-over to
        the dispatcher). Requests arriving meanwhile queue and form the next batch."""
        entry = _Entry(
            request, size, level, _NO_GROUP, loop.create_future(), now, deadline, trace_context
        )
        entry.state = _State.DISPATCHED
        self._inflight += 1
        try:
            await self._execute([entry])
        except asyncio.CancelledError:
            if entry.future.done() and not entry.future.cancelled():
                entry.future.exception()  # the caller is gone; mark the error as read
            raise
        return entry.future.result()

    # -- queue bookkeeping -------------------------------------------------------------

    def _remove(self, entry: _Entry) -> None:
        group = entry.group
        group.levels[entry.level].remove(entry)
        group.items -= entry.size
        self._queued -= 1
        entry.state = _State.REMOVED
        if entry.timer is not None:
            entry.timer.cancel()
        if group.items == 0 and not any(group.levels):
            del self._groups[group.key]
        self._report_depth()

    def _fail_queued(self, error: HeadraceError) -> None:
        for group in list(self._groups.values()):
            for level in group.levels:
                for entry in list(level):
                    self._remove(entry)
                    self._fail(entry, error)

    def _expire(self, entry: _Entry) -> None:
        if entry.state is _State.QUEUED:
            self._remove(entry)
            self._fail(entry, DeadlineExceededError(self._expired(entry.request)))

    def _fail(self, entry: _Entry, error: HeadraceError) -> None:
        if not entry.future.done():
            entry.future.set_exception(error)

    def _trace_undispatched(self, entry: _Entry, loop: asyncio.AbstractEventLoop) -> None:
        future = entry.future
        error = future.exception() if future.done() and not future.cancelled() else None
        if self._tracing is not None and entry.trace_context is not None:
            self._tracing.left_queue_undispatched(
                entry.trace_context, loop.time() - entry.enqueued, entry.size, error
            )

    def _report_depth(self) -> None:
        for observer in self._observers:
            observer.set_queue_depth(self._queued)

    def _wake(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    # -- dispatch ----------------------------------------------------------------------

    async def _dispatch_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                if not self._groups or self._inflight >= self.policy.max_inflight_batches:
                    await self._sleep(loop, None)
                    continue
                now = loop.time()
                group, ready_at = self._next_group(now)
                if ready_at > now:
                    await self._sleep(loop, ready_at)
                    continue
                self._launch(self._take(group))
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug here must not leave callers waiting forever on a dead dispatcher.
                _logger.exception("batcher of model %s failed; failing its queue", self.spec.name)
                self._fail_queued(
                    ModelExecutionError(f"batcher of model '{self.spec.name}' failed")
                )

    async def _sleep(self, loop: asyncio.AbstractEventLoop, until: float | None) -> None:
        """Wait for a new request, a cancellation, a finished batch, or `until`."""
        self._wakeup = loop.create_future()
        timer = loop.call_at(until, self._wake) if until is not None else None
        try:
            await self._wakeup
        finally:
            self._wakeup = None
            if timer is not None:
                timer.cancel()

    def _next_group(self, now: float) -> tuple[_Group, float]:
        """The group to dispatch next and when it becomes ready: at once when full or at a
        preferred size, else when its oldest request's window closes. Among ready groups,
        the one whose head has the highest priority, then the oldest."""
        policy = self.policy
        smallest_preferred = (
            policy.preferred_batch_sizes[0] if policy.preferred_batch_sizes else math.inf
        )
        best = (math.inf, 0, 0.0)
        chosen: _Group | None = None
        for group in self._groups.values():
            if group.items >= policy.max_batch_size or group.items >= smallest_preferred:
                ready_at = now
            else:
                ready_at = max(now, group.oldest() + policy.max_queue_delay_s)
            head = group.head()
            rank = (ready_at, head.level, head.enqueued)
            if chosen is None or rank < best:
                best, chosen = rank, group
        if chosen is None:
            raise LookupError("no queued requests")
        return chosen, best[0]

    def _take(self, group: _Group) -> list[_Entry]:
        """Pop the group's next batch: priority order, FIFO within a level, up to the target
        size (the largest preferred size reached, else max_batch_size); never skips a request
        to take a later one, so large requests are not starved."""
        policy = self.policy
        target = policy.max_batch_size
        if group.items < target:
            reached = [size for size in policy.preferred_batch_sizes if size <= group.items]
            if reached:
                target = reached[-1]
        taken: list[_Entry] = []
        items = 0
        for level in group.levels:
            while level:
                entry = level[0]
                if taken and items + entry.size > target:
                    break
                level.popleft()
                entry.state = _State.DISPATCHED
                if entry.timer is not None:
                    entry.timer.cancel()
                taken.append(entry)
                items += entry.size
            else:
                continue
            break
        group.items -= items
        self._queued -= len(taken)
        if group.items == 0 and not any(group.levels):
            del self._groups[group.key]
        self._report_depth()
        return taken

    def _launch(self, entries: list[_Entry]) -> None:
        self._inflight += 1
        task = asyncio.create_task(self._execute(entries))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _execute(self, entries: list[_Entry]) -> None:
        loop = asyncio.get_running_loop()
        live: list[_Entry] = []
        trace: BatchTrace | None = None
        failure: BaseException | None = None
        try:
            dispatched = loop.time()
            for entry in entries:
                # Callers that cancelled between dispatch and now are dropped here.
                if entry.future.done():
                    continue
                live.append(entry)
                for observer in self._observers:
                    observer.record_queued(int((dispatched - entry.enqueued) * 1e9))
            if not live:
                return
            if self._tracing is not None:
                trace = self._tracing.start_batch(
                    [(e.trace_context, dispatched - e.enqueued, e.size) for e in live]
                )
            started = perf_counter_ns()
            requests = [entry.request for entry in live]
            sizes = [entry.size for entry in live]
            batch = merge(requests)
            merged = perf_counter_ns()
            if trace is None:
                response = await self._backend.infer(self.spec, batch, self._timeout(live, loop))
            else:
                span, token = trace.start_backend()
                try:
                    response = await self._backend.infer(
                        self.spec, batch, self._timeout(live, loop)
                    )
                except BaseException as exc:
                    end_current(span, token, exc)
                    raise
                end_current(span, token, None)
            inferred = perf_counter_ns()
            parts = split(response, requests, sizes)
            finished = perf_counter_ns()
            batch_id = self._batch_ids.new()
            batch_size = sum(sizes)
            for entry, part in zip(live, parts, strict=True):
                part.batch_id = batch_id
                part.batch_size = batch_size
                if not entry.future.done():
                    entry.future.set_result(part)
            seconds = (inferred - merged) / 1e9
            average = self._batch_seconds
            self._batch_seconds = (
                seconds if average is None else average + 0.2 * (seconds - average)
            )
            for observer in self._observers:
                observer.record_execution(
                    batch_size=batch_size,
                    requests=len(live),
                    input_ns=merged - started,
                    infer_ns=inferred - merged,
                    output_ns=finished - inferred,
                )
        except HeadraceError as exc:
            failure = exc
            for entry in live:
                self._fail(entry, exc)
        except asyncio.CancelledError as exc:
            failure = exc
            for entry in live:
                self._fail(entry, ModelUnavailableError(self._shutting_down()))
            raise
        except Exception as exc:
            failure = exc
            _logger.exception("batch of model %s failed", self.spec.name)
            for entry in live:
                self._fail(
                    entry,
                    ModelExecutionError(
                        f"batch of model '{self.spec.name}' failed: {type(exc).__name__}: {exc}"
                    ),
                )
        finally:
            self._inflight -= 1
            self._wake()
            if trace is not None:
                trace.end(failure)

    @staticmethod
    def _timeout(entries: Sequence[_Entry], loop: asyncio.AbstractEventLoop) -> float | None:
        """The backend call's time limit: until the last deadline among the batch's requests
        (none if any request has none), so no request loses time it was given."""
        deadlines = [entry.deadline for entry in entries]
        if any(deadline is None for deadline in deadlines):
            return None
        return max(0.0, max(d for d in deadlines if d is not None) - loop.time())

    def _retry_hint_ms(self) -> int:
        """When a retry may find room: the batches ahead of it, at the recent batch time."""
        policy = self.policy
        batches_ahead = math.ceil(self._queued / policy.max_batch_size)
        seconds = (
            max(self._batch_seconds or 0.0, policy.max_queue_delay_s)
            * batches_ahead
            / policy.max_inflight_batches
        )
        return max(1, min(10_000, round(seconds * 1000)))

    def _expired(self, request: InferenceRequest) -> str:
        return (
            f"request {request.id!r} to model '{self.spec.name}' passed its deadline "
            "before it was dispatched"
        )

    def _shutting_down(self) -> str:
        return f"model '{self.spec.name}' version {self.spec.version} is shutting down"
