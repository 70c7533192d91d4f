"""Scenario `shared_memory`: large tensors to a Triton on the same host, through system shared
memory versus as bytes in the gRPC messages.

One tritonserver (Headrace's launcher, the example repository) and one Headrace process whose
config has two entries for Triton's `identity` model: `identity_shm` with
`shared_memory.enabled` and `identity_bytes` without. Each request is one 1 x N FP32 tensor
(4 MiB by default); at each concurrency the two are measured back to back, in an order that
alternates between trials. Only the Headrace -> Triton hop changes: the client still sends and
receives the tensor as bytes over gRPC to Headrace.

At each point a third side sends the same tensor from the client straight to Triton's
`identity` (bytes, no Headrace): what the gateway adds to a large request.

The scenario also measures the Headrace -> Triton hop alone: Headrace's `TritonBackend`, in
the bench process, calling the same Triton with the same two model entries, without the front
end or a client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import yaml

from bench.frontend import HOST, METHOD, check_identity_reply, identity_request
from bench.loadgen import LoadSpec, percentile, run_load
from bench.machine import one_line
from bench.server_process import WORKERS_VARIABLE, ServerProcess
from bench.sweep import SweepOptions, divide, number
from bench.sweep import add_arguments as sweep_arguments
from bench.sweep import options_from as options_from
from headrace.backends.shared_memory import SystemRegion
from headrace.backends.triton import TritonBackend
from headrace.config import Settings, TritonModelSettings
from headrace.inference import InferenceRequest
from headrace.launchers.triton import TritonServer, example_repository
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol import grpc_service_pb2_grpc as pb_grpc
from headrace.protocol.datatypes import DATATYPES
from headrace.protocol.placement import Placement
from headrace.spec import ModelSpec

SUMMARY = "4 MiB FP32 tensors to a local Triton: shared memory vs bytes, and Triton directly"
SHARED = "identity_shm"
BYTES = "identity_bytes"
DIRECT = "triton_direct"
"""The client straight to Triton's `identity`, bytes, no Headrace: what Headrace adds."""
MODELS = (SHARED, BYTES)
SIDES = (SHARED, BYTES, DIRECT)
LABELS = {SHARED: "shared memory", BYTES: "bytes", DIRECT: "none: client -> Triton directly"}
GOAL_RATIO = 2.0
"""Shared-memory over bytes requests/s, at every concurrency."""
MIB = 1024 * 1024


DEFAULTS = SweepOptions(concurrencies=(1, 4), duration_s=5.0, clients=1, elements=MIB)
"""The standard run: 1 Mi FP32 values (4 MiB) per request, one client process."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The scenario's command-line options, defaulting to `DEFAULTS`."""
    sweep_arguments(parser, DEFAULTS)


def headrace_config(triton_address: str, options: SweepOptions) -> dict[str, Any]:
    """Headrace's config: the Triton identity model twice, with and without shared memory."""
    tensor_bytes = options.elements * 4
    concurrency = max(options.concurrencies)

    def entry(name: str, shared_memory: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": name,
            "backend": "triton",
            "remote_name": "identity",
            "endpoints": [triton_address],
            "batching": {"enabled": False},
            "shared_memory": shared_memory,
        }

    shared = {
        "enabled": True,
        "min_tensor_bytes": min(64 * 1024, tensor_bytes),
        "max_output_bytes": tensor_bytes,
        # A region per request in flight, each holding the input and the output.
        "pool_bytes": concurrency * 4 * max(tensor_bytes, 64 * 1024),
    }
    return {
        "server": {
            "max_message_bytes": max(128 * MIB, 4 * tensor_bytes),
            "system_shared_memory": True,
        },
        "triton": {
            "max_inflight_per_endpoint": concurrency,
            "max_message_bytes": max(128 * MIB, 4 * tensor_bytes),
        },
        "models": [entry(SHARED, shared), entry(BYTES, {})],
    }


