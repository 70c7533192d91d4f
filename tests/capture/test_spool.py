"""The spool on its own: framing, torn tails, recovery after a crash, sequence numbers,
sealing by size and age, the disk cap."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from headrace.capture.spool import OPEN_SUFFIX, SEALED_SUFFIX, Spool, frame, read_entries


def make_spool(directory: Path, **overrides: object) -> Spool:
    options: dict[str, object] = {
        "max_bytes": 1 << 30,
        "segment_max_bytes": 1 << 20,
        "segment_max_age_s": 60.0,
    }
    options.update(overrides)
    return Spool(directory, **options)  # type: ignore[arg-type]


def entries_of(spool: Spool) -> list[bytes]:
    return [bytes(entry) for segment in spool.sealed() for entry in read_entries(segment.path)]


def test_entries_come_back_in_order_once_sealed(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    spool.append([b"one", b"two"])
    spool.append([b"three"])
    assert spool.sealed() == []  # still open
    spool.seal()
    assert entries_of(spool) == [b"one", b"two", b"three"]
    assert spool.size_bytes == sum(len(frame(e)) for e in (b"one", b"two", b"three"))


def test_a_torn_tail_is_skipped_and_the_whole_entries_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = make_spool(tmp_path)
    spool.append([b"first", b"second"])
    spool.close()  # as a crash would leave it: open, not sealed
    (segment,) = tmp_path.glob(f"*{OPEN_SUFFIX}")
    with segment.open("ab") as file:
        file.write(frame(b"third, cut short")[:-5])
    with caplog.at_level(logging.WARNING):
        recovered = make_spool(tmp_path)
        assert entries_of(recovered) == [b"first", b"second"]
    assert "torn tail" in caplog.text


def test_a_corrupt_entry_ends_the_segment(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    spool.append([b"good", b"flipped", b"after"])
    spool.seal()
    (segment,) = spool.sealed()
    data = bytearray(segment.path.read_bytes())
    data[len(frame(b"good")) + 8] ^= 0xFF  # first payload byte of the second entry
    segment.path.write_bytes(bytes(data))
    assert entries_of(spool) == [b"good"]


def test_recovery_seals_what_a_crash_left_open_and_continues_the_sequence(
    tmp_path: Path,
) -> None:
    spool = make_spool(tmp_path)
    spool.append([b"sealed before the crash"])
    spool.seal()
    spool.append([b"open at the crash"])
    spool.close()
    assert sorted(p.suffix for p in tmp_path.iterdir() if p.stem.isdigit()) == [
        OPEN_SUFFIX,
        SEALED_SUFFIX,
    ]
    recovered = make_spool(tmp_path)
    assert [s.seq for s in recovered.sealed()] == [1, 2]
    assert entries_of(recovered) == [b"sealed before the crash", b"open at the crash"]
    recovered.append([b"after the restart"])
    recovered.seal()
    assert [s.seq for s in recovered.sealed()] == [1, 2, 3]


def test_sequence_numbers_survive_deleting_every_segment(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    for payload in (b"a", b"b"):
        spool.append([payload])
        spool.seal()
    for segment in spool.sealed():
        spool.delete(segment)
    spool.close()
    assert spool.size_bytes == 0
    restarted = make_spool(tmp_path)
    restarted.append([b"c"])
    restarted.seal()
    (segment,) = restarted.sealed()
    # Never a number used before (the segment `seal` opened ahead, empty, took 3).
    assert segment.seq == 4


def test_a_segment_is_sealed_once_it_reaches_its_size(tmp_path: Path) -> None:
    spool = make_spool(tmp_path, segment_max_bytes=1024)
    entry = b"x" * 300
    for _ in range(7):
        spool.append([entry])
    sizes = [segment.size for segment in spool.sealed()]
    # 4 entries of 308 framed bytes pass 1024; the next three wait in the open segment.
    assert sizes == [4 * len(frame(entry))]
    assert spool.size_bytes == 7 * len(frame(entry))


def test_a_segment_is_sealed_by_age(tmp_path: Path) -> None:
    spool = make_spool(tmp_path, segment_max_age_s=0.05)
    spool.append([b"young"])
    spool.seal(older_than_s=60)
    assert spool.sealed() == []
    time.sleep(0.06)
    spool.seal(older_than_s=0.05)
    assert entries_of(spool) == [b"young"]


def test_the_cap_counts_every_byte_on_disk(tmp_path: Path) -> None:
    spool = make_spool(tmp_path, max_bytes=2048)
    spool.append([b"y" * 1000])
    assert not spool.full
    spool.append([b"y" * 1100])
    assert spool.full
    spool.seal()
    (segment,) = spool.sealed()
    spool.delete(segment)
    assert not spool.full
    assert spool.size_bytes == 0


def test_oldest_record_time_follows_the_pending_segments(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    assert spool.oldest_s() is None
    before = time.time()
    spool.append([b"z"])
    oldest = spool.oldest_s()
    assert oldest is not None
    assert before <= oldest <= time.time()


@pytest.mark.parametrize("fsync_interval_ms", [0, 50])
def test_fsync_modes_keep_every_entry(tmp_path: Path, fsync_interval_ms: int) -> None:
    spool = make_spool(tmp_path, fsync_interval_ms=fsync_interval_ms, segment_max_bytes=1024)
    for index in range(10):
        spool.append([str(index).encode() * 200])
    spool.sync()
    spool.seal()
    spool.sync()
    assert entries_of(spool) == [str(i).encode() * 200 for i in range(10)]


def test_empty_files_left_by_a_crash_are_removed(tmp_path: Path) -> None:
    (tmp_path / f"{7:016d}{OPEN_SUFFIX}").touch()
    spool = make_spool(tmp_path)
    assert spool.sealed() == []
    spool.append([b"next"])
    spool.seal()
    assert [s.seq for s in spool.sealed()] == [8]
    spool.close()  # (and so the empty segment `seal` opened ahead goes too)
    assert not any(p.stat().st_size == 0 for p in tmp_path.iterdir() if p.stem.isdigit())


def test_seal_opens_the_next_segment_so_appends_never_make_files(tmp_path: Path) -> None:
    # Making, closing and renaming files takes milliseconds on a busy disk: the capture
    # stage's `seal` does it, outside the lock the serving thread's appends take.
    spool = make_spool(tmp_path)
    spool.append([b"a"])
    spool.seal()
    opened = sorted(p.name for p in spool.directory.iterdir() if p.suffix == ".open")
    assert opened == ["0000000000000002.open"]
    spool.append([b"b"])
    spool.append([b"c"])
    spool.seal()
    assert [s.seq for s in spool.sealed()] == [1, 2]
    assert [list(read_entries(s.path)) for s in spool.sealed()] == [[b"a"], [b"b", b"c"]]
    spool.seal()  # the open segment is empty: nothing to seal
    assert [s.seq for s in spool.sealed()] == [1, 2]
    spool.close()
    assert not [p for p in spool.directory.iterdir() if p.suffix == ".open"]


def test_appends_and_seals_from_two_threads_keep_every_entry_once_in_order(
    tmp_path: Path,
) -> None:
    # The serving thread appends (sealing full segments itself) while the capture stage
    # seals by age and opens the next segment outside the lock.
    spool = make_spool(tmp_path, segment_max_bytes=600)
    entries = [f"e{index:05d}".encode() for index in range(3000)]
    done = threading.Event()

    def seal_often() -> None:
        while not done.is_set():
            spool.seal()

    sealer = threading.Thread(target=seal_often)
    sealer.start()
    try:
        for entry in entries:
            spool.append([entry])
    finally:
        done.set()
        sealer.join()
    spool.seal()
    segments = spool.sealed()
    seqs = [segment.seq for segment in segments]
    assert seqs == sorted(set(seqs))
    assert [e for segment in segments for e in read_entries(segment.path)] == entries
    assert spool.size_bytes == sum(segment.size for segment in segments)
    spool.close()
