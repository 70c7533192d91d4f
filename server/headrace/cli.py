"""The `headrace` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
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
    return parser


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
