"""Launchers: real servers Headrace talks to, started locally for tests, benchmarks and
developers (production runs them elsewhere, e.g. NVIDIA's Triton container, any S3 store)."""

from headrace.launchers.seaweedfs import SeaweedFS
from headrace.launchers.triton import TritonInstallation, TritonServer, example_repository

__all__ = ["SeaweedFS", "TritonInstallation", "TritonServer", "example_repository"]
