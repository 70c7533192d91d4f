"""Micro-benchmark: CPU that tracing adds on the serving event loop, per traced call.

`python -m bench.tracing_path [--base OTHER/server] [--requests N] [--rounds R] [--batched]`

A real Headrace (`Application`, the embedded default config, capture off) serves `identity`
in a fresh process, with tracing off or on (sample ratio 1.0, OTLP gRPC to a receiver in this
process that decodes and counts the spans); a client process of its own sends `--requests`
calls of the `telemetry` scenario's request (1x16 FP32, concurrency 16, one channel) after a
warm-up. The number is the CPU time of the server's event-loop thread (`time.thread_time`,
read on that thread: the thread that saturates first) per call, tracing on minus tracing off,
also the whole process's CPU (`time.process_time`: grpc's threads and the span sender too).
With `--batched`, `identity` runs behind a batcher (the queue, batch, batch-request spans).
With `--with-traceparent`, every call carries a W3C `traceparent` (the server span's parent
is then remote, as behind a traced client).

With `--base`, each round runs that checkout's `headrace` (its `server/` folder, e.g. a
`git worktree add /tmp/base main`) and then this one's, off and on each, every run in a fresh
process, so both are measured in one invocation on the same machine state; the report gives
medians over rounds. Not a scenario of `python -m bench`: it measures code paths.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

SERVER_DIR = Path(__file__).resolve().parent.parent / "server"
ROOT = Path(__file__).resolve().parent.parent
ELEMENTS = 16
WARMUP_REQUESTS = 1_000
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TRACING_ENV = "HEADRACE_TRACING__"


async def _client(port: int, requests: int, concurrency: int, traceparent: bool) -> None:
    """Warm up, say `warm`, wait for a line on stdin, send `requests` calls, say `done`."""
    import grpc

    from bench.frontend import METHOD, identity_request

    request = identity_request(ELEMENTS)
    metadata = (("traceparent", TRACEPARENT),) if traceparent else None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(METHOD)

        async def caller(count: int) -> None:
            for _ in range(count):
                await call(request, metadata=metadata)

        async def run(total: int) -> None:
            await asyncio.gather(*(caller(total // concurrency) for _ in range(concurrency)))

        await run(WARMUP_REQUESTS)
        print("warm", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        await run(requests)
        print("done", flush=True)


async def _handshake(line: bytes) -> None:
    """Tell the parent `line` on stdout and wait for its answer on stdin."""
    sys.stdout.buffer.write(line)
    sys.stdout.flush()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


class Load(NamedTuple):
    """What a measurement sends and to what."""

    requests: int
    concurrency: int
    traceparent: bool
    """Every call carries a W3C traceparent."""
    batched: bool
    """`identity` behind a batcher."""

    def arguments(self) -> list[str]:
        """As this module's command-line options."""
        arguments = ["--requests", str(self.requests), "--concurrency", str(self.concurrency)]
        if self.traceparent:
            arguments.append("--with-traceparent")
        if self.batched:
            arguments.append("--batched")
        return arguments


async def _serve(tracing: bool, receiver_port: int, load: Load) -> Any:
    import headrace
    from headrace.app import Application
    from headrace.config import load_settings

    # Tracing settings from this process's environment (HEADRACE_TRACING__*) apply too.
    environ = {key: value for key, value in os.environ.items() if key.startswith(TRACING_ENV)}
    environ["HEADRACE_CAPTURE__ENABLED"] = "false"
    if load.batched:  # the embedded default's first model: identity
        environ["HEADRACE_MODELS__0__BATCHING__ENABLED"] = "true"
    if tracing:
        environ |= {
            "HEADRACE_TRACING__EXPORTER": "otlp_grpc",
            "HEADRACE_TRACING__ENDPOINT": f"http://127.0.0.1:{receiver_port}",
            "HEADRACE_TRACING__SAMPLE_RATIO": "1.0",
        }
    settings = load_settings(
        environ=environ, overrides={"server.host": "127.0.0.1", "server.port": 0}
    )
    application = Application(settings)
    port = await application.start()
    arguments = ["--client", str(port), *load.arguments()]
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.tracing_path",
        *arguments,
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert client.stdin is not None
    assert client.stdout is not None
    try:
        if await client.stdout.readline() != b"warm\n":
            raise SystemExit("the client failed to warm up")
        await _handshake(b"warm\n")  # the parent may start counting instructions
        thread_begin, process_begin = time.thread_time(), time.process_time()
        client.stdin.write(b"go\n")
        await client.stdin.drain()
        if await client.stdout.readline() != b"done\n":
            raise SystemExit("the client failed")
        thread_s = time.thread_time() - thread_begin
        process_s = time.process_time() - process_begin
        await _handshake(b"done\n")  # ... and dump them
    finally:
        await client.wait()
        await application.stop(grace_s=0)
    return {
        "headrace": headrace.__file__,
        "loop_us": thread_s / load.requests * 1e6,
        "process_us": process_s / load.requests * 1e6,
    }


