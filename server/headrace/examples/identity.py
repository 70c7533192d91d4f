"""The identity model: every output is one of the inputs, unchanged.

Tests and benchmarks use it to measure Headrace itself: the model costs nothing, so what a
request costs is the gateway's work.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


class Identity:
    """Returns `inputs[source]` as output `target` for each `target: source` in `outputs`
    (default: OUTPUT0 from INPUT0)."""

    def __init__(self, outputs: Mapping[str, str] | None = None) -> None:
        self._sources = dict(outputs or {"OUTPUT0": "INPUT0"})

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {target: inputs[source] for target, source in self._sources.items()}
