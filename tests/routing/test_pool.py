"""Endpoint selection, in-flight limits, ejection and re-admission."""

from __future__ import annotations

import asyncio

import pytest

from headrace.errors import ModelUnavailableError
from headrace.routing import EndpointPool


def _pool(limit: int = 2, failures: int = 2, ejection_s: float = 0.2) -> EndpointPool:
    pool = EndpointPool(
        "m",
        max_inflight_per_endpoint=limit,
        ejection_consecutive_failures=failures,
        ejection_s=ejection_s,
    )
    pool.set_addresses(["a:1", "b:1", "c:1"])
    return pool


async def test_fewest_in_flight_wins() -> None:
    pool = _pool(limit=10)
    taken = [await pool.acquire() for _ in range(6)]
    assert sorted(e.in_flight for e in pool.endpoints) == [2, 2, 2]
    for endpoint in taken[:2]:
        pool.release(endpoint)
    freed = {e.address for e in taken[:2]}
    nxt = await pool.acquire()
    assert nxt.address in freed or nxt.in_flight == 2


async def test_no_stickiness_ties_are_random() -> None:
    pool = _pool(limit=10)
    seen = set()
    for _ in range(60):
        endpoint = await pool.acquire()
        seen.add(endpoint.address)
        pool.release(endpoint)
    assert seen == {"a:1", "b:1", "c:1"}


async def test_calls_wait_at_the_limit() -> None:
    pool = _pool(limit=1)
    held = [await pool.acquire() for _ in range(3)]
    waiting = asyncio.ensure_future(pool.acquire())
    await asyncio.sleep(0.02)
    assert not waiting.done()
    pool.release(held[1])
    assert (await asyncio.wait_for(waiting, 1)) is held[1]


async def test_ejection_and_readmission() -> None:
    pool = _pool(failures=2, ejection_s=0.1)
    a = next(e for e in pool.endpoints if e.address == "a:1")
    for _ in range(2):
        a.in_flight += 1
        pool.release(a, unreachable=True)
    assert not a.available(asyncio.get_running_loop().time())
    for _ in range(20):
        endpoint = await pool.acquire()
        assert endpoint is not a
        pool.release(endpoint)
    await asyncio.sleep(0.15)
    assert not a.available(asyncio.get_running_loop().time())  # needs a passing health check
    pool.record_health(a, True)
    assert a.available(asyncio.get_running_loop().time())


async def test_one_failure_does_not_eject() -> None:
    pool = _pool(failures=2)
    a = pool.endpoints[0]
    a.in_flight += 1
    pool.release(a, unreachable=True)
    a.in_flight += 1
    pool.release(a)  # a success resets the count
    a.in_flight += 1
    pool.release(a, unreachable=True)
    assert a.available(asyncio.get_running_loop().time())


async def test_nothing_available_is_unavailable() -> None:
    pool = _pool()
    for endpoint in pool.endpoints:
        pool.record_health(endpoint, False)
    assert not pool.ready()
    with pytest.raises(
        ModelUnavailableError, match=r"no available endpoint for model 'm' \(a:1 \(unhealthy\)"
    ):
        await pool.acquire()


async def test_excluded_endpoints_are_skipped() -> None:
    pool = _pool()
    a, b, c = pool.endpoints
    assert (await pool.acquire(exclude=[a, b])) is c
    with pytest.raises(ModelUnavailableError):
        await pool.acquire(exclude=[a, b, c])


async def test_removed_endpoints_finish_but_get_no_new_calls() -> None:
    pool = _pool(limit=10)
    held = await pool.acquire()
    removed = pool.set_addresses([e.address for e in pool.endpoints if e is not held] + ["d:1"])
    assert removed == [held]
    pool.release(held)
    addresses = set()
    for _ in range(40):
        endpoint = await pool.acquire()
        addresses.add(endpoint.address)
        pool.release(endpoint)
    assert held.address not in addresses
    assert "d:1" in addresses


class _Recorder:
    """A PoolObserver keeping the latest state it was told."""

    def __init__(self) -> None:
        self.in_flight: dict[str, int] = {}
        self.available: dict[str, bool] = {}
        self.ejections: dict[str, int] = {}
        self.removed: list[str] = []

    def endpoint_in_flight(self, address: str, in_flight: int) -> None:
        self.in_flight[address] = in_flight

    def endpoint_available(self, address: str, available: bool) -> None:
        self.available[address] = available

    def endpoint_ejected(self, address: str) -> None:
        self.ejections[address] = self.ejections.get(address, 0) + 1

    def endpoint_removed(self, address: str) -> None:
        self.removed.append(address)


async def test_observer_follows_every_change() -> None:
    pool = _pool(limit=10, failures=2, ejection_s=0.05)
    held = await pool.acquire()
    recorder = _Recorder()
    pool.observe(recorder)  # told the state now, not only what changes later
    assert recorder.in_flight == {"a:1": 0, "b:1": 0, "c:1": 0, held.address: 1}
    assert recorder.available == {"a:1": True, "b:1": True, "c:1": True}

    pool.release(held, unreachable=True)
    second = await pool.acquire(exclude=[e for e in pool.endpoints if e is not held])
    assert second is held
    pool.release(held, unreachable=True)
    assert recorder.in_flight[held.address] == 0
    assert recorder.ejections == {held.address: 1}
    assert recorder.available[held.address] is False

    await asyncio.sleep(0.06)
    pool.record_health(held, True)
    assert recorder.available[held.address] is True

    pool.set_addresses(["a:1", "d:1"])
    assert sorted(recorder.removed) == ["b:1", "c:1"]
    assert recorder.available["d:1"] is True
    assert recorder.in_flight["d:1"] == 0


async def test_one_failed_health_check_does_not_take_an_endpoint_out() -> None:
    pool = EndpointPool(
        "m",
        max_inflight_per_endpoint=1,
        ejection_consecutive_failures=2,
        ejection_s=1.0,
        unhealthy_after_failed_checks=2,
    )
    pool.set_addresses(["a:1"])
    (a,) = pool.endpoints
    pool.record_health(a, False)
    assert a.healthy
    assert pool.ready()
    pool.record_health(a, True)  # a pass resets the count
    pool.record_health(a, False)
    assert a.healthy
    pool.record_health(a, False)
    assert not a.healthy
    assert not pool.ready()
    pool.record_health(a, True)
    assert pool.ready()