def run(options: SweepOptions, results_dir: Path, stamp: str) -> dict[str, Any]:
    """Run the scenario; returns every number, JSON-ready. Triton and Headrace are stopped on
    return, on errors and on KeyboardInterrupt.

    Raises:
        RuntimeError: a server did not start (TritonLaunchError included).
        LoadError: a client failed (a wrong reply included).
    """
    points: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        triton = stack.enter_context(TritonServer(example_repository()))
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-shm-")))
        config = scratch / "headrace.yaml"
        config.write_text(yaml.safe_dump(headrace_config(triton.address, options)))
        argv = [sys.executable, "-m", "headrace", "serve", "--config", str(config)]
        argv += ["--host", HOST, "--port", "0"]
        log = results_dir / f"shared_memory-{stamp}-headrace.log"
        workers = {WORKERS_VARIABLE: str(options.headrace_workers)}
        server = stack.enter_context(ServerProcess("headrace", argv, log, workers))
        for concurrency in options.concurrencies:
            for trial in range(options.trials):
                order = SIDES if trial % 2 == 0 else SIDES[::-1]
                for model in order:
                    direct = model == DIRECT
                    spec = LoadSpec(
                        target=triton.address if direct else f"{HOST}:{server.port}",
                        method=METHOD,
                        request=identity_request(options.elements, "identity" if direct else model),
                        check=check_identity_reply,
                        concurrency=concurrency,
                        clients=min(options.clients, concurrency),
                        warmup_s=options.warmup_s,
                        duration_s=options.duration_s,
                        connections=options.connections,
                    )
                    # Headrace's CPU; none on the direct side, which Headrace does not see.
                    load = run_load(spec, meter=(lambda: 0.0) if direct else server.cpu_seconds)
                    points.append(
                        {"model": model, "concurrency": concurrency, "trial": trial, **asdict(load)}
                    )
                    print(
                        f"{model} c={concurrency} trial {trial + 1}: "
                        f"{load.requests_per_s:,.1f} requests/s, p99 {load.p99_ms or 0:.1f} ms",
                        file=sys.stderr,
                        flush=True,
                    )
        client_points = asyncio.run(_measure_client_shared(f"{HOST}:{server.port}", options))
        hop_points = asyncio.run(_measure_hop(triton.address, options))
    summary = _summary(points, options.concurrencies, SIDES)
    hop_summary = _summary(hop_points, options.concurrencies, MODELS)
    ratios = {
        concurrency: divide(models[SHARED]["requests_per_s"], models[BYTES]["requests_per_s"])
        for concurrency, models in summary.items()
    }
    vs_direct = {
        concurrency: {
            model: divide(models[model]["requests_per_s"], models[DIRECT]["requests_per_s"])
            for model in MODELS
        }
        for concurrency, models in summary.items()
    }
    hop_ratios = {
        concurrency: divide(models[SHARED]["requests_per_s"], models[BYTES]["requests_per_s"])
        for concurrency, models in hop_summary.items()
    }
    client_summary = _summary(client_points, options.concurrencies, MODELS)
    client_ratios = {
        concurrency: divide(models[SHARED]["requests_per_s"], models[BYTES]["requests_per_s"])
        for concurrency, models in client_summary.items()
    }
    return {
        "options": asdict(options),
        "tensor_bytes": options.elements * 4,
        "note": "client processes, Headrace and Triton share the machine's cores; the client "
        "to Headrace hop is bytes over gRPC for both models",
        "points": points,
        "summary": summary,
        "ratios": ratios,
        "vs_direct": vs_direct,
        "hop_points": hop_points,
        "hop_summary": hop_summary,
        "hop_ratios": hop_ratios,
        "client_points": client_points,
        "client_summary": client_summary,
        "client_ratios": client_ratios,
        "goal_ratio": GOAL_RATIO,
    }


