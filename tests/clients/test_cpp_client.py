"""The C++ client (clients/cpp), its stubs generated from proto/ and built with CMake, against a
live server: its example prints what the models compute."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.clients.example_lines import check_example_output

# The first test of a session may build the client from nothing (about a minute on 2 cores).
pytestmark = pytest.mark.timeout(900)


def test_example_prints_what_the_models_compute(server, cpp_example: Path) -> None:
    result = subprocess.run(
        [str(cpp_example), server.address], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    check_example_output(result.stdout, server.address)


def test_example_fails_on_an_unreachable_server(cpp_example: Path) -> None:
    result = subprocess.run(
        [str(cpp_example), "127.0.0.1:1"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: ServerLive: status 14: ")
    assert result.stdout == ""
