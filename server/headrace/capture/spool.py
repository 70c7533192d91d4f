"""The capture spool: append-only segment files on local disk, one directory per writer.

Every entry is framed as `length (u32 LE) | CRC32 of the payload (u32 LE) | payload`, so a
torn tail (a write cut short by a crash) is detected when the segment is read and everything
after the last whole entry is skipped. A segment is written as `{seq}.open`, sealed by
renaming it to `{seq}.seg` (an atomic rename) once it reaches `segment_max_bytes` or
`segment_max_age_s`; sealed segments never change again and are deleted only after their
records are stored. Sequence numbers grow monotonically and survive restarts (the highest seen
in file names and in the `sequence` file, written whenever a segment opens), so a segment's
number, which names its Parquet files, is never reused.

Durability per mode (`fsync_interval_ms`):

- None (default): `append` returns once the bytes are written to the operating system
  (`os.write`): they survive a crash of the Headrace process, not of the machine.
- 0: `append` also fsyncs before it returns: a record is on the disk before its response
  leaves, which survives a machine crash (costs one fsync per group commit).
- N > 0: the capture stage fsyncs the open segment every N ms: a machine crash loses at most
  the last N ms of records.

Thread-safe: the event loop (or the committer's thread) appends while the capture stage seals,
reads and deletes.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

_FRAME = struct.Struct("<II")
"""Payload length, CRC32 of the payload."""
_FRAME_SIZE = _FRAME.size
OPEN_SUFFIX = ".open"
SEALED_SUFFIX = ".seg"
SEQUENCE_FILE = "sequence"
_SEQUENCE_DIGITS = 16
_MAX_BUFFERS = 512
"""Buffers per writev call, well under every system's IOV_MAX (1024 on Linux)."""

_logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Segment:
    """A sealed segment: immutable until deleted."""

    seq: int
    path: Path
    size: int
    opened_s: float
    """Wall-clock time (Unix seconds) its first entry was written, or its file's
    modification time for a segment found at start-up: how old its oldest record is."""


def frame(payload: bytes) -> bytes:
    """One spool entry as written to a segment."""
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def _write_all(fd: int, buffers: list[bytes], size: int) -> None:
    """All of `buffers` (`size` bytes together), in order, with as few system calls as the
    kernel allows: one for a group of up to `_MAX_BUFFERS` buffers that it takes whole."""
    if len(buffers) <= _MAX_BUFFERS:
        written = os.writev(fd, buffers)
        if written < size:
            _write_rest(fd, buffers, written)
        return
    for start in range(0, len(buffers), _MAX_BUFFERS):
        chunk = buffers[start : start + _MAX_BUFFERS]
        written = os.writev(fd, chunk)
        if written < sum(len(buffer) for buffer in chunk):
            _write_rest(fd, chunk, written)


def _write_rest(fd: int, buffers: list[bytes], written: int) -> None:
    """Finish a short write (a signal, a full disk) of `buffers`, `written` bytes in."""
    rest = memoryview(b"".join(buffers))[written:]
    while rest:
        rest = rest[os.write(fd, rest) :]


def read_entries(path: Path) -> Iterator[memoryview]:
    """The whole entries of a segment file, in order; a torn or corrupt tail (a length past
    the end, a CRC mismatch) ends the segment and is logged."""
    data = memoryview(path.read_bytes())
    for start, length in entry_spans(data, path):
        yield data[start : start + length]


def entry_spans(data: bytes | memoryview, path: Path) -> list[tuple[int, int]]:
    """(offset, length) of each whole entry in a segment file's bytes `data`, in order; a torn
    or corrupt tail (a length past the end, a CRC mismatch) ends the segment and is logged
    (naming `path`)."""
    view = memoryview(data)
    spans: list[tuple[int, int]] = []
    offset = 0
    end = len(view)
    while offset < end:
        if end - offset < _FRAME.size:
            break
        length, crc = _FRAME.unpack_from(view, offset)
        start = offset + _FRAME.size
        if start + length > end:
            break
        if zlib.crc32(view[start : start + length]) != crc:
            break
        spans.append((start, length))
        offset = start + length
    if offset < end:
        _logger.warning(
            "capture spool segment %s: skipped a torn tail of %d bytes at offset %d "
            "(a crash cut its last write short)",
            path,
            end - offset,
            offset,
        )
    return spans


