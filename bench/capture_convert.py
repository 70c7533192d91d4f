"""CPU per record of the capture conversion (the worker process's work), this tree against
another checkout, in one invocation: `python -m bench.capture_convert --base OTHER/server`.

Not a scenario of the standard set: a micro-benchmark of the stage that turns spool segments
into Parquet, without servers or load. Each measurement runs in a fresh child process that
imports `headrace` from one tree; trees alternate (ABBA) so drift hits both alike. Per case
(`small`: the `capture` scenario's identity record, one FP32 input of 16 elements and its
echo; `large`: 1 MiB FP32 each way) it reports the median CPU time (time.process_time) per
record of

- `table`: `records_to_table` over all records (one table);
- `segment`: the worker's whole job for one spool segment holding them (read, decode, rules,
  group, tables, Parquet encoding, store into a local folder without fsync).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CASES = {"small": (16, 20_000), "large": (262_144, 48)}
"""case: (FP32 elements per tensor, records)."""
SERVER_DIR = Path(__file__).resolve().parent.parent / "server"


def _measure(server_dir: str, elements: int, count: int, rounds: int) -> dict[str, list[float]]:
    """In a child process: CPU seconds per record of each stage, `rounds` times after one
    round that warms up (imports, first touch of memory, allocator pools)."""
    sys.path.insert(0, server_dir)
    import numpy as np

    from headrace.capture import converter
    from headrace.capture.parquet import records_to_table
    from headrace.capture.record import CaptureRecord
    from headrace.capture.spool import Spool
    from headrace.capture.store import LocalStore
    from headrace.capture.writer import CaptureFileWriter
    from headrace.protocol import grpc_service_pb2 as pb

    if not str(Path(converter.__file__).resolve()).startswith(str(Path(server_dir).resolve())):
        raise RuntimeError(f"imported {converter.__file__}, not from {server_dir}")
    data = np.arange(elements, dtype="<f4").tobytes()
    request = pb.ModelInferRequest(
        model_name="identity",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="INPUT0", datatype="FP32", shape=[1, elements]
            )
        ],
        raw_input_contents=[data],
    ).SerializeToString()
    response = pb.ModelInferResponse(
        model_name="identity",
        model_version="1",
        outputs=[
            pb.ModelInferResponse.InferOutputTensor(
                name="OUTPUT0", datatype="FP32", shape=[1, elements]
            )
        ],
        raw_output_contents=[data],
    ).SerializeToString()
    start_ns = time.time_ns()
    records = [
        CaptureRecord(
            request_id=f"{index:08x}-6f1c-4a8e-9d2b-{index:012x}",
            model="identity",
            version="1",
            received_ns=start_ns + index * 1000,
            responded_ns=start_ns + index * 1000 + 500_000,
            latency_ns=500_000,
            status_code=0,
            status_message="",
            request=request,
            response=response,
            batch_id=f"batch-{index // 8}",
            batch_size=8,
            endpoint="local",
        )
        for index in range(count)
    ]
    seconds: dict[str, list[float]] = {"table": [], "segment": []}
    with tempfile.TemporaryDirectory() as folder:
        spool = Spool(
            Path(folder) / "spool",
            max_bytes=1 << 40,
            segment_max_bytes=1 << 40,
            segment_max_age_s=3600,
        )
        spool.append([record.encode() for record in records])
        spool.seal()
        (segment,) = spool.sealed()
        writer = CaptureFileWriter(LocalStore(Path(folder) / "store", fsync=False), "bench-0")
        for round_index in range(rounds + 1):  # round 0 warms up: first touch of memory
            started = time.process_time()
            table = records_to_table(records)
            table_seconds = (time.process_time() - started) / count
            del table
            started = time.process_time()
            stored = converter._store_segment(writer, segment.path, 1, {}, b"")
            segment_seconds = (time.process_time() - started) / count
            if round_index:
                seconds["table"].append(table_seconds)
                seconds["segment"].append(segment_seconds)
            if stored != {"identity": count}:
                raise RuntimeError(f"stored {stored}, expected {count} records")
        spool.close()
    return seconds


def _child(server_dir: str, case: str, rounds: int) -> dict[str, list[float]]:
    output = subprocess.run(
        [sys.executable, "-m", "bench.capture_convert", "--child", server_dir, case, str(rounds)],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout
    result: dict[str, list[float]] = json.loads(output)
    return result


def main(arguments: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="another checkout's server/ folder to compare with")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated cases")
    parser.add_argument("--alternations", type=int, default=2, help="child processes per tree")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per child")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    options = parser.parse_args(arguments)
    if options.child:
        server_dir, case, rounds = options.child
        elements, count = CASES[case]
        print(json.dumps(_measure(server_dir, elements, count, int(rounds))))
        return
    trees = {"this tree": str(SERVER_DIR)}
    if options.base:
        trees = {"base": str(Path(options.base).resolve()), **trees}
    samples: dict[tuple[str, str, str], list[float]] = {}
    cases = options.cases.split(",")
    for case in cases:
        for alternation in range(options.alternations):
            order = list(trees.items())
            for tree, server_dir in order if alternation % 2 == 0 else order[::-1]:
                print(f"{case}: {tree} ({alternation + 1}/{options.alternations})", file=sys.stderr)
                for stage, values in _child(server_dir, case, options.rounds).items():
                    samples.setdefault((case, stage, tree), []).extend(values)
    names = list(trees)
    header = " | ".join(f"{name} us/record" for name in names)
    ratio = " | this/base" if options.base else ""
    print(f"| case | stage | {header}{ratio} |")
    print("|---|---|" + "--:|" * (len(names) + bool(options.base)))
    for case in cases:
        elements, count = CASES[case]
        for stage in ("table", "segment"):
            medians: dict[str, Any] = {
                name: statistics.median(samples[(case, stage, name)]) * 1e6 for name in names
            }
            cells = " | ".join(f"{medians[name]:,.1f}" for name in names)
            if options.base:
                cells += f" | {medians['this tree'] / medians['base']:.2f}"
            print(f"| {case} ({count:,} x {elements:,} FP32) | {stage} | {cells} |")


if __name__ == "__main__":
    main()
