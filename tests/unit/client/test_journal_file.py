"""The journal file: a compact durable start, appends, syncs, and reading it back."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.client._journal import Journal
from ferry.protocol import chunk_digest
from ferry.protocol.journal import (
    RECORD_SIZE,
    Recovered,
    chunk_record,
    finished_record,
    header_record,
    manifest_fingerprint,
    synced_record,
)

CHUNK_SIZE = 4096
FINGERPRINT = manifest_fingerprint("sessions/j1", b"manifest-1")
FILE_CHUNKS = [4, 2, 0]


def digest(file_index: int, chunk_index: int) -> bytes:
    return chunk_digest(f"{file_index}/{chunk_index}".encode())


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / ".ferry-j1.journal"


@pytest.fixture
def journal(path: Path) -> Iterator[Journal]:
    j = Journal(path, CHUNK_SIZE, FINGERPRINT)
    yield j
    j.close()


def reopen(path: Path) -> Recovered:
    """What the next run reads."""
    return Journal(path, CHUNK_SIZE, FINGERPRINT).read(FILE_CHUNKS)


def test_missing_file_reads_empty(journal: Journal) -> None:
    assert journal.read(FILE_CHUNKS) == Recovered()


def test_start_empty_writes_header_and_synced(journal: Journal, path: Path) -> None:
    journal.start(Recovered())
    header = header_record(CHUNK_SIZE, FINGERPRINT)
    assert path.read_bytes() == header + synced_record(RECORD_SIZE)
    assert reopen(path) == Recovered(valid_length=2 * RECORD_SIZE)
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)


def test_start_writes_a_compact_durable_journal(journal: Journal, path: Path) -> None:
    known = Recovered(sure={(1, 1): digest(1, 1), (0, 2): digest(0, 2)}, finished={2})
    journal.start(known)
    body = header_record(CHUNK_SIZE, FINGERPRINT)
    body += chunk_record(0, 2, digest(0, 2)) + chunk_record(1, 1, digest(1, 1))
    body += finished_record(2)
    body += synced_record(len(body))
    assert path.read_bytes() == body
    got = reopen(path)
    assert got.sure == known.sure
    assert got.unsure == {}
    assert got.finished == {2}
    assert got.valid_length == len(body)


def test_start_replaces_the_old_journal(journal: Journal, path: Path, tmp_path: Path) -> None:
    old = header_record(CHUNK_SIZE, FINGERPRINT)
    old += chunk_record(0, 0, digest(0, 0)) + chunk_record(0, 1, digest(0, 1)) + b"torn"
    path.write_bytes(old)
    inode = path.stat().st_ino
    journal.start(Recovered(sure={(0, 1): digest(0, 1)}))
    # A new file renamed over the old one (never rewritten in place), no temp file left.
    assert path.stat().st_ino != inode
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    got = reopen(path)
    assert got.sure == {(0, 1): digest(0, 1)}
    assert got.unsure == {}


def test_chunks_then_sync_are_sure(journal: Journal, path: Path, tmp_path: Path) -> None:
    journal.start(Recovered())
    data = tmp_path / "data"
    data.write_bytes(b"x" * 10)
    fd = os.open(data, os.O_RDWR)
    try:
        journal.chunk(0, 0, digest(0, 0))
        journal.chunk(1, 1, digest(1, 1))
        journal.sync([fd])
    finally:
        os.close(fd)
    got = reopen(path)
    assert got.sure == {(0, 0): digest(0, 0), (1, 1): digest(1, 1)}
    assert got.unsure == {}
    assert got.valid_length == path.stat().st_size


def test_sync_with_a_closed_descriptor_still_syncs(journal: Journal, path: Path) -> None:
    journal.start(Recovered())
    journal.chunk(0, 3, digest(0, 3))
    fd = os.open(path, os.O_RDONLY)
    os.close(fd)  # a file that finished meanwhile: its descriptor is gone
    journal.sync([fd])
    assert reopen(path).sure == {(0, 3): digest(0, 3)}


def test_chunks_without_sync_are_unsure(journal: Journal, path: Path) -> None:
    journal.start(Recovered(sure={(0, 0): digest(0, 0)}))
    journal.chunk(0, 1, digest(0, 1))
    journal.sync([])
    journal.chunk(0, 2, digest(0, 2))
    journal.chunk(1, 0, digest(1, 0))
    got = reopen(path)
    assert got.sure == {(0, 0): digest(0, 0), (0, 1): digest(0, 1)}
    assert got.unsure == {(0, 2): digest(0, 2), (1, 0): digest(1, 0)}


def test_finished_is_durable_and_vouches_for_its_file(journal: Journal, path: Path) -> None:
    journal.start(Recovered())
    journal.chunk(1, 0, digest(1, 0))
    journal.chunk(0, 0, digest(0, 0))
    journal.chunk(1, 1, digest(1, 1))
    journal.finished(1)
    got = reopen(path)
    assert got.finished == {1}
    assert got.sure == {(1, 0): digest(1, 0), (1, 1): digest(1, 1)}
    assert got.unsure == {(0, 0): digest(0, 0)}


def test_close_keeps_the_journal_for_the_next_run(journal: Journal, path: Path) -> None:
    journal.start(Recovered())
    journal.chunk(0, 0, digest(0, 0))
    journal.sync([])
    journal.close()
    journal.close()  # twice is harmless
    assert reopen(path).sure == {(0, 0): digest(0, 0)}


def test_remove_deletes_it(journal: Journal, path: Path) -> None:
    journal.start(Recovered())
    journal.chunk(0, 0, digest(0, 0))
    journal.remove()
    assert not path.exists()
    assert journal.read(FILE_CHUNKS) == Recovered()
    journal.remove()  # already gone: fine


def test_another_transfers_journal_reads_empty(path: Path) -> None:
    other = Journal(path, CHUNK_SIZE, manifest_fingerprint("sessions/j2", b"manifest-1"))
    other.start(Recovered(sure={(0, 0): digest(0, 0)}, finished={2}))
    other.close()
    assert reopen(path) == Recovered()
    other_size = Journal(path, CHUNK_SIZE * 2, FINGERPRINT)
    other_size.start(Recovered(sure={(0, 0): digest(0, 0)}))
    other_size.close()
    assert reopen(path) == Recovered()


def test_a_torn_tail_on_disk_is_cut_off(journal: Journal, path: Path) -> None:
    journal.start(Recovered())
    journal.chunk(0, 0, digest(0, 0))
    journal.sync([])
    journal.chunk(0, 1, digest(0, 1))
    journal.close()
    whole = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(whole - 5)
    got = reopen(path)
    assert got.sure == {(0, 0): digest(0, 0)}
    assert got.unsure == {}
    assert got.valid_length == whole - RECORD_SIZE
