"""`python -m bench [--quick] [SCENARIO] [OPTIONS]`: run benchmark scenarios, print a Markdown
report to stdout and keep, under bench/results/, every number in a JSON file, the report as
Markdown and a throughput vs p99 plot (PNG) per scenario."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, Protocol

from bench import (
    backtest,
    capture,
    frontend,
    gpu_sim,
    open_loop,
    overload,
    plot,
    shared_memory,
    soak,
    stream,
    telemetry,
    triton,
    workers,
)
from bench.loadgen import LoadError
from bench.machine import describe_machine

RESULTS_DIR = Path(
    os.environ.get("BENCH_RESULTS_DIR") or Path(__file__).resolve().parent / "results"
)
"""Where reports and server logs go: bench/results/, or `BENCH_RESULTS_DIR` (the
harness tests point it at a temporary folder)."""
STANDARD_SET = (
    "frontend",
    "open_loop",
    "stream",
    "gpu_sim",
    "triton",
    "shared_memory",
    "telemetry",
    "capture",
    "workers",
    "overload",
)
"""What `python -m bench` runs with no scenario named (those registered), in this order."""
STANDARD_ARGUMENTS: dict[str, tuple[str, ...]] = {}
"""Options of the standard set that differ from a scenario's defaults (none: each scenario's
defaults are its standard run)."""
QUICK_ARGUMENTS = ("--trials", "1", "--warmup-s", "0.5", "--duration-s", "1.5")
"""`--quick`: every scenario of the standard set with short windows and one trial (each
option only where the scenario has it)..."""
QUICK_SCENARIO_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "frontend": ("--trials", "2"),
    "open_loop": ("--rates", "500,2000"),
    "stream": ("--trials", "2"),
    "gpu_sim": ("--concurrencies", "1,64"),
    "triton": ("--concurrencies", "64"),
    "shared_memory": ("--concurrencies", "1"),
    "overload": ("--overload-ratios", "3", "--storm-concurrency", "0"),
}
"""...and fewer load levels (these come after `QUICK_ARGUMENTS`, so they win)."""
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

    # Optional: `series(report) -> bench.plot.Series`, the (requests/s, p99 ms) points to
    # plot, for a report whose load points `bench.plot.series` cannot find.


def _scenarios() -> dict[str, Scenario]:
    modules: tuple[Any, ...] = (
        frontend,
        open_loop,
        stream,
        gpu_sim,
        triton,
        shared_memory,
        telemetry,
        capture,
        workers,
        backtest,
        overload,
        soak,
    )
    return {module.__name__.rpartition(".")[2]: module for module in modules}


def _parser(scenarios: dict[str, Scenario]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Headrace benchmarks. With no scenario, runs the standard set: "
        + ", ".join(name for name in STANDARD_SET if name in scenarios),
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the standard set with short windows, one trial and fewer load levels (~2 min)",
    )
    commands = parser.add_subparsers(dest="scenario", metavar="SCENARIO")
    for name, scenario in scenarios.items():
        scenario.add_arguments(commands.add_parser(name, help=scenario.SUMMARY))
    return parser


def _interrupt(signal_number: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def _accepted(parser: argparse.ArgumentParser, arguments: Sequence[str]) -> list[str]:
    """The `--option value` pairs of `arguments` that `parser` has (scenarios differ)."""
    known = {option for action in parser._actions for option in action.option_strings}
    pairs = zip(arguments[::2], arguments[1::2], strict=True)
    return [part for option, value in pairs if option in known for part in (option, value)]


def plan(
    argv: Sequence[str], scenarios: dict[str, Scenario]
) -> list[tuple[str, argparse.Namespace, list[str]]]:
    """What `python -m bench ARGV` runs: (scenario, its parsed options, the arguments that
    give them). With no scenario named, the standard set (those registered), each with its
    standard (or, with --quick, short) options.

    Raises:
        SystemExit: ARGV does not parse (argparse prints why).
    """
    parser = _parser(scenarios)
    arguments = parser.parse_args(argv)
    if arguments.scenario:
        return [(arguments.scenario, arguments, list(argv))]
    commands = next(
        action
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)  # the scenarios' subparsers
    )
    runs = []
    for name in STANDARD_SET:
        if name not in scenarios:
            continue
        extra: Sequence[str] = STANDARD_ARGUMENTS.get(name, ())
        if arguments.quick:
            extra = [*QUICK_ARGUMENTS, *QUICK_SCENARIO_ARGUMENTS.get(name, ())]
        scenario_argv = [name, *_accepted(commands.choices[name], extra)]
        runs.append((name, parser.parse_args(scenario_argv), scenario_argv))
    return runs


def write_outputs(
    report: dict[str, Any], scenario: Scenario, results_dir: Path
) -> tuple[Path, Path, Path | None]:
    """The report's JSON, its Markdown and its plot, under `results_dir` as
    SCENARIO-STAMP.{json,md,png}; returns their paths (no plot when it has no load points)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    base = results_dir / f"{report['scenario']}-{report['started_utc']}"
    json_path = base.with_suffix(".json")
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    markdown_path = base.with_suffix(".md")
    markdown_path.write_text(scenario.render(report) + "\n")
    series_of = getattr(scenario, "series", plot.series)
    png_path = plot.draw(report, base.with_suffix(".png"), series_of)
    return json_path, markdown_path, png_path


def main(argv: Sequence[str] | None = None) -> int:
    """Run the scenarios asked for; returns the exit status. In the standard set, a scenario
    that fails is reported and the others still run (the status is then EXIT_FAILED)."""
    # SIGTERM (from `timeout`, CI, a process manager) unwinds like Ctrl-C, so the servers and
    # client processes are stopped instead of left running.
    signal.signal(signal.SIGTERM, _interrupt)
    argv = list(sys.argv[1:] if argv is None else argv)
    scenarios = _scenarios()
    runs = plan(argv, scenarios)
    machine = describe_machine()
    failed: list[str] = []
    began = time.monotonic()
    for name, scenario_arguments, scenario_argv in runs:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        print(f"running {shlex.join(scenario_argv)} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            scenario = scenarios[name]
            report = scenario.run(scenario.options_from(scenario_arguments), RESULTS_DIR, stamp)
        except KeyboardInterrupt:
            print("interrupted; servers stopped", file=sys.stderr)
            return EXIT_INTERRUPTED
        except (LoadError, RuntimeError, ValueError, OSError) as exc:
            print(f"bench {name}: {exc}", file=sys.stderr)
            failed.append(name)
            continue
        report = {
            "scenario": name,
            "started_utc": stamp,
            "command": shlex.join(["python", "-m", "bench", *scenario_argv]),
            "elapsed_s": round(time.monotonic() - started, 1),
            "machine": machine,
            **report,
        }
        json_path, markdown_path, png_path = write_outputs(report, scenario, RESULTS_DIR)
        print(markdown_path.read_text(), end="")
        print(f"\nMarkdown: {markdown_path}")
        if png_path is not None:
            print(f"Plot: {png_path}")
        print(f"Every number: {json_path}", flush=True)
        print(f"{name}: {report['elapsed_s']:.0f} s", file=sys.stderr, flush=True)
    if len(runs) > 1:
        print(f"all: {time.monotonic() - began:.0f} s", file=sys.stderr)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
