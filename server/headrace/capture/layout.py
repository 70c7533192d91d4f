"""Where capture files go, and how a path is read back.

`{prefix}/model={name}/version={v}/date={YYYY-MM-DD}/hour={HH}/{writer}-{seq}-{part}.parquet`,
partitioned by the call's received time in UTC (Hive-style `key=value` folders, which pyarrow,
pandas, DuckDB and Spark read as columns). The prefix belongs to the object store; paths here
are relative to it.

File names are a pure function of (writer id, spool segment sequence number, part index), so
when a crash makes the writer process the same segment again it overwrites the same files
instead of adding duplicates. Numbers are zero-padded so names sort in write order.
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

FILE_SUFFIX = ".parquet"
EMPTY_PARTITION_VALUE = "__HIVE_DEFAULT_PARTITION__"
"""How an empty value (a failed call with no version) is written: pyarrow and DuckDB read it as
null."""
WRITER_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.\-]*$")
_NANOSECONDS_PER_SECOND = 1_000_000_000
NANOSECONDS_PER_HOUR = 3600 * _NANOSECONDS_PER_SECOND
"""Unix time has no leap seconds: every UTC hour is this long, starting at a multiple of it."""
_FILE_NAME = re.compile(r"^(?P<writer>.+)-(?P<seq>\d+)-(?P<part>\d+)\.parquet$")
_PARTITION_KEYS = ("model", "version", "date", "hour")


MAX_PARTITION_VALUE_CHARS = 160
"""Longer encoded values (a client asking for an absurd model name) are cut and suffixed with a
hash, so no path component passes file-system (255) or S3 key (1024) limits."""


def _encode(value: str) -> str:
    if not value:
        return EMPTY_PARTITION_VALUE
    encoded = urllib.parse.quote(value, safe="")
    if len(encoded) <= MAX_PARTITION_VALUE_CHARS:
        return encoded
    digest = hashlib.sha256(value.encode()).hexdigest()[:16]
    return f"{encoded[: MAX_PARTITION_VALUE_CHARS - 18].rstrip('%')}~{digest}"


def _decode(value: str) -> str:
    return "" if value == EMPTY_PARTITION_VALUE else urllib.parse.unquote(value)


@dataclass(frozen=True, slots=True, order=True)
class Partition:
    """One model version's captures of one UTC hour."""

    model: str
    version: str
    date: date
    hour: int

    @classmethod
    def of(cls, model: str, version: str, received_ns: int) -> Partition:
        """The partition of a call received at `received_ns` (Unix epoch nanoseconds)."""
        moment = datetime.fromtimestamp(received_ns // _NANOSECONDS_PER_SECOND, UTC)
        return cls(model, version, moment.date(), moment.hour)

    @property
    def directory(self) -> str:
        return (
            f"model={_encode(self.model)}/version={_encode(self.version)}/"
            f"date={self.date.isoformat()}/hour={self.hour:02d}"
        )

    @property
    def start(self) -> datetime:
        """The first instant of the hour (UTC)."""
        return datetime(self.date.year, self.date.month, self.date.day, self.hour, tzinfo=UTC)

    def overlaps(self, start: datetime | None, end: datetime | None) -> bool:
        """Whether calls in this hour may fall in [start, end) (aware datetimes)."""
        hour_end = self.start + timedelta(hours=1)
        return (start is None or start < hour_end) and (end is None or end > self.start)


@dataclass(frozen=True, slots=True, order=True)
class CaptureFile:
    """One Parquet file: its partition and the (writer, segment, part) it was made from."""

    partition: Partition
    writer: str
    segment_seq: int
    part: int

    @property
    def path(self) -> str:
        """The path relative to the store's prefix."""
        return (
            f"{self.partition.directory}/{self.writer}-{self.segment_seq:012d}-{self.part:04d}"
            f"{FILE_SUFFIX}"
        )


def partition_prefix(model: str, version: str | None = None) -> str:
    """The folder holding `model`'s files (of `version`, when given), ending in `/`."""
    prefix = f"model={_encode(model)}/"
    return prefix if version is None else f"{prefix}version={_encode(version)}/"


def check_writer_id(writer_id: str) -> str:
    """Raises ValueError for a writer id that cannot be part of a file name."""
    if not WRITER_ID_PATTERN.match(writer_id):
        raise ValueError(
            f"capture writer id {writer_id!r} must be letters, digits, '_', '.' or '-' "
            "(not starting with '-')"
        )
    return writer_id


def capture_file_path(
    model: str, version: str, received_ns: int, writer_id: str, segment_seq: int, part: int
) -> str:
    """The path (relative to the store's prefix) of part `part` of segment `segment_seq`'s
    calls to `model` `version` in the hour of `received_ns`."""
    if segment_seq < 0 or part < 0:
        raise ValueError("segment sequence number and part index must be >= 0")
    return CaptureFile(
        Partition.of(model, version, received_ns), check_writer_id(writer_id), segment_seq, part
    ).path


def parse_capture_path(path: str) -> CaptureFile | None:
    """The capture file a path names, or None for any other path. Leading folders (a prefix)
    are ignored; only the last five components are read."""
    parts = path.strip("/").split("/")
    if len(parts) < 5:
        return None
    *_, model, version, day, hour, name = parts
    values: dict[str, str] = {}
    for key, component in zip(_PARTITION_KEYS, (model, version, day, hour), strict=True):
        found_key, separator, value = component.partition("=")
        if found_key != key or not separator:
            return None
        values[key] = value
    match = _FILE_NAME.match(name)
    if match is None:
        return None
    try:
        partition = Partition(
            _decode(values["model"]),
            _decode(values["version"]),
            date.fromisoformat(values["date"]),
            int(values["hour"]),
        )
    except ValueError:
        return None
    if not 0 <= partition.hour < 24:
        return None
    return CaptureFile(partition, match["writer"], int(match["seq"]), int(match["part"]))
