"""Endpoint addresses from static entries and DNS names."""

from __future__ import annotations

from headrace.routing.discovery import resolve


async def test_static_and_dns_entries() -> None:
    addresses = await resolve(["10.0.0.7:8001", "dns:///localhost:8001", "10.0.0.7:8001"])
    assert addresses[0] == "10.0.0.7:8001"
    assert addresses.count("10.0.0.7:8001") == 1
    assert "127.0.0.1:8001" in addresses or "[::1]:8001" in addresses


async def test_unresolvable_name_contributes_nothing() -> None:
    assert await resolve(["dns:///no-such-host.invalid:8001", "a:1"]) == ["a:1"]
