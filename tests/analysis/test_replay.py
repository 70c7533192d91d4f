"""Client-side batching of replayed calls."""

from __future__ import annotations

import numpy as np

from headrace.analysis.calls import CapturedCall
from headrace.analysis.replay import batches


def test_batches_keep_calls_of_one_signature_together() -> None:
    def call(rows: int, columns: int) -> CapturedCall:
        return CapturedCall("", {"X": np.zeros((rows, columns), np.float32)}, {}, 0.0)

    calls = [call(3, 6), call(3, 2), call(3, 6), call(3, 6), call(9, 6), call(1, 2)]
    grouped = list(batches(calls, 8))
    shapes = [[c.inputs["X"].shape for c in group] for group in grouped]
    assert shapes == [[(3, 6), (3, 6)], [(3, 6)], [(9, 6)], [(3, 2), (1, 2)]]
    assert [len(group) for group in batches(calls, 1)] == [1] * 6
