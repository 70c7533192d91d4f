"""The `headrace backtest` and `headrace drift` commands (registered by headrace.cli).

Exit status: 0 when the thresholds held (backtest) or no feature drifted (drift report), 1 when
not, 2 for usage errors and for a run that could not happen (no captures, candidate
unreachable, unreadable profile).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc

from headrace.analysis.backtest import run_backtest, run_shadow_backtest
from headrace.analysis.calls import CapturedCall, captured_calls
from headrace.analysis.comparison import Thresholds
from headrace.analysis.drift import (
    DEFAULT_BINS,
    Profile,
    ProfileBuilder,
    ProfileError,
    compare_with_profile,
    profile_from_file,
)
from headrace.analysis.replay import Target
from headrace.analysis.report import write_drift_report

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
DEFAULT_PSI_THRESHOLD = 0.25
"""PSI above which a feature counts as drifted (the common "major shift" reading)."""


def _time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"'{text}' is not an ISO 8601 time") from exc
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def _capture_window(command: argparse.ArgumentParser, required: bool = True) -> None:
    command.add_argument(
        "--captures",
        required=required,
        help="capture location: a local folder or s3://bucket/prefix",
    )
    command.add_argument("--model", required=True, help="model whose captures are read")
    command.add_argument("--version", help="only this model version (default: all)")
    command.add_argument("--since", type=_time, help="first capture time (ISO 8601, UTC default)")
    command.add_argument("--until", type=_time, help="capture time to stop at (exclusive)")
    command.add_argument("--s3-endpoint", help="S3 endpoint host:port of the captures (not AWS)")
    command.add_argument("--s3-region", default="us-east-1", help="S3 region of the captures")
    command.add_argument("--s3-scheme", choices=("https", "http"), default="https")


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `backtest` and `drift` on the `headrace` parser."""
    backtest = commands.add_parser(
        "backtest",
        help="replay captured calls against a candidate model and compare the outputs",
        description="Replay captured inputs against a candidate (any Open Inference Protocol "
        "endpoint) and compare its outputs with the captured ones; or, with --shadow, compare "
        "captured shadow calls with their primaries. Exit 0: thresholds held; 1: not; 2: "
        "usage error or nothing to compare.",
    )
    _capture_window(backtest)
    target = backtest.add_mutually_exclusive_group(required=True)
    target.add_argument("--candidate", metavar="HOST:PORT", help="endpoint to replay against")
    target.add_argument(
        "--shadow", action="store_true", help="compare captured shadow calls with primaries"
    )
    backtest.add_argument("--candidate-model", help="model name there (default: --model)")
    backtest.add_argument("--candidate-version", default="", help="version there (default: latest)")
    backtest.add_argument("--concurrency", type=_positive, default=8, help="requests in flight")
    backtest.add_argument(
        "--batch-size",
        type=_positive,
        default=1,
        help="rows per replayed request: calls of one input shape are joined (default 1)",
    )
    backtest.add_argument("--timeout-s", type=float, default=60.0, help="per replayed request")
    backtest.add_argument("--tls", action="store_true", help="TLS to the candidate")
    backtest.add_argument("--tls-ca", type=Path, help="PEM CA bundle (default: system roots)")
    backtest.add_argument("--tls-cert", type=Path, help="PEM client certificate (mutual TLS)")
    backtest.add_argument("--tls-key", type=Path, help="PEM client key (mutual TLS)")
    backtest.add_argument("--output", type=Path, required=True, help="report folder")
    backtest.add_argument("--max-abs-error", type=float, help="bound on max absolute error")
    backtest.add_argument("--max-rel-error", type=float, help="bound on max relative error")
    backtest.add_argument(
        "--min-agreement", type=float, help="least label agreement / BYTES exact-match share"
    )
    backtest.add_argument("--no-progress", action="store_true", help="no progress bar")

    drift = commands.add_parser("drift", help="drift profiles and reports")
    drift_commands = drift.add_subparsers(dest="drift_command", required=True)
    profile = drift_commands.add_parser(
        "profile",
        help="build a reference profile from captures or a file",
        description="Per-feature statistics of a model's inputs and outputs (JSON), the "
        "reference the server's drift monitor and `drift report` compare with.",
    )
    _capture_window(profile, required=False)
    profile.add_argument(
        "--file", type=Path, help="reference data (.npz or .parquet) instead of captures"
    )
    profile.add_argument("--bins", type=_positive, default=DEFAULT_BINS, help="PSI bins")
    profile.add_argument("--output", type=Path, required=True, help="profile JSON to write")
    report = drift_commands.add_parser(
        "report",
        help="compare captures with a reference profile",
        description="PSI and KS distance per feature of captured calls against a profile: "
        "a table (JSON, Markdown, HTML) and a histogram per feature. Exit 1 when a feature's "
        "PSI is above --psi-threshold.",
    )
    _capture_window(report)
    report.add_argument("--profile", type=Path, required=True, help="reference profile JSON")
    report.add_argument("--output", type=Path, required=True, help="report folder")
    report.add_argument(
        "--psi-threshold", type=float, default=DEFAULT_PSI_THRESHOLD, help="drifted above this"
    )


