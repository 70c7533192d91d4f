"""A stand-in for a GPU model: each execution costs a fixed wait (a kernel launch and run)
plus a small cost per item, and returns its input.

The wait is a sleep, which releases the GIL as a real GPU call does, so what batching buys on
a GPU shows here on a CPU: one execution of 64 items costs about what one of 1 item does.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np


class GpuSim:
    """OUTPUT0 = INPUT0 after `execution_s + items * per_item_s` seconds."""

    def __init__(self, execution_s: float = 0.005, per_item_s: float = 0.00002) -> None:
        self._execution_s = execution_s
        self._per_item_s = per_item_s

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = inputs["INPUT0"]
        time.sleep(self._execution_s + len(values) * self._per_item_s)
        return {"OUTPUT0": values}
