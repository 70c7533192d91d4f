"""Routing: endpoint pools, balancing, health, ejection and DNS discovery."""

from headrace.routing.pool import Endpoint, EndpointPool

__all__ = ["Endpoint", "EndpointPool"]
