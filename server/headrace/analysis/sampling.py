"""A uniform sample of bounded size from a stream of any length (reservoir sampling).

Plots and quantiles need values, not just sums; a reservoir keeps at most `capacity` items
whatever the stream's length, each item of the stream equally likely to be in it (Vitter's
Algorithm R, vectorised per chunk).
"""

from __future__ import annotations

import numpy as np


class Reservoir:
    """Up to `capacity` items (rows of equal shape) sampled uniformly from all added."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError("a reservoir holds at least one item")
        self.capacity = capacity
        self.seen = 0
        """Items offered so far."""
        self._rng = np.random.default_rng(seed)
        self._data: np.ndarray | None = None
        self._size = 0

    def add(self, items: np.ndarray) -> None:
        """Offer a chunk of items (along the first dimension)."""
        count = len(items)
        if count == 0:
            return
        if self._data is None:
            self._data = np.empty((self.capacity, *items.shape[1:]), dtype=items.dtype)
        elif items.shape[1:] != self._data.shape[1:]:
            raise ValueError(
                f"items of shape {items.shape[1:]} offered to a reservoir of {self._data.shape[1:]}"
            )
        fill = min(count, self.capacity - self._size)
        if fill:
            self._data[self._size : self._size + fill] = items[:fill]
            self._size += fill
        rest = items[fill:]
        if len(rest):
            positions = self.seen + fill + np.arange(len(rest))
            slots = self._rng.integers(0, positions + 1)
            kept = slots < self.capacity
            self._data[slots[kept]] = rest[kept]
        self.seen += count

    @property
    def items(self) -> np.ndarray:
        """The sample (a view; at most `capacity` items, fewer while fewer were offered)."""
        if self._data is None:
            return np.empty((0,))
        return self._data[: self._size]

    def __len__(self) -> int:
        return self._size
