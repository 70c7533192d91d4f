"""The `workers` scenario: its load generator is chosen and checked up front, and a short run
with h2load against two real Headrace servers (1 and 2 workers) reports every trial with the
requests each worker answered."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import pytest

from bench import workers
from bench.h2load import ToolMissingError
from bench.machine import describe_machine


def _options(argv: list[str]) -> workers.WorkersOptions:
    parser = argparse.ArgumentParser()
    workers.add_arguments(parser)
    return workers.options_from(parser.parse_args(argv))


def test_the_client_is_auto_h2load_or_python() -> None:
    assert _options([]).client == workers.AUTO
    assert _options(["--client", "python"]).client == workers.PYTHON
    with pytest.raises(ValueError, match="--client must be one of auto, h2load, python"):
        _options(["--client", "ghz"])


def test_h2load_needs_a_concurrency_the_connections_divide() -> None:
    argv = ["--concurrency", "60", "--clients", "2", "--connections", "8"]
    assert _options(argv).concurrency == 60  # the Python clients spread it unevenly
    with pytest.raises(ValueError, match="multiple of --clients x --connections"):
        _options([*argv, "--client", "h2load"])


def test_auto_takes_h2load_when_installed_and_asking_for_a_missing_one_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert workers.load_generator(workers.AUTO) == workers.H2LOAD
    assert workers.load_generator(workers.PYTHON) == workers.PYTHON
    monkeypatch.setenv("PATH", str(tmp_path))
    assert workers.load_generator(workers.AUTO) == workers.PYTHON
    with pytest.raises(ToolMissingError, match="nghttp2-client"):
        workers.load_generator(workers.H2LOAD)


def test_a_short_h2load_run_reports_each_trial_and_the_requests_per_worker(
    tmp_path: Path,
) -> None:
    options = replace(
        workers.WorkersOptions(),
        client=workers.H2LOAD,
        trials=1,
        warmup_s=0.3,
        duration_s=1.0,
        concurrency=16,
        clients=1,
        connections=8,
    )
    report = workers.run(options, tmp_path, "test")
    assert report["client"] == workers.H2LOAD
    assert [trial["side"] for trial in report["trials"]] == [workers.SINGLE, workers.MULTI]
    for trial in report["trials"]:
        assert trial["load"]["errors"] == {}
        assert trial["load"]["completed"] > 0
        spread = trial["worker_requests"]
        # Every request of the trial, answered by the side's own workers.
        assert set(spread) <= {str(worker) for worker in range(trial["workers"])}
        assert sum(spread.values()) >= trial["load"]["completed"]
    assert report["ratio"] > 0
    report["machine"] = describe_machine()
    markdown = workers.render(report)
    assert "h2load threads" in markdown
    assert "requests per worker" in markdown
