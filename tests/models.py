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


GATED: dict[str, Gated] = {}
"""Gated models by key, so a test can hold and release the model it configured."""


class Gated:
    """OUTPUT0 = 2 * INPUT0 + 1, recording every batch it runs. While `gate` is clear, calls
    wait for it (a busy model, as the tests need it); an input value of -1 fails the batch."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.running = threading.Event()
        self.delay_s = delay_s
        self.batches: list[np.ndarray] = []
        self._lock = threading.Lock()

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.running.set()
        self.gate.wait(30)
        if self.delay_s:
            time.sleep(self.delay_s)
        values = inputs["INPUT0"]
        with self._lock:
            self.batches.append(np.array(values))
        if (values == -1).any():
            raise ValueError("poisoned input")
        return {"OUTPUT0": values * 2 + 1}


def gated(key: str, delay_s: float = 0.0) -> Gated:
    """Entrypoint: a new Gated model, registered under `key`."""
    GATED[key] = Gated(delay_s)
    return GATED[key]


class Propagating:
    """Echoes INPUT0 and records, per call, the W3C headers a remote backend would inject
    into its call from the current trace context (the seam a Triton backend uses)."""

    def __init__(self) -> None:
        self.injected: list[dict[str, str]] = []

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from opentelemetry import propagate

        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        self.injected.append(carrier)
        return {"OUTPUT0": inputs["INPUT0"]}


PROPAGATING: dict[str, Propagating] = {}


def propagating(key: str) -> Propagating:
    """Entrypoint: a new Propagating model, registered under `key`."""
    PROPAGATING[key] = Propagating()
    return PROPAGATING[key]


class WhoAmI:
    """Answers the name of the token the request came with (auth's `current_identity`), as
    one BYTES element; inline models run in the request's own context."""

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from headrace.frontend.auth import current_identity

        return {"OUTPUT0": np.array([current_identity().encode()], dtype=object)}


class Recording:
    """Echoes INPUT0 after `delay_s`, and appends every value it ran to the file at `path`
    (one per line, flushed before answering): which requests reached the model, for tests
    that run Headrace in another process."""

    def __init__(self, path: str, delay_s: float = 0.0) -> None:
        self._path = path
        self._delay_s = delay_s
        self._lock = threading.Lock()

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = inputs["INPUT0"]
        time.sleep(self._delay_s)
        with self._lock, open(self._path, "a") as log:
            log.writelines(f"{value:.0f}\n" for value in values.ravel())
        return {"OUTPUT0": values}