class Spool:
    """Append-only segments in `directory`, capped at `max_bytes` on disk."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int,
        segment_max_bytes: int,
        segment_max_age_s: float,
        fsync_interval_ms: int | None = None,
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_max_bytes = segment_max_bytes
        self.segment_max_age_s = segment_max_age_s
        self.fsync_each_append = fsync_interval_ms == 0
        self.fsync_interval = bool(fsync_interval_ms)
        self._unsynced_sealed: list[int] = []
        self._lock = threading.Lock()
        self._sequence_lock = threading.Lock()
        """Orders writes of the sequence file (taken inside `_lock` or without it)."""
        self._sequence_written = 0
        self._fd: int | None = None
        self._open_seq = 0
        self._open_size = 0
        self._opened_s = 0.0
        self._opened_monotonic = 0.0
        self._unsynced = False
        self._sealed: dict[int, Segment] = {}
        self._bytes = 0
        self._next_seq = 1
        self._recover()

    # -- start-up ----------------------------------------------------------------------

    def _recover(self) -> None:
        """Seal what a previous process left open and find the next sequence number."""
        self.directory.mkdir(parents=True, exist_ok=True)
        highest = 0
        sequence_file = self.directory / SEQUENCE_FILE
        try:
            highest = int(sequence_file.read_text().strip() or 0)
        except FileNotFoundError:
            pass
        except ValueError:
            _logger.warning("capture spool: %s is unreadable; using file names", sequence_file)
        for path in sorted(self.directory.iterdir()):
            if path.suffix not in (OPEN_SUFFIX, SEALED_SUFFIX) or not path.stem.isdigit():
                continue
            seq = int(path.stem)
            highest = max(highest, seq)
            if path.suffix == OPEN_SUFFIX:
                sealed = path.with_suffix(SEALED_SUFFIX)
                os.replace(path, sealed)
                _logger.info("capture spool: sealed segment %d left open by a previous run", seq)
                path = sealed
            stat = path.stat()
            if stat.st_size == 0:
                path.unlink()
                continue
            self._sealed[seq] = Segment(seq, path, stat.st_size, stat.st_mtime)
            self._bytes += stat.st_size
        self._next_seq = highest + 1

    # -- writing -----------------------------------------------------------------------

    @property
    def size_bytes(self) -> int:
        """Bytes on disk in segments, open and sealed."""
        return self._bytes

    @property
    def full(self) -> bool:
        """Whether the disk cap is reached: new entries should not be appended."""
        return self._bytes >= self.max_bytes

    def append(self, entries: Sequence[bytes]) -> None:
        """Write framed `entries` with one write (a group commit); they are in the OS (and on
        disk when fsync_interval_ms is 0) when this returns. Seals the segment once it is
        full.

        Raises:
            OSError: the write failed (disk full, I/O error); a partial write is a torn
                tail that readers skip.
        """
        # Headers and payloads go to the kernel as they are (writev): no copy of a large
        # tensor is made here.
        buffers: list[bytes] = []
        size = 0
        for entry in entries:
            length = len(entry)
            buffers.append(_FRAME.pack(length, zlib.crc32(entry)))
            buffers.append(entry)
            size += _FRAME_SIZE + length
        with self._lock:
            fd = self._fd if self._fd is not None else self._open_segment()
            if not self._open_size:  # a segment's age counts from its first entry
                self._opened_s = time.time()
                self._opened_monotonic = time.monotonic()
            try:
                _write_all(fd, buffers, size)
            except OSError:
                # Entries after a torn one would be unreadable: cut back to the last whole one.
                os.ftruncate(fd, self._open_size)
                raise
            self._open_size += size
            self._bytes += size
            if self.fsync_each_append:
                os.fsync(fd)
            else:
                self._unsynced = True
            if self._open_size >= self.segment_max_bytes:
                self._seal_open()

    def _open_segment(self) -> int:
        """Open the next segment now (under `_lock`: the first append, or one after an
        append filled a segment); the capture stage opens the others (`seal`)."""
        seq = self._next_seq
        self._next_seq += 1
        fd = self._fd = self._create_segment(seq)
        self._open_seq = seq
        self._open_size = 0
        return fd

    def _create_segment(self, seq: int) -> int:
        """Make segment `seq`'s file, empty, and record its number. File-system metadata
        operations: about 0.7 ms, up to 4 ms while the disk is busy."""
        with self._sequence_lock:
            if seq > self._sequence_written:
                # The number must outlive the segment: a reused number would overwrite its
                # files in the store.
                temporary = self.directory / f"{SEQUENCE_FILE}.tmp"
                temporary.write_text(str(seq))
                os.replace(temporary, self.directory / SEQUENCE_FILE)
                self._sequence_written = seq
        return os.open(self._path(seq, OPEN_SUFFIX), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def _path(self, seq: int, suffix: str) -> Path:
        return self.directory / f"{seq:0{_SEQUENCE_DIGITS}d}{suffix}"

    def _seal_open(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self.fsync_interval:
            # fsync is the capture stage's job (never the request path's): it syncs and
            # closes this file at its next interval (it may be syncing it right now).
            self._unsynced_sealed.append(fd)
            self._unsynced = False
        else:
            os.close(fd)
        sealed = self._path(self._open_seq, SEALED_SUFFIX)
        os.replace(self._path(self._open_seq, OPEN_SUFFIX), sealed)
        self._sealed[self._open_seq] = Segment(
            self._open_seq, sealed, self._open_size, self._opened_s
        )

    # -- the capture stage's side ------------------------------------------------------

    def seal(self, *, older_than_s: float = 0.0) -> None:
        """Seal the open segment if it holds entries and got its first at least
        `older_than_s` seconds ago (0: whatever its age), and open the next one.

        The file-system work (the next segment's file, closing and renaming the sealed one)
        is done outside the lock that appends take: serving's writes never wait for it.
        """
        with self._lock:
            if self._fd is None or self._open_size == 0:
                return
            if time.monotonic() - self._opened_monotonic < older_than_s:
                return
            sealing = self._open_seq
            seq = self._next_seq
            self._next_seq += 1
        fd = self._create_segment(seq)
        old: tuple[int, int, float] | None = None
        with self._lock:
            if self._fd is not None and self._open_seq == sealing:
                old_fd = self._fd
                old = (self._open_seq, self._open_size, self._opened_s)
                self._fd, self._open_seq, self._open_size = fd, seq, 0
                if self.fsync_interval:
                    # Synced and closed by the capture stage's next `sync` (this thread).
                    self._unsynced_sealed.append(old_fd)
                    self._unsynced = False
                else:
                    os.close(old_fd)
                fd = -1
            elif self._fd is None:  # sealed by a full append meanwhile: take this one
                self._fd, self._open_seq, self._open_size = fd, seq, 0
                fd = -1
        if fd >= 0:  # an append opened another segment meanwhile: this one is not needed
            os.close(fd)
            self._path(seq, OPEN_SUFFIX).unlink(missing_ok=True)
        if old is not None:
            old_seq, old_size, old_opened_s = old
            path = self._path(old_seq, SEALED_SUFFIX)
            os.replace(self._path(old_seq, OPEN_SUFFIX), path)
            with self._lock:
                self._sealed[old_seq] = Segment(old_seq, path, old_size, old_opened_s)

    def sync(self) -> None:
        """fsync what was written since the last sync (the interval modes call this every
        `fsync_interval_ms`, from one thread)."""
        with self._lock:
            fd = self._fd if self._unsynced else None
            self._unsynced = False
            sealed, self._unsynced_sealed = self._unsynced_sealed, []
        # Outside the lock: appends go on while the disk catches up. In the interval modes
        # only this method closes a segment's file, so `fd` stays open meanwhile.
        if fd is not None:
            os.fsync(fd)
        for sealed_fd in sealed:
            os.fsync(sealed_fd)
            os.close(sealed_fd)

    def sealed(self) -> list[Segment]:
        """Sealed segments, oldest first."""
        with self._lock:
            return [self._sealed[seq] for seq in sorted(self._sealed)]

    def delete(self, segment: Segment) -> None:
        """Remove a segment whose records are stored."""
        with self._lock:
            if self._sealed.pop(segment.seq, None) is None:
                return
            self._bytes -= segment.size
        segment.path.unlink(missing_ok=True)

    def oldest_s(self) -> float | None:
        """Wall-clock time of the oldest record not yet stored (None: nothing pending)."""
        with self._lock:
            times = [segment.opened_s for segment in self._sealed.values()]
            if self._fd is not None and self._open_size:
                times.append(self._opened_s)
        return min(times) if times else None

    def close(self) -> None:
        """Close the open segment's file (left open: the next start seals it; removed when
        it holds nothing, as the one `seal` opened ahead may)."""
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is not None:
                if self._unsynced and self.fsync_interval:
                    os.fsync(fd)
                os.close(fd)
                if not self._open_size:
                    self._path(self._open_seq, OPEN_SUFFIX).unlink(missing_ok=True)
        self.sync()
