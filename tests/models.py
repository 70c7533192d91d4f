"""Local models used only by tests (loaded by file path, which also exercises that path)."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

import numpy as np


class AddSub:
    """Triton's `simple` example: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1."""

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            "OUTPUT0": inputs["INPUT0"] + inputs["INPUT1"],
            "OUTPUT1": inputs["INPUT0"] - inputs["INPUT1"],
        }


class Scale:
    """OUTPUT0 = INPUT0 * factor: tells model versions apart."""

    def __init__(self, factor: float) -> None:
        self._factor = np.float32(factor)

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"OUTPUT0": inputs["INPUT0"] * self._factor}


class Failing:
    """Raises on every call."""

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise ValueError("weights are corrupt")


class WrongOutput:
    """Returns a BYTES output where FP32 is declared."""

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"OUTPUT0": np.array([b"x"] * len(inputs["INPUT0"]), dtype=object)}


class Slow:
    """Echoes after `delay_s`; records how many calls are running (for shutdown tests)."""

    def __init__(self, delay_s: float) -> None:
        self._delay_s = delay_s
        self.started = threading.Event()

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.started.set()
        time.sleep(self._delay_s)
        return {"OUTPUT0": inputs["INPUT0"]}
