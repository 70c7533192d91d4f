"""Launchers: real servers Headrace talks to, started locally for tests, benchmarks and
developers (production runs them elsewhere, e.g. NVIDIA's Triton container)."""

from headrace.launchers.triton import TritonInstallation, TritonServer, example_repository

__all__ = ["TritonInstallation", "TritonServer", "example_repository"]
