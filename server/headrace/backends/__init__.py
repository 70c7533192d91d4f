"""Backends: where a model actually runs (in-process, or Triton servers)."""

from headrace.backends.base import Backend
from headrace.backends.local import LocalBackend

__all__ = ["Backend", "LocalBackend"]
