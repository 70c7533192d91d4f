"""`headrace captures ls / show / export` through the command's entry point."""

from __future__ import annotations

import csv
import json
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from headrace.capture.parquet import rows_from_table
from headrace.capture.store import LocalStore
from headrace.capture.writer import CaptureFileWriter
from headrace.cli import main
from headrace.launchers.seaweedfs import SeaweedFS
from tests.capture.samples import BASE_NS, HOUR_NS, make_record


def write_sample(store: object) -> None:
    writer = CaptureFileWriter(store, "w")  # type: ignore[arg-type]
    writer.write_segment(
        0,
        [
            make_record(
                "first",
                {"X": np.arange(20, dtype=np.float32), "T": np.array([b"a\x00", b"\xff"], object)},
                {"Y": np.array([1, 2], np.int64)},
                trace_id="ab" * 16,
                headers={"x-team": "forecast"},
            ),
            make_record(
                "second",
                {"X": np.arange(3, dtype=np.float32)},
                None,
                received_ns=BASE_NS + HOUR_NS,
                status_code=14,
                status_message="backend down",
            ),
            make_record("elsewhere", {"Z": np.zeros(1, np.int8)}, model="other"),
        ],
    )


def test_ls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_sample(LocalStore(tmp_path))
    assert main(["captures", "ls", "--store", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("3 files")
    assert lines[0].endswith(
        "model=m/version=1/date=2026-11-27/hour=10/w-000000000000-0000.parquet"
    )
    assert (
        main(
            [
                "captures",
                "ls",
                "--store",
                str(tmp_path),
                "--model",
                "m",
                "--since",
                "2026-11-27T11:00:00",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert "hour=11" in lines[0]


def test_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_sample(LocalStore(tmp_path))
    assert main(["captures", "show", "--store", str(tmp_path), "--model", "m"]) == 0
    out = capsys.readouterr().out
    assert "id first  OK" in out
    assert f"trace: {'ab' * 16}" in out
    assert "input X: FP32 [20] min 0 max 19 mean 9.5 [0, 1, 2, 3, 4, 5, 6, 7, ...]" in out
    assert "input T: BYTES [2] [b'a\\x00', b'\\xff']" in out
    assert "output Y: INT64 [2] min 1 max 2" in out
    assert "id second  UNAVAILABLE" in out
    assert "message: backend down" in out
    assert out.splitlines()[-1] == "2 calls shown"
    main(["captures", "show", "--store", str(tmp_path), "--model", "m", "--request-id", "second"])
    assert "first" not in capsys.readouterr().out


def test_export_parquet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_sample(LocalStore(tmp_path / "store"))
    output = tmp_path / "out.parquet"
    arguments = ["captures", "export", "--store", str(tmp_path / "store"), "--model", "m"]
    assert main([*arguments, "--output", str(output)]) == 0
    assert "2 calls written" in capsys.readouterr().out
    rows = list(rows_from_table(pq.read_table(output)))
    assert [row.request_id for row in rows] == ["first", "second"]
    assert rows[0].inputs["T"].tolist() == [b"a\x00", b"\xff"]
    assert rows[1].outputs == {}


def test_export_jsonl_and_csv(tmp_path: Path) -> None:
    write_sample(LocalStore(tmp_path / "store"))
    arguments = ["captures", "export", "--store", str(tmp_path / "store"), "--model", "m"]
    assert main([*arguments, "--format", "jsonl", "--output", str(tmp_path / "out.jsonl")]) == 0
    first, second = (json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines())
    assert first["input.X"] == list(range(20))
    assert first["input.T"] == ["a\x00", {"base64": "/w=="}]
    assert first["output.Y"] == [1, 2]
    assert first["headers"] == {"x-team": "forecast"}
    assert second["status"] == "UNAVAILABLE"
    assert "output.Y" not in second
    assert main([*arguments, "--format", "csv", "--output", str(tmp_path / "out.csv")]) == 0
    with (tmp_path / "out.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [row["request_id"] for row in rows] == ["first", "second"]
    assert json.loads(rows[0]["output.Y"]) == [1, 2]
    assert rows[1]["output.Y"] == ""


def test_reads_s3(
    seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = f"test-commands-{uuid.uuid4().hex[:8]}"
    write_sample(seaweedfs.store(prefix))
    for name, value in seaweedfs.environ().items():
        monkeypatch.setenv(name, value)
    store = f"s3://{seaweedfs.bucket}/{prefix}"
    options = ["--endpoint", seaweedfs.endpoint, "--scheme", "http"]
    assert main(["captures", "ls", "--store", store, *options]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("3 files")


def test_store_errors_exit_with_a_message(
    seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = f"s3://{seaweedfs.bucket}/x"
    options = ["--endpoint", seaweedfs.endpoint, "--scheme", "http"]
    assert main(["captures", "ls", "--store", store, *options]) == 1
    assert "headrace captures:" in capsys.readouterr().err
