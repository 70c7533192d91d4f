"""Routing: endpoint pools, balancing, health, ejection and DNS discovery."""

from headrace.routing.pool import Endpoint, EndpointPool, PoolObserver

__all__ = ["Endpoint", "EndpointPool", "PoolObserver"]
