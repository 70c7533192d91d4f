"""Scenario `frontend`: unary ModelInfer on the `identity` model through Headrace, against the
bare grpc.aio server of `bench.baseline_server` answering the same message.

Both servers run once per invocation, each in its own process; trials alternate between them in
ABBA order with the same client, request and concurrency, so slow drift in the machine's state
falls on both sides alike. The reported figures are medians over trials.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bench.baseline_server import SERVICE_NAME
from bench.loadgen import LoadResult, LoadSpec, run_load
from bench.machine import one_line
from bench.options import add_options, check_load, options_of
from bench.server_process import CAPTURE_OFF, ServerProcess
from bench.sweep import number
from headrace.protocol import grpc_service_pb2 as pb

SUMMARY = "unary ModelInfer on `identity`: Headrace vs a bare grpc.aio server"
HOST = "127.0.0.1"
METHOD = f"/{SERVICE_NAME}/ModelInfer"
MODEL_NAME = "identity"
INPUT_NAME = "INPUT0"
OUTPUT_NAME = "OUTPUT0"
DATATYPE = "FP32"
HEADRACE = "headrace"
BARE = "bare"
SIDE_LABELS = {HEADRACE: "Headrace", BARE: "bare grpc.aio"}
GOAL_RATIO = 0.8
"""Headrace's requests/s over the bare server's that the front end should reach."""


@dataclass(frozen=True, slots=True)
class FrontendOptions:
    """The scenario's knobs; the defaults are the standard run."""

    trials: int = 3
    """Trials per server."""
    duration_s: float = 5.0
    """Measurement window of each trial."""
    warmup_s: float = 2.0
    """Warm-up before each window (connections, caches, allocator)."""
    concurrency: int = 16
    """Requests in flight, over all client processes."""
    clients: int = 2
    """Client processes."""
    elements: int = 16
    """FP32 elements in INPUT0 (batch 1)."""


@dataclass(frozen=True, slots=True)
class Trial:
    """One measurement window against one server."""

    index: int
    side: str
    load: LoadResult
    server_cpu_ms_per_request: float | None


_HELP = {
    "trials": "trials per server",
    "duration_s": "measurement window, s",
    "warmup_s": "warm-up before each window, s",
    "concurrency": "requests in flight over all clients",
    "clients": "client processes",
    "elements": "FP32 elements in INPUT0",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The scenario's command-line options, defaulting to `FrontendOptions()`."""
    add_options(parser, FrontendOptions(), _HELP)


def options_from(arguments: argparse.Namespace) -> FrontendOptions:
    """The options `add_arguments` parsed.

    Raises:
        ValueError: a count below 1, a negative warm-up or an empty window.
    """
    return check_load(options_of(FrontendOptions, arguments))


def identity_request(elements: int, model: str = MODEL_NAME) -> bytes:
    """A serialized batch-1 request for `identity` (or another model whose OUTPUT0 echoes
    INPUT0) with `elements` FP32 values."""
    data = np.arange(elements, dtype="<f4").tobytes()  # the wire is little-endian
    return pb.ModelInferRequest(
        model_name=model,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name=INPUT_NAME, datatype=DATATYPE, shape=[1, elements]
            )
        ],
        raw_input_contents=[data],
    ).SerializeToString()


def check_identity_reply(request: bytes, reply: bytes) -> None:
    """Raises ValueError unless `reply` holds exactly OUTPUT0 equal to the request's INPUT0."""
    sent = pb.ModelInferRequest.FromString(request)
    answer = pb.ModelInferResponse.FromString(reply)
    tensor = sent.inputs[0]
    outputs = [(output.name, output.datatype, list(output.shape)) for output in answer.outputs]
    if (
        answer.model_name != sent.model_name
        or outputs != [(OUTPUT_NAME, tensor.datatype, list(tensor.shape))]
        or list(answer.raw_output_contents) != [sent.raw_input_contents[0]]
    ):
        raise ValueError(f"reply is not the identity of the request: {answer}")


class ClosedLoad(Protocol):
    """A scenario's closed-loop load options."""

    concurrency: int
    clients: int
    warmup_s: float
    duration_s: float


def identity_load(options: ClosedLoad, target: str, request: bytes, **more: Any) -> LoadSpec:
    """The load of calls to `identity` with `request` at `target` that `options` describe
    (`more`: other LoadSpec fields)."""
    return LoadSpec(
        target=target,
        method=METHOD,
        request=request,
        check=check_identity_reply,
        concurrency=options.concurrency,
        clients=options.clients,
        warmup_s=options.warmup_s,
        duration_s=options.duration_s,
        **more,
    )


def trial_order(trials: int) -> list[str]:
    """Headrace then bare, bare then Headrace, ... (ABBA), `trials` of each."""
    order: list[str] = []
    for pair in range(trials):
        order += [HEADRACE, BARE] if pair % 2 == 0 else [BARE, HEADRACE]
    return order


def server_processes(
    results_dir: Path, stamp: str, scenario: str = "frontend"
) -> dict[str, ServerProcess]:
    """Headrace (embedded default config) and the bare server, not yet started, logging to
    `results_dir/SCENARIO-STAMP-SIDE.log`."""
    python = sys.executable
    argvs = {
        HEADRACE: [python, "-m", "headrace", "serve", "--host", HOST, "--port", "0"],
        BARE: [python, "-m", "bench.baseline_server", "--host", HOST, "--port", "0"],
    }
    return {
        # The gateway's own cost; capture is measured by its own scenario (bench/capture.py).
        side: ServerProcess(
            side,
            argv,
            results_dir / f"{scenario}-{stamp}-{side}.log",
            CAPTURE_OFF,
        )
        for side, argv in argvs.items()
    }


