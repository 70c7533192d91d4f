"""The endpoints that serve one model, their health and their in-flight calls.

The pool picks the endpoint for each call: among the available ones (healthy and not ejected)
below `max_inflight_per_endpoint`, the one with the fewest calls in flight, ties broken at
random; so there is no stickiness, and a slow endpoint, holding its calls longer, gets fewer.
When every available endpoint is at its limit the call waits here (and batches keep growing
in Headrace) instead of queueing in Triton. Calls that fail as if the endpoint were gone count
towards ejecting it; health checks re-admit it after the ejection period. The pool knows
nothing of the wire protocol: the backend reports outcomes and health.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterable
from typing import Protocol

from headrace.errors import ModelUnavailableError

_logger = logging.getLogger(__name__)


class Endpoint:
    """One server address as seen by one model's pool."""

    __slots__ = (
        "address",
        "calls",
        "consecutive_failures",
        "ejected_until",
        "failed_checks",
        "healthy",
        "in_flight",
        "removed",
    )

    def __init__(self, address: str) -> None:
        self.address = address
        self.in_flight = 0
        self.calls = 0
        """Calls started on this endpoint so far."""
        self.healthy = True
        """The last health check's verdict (optimistic until the first)."""
        self.ejected_until = 0.0
        self.consecutive_failures = 0
        self.failed_checks = 0
        """Consecutive failed health checks."""
        self.removed = False

    def available(self, now: float) -> bool:
        return self.healthy and not self.removed and now >= self.ejected_until

    def describe(self, now: float) -> str:
        if self.removed:
            return f"{self.address} (removed)"
        if now < self.ejected_until:
            return f"{self.address} (ejected)"
        return self.address if self.healthy else f"{self.address} (unhealthy)"


class PoolObserver(Protocol):
    """What is told of a pool's endpoints as they change (metrics). Called on the event loop;
    must be cheap."""

    def endpoint_in_flight(self, address: str, in_flight: int) -> None: ...

    def endpoint_available(self, address: str, available: bool) -> None:
        """Whether the endpoint takes calls now (healthy, not ejected)."""
        ...

    def endpoint_ejected(self, address: str) -> None: ...

    def endpoint_removed(self, address: str) -> None: ...


