"""The refusal CPU micro-benchmark against a real Headrace process: every kind of call gets
the answer it is meant to (it raises otherwise) and costs the server some CPU."""

from __future__ import annotations

import re

import pytest

from bench import refusal_cpu


def test_each_kind_of_call_is_measured(capsys: pytest.CaptureFixture[str]) -> None:
    refusal_cpu.main(["--calls", "40", "--rounds", "1", "--elements", "16", "--concurrency", "4"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| this")]
    assert len(rows) == 1
    cells = rows[0].strip("|").split("|")[2:]
    assert len(cells) == len(refusal_cpu.KINDS)
    for cell in cells:
        match = re.match(r"\s*([\d,]+) \(", cell)
        assert match is not None