async def _measure_hop(triton_address: str, options: SweepOptions) -> list[dict[str, Any]]:
    """The Headrace -> Triton hop alone: `TritonBackend.infer` in this process, closed loop at
    each concurrency, both model entries back to back (order alternating by trial). Every
    reply is checked against the input. CPU is this process's (Headrace's side of the hop)."""
    settings = Settings.model_validate(headrace_config(triton_address, options))
    models = [model for model in settings.models if isinstance(model, TritonModelSettings)]
    backend = TritonBackend(models, settings.triton)
    await backend.start()
    try:
        specs = {spec.name: spec for spec in backend.model_specs()}
        data = np.arange(options.elements, dtype="<f4").reshape(1, options.elements)
        points: list[dict[str, Any]] = []
        for concurrency in options.concurrencies:
            for trial in range(options.trials):
                for model in MODELS if trial % 2 == 0 else MODELS[::-1]:
                    latencies_ns: list[int] = []
                    spec = specs[model]
                    warmup_end = time.perf_counter() + options.warmup_s
                    await asyncio.gather(
                        *(
                            _hop_calls(backend, spec, data, warmup_end, [])
                            for _ in range(concurrency)
                        )
                    )
                    cpu_start, start = time.process_time(), time.perf_counter()
                    end = start + options.duration_s
                    await asyncio.gather(
                        *(
                            _hop_calls(backend, spec, data, end, latencies_ns)
                            for _ in range(concurrency)
                        )
                    )
                    elapsed = time.perf_counter() - start
                    cpu_s = time.process_time() - cpu_start
                    point = _point(model, concurrency, trial, sorted(latencies_ns), elapsed, cpu_s)
                    points.append(point)
                    print(
                        f"hop {model} c={concurrency} trial {trial + 1}: "
                        f"{point['requests_per_s']:,.1f} requests/s",
                        file=sys.stderr,
                        flush=True,
                    )
        return points
    finally:
        await backend.stop()


async def _measure_client_shared(address: str, options: SweepOptions) -> list[dict[str, Any]]:
    """End to end with shared memory on both hops: a grpc.aio client in this process with one
    /dev/shm region per call in flight (input and output), registered with Headrace, calling
    `identity_shm`; against the same client sending and receiving bytes to `identity_bytes`.
    Each call writes its input into the region and reads its output back (a real client's
    copies), and every reply is checked. CPU is this process's (the client's)."""
    data = np.arange(options.elements, dtype="<f4").reshape(1, options.elements)
    tensor_bytes = data.nbytes
    points: list[dict[str, Any]] = []
    async with grpc.aio.insecure_channel(
        address,
        options=[
            ("grpc.max_receive_message_length", 4 * tensor_bytes + MIB),
            ("grpc.max_send_message_length", 4 * tensor_bytes + MIB),
        ],
    ) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        regions = []
        try:
            for index in range(max(options.concurrencies)):
                region = SystemRegion(f"bench-client-{os.getpid()}-{index}", 2 * tensor_bytes)
                regions.append(region)
                await stub.SystemSharedMemoryRegister(
                    pb.SystemSharedMemoryRegisterRequest(
                        name=region.name, key=region.key, offset=0, byte_size=region.byte_size
                    )
                )
            for concurrency in options.concurrencies:
                for trial in range(options.trials):
                    for model in MODELS if trial % 2 == 0 else MODELS[::-1]:
                        calls = [
                            _client_calls(stub, model, regions[i], data) for i in range(concurrency)
                        ]
                        warmup_end = time.perf_counter() + options.warmup_s
                        await asyncio.gather(*(call(warmup_end, []) for call in calls))
                        latencies_ns: list[int] = []
                        cpu_start, start = time.process_time(), time.perf_counter()
                        end = start + options.duration_s
                        await asyncio.gather(*(call(end, latencies_ns) for call in calls))
                        elapsed = time.perf_counter() - start
                        points.append(
                            _point(
                                model,
                                concurrency,
                                trial,
                                sorted(latencies_ns),
                                elapsed,
                                time.process_time() - cpu_start,
                            )
                        )
                        print(
                            f"client shm {model} c={concurrency} trial {trial + 1}: "
                            f"{points[-1]['requests_per_s']:,.1f} requests/s",
                            file=sys.stderr,
                            flush=True,
                        )
            await stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest())
        finally:
            for region in regions:
                region.close()
    return points


