"""Micro-benchmark: CPU that capture adds on the request path, per captured request.

`python -m bench.capture_path [--base OTHER_CHECKOUT/server] [--requests N] [--rounds R]`

What one captured call costs the serving process beyond an uncaptured one, outside gRPC: a
generated request id (the client sent none, as in the `capture` scenario), `admit()`, and
`record()` with its write to a real spool on local disk, metrics on, the `capture` scenario's
request (16 FP32 values, batch 1). Each number is CPU time (`time.process_time`, all threads:
the group commit's thread too) per request, minus the same loop with capture skipped, with
`--concurrency` callers awaiting on one event loop (1: every record is its own group; 16:
records of one event-loop turn share a group commit).

With `--base`, each round runs that checkout's `headrace` (its `server/` folder, e.g. a
`git worktree add /tmp/base main`) and then this one's, each in a fresh process, so both are
measured in one invocation on the same machine state; the report gives medians over rounds.
Not a scenario of `python -m bench`: it measures code paths, not a served load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from time import perf_counter_ns
from typing import Any

SERVER_DIR = Path(__file__).resolve().parent.parent / "server"
CONCURRENCIES = (1, 16)
ELEMENTS = 16


def _id_factory() -> Callable[[], str]:
    """How the servicer makes an id for a request without one, in the checkout imported."""
    try:
        from headrace.inference import RequestIds
    except ImportError:  # before request ids came from a counter
        import uuid

        return lambda: uuid.uuid4().hex
    ids = RequestIds()
    return ids.new


async def _measure(requests: int, concurrency: int, *, captured: bool) -> float:
    """CPU microseconds per request of `concurrency` callers doing `requests` calls."""
    import numpy as np
    from prometheus_client import CollectorRegistry

    from headrace.capture.spool import Spool
    from headrace.capture.tee import ModelCapture, SpoolCommitter
    from headrace.config import ModelCaptureSettings
    from headrace.inference import InferenceResponse
    from headrace.protocol import grpc_service_pb2 as pb
    from headrace.spec import ModelSpec
    from headrace.telemetry.metrics import CaptureMetrics

    values = np.arange(ELEMENTS, dtype="<f4")
    message = pb.ModelInferRequest(
        model_name="identity",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="INPUT0", datatype="FP32", shape=[1, ELEMENTS]
            )
        ],
        raw_input_contents=[values.tobytes()],
    )
    wire = message.SerializeToString()
    response = InferenceResponse(
        "identity",
        "1",
        "",
        {"OUTPUT0": values[None]},
        endpoint="local",
        batch_id="8c1f0a9e2b7d4c61-1",
        batch_size=1,
    )
    reply = pb.ModelInferResponse(
        model_name="identity",
        model_version="1",
        outputs=[
            pb.ModelInferResponse.InferOutputTensor(
                name="OUTPUT0", datatype="FP32", shape=[1, ELEMENTS]
            )
        ],
        raw_output_contents=[values.tobytes()],
    ).SerializeToString()
    metadata = (("user-agent", "grpc-python/1.85.3"),)
    new_id = _id_factory()
    with tempfile.TemporaryDirectory(prefix="capture-path-") as directory:
        spool = Spool(
            Path(directory),
            max_bytes=1 << 40,
            segment_max_bytes=1 << 40,
            segment_max_age_s=3600.0,
        )
        executor = ThreadPoolExecutor(1)
        committer = SpoolCommitter(spool, executor)
        spec = ModelSpec("identity", "1", "python", "python", (), ())
        metrics = CaptureMetrics(CollectorRegistry())
        capture = ModelCapture(spec, ModelCaptureSettings(), spool, committer, metrics)

        async def caller(count: int) -> None:
            for _ in range(count):
                started = perf_counter_ns()
                received_ns = time.time_ns()
                if not captured:
                    await asyncio.sleep(0)  # the answer's own turn, as a captured call has
                    continue
                request_id = message.id or new_id()
                if capture.admit():
                    await capture.record(
                        wire=wire,
                        message=message,
                        metadata=lambda: metadata,
                        identity="",
                        received_ns=received_ns,
                        started_ns=started,
                        code=0,
                        status_message="",
                        response=response,
                        reply=reply,
                        request_id=request_id,
                    )
                await asyncio.sleep(0)

        per_caller = requests // concurrency
        begin = time.process_time()
        await asyncio.gather(*(caller(per_caller) for _ in range(concurrency)))
        elapsed = time.process_time() - begin
        await committer.drain()
        spool.close()
        executor.shutdown()
    return elapsed / (per_caller * concurrency) * 1e6


def _child(requests: int) -> dict[str, Any]:
    import headrace

    asyncio.run(_measure(requests // 10, 1, captured=True))  # warm-up
    result: dict[str, Any] = {"headrace": headrace.__file__}
    for concurrency in CONCURRENCIES:
        off = asyncio.run(_measure(requests, concurrency, captured=False))
        on = asyncio.run(_measure(requests, concurrency, captured=True))
        result[str(concurrency)] = on - off
    return result


def _run(server_dir: Path, requests: int) -> dict[str, Any]:
    environment = {**os.environ, "PYTHONPATH": str(server_dir)}
    output = subprocess.run(
        [sys.executable, "-m", "bench.capture_path", "--child", "--requests", str(requests)],
        env=environment,
        cwd=Path(__file__).resolve().parent.parent,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, Any] = json.loads(output)
    if not result["headrace"].startswith(str(server_dir)):
        raise SystemExit(f"{server_dir}: imported {result['headrace']} instead")
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, help="another checkout's server/ folder")
    parser.add_argument("--requests", type=int, default=20_000, help="per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    if arguments.child:
        print(json.dumps(_child(arguments.requests)))
        return
    sides = {"this checkout": SERVER_DIR}
    if arguments.base is not None:
        sides = {"base": arguments.base.resolve(), **sides}
    samples: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for _ in range(arguments.rounds):
        for side, server_dir in sides.items():
            samples[side].append(_run(server_dir, arguments.requests))
    header = " | ".join(f"concurrency {concurrency}" for concurrency in CONCURRENCIES)
    print(f"CPU us per captured request on the request path (median of {arguments.rounds})")
    print(f"| code | {header} |")
    print("|---|" + "---|" * len(CONCURRENCIES))
    medians: dict[str, dict[str, Any]] = {}
    for side, rounds in samples.items():
        medians[side] = {
            str(c): statistics.median(sample[str(c)] for sample in rounds) for c in CONCURRENCIES
        }
        cells = " | ".join(f"{medians[side][str(c)]:.1f}" for c in CONCURRENCIES)
        print(f"| {side} ({sides[side]}) | {cells} |")
    if "base" in medians:
        ratios = " | ".join(
            f"{medians['this checkout'][str(c)] / medians['base'][str(c)]:.2f}x"
            for c in CONCURRENCIES
        )
        print(f"| this / base | {ratios} |")


if __name__ == "__main__":
    main()