def _median(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def _summary(trials: list[Trial]) -> dict[str, Any]:
    errors: dict[str, int] = {}
    for trial in trials:
        for code, count in trial.load.errors.items():
            errors[code] = errors.get(code, 0) + count
    return {
        "requests_per_s": _median([trial.load.requests_per_s for trial in trials]),
        "p50_ms": _median([trial.load.p50_ms for trial in trials]),
        "p99_ms": _median([trial.load.p99_ms for trial in trials]),
        "server_cpu_ms_per_request": _median([trial.server_cpu_ms_per_request for trial in trials]),
        "client_cpu_s": _median([trial.load.client_cpu_s for trial in trials]),
        "errors": errors,
    }


def run(options: FrontendOptions, results_dir: Path, stamp: str) -> dict[str, Any]:
    """Run the scenario; returns every number, JSON-ready. Servers are stopped on return,
    on errors and on KeyboardInterrupt.

    Raises:
        RuntimeError: a server did not start.
        LoadError: a client failed (a wrong reply included).
    """
    request = identity_request(options.elements)
    servers = server_processes(results_dir, stamp)
    trials: list[Trial] = []
    with contextlib.ExitStack() as stack:
        for server in servers.values():
            stack.enter_context(server)
        for index, side in enumerate(trial_order(options.trials)):
            server = servers[side]
            spec = identity_load(options, f"{HOST}:{server.port}", request)
            load = run_load(spec, meter=server.cpu_seconds)
            per_request = load.metered * 1000 / load.completed if load.completed else None
            trials.append(Trial(index, side, load, per_request))
            # Progress, in the format of the final per-trial table.
            print(_trial_row(asdict(trials[-1])), file=sys.stderr, flush=True)
    summary = {side: _summary([t for t in trials if t.side == side]) for side in SIDE_LABELS}
    bare_rps = summary[BARE]["requests_per_s"]
    headrace_cpu = summary[HEADRACE]["server_cpu_ms_per_request"]
    bare_cpu = summary[BARE]["server_cpu_ms_per_request"]
    pair_ratios = [
        _ratio(trials[index], trials[index + 1]) for index in range(0, len(trials) - 1, 2)
    ]
    return {
        "options": asdict(options),
        "request_bytes": len(request),
        "servers": {side: list(server.argv) for side, server in servers.items()},
        "note": "client processes and both servers share the machine's cores",
        "trials": [asdict(trial) for trial in trials],
        "summary": summary,
        "ratio": summary[HEADRACE]["requests_per_s"] / bare_rps if bare_rps else None,
        "pair_ratios": pair_ratios,
        # Clients share the cores, so requests/s understates a server-bound gap; the CPU each
        # request costs the server does not depend on who else runs.
        "cpu_cost_ratio": headrace_cpu / bare_cpu if headrace_cpu and bare_cpu else None,
        "goal_ratio": GOAL_RATIO,
    }


def _ratio(first: Trial, second: Trial) -> float | None:
    headrace, bare = (first, second) if first.side == HEADRACE else (second, first)
    if not bare.load.requests_per_s:
        return None
    return headrace.load.requests_per_s / bare.load.requests_per_s


def _trial_row(trial: dict[str, Any]) -> str:
    """One trial as a Markdown table row; `trial` is a `Trial` as `asdict` makes it."""
    load = trial["load"]
    return (
        f"| {trial['index'] + 1} | {SIDE_LABELS[trial['side']]} "
        f"| {number(load['requests_per_s'], 0)} | {number(load['p50_ms'], 2)} "
        f"| {number(load['p99_ms'], 2)} | {number(trial['server_cpu_ms_per_request'], 3)} "
        f"| {sum(load['errors'].values())} |"
    )


def render(report: dict[str, Any]) -> str:
    """The report as Markdown: medians, the ratio, then every trial."""
    options = report["options"]
    summary = report["summary"]
    lines = [
        f"## frontend: {SUMMARY}",
        "",
        f"1x{options['elements']} {DATATYPE} ({report['request_bytes']} B request), "
        f"concurrency {options['concurrency']} over {options['clients']} client processes, "
        f"{options['trials']} trials per server (ABBA), {options['warmup_s']:g} s warm-up + "
        f"{options['duration_s']:g} s window; medians over trials.",
        f"Machine: {one_line(report['machine'])}; clients and servers share its cores.",
        "",
        "| server | requests/s | p50 ms | p99 ms | server CPU ms/request | errors |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for side, label in SIDE_LABELS.items():
        side_summary = summary[side]
        errors = ", ".join(f"{code} {n}" for code, n in side_summary["errors"].items()) or "0"
        lines.append(
            f"| {label} | {number(side_summary['requests_per_s'], 0)} "
            f"| {number(side_summary['p50_ms'], 2)} | {number(side_summary['p99_ms'], 2)} "
            f"| {number(side_summary['server_cpu_ms_per_request'], 3)} | {errors} |"
        )
    pairs = ", ".join(number(ratio, 2) for ratio in report["pair_ratios"])
    verdict = "meets" if (report["ratio"] or 0) >= report["goal_ratio"] else "below"
    lines += [
        "",
        f"**Headrace / bare requests/s: {number(report['ratio'], 2)}** ({verdict} the goal of "
        f">= {report['goal_ratio']}; per AB pair: {pairs})",
        "",
        f"Server CPU per request, Headrace / bare: {number(report['cpu_cost_ratio'], 2)}",
        "",
        "| trial | server | requests/s | p50 ms | p99 ms | server CPU ms/request | errors |",
        "|--:|---|--:|--:|--:|--:|--:|",
    ]
    lines += [_trial_row(trial) for trial in report["trials"]]
    return "\n".join(lines)
