"""bench/capture_path.py: the micro-benchmark measures this checkout (and another one, with
--base) in fresh processes and reports a number per concurrency."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench import capture_path


def test_report_gives_a_number_per_concurrency_for_each_checkout(
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = str(capture_path.SERVER_DIR)
    capture_path.main(["--base", server, "--rounds", "1", "--requests", "320"])
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split(" (")[0].strip("| "): line for line in lines if server in line}
    assert set(rows) == {"base", "this checkout"}
    for row in rows.values():
        cells = row.split("|")[2:-1]
        assert len(cells) == len(capture_path.CONCURRENCIES)
        assert all(re.fullmatch(r" -?\d+\.\d ", cell) for cell in cells)
    assert any(line.startswith("| this / base |") for line in lines)


def test_a_base_without_headrace_is_refused_not_measured_as_this_checkout(
    tmp_path: Path,
) -> None:
    with pytest.raises(SystemExit, match="instead"):
        capture_path.main(["--base", str(tmp_path), "--rounds", "1", "--requests", "320"])
