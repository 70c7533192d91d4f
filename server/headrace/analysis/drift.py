"""Drift: reference profiles of a model's features and the distances of new data from them.

A feature is one column of a numeric tensor: column `c` of the last dimension of input or
output `T` is the feature `input:T[c]` (a tensor of one dimension is one feature, `input:T`).
A model's reference profile holds, per feature: count, mean, standard deviation, min and max of
the whole reference window; PSI bin cut points at reference quantiles and the reference share of
each bin; and a sorted sample of reference values for the KS distance. The profile is a JSON
file (`Profile.save` / `Profile.load`).

PSI (population stability index) over the reference bins:
`sum((current - reference) * ln(current / reference))` over bin shares, each share floored at
`PSI_FLOOR` so an empty bin counts as rare rather than infinitely surprising. Common reading:
< 0.1 stable, 0.1-0.25 moderate shift, > 0.25 major shift.

KS distance: the two-sample Kolmogorov-Smirnov statistic between the reference sample and the
current values, `max |F_reference(x) - F_current(x)|` (what `scipy.stats.ks_2samp` reports as
its statistic), in [0, 1].
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from headrace.analysis.calls import CapturedCall
from headrace.analysis.sampling import Reservoir

PROFILE_FORMAT = 1
PSI_FLOOR = 1e-4
"""Smallest bin share PSI uses (an empty bin would make the index infinite)."""
DEFAULT_BINS = 10
DEFAULT_SAMPLE_SIZE = 2000
"""Reference values kept per feature for KS distances."""
DEFAULT_RESERVOIR_ROWS = 100_000
"""Rows per tensor the profile's quantiles and bin shares are computed from."""
KINDS = ("input", "output")


class ProfileError(ValueError):
    """A profile file that cannot be read, or data that does not fit a profile."""


def psi(reference_shares: np.ndarray, current_shares: np.ndarray) -> float:
    """Population stability index between two distributions over the same bins."""
    reference = np.maximum(np.asarray(reference_shares, dtype=np.float64), PSI_FLOOR)
    current = np.maximum(np.asarray(current_shares, dtype=np.float64), PSI_FLOOR)
    return float(np.sum((current - reference) * np.log(current / reference)))


