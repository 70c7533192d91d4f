"""The gRPC front end: servicer, health, reflection and server construction."""

from headrace.frontend.server import FrontendServer
from headrace.frontend.servicer import InferenceServicer

__all__ = ["FrontendServer", "InferenceServicer"]
