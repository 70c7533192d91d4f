"""Fixtures for the clients in other languages: each is installed or built from clients/ and
proto/ once per session (cached between runs where the toolchain allows), then run against the
`server` fixture."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
NODE_CLIENT = ROOT / "clients" / "node"
CPP_CLIENT = ROOT / "clients" / "cpp"
# Ignored by git (.gitignore: build/); kept between runs so an unchanged client rebuilds in
# seconds. CMake's dependency on proto/*.proto regenerates the stubs when the protocol changes.
CPP_BUILD = CPP_CLIENT / "build"
# npm ci replaces node_modules from package-lock.json every time; this stamp, written after a
# successful install, records the lock file it installed, so an unchanged lock skips it.
NPM_STAMP = NODE_CLIENT / "node_modules" / ".headrace-package-lock.sha256"
INSTALL_TIMEOUT_S = 300
BUILD_TIMEOUT_S = 600


def _run(command: list[str], cwd: Path, timeout_s: float) -> None:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} (in {cwd}) exited {result.returncode}:\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )


def _require(*tools: str) -> None:
    # Missing tools fail, never skip: .ci/run installs them (see clients/*/README.md).
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not on PATH: run .ci/run as root once, or install them")


@pytest.fixture(scope="session")
def node_client() -> Path:
    """clients/node with its dependencies installed by `npm ci` from package-lock.json."""
    _require("node", "npm")
    lock = hashlib.sha256((NODE_CLIENT / "package-lock.json").read_bytes()).hexdigest()
    if not NPM_STAMP.is_file() or NPM_STAMP.read_text() != lock:
        _run(["npm", "ci", "--no-audit", "--no-fund"], NODE_CLIENT, INSTALL_TIMEOUT_S)
        NPM_STAMP.write_text(lock)
    return NODE_CLIENT


@pytest.fixture(scope="session")
def cpp_example() -> Path:
    """The C++ example: stubs generated from proto/, built with CMake in clients/cpp/build."""
    _require("cmake", "protoc", "grpc_cpp_plugin", "c++")
    cache = CPP_BUILD / "CMakeCache.txt"
    # A build directory configured from another checkout cannot be reused.
    if cache.is_file() and f"CMAKE_HOME_DIRECTORY:INTERNAL={CPP_CLIENT}\n" not in cache.read_text():
        shutil.rmtree(CPP_BUILD)
    if not cache.is_file():
        _run(["cmake", "-S", str(CPP_CLIENT), "-B", str(CPP_BUILD)], ROOT, BUILD_TIMEOUT_S)
    jobs = str(os.cpu_count() or 1)
    _run(["cmake", "--build", str(CPP_BUILD), "--parallel", jobs], ROOT, BUILD_TIMEOUT_S)
    return CPP_BUILD / "headrace_example"
