"""Reading captures back: the Python API, and the files opened by pandas, pyarrow.dataset and
DuckDB in a process that cannot import Headrace."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from datetime import UTC, datetime
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from headrace.capture.reader import list_files, read_arrays, read_records
from headrace.capture.store import LocalStore
from headrace.capture.writer import CaptureFileWriter
from headrace.launchers.seaweedfs import SeaweedFS
from tests.capture.samples import BASE_NS, HOUR_NS, make_record

TEN = datetime(2026, 11, 27, 10, tzinfo=UTC)


def write_sample(store: LocalStore | object) -> None:
    writer = CaptureFileWriter(store, "w")  # type: ignore[arg-type]
    records = [
        make_record(
            f"r{hour}-{index}",
            {"X": np.full((2, 3), hour * 10 + index, dtype=np.int64)},
            {"Y": np.array([[hour], [index]], dtype=np.float16)},
            received_ns=BASE_NS + hour * HOUR_NS + index,
        )
        for hour in range(3)
        for index in range(2)
    ]
    records.append(make_record("failed", {"X": np.zeros((1, 3), np.int64)}, None, status_code=13))
    records.append(make_record("other", {"Z": np.zeros(1, np.int8)}, model="other"))
    writer.write_segment(1, records[:3])
    writer.write_segment(2, records[3:])


def test_read_records_by_model_and_time(tmp_path: Path) -> None:
    write_sample(LocalStore(tmp_path))
    ids = [row.request_id for row in read_records(tmp_path, "m")]
    assert ids == ["r0-0", "r0-1", "failed", "r1-0", "r1-1", "r2-0", "r2-1"]
    eleven = datetime(2026, 11, 27, 11, 15)  # naive: UTC; r1-0 was received at this instant
    ids = [row.request_id for row in read_records(str(tmp_path), "m", start=eleven)]
    assert ids == ["r1-0", "r1-1", "r2-0", "r2-1"]
    ids = [row.request_id for row in read_records(tmp_path, "m", "1", TEN, eleven)]
    assert ids == ["r0-0", "r0-1", "failed"]
    assert [row.request_id for row in read_records(tmp_path, "m", version="9")] == []
    (row,) = read_records(tmp_path, "other")
    assert row.inputs["Z"].dtype == np.int8


def test_time_range_prunes_files(tmp_path: Path) -> None:
    write_sample(LocalStore(tmp_path))
    files = list_files(LocalStore(tmp_path), "m", start=datetime(2026, 11, 27, 12, tzinfo=UTC))
    assert [stored.file.partition.hour for stored in files] == [12]
    everything = list_files(LocalStore(tmp_path))
    assert [
        (f.file.partition.model, f.file.partition.hour, f.file.segment_seq) for f in everything
    ] == [
        ("m", 10, 1),
        ("m", 10, 2),
        ("m", 11, 1),
        ("m", 11, 2),
        ("m", 12, 2),
        ("other", 10, 2),
    ]


def test_read_arrays_concatenates_ok_calls(tmp_path: Path) -> None:
    write_sample(LocalStore(tmp_path))
    arrays = read_arrays(tmp_path, "m")
    assert arrays["input.X"].shape == (12, 3)
    assert arrays["input.X"].dtype == np.int64
    assert arrays["input.X"][::2, 0].tolist() == [0, 1, 10, 11, 20, 21]
    assert arrays["output.Y"].dtype == np.float16
    assert arrays["output.Y"].shape == (12, 1)
    with_failed = read_arrays(tmp_path, "m", only_ok=False)
    assert with_failed["input.X"].shape == (13, 3)


def test_read_from_s3(seaweedfs: SeaweedFS) -> None:
    prefix = f"test-reader-{uuid.uuid4().hex[:8]}"
    write_sample(seaweedfs.store(prefix))
    assert len(list(read_records(seaweedfs.store(prefix), "m"))) == 7


def test_s3_uri_source(seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = f"test-reader-{uuid.uuid4().hex[:8]}"
    write_sample(seaweedfs.store(prefix))
    for name, value in seaweedfs.environ().items():
        monkeypatch.setenv(name, value)
    uri = f"s3://{seaweedfs.bucket}/{prefix}"
    rows = read_records(uri, "other", endpoint=seaweedfs.endpoint, scheme="http")
    assert [row.request_id for row in rows] == ["other"]


# Runs in a fresh interpreter that cannot import headrace (an import hook refuses it, and
# the checkout is off sys.path): what a data team without Headrace sees.
WITHOUT_HEADRACE = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class RefuseHeadrace(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "headrace" or name.startswith("headrace."):
                raise ImportError("headrace must not be imported here")
            return None

    sys.meta_path.insert(0, RefuseHeadrace())
    sys.path = [p for p in sys.path if "server" not in p and p not in ("", ".")]
    root = sys.argv[1]

    import duckdb
    import pandas as pd
    import pyarrow.dataset as ds

    result = {}
    folder = root + "/model=types"
    frame = pd.read_parquet(folder)
    result["pandas_rows"] = len(frame)
    result["pandas_columns"] = sorted(frame.columns)
    first = frame.sort_values("request_id").iloc[0]
    result["pandas_fp16"] = [float(v) for v in first["input.half"]]
    result["pandas_bytes"] = [v.hex() for v in first["input.text"]]
    result["pandas_received"] = str(first["received"])

    dataset = ds.dataset(root, format="parquet", partitioning="hive")
    table = dataset.to_table(filter=ds.field("model") == "types")
    result["dataset_rows"] = table.num_rows
    result["dataset_partitions"] = sorted(set(table.column("hour").to_pylist()))

    rows = duckdb.sql(
        f"SELECT request_id, model, \\"input.bf\\", \\"input_shape.bf\\", \\"output.flag\\", "
        f"status FROM read_parquet('{folder}/**/*.parquet', hive_partitioning = true, "
        "union_by_name = true) "
        "ORDER BY request_id"
    ).fetchall()
    result["duckdb"] = [[str(value) for value in row] for row in rows]
    result["headrace_imported"] = any(name.startswith("headrace") for name in sys.modules)
    print(json.dumps(result))
    """
)


def test_files_open_without_headrace(tmp_path: Path) -> None:
    writer = CaptureFileWriter(LocalStore(tmp_path), "w")
    inputs = {
        "half": np.array([1.5, -0.25], dtype=np.float16),
        "bf": np.array([[1.5, 2.0]], dtype=ml_dtypes.bfloat16),
        "text": np.array([b"a\x00b", b"\xff"], dtype=object),
    }
    outputs = {"flag": np.array([True, False])}
    writer.write_segment(
        0,
        [
            make_record("a", inputs, outputs, model="types"),
            make_record(
                "b", inputs, None, model="types", received_ns=BASE_NS + HOUR_NS, status_code=3
            ),
        ],
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", WITHOUT_HEADRACE, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["headrace_imported"] is False
    assert result["pandas_rows"] == 2
    assert {"received", "model_name", "input.half", "input_shape.half", "hour"} <= set(
        result["pandas_columns"]
    )
    assert result["pandas_fp16"] == [1.5, -0.25]
    assert result["pandas_bytes"] == ["610062", "ff"]
    assert result["pandas_received"] == "2026-11-27 10:15:00+00:00"
    assert result["dataset_rows"] == 2
    assert result["dataset_partitions"] == [10, 11]
    assert result["duckdb"] == [
        ["a", "types", "[1.5, 2.0]", "[1, 2]", "[True, False]", "OK"],
        ["b", "types", "[1.5, 2.0]", "[1, 2]", "None", "INVALID_ARGUMENT"],
    ]
