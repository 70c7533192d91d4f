"""Reservoir sampling: bounded, and uniform over the stream."""

from __future__ import annotations

import numpy as np
import pytest

from headrace.analysis.sampling import Reservoir


def test_keeps_everything_until_full_then_stays_at_capacity() -> None:
    reservoir = Reservoir(100)
    reservoir.add(np.arange(60))
    assert sorted(reservoir.items.tolist()) == list(range(60))
    reservoir.add(np.arange(60, 10_000))
    assert len(reservoir) == 100
    assert reservoir.seen == 10_000
    assert len(set(reservoir.items.tolist())) == 100


def test_every_item_is_equally_likely_whatever_the_chunking() -> None:
    # 2000 reservoirs of 10 from a stream of 100 offered in uneven chunks: each item should be
    # kept ~200 times (binomial sd ~13.4); 5 sd bounds keep the test from ever flaking.
    counts = np.zeros(100)
    for seed in range(2000):
        reservoir = Reservoir(10, seed)
        for chunk in np.split(np.arange(100), [3, 17, 18, 60]):
            reservoir.add(chunk)
        counts[reservoir.items] += 1
    assert counts.sum() == 20_000
    assert counts.min() > 200 - 5 * 13.4
    assert counts.max() < 200 + 5 * 13.4


def test_rows_keep_together_and_shapes_must_match() -> None:
    reservoir = Reservoir(5)
    rows = np.arange(40).reshape(20, 2)
    reservoir.add(rows)
    for row in reservoir.items:
        assert row[1] == row[0] + 1
    with pytest.raises(ValueError, match="shape"):
        reservoir.add(np.zeros((2, 3)))
