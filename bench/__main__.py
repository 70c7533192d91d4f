"""`python -m bench [SCENARIO] [OPTIONS]`: run benchmark scenarios, print a Markdown report to
stdout and keep every number in a JSON file under bench/results/."""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, Protocol

from bench import frontend, gpu_sim, overload, shared_memory, soak, telemetry, triton
from bench.loadgen import LoadError
from bench.machine import describe_machine

RESULTS_DIR = Path(__file__).resolve().parent / "results"
STANDARD_SET = ("frontend", "gpu_sim", "triton")
"""What `python -m bench` runs with no scenario named, each with its default options."""
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


class Scenario(Protocol):
    """What every scenario module (bench/<name>.py) provides to the CLI."""

    SUMMARY: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def options_from(self, arguments: argparse.Namespace) -> Any: ...

    def run(self, options: Any, results_dir: Path, stamp: str) -> dict[str, Any]:
        """(options, results directory, UTC time stamp) -> JSON-ready report."""
        ...

    def render(self, report: dict[str, Any]) -> str: ...


def _scenarios() -> dict[str, Scenario]:
    modules: tuple[Any, ...] = (
        frontend,
        gpu_sim,
        triton,
        shared_memory,
        telemetry,
        overload,
        soak,
    )
    return {module.__name__.rpartition(".")[2]: module for module in modules}


def _parser(scenarios: dict[str, Scenario]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Headrace benchmarks. With no scenario, runs the standard set: "
        + ", ".join(STANDARD_SET),
    )
    commands = parser.add_subparsers(dest="scenario", metavar="SCENARIO")
    for name, scenario in scenarios.items():
        scenario.add_arguments(commands.add_parser(name, help=scenario.SUMMARY))
    return parser


def _interrupt(signal_number: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run the scenarios asked for; returns the exit status."""
    # SIGTERM (from `timeout`, CI, a process manager) unwinds like Ctrl-C, so the servers and
    # client processes are stopped instead of left running.
    signal.signal(signal.SIGTERM, _interrupt)
    argv = list(sys.argv[1:] if argv is None else argv)
    scenarios = _scenarios()
    parser = _parser(scenarios)
    arguments = parser.parse_args(argv)
    # With no scenario named, each of the standard set is parsed alone to get its defaults.
    runs = (
        [(arguments.scenario, arguments)]
        if arguments.scenario
        else [(name, parser.parse_args([name])) for name in STANDARD_SET]
    )
    machine = describe_machine()
    for name, scenario_arguments in runs:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        print(f"running {name} ...", file=sys.stderr, flush=True)
        try:
            scenario = scenarios[name]
            report = scenario.run(scenario.options_from(scenario_arguments), RESULTS_DIR, stamp)
        except KeyboardInterrupt:
            print("interrupted; servers stopped", file=sys.stderr)
            return EXIT_INTERRUPTED
        except (LoadError, RuntimeError, ValueError) as exc:
            print(f"bench {name}: {exc}", file=sys.stderr)
            return EXIT_FAILED
        report = {
            "scenario": name,
            "started_utc": stamp,
            "command": shlex.join(["python", "-m", "bench", *argv]),
            "machine": machine,
            **report,
        }
        path = RESULTS_DIR / f"{name}-{stamp}.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(scenarios[name].render(report))
        print(f"\nEvery number: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