def run(arguments: argparse.Namespace) -> int:
    """Run `backtest` or `drift`; returns the exit status."""
    try:
        if arguments.command == "backtest":
            return _backtest(arguments)
        if arguments.drift_command == "profile":
            return _profile(arguments)
        return _drift_report(arguments)
    except (ProfileError, OSError) as exc:
        print(f"headrace {arguments.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _calls(arguments: argparse.Namespace) -> Iterator[CapturedCall]:
    options = {"region": arguments.s3_region, "scheme": arguments.s3_scheme}
    if arguments.s3_endpoint:
        options["endpoint"] = arguments.s3_endpoint
    return captured_calls(
        arguments.captures,
        arguments.model,
        arguments.version,
        arguments.since,
        arguments.until,
        **options,
    )


def _credentials(arguments: argparse.Namespace) -> grpc.ChannelCredentials | None:
    if not arguments.tls:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=arguments.tls_ca.read_bytes() if arguments.tls_ca else None,
        private_key=arguments.tls_key.read_bytes() if arguments.tls_key else None,
        certificate_chain=arguments.tls_cert.read_bytes() if arguments.tls_cert else None,
    )


def _backtest(arguments: argparse.Namespace) -> int:
    thresholds = Thresholds(
        arguments.max_abs_error, arguments.max_rel_error, arguments.min_agreement
    )
    progress = not arguments.no_progress
    if arguments.shadow:
        outcome = run_shadow_backtest(
            lambda: _calls(arguments),
            arguments.model,
            arguments.output,
            thresholds,
            progress=progress,
            captures=arguments.captures,
        )
    else:
        target = Target(
            arguments.candidate,
            arguments.candidate_model or arguments.model,
            arguments.candidate_version,
            _credentials(arguments),
            arguments.timeout_s,
        )
        try:
            outcome = run_backtest(
                _calls(arguments),
                target,
                arguments.output,
                thresholds,
                concurrency=arguments.concurrency,
                batch_size=arguments.batch_size,
                progress=progress,
                captures=arguments.captures,
            )
        except grpc.aio.AioRpcError as exc:
            print(
                f"headrace backtest: candidate {arguments.candidate}: {exc.code().name}: "
                f"{exc.details()}",
                file=sys.stderr,
            )
            return EXIT_USAGE
    summary = outcome.summary
    if summary["calls"] == 0:
        print("headrace backtest: no captured calls to compare", file=sys.stderr)
        return EXIT_USAGE
    verdict = "passed" if outcome.passed else "FAILED"
    print(
        f"backtest {verdict}: {summary['calls']} calls in {summary['wall_s']} s "
        f"({summary['calls_per_s']} calls/s); report {outcome.files['html']}"
    )
    for problem in summary["violations"]:
        print(f"  {problem}")
    return EXIT_OK if outcome.passed else EXIT_FAILED


def _profile(arguments: argparse.Namespace) -> int:
    if (arguments.file is None) == (arguments.captures is None):
        print("headrace drift profile: give --captures or --file", file=sys.stderr)
        return EXIT_USAGE
    if arguments.file is not None:
        profile = profile_from_file(arguments.file, arguments.model, bins=arguments.bins)
    else:
        builder = ProfileBuilder(arguments.model, arguments.version or "", bins=arguments.bins)
        builder.add_calls(_calls(arguments))
        profile = builder.build()
    profile.save(arguments.output)
    print(f"profile of {profile.rows} rows, {len(profile.features)} features: {arguments.output}")
    return EXIT_OK


def _drift_report(arguments: argparse.Namespace) -> int:
    profile = Profile.load(arguments.profile)
    current = ProfileBuilder(arguments.model, arguments.version or "")
    current.add_calls(_calls(arguments))
    if current.rows == 0:
        print("headrace drift report: no captured calls in the window", file=sys.stderr)
        return EXIT_USAGE
    values = current.feature_values()
    drifts = compare_with_profile(profile, values)
    files = write_drift_report(
        arguments.model,
        drifts,
        profile.features,
        values,
        arguments.output,
        arguments.psi_threshold,
    )
    drifted = [drift.feature for drift in drifts if drift.psi > arguments.psi_threshold]
    print(
        f"drift of {current.rows} calls: {', '.join(drifted) or 'no feature'} above PSI "
        f"{arguments.psi_threshold:g}; report {files['html']}"
    )
    return EXIT_FAILED if drifted else EXIT_OK