class EndpointPool:
    """One model's endpoints. Used from the event loop only."""

    def __init__(
        self,
        model: str,
        *,
        max_inflight_per_endpoint: int,
        ejection_consecutive_failures: int,
        ejection_s: float,
        unhealthy_after_failed_checks: int = 1,
    ) -> None:
        self.model = model
        self.limit = max_inflight_per_endpoint
        """Calls in flight per endpoint; may be changed once the model is described."""
        self._ejection_failures = ejection_consecutive_failures
        self._ejection_s = ejection_s
        self._unhealthy_after = unhealthy_after_failed_checks
        self._endpoints: dict[str, Endpoint] = {}
        self._changed: asyncio.Future[None] | None = None
        self._observer: PoolObserver | None = None

    def observe(self, observer: PoolObserver) -> None:
        """Tell `observer` of every change from now on, and of every endpoint's state now."""
        self._observer = observer
        now = asyncio.get_running_loop().time()
        for endpoint in self._endpoints.values():
            observer.endpoint_in_flight(endpoint.address, endpoint.in_flight)
            observer.endpoint_available(endpoint.address, endpoint.available(now))

    @property
    def endpoints(self) -> list[Endpoint]:
        return list(self._endpoints.values())

    def set_addresses(self, addresses: Iterable[str]) -> list[Endpoint]:
        """Make the pool's endpoints exactly `addresses`; returns the endpoints removed (their
        in-flight calls finish; new calls go elsewhere)."""
        wanted = dict.fromkeys(addresses)
        removed = []
        for address in list(self._endpoints):
            if address not in wanted:
                endpoint = self._endpoints.pop(address)
                endpoint.removed = True
                removed.append(endpoint)
                if self._observer is not None:
                    self._observer.endpoint_removed(address)
        for address in wanted:
            if address not in self._endpoints:
                self._endpoints[address] = Endpoint(address)
                if self._observer is not None:
                    self._observer.endpoint_in_flight(address, 0)
                    self._observer.endpoint_available(address, True)
        self._notify()
        return removed

    def ready(self) -> bool:
        """Whether some endpoint can take calls now."""
        now = asyncio.get_running_loop().time()
        return any(endpoint.available(now) for endpoint in self._endpoints.values())

    async def acquire(self, exclude: Iterable[Endpoint] = ()) -> Endpoint:
        """Reserve the endpoint for a call; `release` it when the call ends.

        Raises:
            ModelUnavailableError (UNAVAILABLE): no endpoint is available (all unhealthy,
                ejected or excluded).
        """
        excluded = set(exclude)
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            candidates = [
                e for e in self._endpoints.values() if e.available(now) and e not in excluded
            ]
            if not candidates:
                described = ", ".join(e.describe(now) for e in self._endpoints.values())
                raise ModelUnavailableError(
                    f"no available endpoint for model '{self.model}' ({described or 'none'})"
                )
            free = [e for e in candidates if e.in_flight < self.limit]
            if free:
                fewest = min(e.in_flight for e in free)
                endpoint = random.choice([e for e in free if e.in_flight == fewest])
                endpoint.in_flight += 1
                endpoint.calls += 1
                if self._observer is not None:
                    self._observer.endpoint_in_flight(endpoint.address, endpoint.in_flight)
                return endpoint
            if self._changed is None or self._changed.done():
                self._changed = loop.create_future()
            await self._changed

    def release(self, endpoint: Endpoint, *, unreachable: bool = False) -> None:
        """End a call. `unreachable`: it failed as if the endpoint were gone (UNAVAILABLE,
        connection refused or reset), which counts towards ejection."""
        endpoint.in_flight -= 1
        if self._observer is not None and not endpoint.removed:
            self._observer.endpoint_in_flight(endpoint.address, endpoint.in_flight)
        if unreachable:
            endpoint.consecutive_failures += 1
            if endpoint.consecutive_failures >= self._ejection_failures:
                self._eject(endpoint)
        else:
            endpoint.consecutive_failures = 0
        self._notify()

    def record_health(self, endpoint: Endpoint, healthy: bool) -> None:
        """An active health check's verdict. A healthy endpoint is marked unhealthy only after
        `unhealthy_after_failed_checks` failed checks in a row: one check timing out while this
        process is busy must not take a working server out (failed calls eject at once)."""
        if healthy:
            endpoint.failed_checks = 0
        else:
            endpoint.failed_checks += 1
            if endpoint.healthy and endpoint.failed_checks < self._unhealthy_after:
                return
        if healthy != endpoint.healthy:
            _logger.warning(
                "endpoint %s for model %s is %s",
                endpoint.address,
                self.model,
                "healthy again" if healthy else "unhealthy",
            )
        endpoint.healthy = healthy
        if healthy:
            endpoint.consecutive_failures = 0
        if self._observer is not None and not endpoint.removed:
            now = asyncio.get_running_loop().time()
            self._observer.endpoint_available(endpoint.address, endpoint.available(now))
        self._notify()

    def _eject(self, endpoint: Endpoint) -> None:
        now = asyncio.get_running_loop().time()
        if now >= endpoint.ejected_until:
            _logger.warning(
                "ejecting endpoint %s for model %s for %.1f s after %d failed calls",
                endpoint.address,
                self.model,
                self._ejection_s,
                endpoint.consecutive_failures,
            )
            if self._observer is not None:
                self._observer.endpoint_ejected(endpoint.address)
        endpoint.ejected_until = now + self._ejection_s
        # Back only once a health check passes after the ejection period.
        endpoint.healthy = False
        if self._observer is not None and not endpoint.removed:
            self._observer.endpoint_available(endpoint.address, False)

    def _notify(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
