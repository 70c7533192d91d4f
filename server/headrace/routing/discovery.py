"""Endpoint addresses from configuration: `host:port` as given, `dns:///host:port` resolved
to one address per record (a Kubernetes headless service: one per pod)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterable

DNS_PREFIX = "dns:///"

_logger = logging.getLogger(__name__)


def is_dns(endpoint: str) -> bool:
    return endpoint.startswith(DNS_PREFIX)


def _format(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def resolve(endpoints: Iterable[str]) -> list[str]:
    """The addresses the endpoints stand for now, in order, without duplicates. A DNS name
    that does not resolve contributes nothing (and is logged); static addresses always count."""
    loop = asyncio.get_running_loop()
    addresses: list[str] = []
    for endpoint in endpoints:
        if not is_dns(endpoint):
            addresses.append(endpoint)
            continue
        host, _, port = endpoint.removeprefix(DNS_PREFIX).rpartition(":")
        try:
            records = await loop.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except OSError as exc:
            _logger.warning("cannot resolve %s: %s", endpoint, exc)
            continue
        addresses += sorted({_format(str(record[4][0]), int(port)) for record in records})
    return list(dict.fromkeys(addresses))
