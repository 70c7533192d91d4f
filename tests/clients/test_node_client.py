"""The Node.js client (clients/node), installed with `npm ci` from its lock file, against a live
server: its example prints what the models compute, and its raw-contents helpers pass their
own tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from headrace.config import load_settings
from tests.clients.conftest import ROOT
from tests.clients.example_lines import check_example_output
from tests.conftest import ServerThread

# The first test of a session may run `npm ci`.
pytestmark = pytest.mark.timeout(600)


def test_example_prints_what_the_models_compute(server, node_client: Path) -> None:
    result = subprocess.run(
        ["node", "example.js", server.address],
        cwd=node_client,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    check_example_output(result.stdout, server.address)


def test_raw_contents_helpers(node_client: Path) -> None:
    result = subprocess.run(
        ["npm", "test"], cwd=node_client, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# fail 0" in result.stdout


def test_example_fails_on_an_unreachable_server(node_client: Path) -> None:
    # Port 1 on loopback: nothing listens there, so the call fails fast with UNAVAILABLE.
    result = subprocess.run(
        ["node", "example.js", "127.0.0.1:1"],
        cwd=node_client,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: 14 UNAVAILABLE")
    assert result.stdout == ""


def test_example_runs_against_the_clients_config(node_client: Path) -> None:
    # The config the READMEs tell developers to serve (`make serve ARGS="--config ..."`).
    settings = load_settings(
        ROOT / "configs" / "clients.yaml",
        environ={},
        overrides={"server.host": "127.0.0.1", "server.port": 0},
    )
    with ServerThread(settings) as server:
        result = subprocess.run(
            ["node", "example.js", server.address],
            cwd=node_client,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        check_example_output(result.stdout, server.address)
