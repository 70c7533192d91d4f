"""Micro-benchmark: the server CPU one refused inference call costs, against one accepted call.

`python -m bench.refusal_cpu [--calls N] [--elements 16,16384] [--source LABEL=DIR ...]`

One Headrace process (per source tree, each in turn, the order reversing every round) serves
three models: `identity` (inline, no batcher: an accepted call at its cheapest), `hold` (a
batcher whose queue of one is kept full by two calls parked in it: every other call to it is
refused with RESOURCE_EXHAUSTED, queue full) and `park` (unbatched, long calls).
`server.limits.max_inflight_requests` is `concurrency` + 3, so once `hold`'s two calls and
`park`'s `concurrency` + 1 are parked every other inference call is refused by the in-flight
limit. `--capture` captures every call (to a local folder). Per request size, `calls`
calls of each kind go out from `concurrency` coroutines in this process, and the server's
CPU time (user + system, /proc) over them, divided by the calls, is reported. CPU time, not
wall time, so the numbers hold on a machine busy with other work.

`--source base=/tmp/overload-base/server` runs a second source tree (a `git worktree` of an
older commit) through the same client: PYTHONPATH puts its `headrace` first.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import yaml

from bench.frontend import HOST, METHOD, identity_request
from bench.server_process import ServerProcess

PARK_S = 600.0
"""How long a parked call runs: longer than the benchmark; the server is killed at the end."""
KINDS = ("accepted", "refused_queue", "refused_inflight")


def config(concurrency: int, capture_dir: Path | None = None) -> dict[str, Any]:
    """The models; with `capture_dir`, every call is captured there (segments never sealed
    while measuring, so the conversion's CPU stays out: the request path's cost only)."""
    signature = {
        "max_batch_size": 8,
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [-1]}],
    }
    parked = {"entrypoint": "headrace.examples.gpu_sim:GpuSim", "execution": "thread"}
    parked["init_args"] = {"execution_s": PARK_S, "per_item_s": 0.0}  # type: ignore[assignment]
    capture: dict[str, Any] = {"enabled": False}
    if capture_dir is not None:
        capture = {
            "enabled": True,
            "spool_dir": str(capture_dir / "spool"),
            "segment_max_age_s": PARK_S,
            "store": {"kind": "local", "path": str(capture_dir / "store")},
        }
    return {
        "capture": capture,
        "server": {"limits": {"max_inflight_requests": _inflight_limit(concurrency)}},
        "models": [
            {
                "name": "identity",
                **signature,
                "entrypoint": "headrace.examples.identity:Identity",
                "execution": "inline",
                "batching": {"enabled": False},
            },
            {
                "name": "hold",
                **signature,
                **parked,
                "batching": {"max_inflight_batches": 1, "max_queue_size": 1},
            },
            {"name": "park", **signature, **parked, "batching": {"enabled": False}},
        ],
    }


def _inflight_limit(concurrency: int) -> int:
    """Room for the accepted calls, and for `hold`'s two parked calls besides."""
    return concurrency + 3


async def _calls(
    channel: grpc.aio.Channel, request: bytes, calls: int, concurrency: int
) -> Counter[str]:
    call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
    codes: Counter[str] = Counter()
    remaining = calls

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            try:
                await call(request)
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1
            else:
                codes["OK"] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return codes


async def _measure(
    server: ServerProcess, sizes: list[int], calls: int, concurrency: int
) -> dict[str, dict[int, float]]:
    """Server CPU microseconds per call, by kind and request size."""
    per_call: dict[str, dict[int, float]] = {kind: {} for kind in KINDS}
    async with grpc.aio.insecure_channel(f"{HOST}:{server.port}") as channel:
        await channel.channel_ready()
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)

        async def timed(kind: str, model: str, expected: str) -> None:
            for elements in sizes:
                request = identity_request(elements, model)
                await _calls(channel, request, min(calls, 200), concurrency)  # warm-up
                started = server.cpu_seconds()
                codes = await _calls(channel, request, calls, concurrency)
                spent = server.cpu_seconds() - started
                if codes != Counter({expected: calls}):
                    raise RuntimeError(f"{kind}: expected {expected} only, got {dict(codes)}")
                per_call[kind][elements] = spent / calls * 1e6

        await timed("accepted", "identity", "OK")
        parked = [asyncio.ensure_future(call(identity_request(1, "hold"))) for _ in range(2)]
        await asyncio.sleep(1.0)  # one call executing, one queued
        await timed("refused_queue", "hold", "RESOURCE_EXHAUSTED")
        parked += [
            asyncio.ensure_future(call(identity_request(1, "park")))
            for _ in range(_inflight_limit(concurrency) - 2)
        ]
        await asyncio.sleep(1.0)
        await timed("refused_inflight", "identity", "RESOURCE_EXHAUSTED")
        for task in parked:
            task.cancel()
        await asyncio.gather(*parked, return_exceptions=True)
    return per_call


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--elements", default="16,16384", help="comma-separated request sizes")
    parser.add_argument("--capture", action="store_true", help="capture every call")
    parser.add_argument(
        "--source",
        action="append",
        default=[],
        help="LABEL=DIR: another source root (its headrace package) to measure",
    )
    arguments = parser.parse_args(argv)
    sizes = [int(size) for size in arguments.elements.split(",")]
    here = str(Path(__file__).resolve().parent.parent / "server")
    sources = [("this", here)] + [tuple(s.split("=", 1)) for s in arguments.source]
    results: dict[str, list[dict[str, dict[int, float]]]] = {label: [] for label, _ in sources}
    with tempfile.TemporaryDirectory() as directory:
        config_path = Path(directory) / "refusal_cpu.yaml"
        capture_dir = Path(directory) / "capture" if arguments.capture else None
        config_path.write_text(
            yaml.safe_dump(config(arguments.concurrency, capture_dir), sort_keys=False)
        )
        argv_server = [sys.executable, "-m", "headrace", "serve", "--config", str(config_path)]
        argv_server += ["--host", HOST, "--port", "0"]
        for round_index in range(arguments.rounds):
            order = sources if round_index % 2 == 0 else sources[::-1]
            for label, root in order:
                environment = {
                    "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
                }
                server = ServerProcess(
                    label, argv_server, Path(directory) / f"{label}.log", environment
                )
                with server:
                    began = time.monotonic()
                    measured = asyncio.run(
                        _measure(server, sizes, arguments.calls, arguments.concurrency)
                    )
                    server.stop(timeout_s=1.0)
                results[label].append(measured)
                print(
                    f"round {round_index + 1} {label}: {time.monotonic() - began:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
    print("| source | request | " + " | ".join(f"{k} us CPU/call" for k in KINDS) + " |")
    print("|---|--:|" + "--:|" * len(KINDS))
    for label, _ in sources:
        for elements in sizes:
            cells = []
            for kind in KINDS:
                values = sorted(run[kind][elements] for run in results[label])
                cells.append(
                    f"{values[len(values) // 2]:,.0f} ({', '.join(f'{v:,.0f}' for v in values)})"
                )
            print(f"| {label} | {elements * 4:,} B | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