def _client_calls(
    stub: pb_grpc.GRPCInferenceServiceStub, model: str, region: SystemRegion, data: np.ndarray
) -> Callable[[float, list[int]], Awaitable[None]]:
    """One closed-loop caller: shared memory for `identity_shm`, bytes for the other."""
    datatype = DATATYPES["FP32"]
    tensor_bytes = data.nbytes
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=data.shape)
    if model == SHARED:
        input_placement = Placement(region.name, tensor_bytes, 0)
        output_placement = Placement(region.name, tensor_bytes, tensor_bytes)
        input_placement.to_parameters(tensor.parameters)
        output_placement.to_parameters(request.outputs.add(name="OUTPUT0").parameters)
    else:
        request.raw_input_contents.append(data.tobytes())

    async def calls(end_s: float, latencies_ns: list[int]) -> None:
        while (started := time.perf_counter()) < end_s:
            if model == SHARED:
                region.write(0, data, datatype)
                await stub.ModelInfer(request)
                answer = region.read(tensor_bytes, datatype, data.shape)
            else:
                reply = await stub.ModelInfer(request)
                answer = np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(data.shape)
            latencies_ns.append(int((time.perf_counter() - started) * 1e9))
            if not np.array_equal(answer, data):
                raise ValueError(f"{model}: OUTPUT0 is not INPUT0")

    return calls


def _point(
    model: str,
    concurrency: int,
    trial: int,
    latencies_ns: list[int],
    elapsed_s: float,
    cpu_s: float,
) -> dict[str, Any]:
    completed = len(latencies_ns)
    return {
        "model": model,
        "concurrency": concurrency,
        "trial": trial,
        "completed": completed,
        "requests_per_s": completed / elapsed_s,
        "p50_ms": percentile(latencies_ns, 0.5) / 1e6 if completed else None,
        "p99_ms": percentile(latencies_ns, 0.99) / 1e6 if completed else None,
        "metered": cpu_s,
        "errors": {},
    }


async def _hop_calls(
    backend: TritonBackend, spec: ModelSpec, data: np.ndarray, end_s: float, latencies_ns: list[int]
) -> None:
    """Back-to-back calls until `end_s` (perf_counter), each reply checked."""
    request = InferenceRequest(spec.name, "", "", {"INPUT0": data})
    while (started := time.perf_counter()) < end_s:
        response = await backend.infer(spec, request)
        latencies_ns.append(int((time.perf_counter() - started) * 1e9))
        if not np.array_equal(response.outputs["OUTPUT0"], data):
            raise ValueError(f"{spec.name}: OUTPUT0 is not INPUT0")


def _summary(
    points: list[dict[str, Any]], concurrencies: tuple[int, ...], sides: tuple[str, ...]
) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for concurrency in concurrencies:
        summary[str(concurrency)] = {}
        for model in sides:
            mine = [p for p in points if p["model"] == model and p["concurrency"] == concurrency]
            errors: dict[str, int] = {}
            for point in mine:
                for code, count in point["errors"].items():
                    errors[code] = errors.get(code, 0) + count
            latencies = {
                key: [p[key] for p in mine if p[key] is not None] for key in ("p50_ms", "p99_ms")
            }
            summary[str(concurrency)][model] = {
                "requests_per_s": statistics.median(p["requests_per_s"] for p in mine),
                "p50_ms": statistics.median(latencies["p50_ms"]) if latencies["p50_ms"] else None,
                "p99_ms": statistics.median(latencies["p99_ms"]) if latencies["p99_ms"] else None,
                "server_cpu_ms_per_request": None
                if model == DIRECT
                else statistics.median(
                    p["metered"] * 1000 / p["completed"] if p["completed"] else 0.0 for p in mine
                ),
                "errors": errors,
            }
    return summary