def bin_indices(cuts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Bin of each value: bin i holds (cuts[i-1], cuts[i]], the first (-inf, cuts[0]], the
    last (cuts[-1], inf). Closed on the right so that discrete values (0/1 flags) sitting on a
    cut land below it, apart from the next value."""
    return np.searchsorted(cuts, values, side="left")


def bin_shares(cuts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Share of `values` in each of the `len(cuts) + 1` bins."""
    counts = np.bincount(bin_indices(cuts, values), minlength=len(cuts) + 1)
    total = counts.sum()
    return counts / total if total else counts.astype(np.float64)


def ks_distance(reference_sorted: np.ndarray, current: np.ndarray) -> float:
    """Two-sample KS statistic; `reference_sorted` must be sorted ascending."""
    if len(reference_sorted) == 0 or len(current) == 0:
        return math.nan
    current_sorted = np.sort(current)
    points = np.concatenate([reference_sorted, current_sorted])
    reference_cdf = np.searchsorted(reference_sorted, points, side="right") / len(reference_sorted)
    current_cdf = np.searchsorted(current_sorted, points, side="right") / len(current_sorted)
    return float(np.max(np.abs(reference_cdf - current_cdf)))


def quantile_cuts(values: np.ndarray, bins: int) -> np.ndarray:
    """Distinct cut points at the reference's 1/bins ... (bins-1)/bins quantiles."""
    if len(values) == 0:
        return np.empty(0)
    levels = np.arange(1, bins) / bins
    return np.unique(np.quantile(values, levels))


def feature_columns(kind: str, name: str, array: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """(feature name, float64 values) of each column of a numeric tensor; nothing for BYTES,
    BOOL-free of numbers (object arrays) or scalars."""
    if array.dtype == object or array.ndim == 0 or array.dtype.kind not in "biuf":
        return
    values = np.asarray(array, dtype=np.float64)
    if values.ndim == 1:
        yield f"{kind}:{name}", values
        return
    columns = values.reshape(-1, values.shape[-1])
    for column in range(columns.shape[1]):
        yield f"{kind}:{name}[{column}]", columns[:, column]


def tensor_rows(array: np.ndarray) -> np.ndarray | None:
    """A numeric tensor as float64 rows [n, columns] (one column for 1-D); None otherwise."""
    if array.dtype == object or array.ndim == 0 or array.dtype.kind not in "biuf":
        return None
    values = np.asarray(array, dtype=np.float64)
    return values.reshape(-1, 1) if values.ndim == 1 else values.reshape(-1, values.shape[-1])


def feature_names(kind: str, name: str, rows: np.ndarray, one_dimensional: bool) -> list[str]:
    if one_dimensional:
        return [f"{kind}:{name}"]
    return [f"{kind}:{name}[{column}]" for column in range(rows.shape[1])]


@dataclass(frozen=True, slots=True)
class FeatureProfile:
    """One feature of the reference."""

    kind: str
    """`input` or `output`."""
    tensor: str
    column: int | None
    """Column of the tensor's last dimension; None for a one-dimensional tensor."""
    count: int
    mean: float
    std: float
    min: float
    max: float
    cuts: tuple[float, ...]
    """PSI bin cut points (reference quantiles)."""
    shares: tuple[float, ...]
    """Reference share of each of the len(cuts) + 1 bins."""
    sample: tuple[float, ...]
    """Sorted reference values for KS distances (a uniform sample)."""

    def psi(self, values: np.ndarray) -> float:
        if len(values) == 0:
            return math.nan
        return psi(np.asarray(self.shares), bin_shares(np.asarray(self.cuts), values))

    def ks(self, values: np.ndarray) -> float:
        return ks_distance(np.asarray(self.sample), values)


@dataclass(frozen=True, slots=True)
class Profile:
    """A model's reference profile: its features by name."""

    model: str
    version: str
    rows: int
    """Calls (or file rows) the profile was built from."""
    features: Mapping[str, FeatureProfile]

    def save(self, path: Path) -> None:
        document = {
            "format": PROFILE_FORMAT,
            "model": self.model,
            "version": self.version,
            "rows": self.rows,
            "features": {name: asdict(feature) for name, feature in self.features.items()},
        }
        path.write_text(json.dumps(document, indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> Profile:
        """Raises ProfileError for a file that is not a profile."""
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ProfileError(f"{path}: cannot read the profile: {exc}") from exc
        if not isinstance(document, dict) or document.get("format") != PROFILE_FORMAT:
            raise ProfileError(f"{path}: not a Headrace drift profile (format {PROFILE_FORMAT})")
        try:
            features = {
                name: FeatureProfile(
                    kind=entry["kind"],
                    tensor=entry["tensor"],
                    column=entry["column"],
                    count=int(entry["count"]),
                    mean=float(entry["mean"]),
                    std=float(entry["std"]),
                    min=float(entry["min"]),
                    max=float(entry["max"]),
                    cuts=tuple(float(value) for value in entry["cuts"]),
                    shares=tuple(float(value) for value in entry["shares"]),
                    sample=tuple(float(value) for value in entry["sample"]),
                )
                for name, entry in document["features"].items()
            }
            return cls(
                model=str(document["model"]),
                version=str(document["version"]),
                rows=int(document["rows"]),
                features=features,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProfileError(f"{path}: malformed profile: {exc}") from exc

    def tensors(self) -> dict[tuple[str, str], list[tuple[str, FeatureProfile]]]:
        """Features grouped by (kind, tensor), in column order."""
        grouped: dict[tuple[str, str], list[tuple[str, FeatureProfile]]] = {}
        for name, feature in self.features.items():
            grouped.setdefault((feature.kind, feature.tensor), []).append((name, feature))
        for features in grouped.values():
            features.sort(key=lambda item: item[1].column or 0)
        return grouped


class _TensorStats:
    """Exact moments and a row reservoir of one tensor's columns."""

    def __init__(self, columns: int, one_dimensional: bool, reservoir_rows: int, seed: int):
        self.one_dimensional = one_dimensional
        self.count = 0
        self.sum = np.zeros(columns)
        self.sum_squares = np.zeros(columns)
        self.min = np.full(columns, np.inf)
        self.max = np.full(columns, -np.inf)
        self.reservoir = Reservoir(reservoir_rows, seed)

    def add(self, rows: np.ndarray) -> None:
        self.count += len(rows)
        self.sum += rows.sum(axis=0)
        self.sum_squares += np.square(rows).sum(axis=0)
        self.min = np.minimum(self.min, rows.min(axis=0))
        self.max = np.maximum(self.max, rows.max(axis=0))
        self.reservoir.add(rows)


class ProfileBuilder:
    """Builds a profile from a stream of tensors in bounded memory: moments over everything,
    quantiles and bin shares over a uniform reservoir of `reservoir_rows` rows per tensor."""

    def __init__(
        self,
        model: str,
        version: str = "",
        *,
        bins: int = DEFAULT_BINS,
        sample_size: int = DEFAULT_SAMPLE_SIZE,
        reservoir_rows: int = DEFAULT_RESERVOIR_ROWS,
        seed: int = 0,
    ) -> None:
        self._model = model
        self._version = version
        self._bins = bins
        self._sample_size = sample_size
        self._reservoir_rows = reservoir_rows
        self._seed = seed
        self._tensors: dict[tuple[str, str], _TensorStats] = {}
        self.rows = 0

    def add_tensors(self, kind: str, tensors: Mapping[str, np.ndarray]) -> None:
        for name, array in tensors.items():
            rows = tensor_rows(array)
            if rows is None or len(rows) == 0:
                continue
            key = (kind, name)
            stats = self._tensors.get(key)
            if stats is None:
                stats = self._tensors[key] = _TensorStats(
                    rows.shape[1], array.ndim == 1, self._reservoir_rows, self._seed
                )
            elif rows.shape[1] != len(stats.sum):
                raise ProfileError(
                    f"{kind} '{name}' has {rows.shape[1]} columns here but {len(stats.sum)} "
                    "before; a profile needs one shape per tensor"
                )
            stats.add(rows)

    def add_call(self, call: CapturedCall) -> None:
        self.add_tensors("input", call.inputs)
        self.add_tensors("output", call.outputs)
        self.rows += 1

    def add_calls(self, calls: Iterable[CapturedCall]) -> None:
        for call in calls:
            self.add_call(call)

    def feature_values(self) -> dict[str, np.ndarray]:
        """Each feature's values in the reservoir (all of them while fewer than
        `reservoir_rows` rows were added)."""
        values: dict[str, np.ndarray] = {}
        for (kind, tensor), stats in self._tensors.items():
            rows = stats.reservoir.items
            names = feature_names(kind, tensor, rows, stats.one_dimensional)
            for column, name in enumerate(names):
                values[name] = rows[:, column]
        return values

    def build(self) -> Profile:
        """Raises ProfileError when nothing numeric was added."""
        features: dict[str, FeatureProfile] = {}
        rng = np.random.default_rng(self._seed)
        for (kind, tensor), stats in self._tensors.items():
            sample_rows = stats.reservoir.items
            names = feature_names(kind, tensor, sample_rows, stats.one_dimensional)
            mean = stats.sum / stats.count
            variance = np.maximum(stats.sum_squares / stats.count - np.square(mean), 0.0)
            for column, name in enumerate(names):
                values = sample_rows[:, column]
                cuts = quantile_cuts(values, self._bins)
                if len(values) > self._sample_size:
                    sample = rng.choice(values, self._sample_size, replace=False)
                else:
                    sample = values
                features[name] = FeatureProfile(
                    kind=kind,
                    tensor=tensor,
                    column=None if stats.one_dimensional else column,
                    count=stats.count,
                    mean=float(mean[column]),
                    std=float(math.sqrt(variance[column])),
                    min=float(stats.min[column]),
                    max=float(stats.max[column]),
                    cuts=tuple(float(value) for value in cuts),
                    shares=tuple(float(value) for value in bin_shares(cuts, values)),
                    sample=tuple(float(value) for value in np.sort(sample)),
                )
        if not features:
            raise ProfileError("no numeric tensors to profile")
        return Profile(self._model, self._version, self.rows, features)


def profile_from_file(path: Path, model: str, **options: Any) -> Profile:
    """A profile of a reference data set in a file: `.npz` (each array a tensor, first
    dimension the rows; an `output:` prefix on the array name marks an output, else it is an
    input) or `.parquet` (each numeric column, or fixed-size list column, a tensor).

    Raises:
        ProfileError: an unknown suffix, or a file without numeric tensors.
    """
    builder = ProfileBuilder(model, **options)
    suffix = path.suffix.lower()
    tensors: dict[str, np.ndarray]
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            tensors = {name: archive[name] for name in archive.files}
    elif suffix == ".parquet":
        import pyarrow.parquet as parquet

        table = parquet.read_table(path)
        tensors = {}
        for name in table.column_names:
            column = table.column(name).combine_chunks()
            try:
                tensors[name] = np.stack(column.to_numpy(zero_copy_only=False))
            except (ValueError, TypeError):
                continue
    else:
        raise ProfileError(f"{path}: reference files are .npz or .parquet")
    rows = 0
    for name, array in tensors.items():
        kind, _, tensor = name.rpartition(":")
        builder.add_tensors(kind if kind in KINDS else "input", {tensor: array})
        rows = max(rows, len(array))
    builder.rows = rows
    return builder.build()


@dataclass(frozen=True, slots=True)
class FeatureDrift:
    """One feature's reference statistics against the current window."""

    feature: str
    psi: float
    ks: float
    reference_mean: float
    current_mean: float
    reference_std: float
    current_std: float
    current_count: int


def compare_with_profile(profile: Profile, current: Mapping[str, np.ndarray]) -> list[FeatureDrift]:
    """PSI, KS and moments of each profiled feature found in `current` (feature -> values)."""
    result = []
    for name, feature in profile.features.items():
        values = current.get(name)
        if values is None:
            continue
        result.append(
            FeatureDrift(
                feature=name,
                psi=feature.psi(values),
                ks=feature.ks(values),
                reference_mean=feature.mean,
                current_mean=float(values.mean()) if len(values) else math.nan,
                reference_std=feature.std,
                current_std=float(values.std()) if len(values) else math.nan,
                current_count=len(values),
            )
        )
    return result
