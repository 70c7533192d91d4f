"""A description of the machine and software a benchmark ran on, for its results file."""

from __future__ import annotations

import os
import platform
from importlib.metadata import version
from pathlib import Path
from typing import Any


def _cpu_model() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return "unknown"


def describe_machine() -> dict[str, Any]:
    """CPU, OS and the versions that decide gRPC and protobuf speed."""
    # The protobuf backend (upb, cpp or python) changes (de)serialization cost severalfold.
    from google.protobuf.internal import api_implementation

    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "grpcio": version("grpcio"),
        "protobuf": version("protobuf"),
        "protobuf_backend": api_implementation.Type(),
        "headrace": version("headrace"),
        "load_average_at_start": os.getloadavg(),
    }


def one_line(machine: dict[str, Any]) -> str:
    """The description in one line, for tables and reports."""
    return (
        f"{machine['nproc']} x {machine['cpu_model']}, {machine['platform']}, "
        f"Python {machine['python']}, grpcio {machine['grpcio']}, "
        f"protobuf {machine['protobuf']} ({machine['protobuf_backend']})"
    )
