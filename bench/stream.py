"""Scenario `stream`: what one message costs on ModelStreamInfer against a unary ModelInfer.

One Headrace process (the embedded default config) serves `identity`. The same request goes
as a unary call and as a message on a bidirectional stream (one stream per coroutine, held for
the whole trial, one message in flight on it), at the same concurrency, from the same client
processes; trials alternate ABBA. Reported: medians per side, and the stream's requests/s and
server and client CPU per message against the unary call's.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.baseline_server import SERVICE_NAME
from bench.frontend import HOST, METHOD, check_identity_reply, identity_request
from bench.loadgen import LoadSpec, run_load
from bench.machine import one_line
from bench.options import add_options, check_load, options_of
from bench.server_process import CAPTURE_OFF, ServerProcess
from bench.stats import median
from bench.sweep import number
from headrace.protocol import grpc_service_pb2 as pb

SUMMARY = "unary ModelInfer vs ModelStreamInfer on `identity`: cost per message"
STREAM_METHOD = f"/{SERVICE_NAME}/ModelStreamInfer"
UNARY = "unary"
STREAM = "stream"
SIDES = (UNARY, STREAM)
LABELS = {UNARY: "unary ModelInfer", STREAM: "ModelStreamInfer (one message in flight per stream)"}


@dataclass(frozen=True, slots=True)
class StreamOptions:
    """The scenario's knobs; the defaults are the standard run."""

    trials: int = 3
    """Trials per side (ABBA)."""
    duration_s: float = 5.0
    warmup_s: float = 2.0
    concurrency: int = 16
    """Unary calls in flight, or streams open (each with one message in flight)."""
    clients: int = 2
    elements: int = 16


_HELP = {"trials": "trials per side"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The scenario's command-line options, defaulting to `StreamOptions()`."""
    add_options(parser, StreamOptions(), _HELP)


def options_from(arguments: argparse.Namespace) -> StreamOptions:
    """The options `add_arguments` parsed.

    Raises:
        ValueError: a count below 1, more clients than streams, a negative warm-up or an empty
            window.
    """
    return check_load(options_of(StreamOptions, arguments))


def check_stream_reply(request: bytes, reply: bytes) -> None:
    """Raises ValueError unless `reply` is a ModelStreamInferResponse without an error whose
    infer_response is the identity of `request`."""
    answer = pb.ModelStreamInferResponse.FromString(reply)
    if answer.error_message:
        raise ValueError(f"stream answered with an error: {answer.error_message}")
    check_identity_reply(request, answer.infer_response.SerializeToString())


def side_order(trials: int) -> list[str]:
    """unary, stream, stream, unary, ... (ABBA), `trials` of each."""
    order: list[str] = []
    for pair in range(trials):
        order += list(SIDES) if pair % 2 == 0 else list(SIDES[::-1])
    return order


def run(options: StreamOptions, results_dir: Path, stamp: str) -> dict[str, Any]:
    """Run the scenario; returns every number, JSON-ready. The server is stopped on return,
    on errors and on KeyboardInterrupt.

    Raises:
        RuntimeError: the server did not start.
        LoadError: a client failed (a wrong reply included).
    """
    request = identity_request(options.elements)
    argv = [sys.executable, "-m", "headrace", "serve", "--host", HOST, "--port", "0"]
    trials: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(
            ServerProcess(
                "headrace",
                argv,
                results_dir / f"stream-{stamp}-headrace.log",
                CAPTURE_OFF,  # capture is measured by its own scenario (bench/capture.py)
            )
        )
        for index, side in enumerate(side_order(options.trials)):
            spec = LoadSpec(
                target=f"{HOST}:{server.port}",
                method=STREAM_METHOD if side == STREAM else METHOD,
                request=request,
                check=check_stream_reply if side == STREAM else check_identity_reply,
                concurrency=options.concurrency,
                clients=options.clients,
                warmup_s=options.warmup_s,
                duration_s=options.duration_s,
                streaming=side == STREAM,
            )
            load = run_load(spec, meter=server.cpu_seconds)
            trials.append({"index": index, "side": side, "load": asdict(load)})
            print(
                f"{side} trial {index + 1}: {load.requests_per_s:,.0f} messages/s, "
                f"p99 {number(load.p99_ms, 2)} ms, "
                f"server CPU {number(load.server_cpu_ms_per_request, 3)} ms/message",
                file=sys.stderr,
                flush=True,
            )
    summary: dict[str, dict[str, Any]] = {}
    for side in SIDES:
        loads = [trial["load"] for trial in trials if trial["side"] == side]
        summary[side] = {
            key: median([load[key] for load in loads])
            for key in (
                "requests_per_s",
                "p50_ms",
                "p90_ms",
                "p99_ms",
                "p999_ms",
                "server_cpu_ms_per_request",
                "client_cpu_ms_per_request",
            )
        }
        summary[side]["errors"] = sum(sum(load["errors"].values()) for load in loads)
    return {
        "options": asdict(options),
        "request_bytes": len(request),
        "note": "client processes and the server share the machine's cores",
        "trials": trials,
        "summary": summary,
        "ratios": {
            key: _ratio(summary[STREAM][key], summary[UNARY][key])
            for key in (
                "requests_per_s",
                "p99_ms",
                "server_cpu_ms_per_request",
                "client_cpu_ms_per_request",
            )
        },
    }


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def render(report: dict[str, Any]) -> str:
    """The report as Markdown: medians per side, then the stream against unary."""
    options = report["options"]
    summary = report["summary"]
    ratios = report["ratios"]
    lines = [
        f"## stream: {SUMMARY}",
        "",
        f"1x{options['elements']} FP32 ({report['request_bytes']} B request), concurrency "
        f"{options['concurrency']} (calls or streams) over {options['clients']} client "
        f"processes, {options['trials']} trials per side (ABBA), {options['warmup_s']:g} s "
        f"warm-up + {options['duration_s']:g} s window; medians over trials.",
        f"Machine: {one_line(report['machine'])}; clients and server share its cores.",
        "",
        "| side | messages/s | p50 ms | p90 ms | p99 ms | p99.9 ms | server CPU ms/message "
        "| client CPU ms/message | errors |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for side in SIDES:
        row = summary[side]
        lines.append(
            f"| {LABELS[side]} | {number(row['requests_per_s'], 0)} "
            f"| {number(row['p50_ms'], 2)} | {number(row['p90_ms'], 2)} "
            f"| {number(row['p99_ms'], 2)} | {number(row['p999_ms'], 2)} "
            f"| {number(row['server_cpu_ms_per_request'], 3)} "
            f"| {number(row['client_cpu_ms_per_request'], 3)} | {row['errors']} |"
        )
    lines += [
        "",
        f"**Stream / unary: messages/s {number(ratios['requests_per_s'], 2)}, server CPU per "
        f"message {number(ratios['server_cpu_ms_per_request'], 2)}, client CPU per message "
        f"{number(ratios['client_cpu_ms_per_request'], 2)}, p99 "
        f"{number(ratios['p99_ms'], 2)}.**",
    ]
    return "\n".join(lines)