def _run(
    server_dir: Path,
    tracing: bool,
    receiver_port: int,
    load: Load,
    callgrind: Path | None,
    keep: Path | None = None,
) -> dict[str, Any]:
    """One measurement in a fresh process; with `callgrind` (a folder), that process runs
    under valgrind and the instructions of the measured window are counted per thread."""
    # A fixed hash seed: the same dict and set layouts (instruction counts) in every run.
    environment = {
        **os.environ,
        "PYTHONPATH": f"{server_dir}{os.pathsep}{ROOT}",
        "PYTHONHASHSEED": "0",
    }
    arguments = ["--child", "--receiver", str(receiver_port), *load.arguments()]
    if tracing:
        arguments.append("--tracing")
    command = [sys.executable, "-m", "bench.tracing_path", *arguments]
    if callgrind is not None:
        for old in callgrind.glob("callgrind.out*"):
            old.unlink()
        command = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            "--separate-threads=yes",
            f"--callgrind-out-file={callgrind}/callgrind.out",
            *command,
        ]
    child = subprocess.Popen(
        command,
        env=environment,
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL if callgrind is not None else None,
    )
    assert child.stdin is not None
    assert child.stdout is not None

    def expect(line: bytes, control: list[str]) -> None:
        if child.stdout.readline() != line:  # type: ignore[union-attr]
            child.kill()
            raise SystemExit(f"{server_dir}: the measured server failed")
        if callgrind is not None:
            subprocess.run(
                ["callgrind_control", *control, str(child.pid)],
                check=True,
                capture_output=True,
            )
        child.stdin.write(b"go\n")  # type: ignore[union-attr]
        child.stdin.flush()  # type: ignore[union-attr]

    expect(b"warm\n", ["--instr=on"])
    expect(b"done\n", ["--dump=window"])
    output = child.stdout.read().decode()
    if child.wait() != 0:
        raise SystemExit(f"{server_dir}: the measured server failed")
    result: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    if not result["headrace"].startswith(str(server_dir)):
        raise SystemExit(f"{server_dir}: imported {result['headrace']} instead")
    if callgrind is not None:
        loop, total = 0, 0
        for dump in callgrind.glob("callgrind.out*"):
            text = dump.read_text(errors="replace")
            if "window" not in text.split("events:", 1)[0]:
                continue  # the dump at exit
            count = next(
                int(line.split()[1]) for line in text.splitlines() if line.startswith("summary:")
            )
            total += count
            if dump.name.endswith("-01"):  # thread 1: the event loop's
                loop += count
            if keep is not None:
                keep.mkdir(parents=True, exist_ok=True)
                shutil.copy(dump, keep / f"{'on' if tracing else 'off'}-{dump.name}")
        result["loop_us"] = loop / load.requests / 1000  # thousands of instructions per call
        result["process_us"] = total / load.requests / 1000
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--base",
        type=Path,
        action="append",
        default=[],
        help="another checkout's server/ folder (repeatable)",
    )
    parser.add_argument("--requests", type=int, default=8_000, help="per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight")
    parser.add_argument("--with-traceparent", action="store_true", help="calls carry one")
    parser.add_argument(
        "--batched", action="store_true", help="identity behind a batcher (queue, batch spans)"
    )
    parser.add_argument(
        "--callgrind",
        action="store_true",
        help="count instructions (valgrind) instead of CPU time: thousands per call",
    )
    parser.add_argument(
        "--keep", type=Path, help="with --callgrind: copy the dumps (last round) to this folder"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tracing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--receiver", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--client", type=int, help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    traceparent = arguments.with_traceparent
    if arguments.client is not None:
        asyncio.run(
            _client(arguments.client, arguments.requests, arguments.concurrency, traceparent)
        )
        return
    load = Load(arguments.requests, arguments.concurrency, traceparent, arguments.batched)
    if arguments.child:
        result = asyncio.run(_serve(arguments.tracing, arguments.receiver, load))
        print(json.dumps(result))
        return
    from bench.telemetry import otlp_receiver

    sides = {
        **{
            "base" if len(arguments.base) == 1 else f"base {number}": base.resolve()
            for number, base in enumerate(arguments.base, 1)
        },
        "this checkout": SERVER_DIR,
    }
    samples: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    unit = "thousand instructions" if arguments.callgrind else "CPU us"
    with (
        otlp_receiver() as (counter, receiver_port),
        tempfile.TemporaryDirectory(prefix="tracing-path-") as directory,
    ):
        callgrind = Path(directory) if arguments.callgrind else None
        for _ in range(arguments.rounds):
            for side, server_dir in sides.items():
                off = _run(server_dir, False, receiver_port, load, callgrind, arguments.keep)
                on = _run(server_dir, True, receiver_port, load, callgrind, arguments.keep)
                samples[side].append(
                    {
                        "loop_off": off["loop_us"],
                        "loop_added": on["loop_us"] - off["loop_us"],
                        "process_added": on["process_us"] - off["process_us"],
                    }
                )
        spans = counter.spans
    print(
        f"{unit} per call, {arguments.requests} calls at concurrency {arguments.concurrency}"
        f"{' with a traceparent' if traceparent else ''}"
        f"{', identity behind a batcher' if arguments.batched else ''}"
        f" (median of {arguments.rounds};"
        f" {spans} spans received)"
    )
    print("| code | event loop, tracing off | added by tracing: event loop | whole process |")
    print("|---|--:|--:|--:|")
    medians: dict[str, dict[str, float]] = {}
    for side, rounds in samples.items():
        medians[side] = {
            key: statistics.median(sample[key] for sample in rounds) for key in rounds[0]
        }
        m = medians[side]
        print(
            f"| {side} ({sides[side]}) | {m['loop_off']:.1f} | {m['loop_added']:.1f}"
            f" | {m['process_added']:.1f} |"
        )
        print(
            "|  rounds | " + " ".join(f"{sample['loop_added']:.1f}" for sample in rounds) + " | |"
        )


if __name__ == "__main__":
    main()
