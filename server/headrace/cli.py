"""The `headrace` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from headrace import __version__
from headrace.config import DEFAULT_PORT, ENV_CONFIG_PATH, Settings, load_settings
from headrace.errors import ConfigError, StartupError

DEFAULT_TRITON_GRPC_PORT = 8001  # Triton's own default, so clients' usual address works

EXIT_STARTUP_ERROR = 1
EXIT_CONFIG_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="headrace", description="gRPC front door for GPU inference (Open Inference Protocol)."
    )
    parser.add_argument("--version", action="version", version=f"headrace {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--config",
            type=Path,
            default=os.environ.get(ENV_CONFIG_PATH) or None,
            help=f"YAML config file (default: ${ENV_CONFIG_PATH}, else the embedded default)",
        )
        command.add_argument("--host", help="listen address (server.host)")
        command.add_argument(
            "--port", type=int, help=f"gRPC port, 0 for any free one (default {DEFAULT_PORT})"
        )
        command.add_argument(
            "--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="logging.level"
        )

    serve = commands.add_parser("serve", help="run the gateway until SIGTERM/SIGINT")
    with_config(serve)
    serve.add_argument(
        "--workers",
        type=int,
        help="worker processes sharing the port (server.workers; default: one per core, "
        "1: a single process without supervisor)",
    )
    with_config(
        commands.add_parser("config", help="validate the config and print the effective settings")
    )
    triton = commands.add_parser(
        "triton",
        help="run a local tritonserver (from the nvidia-pytriton wheel or $TRITONSERVER_BIN) "
        "until SIGTERM/SIGINT",
    )
    triton.add_argument(
        "--repository",
        type=Path,
        help="Triton model repository (default: the examples, configs/triton/models)",
    )
    triton.add_argument(
        "--grpc-port",
        type=int,
        default=DEFAULT_TRITON_GRPC_PORT,
        help=f"gRPC port on 127.0.0.1, 0 for any free one (default {DEFAULT_TRITON_GRPC_PORT})",
    )
    triton.add_argument(
        "--log-file", type=Path, help="keep Triton's log here (default: a temporary file)"
    )
    _captures_parser(commands)
    _token_parser(commands)

    from headrace.analysis.commands import add_commands

    add_commands(commands)
    return parser


def _captures_parser(commands: Any) -> None:
    captures = commands.add_parser("captures", help="list, show and export captured calls")
    actions = captures.add_subparsers(dest="action", required=True)

    def common(action: argparse.ArgumentParser, model_required: bool) -> None:
        action.add_argument(
            "--store",
            help="where the captures are: a local folder or s3://bucket/prefix "
            "(default: capture.store of the config)",
        )
        action.add_argument(
            "--config",
            type=Path,
            default=os.environ.get(ENV_CONFIG_PATH) or None,
            help=f"YAML config whose capture.store to read without --store (default: "
            f"${ENV_CONFIG_PATH}, else the embedded default)",
        )
        action.add_argument("--endpoint", help="S3 endpoint host:port (not AWS)")
        action.add_argument("--region", default="us-east-1", help="S3 region")
        action.add_argument("--scheme", choices=("https", "http"), default="https")
        action.add_argument("--model", required=model_required, help="model name")
        action.add_argument("--version", dest="model_version", help="model version")
        action.add_argument(
            "--since", type=_timestamp, help="received at or after (ISO 8601; naive is UTC)"
        )
        action.add_argument("--until", type=_timestamp, help="received before (ISO 8601)")

    common(actions.add_parser("ls", help="list capture files"), model_required=False)
    show = actions.add_parser("show", help="print captured calls, tensors summarised")
    common(show, model_required=True)
    show.add_argument("--limit", type=int, default=20, help="at most this many calls")
    show.add_argument("--request-id", help="only the call with this request id")
    export = actions.add_parser("export", help="write captured calls to one file")
    common(export, model_required=True)
    export.add_argument("--format", choices=("parquet", "csv", "jsonl"), default="parquet")
    export.add_argument("--output", type=Path, required=True, help="file to write")


def _timestamp(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time") from exc
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _token_parser(commands: Any) -> None:
    token = commands.add_parser("token", help="bearer tokens for server.auth")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    create = token_commands.add_parser(
        "create",
        help="make a token: prints it once, and the entry (its SHA-256 and scopes) for "
        "server.auth.tokens or the tokens file",
    )
    create.add_argument("name", help="who holds the token (recorded in spans and captures)")
    create.add_argument(
        "--models",
        nargs="*",
        default=[],
        metavar="MODEL",
        help="models the token may use: names or globs (quote them: 'sales_*')",
    )
    create.add_argument(
        "--admin", action="store_true", help="may call RepositoryIndex and ModelStatistics"
    )


def _token(arguments: argparse.Namespace) -> int:
    from headrace.config import AuthTokenSettings
    from headrace.frontend.auth import hash_token, new_token

    secret = new_token()
    try:
        entry = AuthTokenSettings(
            name=arguments.name,
            sha256=hash_token(secret),
            models=tuple(arguments.models),
            admin=arguments.admin,
        )
    except ValueError as exc:
        print(f"headrace token: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    entry_yaml = yaml.safe_dump([entry.model_dump(mode="json")], sort_keys=False)
    print(f"# token for {entry.name}, shown only now (Headrace keeps its SHA-256 only):")
    print(secret)
    print("# add to server.auth.tokens or to the tokens file:")
    print(entry_yaml, end="")
    return 0


def _settings(arguments: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if arguments.host is not None:
        overrides["server.host"] = arguments.host
    if arguments.port is not None:
        overrides["server.port"] = arguments.port
    if arguments.log_level is not None:
        overrides["logging.level"] = arguments.log_level
    if getattr(arguments, "workers", None) is not None:
        overrides["server.workers"] = arguments.workers
    return load_settings(arguments.config, environ=os.environ, overrides=overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `headrace` command; returns the exit status."""
    arguments = _parser().parse_args(argv)
    if arguments.command == "triton":
        return _triton(arguments)
    if arguments.command == "token":
        return _token(arguments)
    if arguments.command == "captures":
        from headrace.capture.commands import run_captures_command

        return run_captures_command(arguments)
    if arguments.command in ("backtest", "drift"):
        from headrace.analysis.commands import run

        return run(arguments)
    try:
        settings = _settings(arguments)
    except ConfigError as exc:
        print(f"headrace: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if arguments.command == "config":
        print(yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False), end="")
        return 0
    # Imported late: `headrace config` needs neither a grpc server nor OpenTelemetry.
    from headrace.app import serve
    from headrace.telemetry import configure_logging
    from headrace.workers import Supervisor, available_cores

    configure_logging(settings.logging)

    workers = settings.server.workers or available_cores()
    try:
        if workers > 1:
            return asyncio.run(Supervisor(settings, workers).run())
        asyncio.run(serve(settings))
    except ConfigError as exc:
        logging.getLogger("headrace").error("%s", exc)
        return EXIT_CONFIG_ERROR
    except StartupError as exc:
        logging.getLogger("headrace").error("%s", exc)
        return EXIT_STARTUP_ERROR
    return 0


def _triton(arguments: argparse.Namespace) -> int:
    from headrace.launchers.triton import TritonServer, example_repository, run_until_signal

    server = TritonServer(
        arguments.repository or example_repository(),
        grpc_port=arguments.grpc_port,
        log_path=arguments.log_file,
    )

    def announce(server: TritonServer) -> None:
        print(
            f"triton serving {server.model_repository} on {server.address} (gRPC), "
            f"log {server.log_path}; Ctrl-C to stop",
            flush=True,
        )

    try:
        return run_until_signal(server, announce)
    except StartupError as exc:
        print(f"headrace triton: {exc}", file=sys.stderr)
        return EXIT_STARTUP_ERROR


if __name__ == "__main__":
    sys.exit(main())