def render(report: dict[str, Any]) -> str:
    """The report as Markdown: one row per concurrency and model, then the ratios."""
    options = report["options"]
    lines = [
        f"## shared_memory: {SUMMARY}",
        "",
        f"1x{options['elements']} FP32 requests ({report['tensor_bytes'] / MIB:g} MiB each way), "
        f"{options['clients']} client process(es), {options['trials']} trials per point, "
        f"{options['warmup_s']:g} s warm-up + {options['duration_s']:g} s window; medians over "
        "trials. One tritonserver (launcher, `identity` python-backend model) and one Headrace "
        "with two entries for it, shared memory on and off.",
        f"Machine: {one_line(report['machine'])}; clients, Headrace and Triton share its cores.",
        "",
        "| concurrency | Headrace -> Triton | requests/s | p50 ms | p99 ms "
        "| Headrace CPU ms/request | errors |",
        "|--:|---|--:|--:|--:|--:|--:|",
    ]
    for concurrency, models in report["summary"].items():
        for model in SIDES if DIRECT in models else MODELS:
            point = models[model]
            errors = ", ".join(f"{code} {n}" for code, n in point["errors"].items()) or "0"
            lines.append(
                f"| {concurrency} | {LABELS[model]} | {number(point['requests_per_s'], 1)} "
                f"| {number(point['p50_ms'], 1)} | {number(point['p99_ms'], 1)} "
                f"| {number(point['server_cpu_ms_per_request'], 2)} | {errors} |"
            )
    ratios = ", ".join(
        f"concurrency {concurrency}: {number(ratio, 2)}x"
        for concurrency, ratio in report["ratios"].items()
    )
    hop_ratios = ", ".join(
        f"concurrency {concurrency}: {number(ratio, 2)}x"
        for concurrency, ratio in report["hop_ratios"].items()
    )
    vs_direct = ", ".join(
        f"concurrency {concurrency}: shared memory {number(by_model[SHARED], 2)}, bytes "
        f"{number(by_model[BYTES], 2)}"
        for concurrency, by_model in report.get("vs_direct", {}).items()
    )
    lines += [
        "",
        f"**Shared memory / bytes requests/s: {ratios}** (goal >= {report['goal_ratio']:g}x).",
        "",
        f"Through Headrace / client -> Triton directly (bytes), requests/s: {vs_direct}.",
        "",
        "The Headrace -> Triton hop alone (`TritonBackend.infer` in the bench process, no front "
        "end, no client; CPU is the bench process's):",
        "",
        "| concurrency | Headrace -> Triton | calls/s | p50 ms | p99 ms | CPU ms/call |",
        "|--:|---|--:|--:|--:|--:|",
    ]
    for concurrency, models in report["hop_summary"].items():
        for model in MODELS:
            point = models[model]
            lines.append(
                f"| {concurrency} | {LABELS[model]} | {number(point['requests_per_s'], 1)} "
                f"| {number(point['p50_ms'], 2)} | {number(point['p99_ms'], 2)} "
                f"| {number(point['server_cpu_ms_per_request'], 2)} |"
            )
    lines += ["", f"**Hop alone, shared memory / bytes calls/s: {hop_ratios}**."]
    client_ratios = ", ".join(
        f"concurrency {concurrency}: {number(ratio, 2)}x"
        for concurrency, ratio in report.get("client_ratios", {}).items()
    )
    if client_ratios:
        lines += [
            "",
            "End to end with shared memory on both hops (a grpc.aio client in the bench process "
            "with a registered /dev/shm region per call in flight, writing each input and "
            "reading each output; against the same client sending bytes; CPU is the client's):",
            "",
            "| concurrency | client -> Headrace -> Triton | requests/s | p50 ms | p99 ms "
            "| client CPU ms/request |",
            "|--:|---|--:|--:|--:|--:|",
        ]
        for concurrency, models in report["client_summary"].items():
            for model in MODELS:
                point = models[model]
                lines.append(
                    f"| {concurrency} | {LABELS[model]} | {number(point['requests_per_s'], 1)} "
                    f"| {number(point['p50_ms'], 2)} | {number(point['p99_ms'], 2)} "
                    f"| {number(point['server_cpu_ms_per_request'], 2)} |"
                )
        lines += ["", f"**Shared memory on both hops / bytes requests/s: {client_ratios}**."]
    return "\n".join(lines)
