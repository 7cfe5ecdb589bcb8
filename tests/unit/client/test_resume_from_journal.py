"""Resuming from the journal, on a real disk: keep what is sure, re-verify the unsure tail,
drop what is gone, and start a compact journal of exactly what was kept."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

import pytest

from ferry.client._journal import Journal
from ferry.client._resume import resume_from_journal
from ferry.client._sink import FileSink, SinkFile
from ferry.files.paths import DestinationExistsError
from ferry.protocol import ReceiveSession, chunk_count, chunk_digest, file_digest
from ferry.protocol.journal import Recovered, manifest_fingerprint
from ferry.v1 import peer_pb2

CHUNK = 16
SESSION = "0123456789abcdef"
FINGERPRINT = manifest_fingerprint(f"sessions/{SESSION}", b"manifest")
# File 0: 3 chunks (16, 16, 8); file 1: 2 chunks; file 2: empty; file 3 (in a folder): 2 chunks.
NAMES = ["a.bin", "b.bin", "empty.txt", "sub/c.bin"]
SIZES = [40, 32, 0, 20]
FILE_CHUNKS = [chunk_count(s, CHUNK) for s in SIZES]


def content(file_index: int) -> bytes:
    return bytes((file_index * 53 + i * 7) % 251 for i in range(SIZES[file_index]))


def piece(file_index: int, chunk_index: int) -> bytes:
    return content(file_index)[chunk_index * CHUNK : (chunk_index + 1) * CHUNK]


def digest(file_index: int, chunk_index: int) -> bytes:
    return chunk_digest(piece(file_index, chunk_index))


def all_chunks(file_index: int) -> list[tuple[int, int]]:
    return [(file_index, c) for c in range(FILE_CHUNKS[file_index])]


def requested(message: peer_pb2.PeerMessage | None) -> list[tuple[int, int]]:
    assert message is not None
    return [
        (r.file_index, c)
        for r in message.request.ranges
        for c in range(r.first_chunk, r.first_chunk + r.chunk_count)
    ]


class Run:
    """One run of the receiver: its sink, journal and session over the same folder."""

    def __init__(self, dest: Path, *, overwrite: bool = False) -> None:
        files = [SinkFile(PurePosixPath(n), s, 0o644, 0) for n, s in zip(NAMES, SIZES, strict=True)]
        self.dest = dest
        self.sink = FileSink(dest, files, SESSION, overwrite=overwrite)
        self.journal = Journal(dest / f".ferry-{SESSION[:12]}.journal", CHUNK, FINGERPRINT)
        self.session = ReceiveSession(SIZES, CHUNK, window=64)

    def write(self, chunks: Iterable[tuple[int, int]]) -> None:
        """Write verified chunks and journal them (not yet synced)."""
        for f, c in chunks:
            self.sink.write(f, c * CHUNK, memoryview(piece(f, c)))
            self.journal.chunk(f, c, digest(f, c))

    def sync(self) -> None:
        self.journal.sync(self.sink.open_fds())

    def finish(self, file_index: int) -> None:
        """Move a complete file into place and journal it, as the receiver does."""
        self.sink.finish(file_index)
        self.journal.finished(file_index)

    def resume(self) -> Recovered:
        return resume_from_journal(self.sink, self.journal, self.session, FILE_CHUNKS)

    def wanted(self) -> list[tuple[int, int]]:
        """Every chunk the session asks for now."""
        self.session.open_stream(1)
        return requested(self.session.request(1))

    def stop(self) -> None:
        """The process ends: descriptors closed, temporary files and journal left behind."""
        for fd in self.sink.open_fds():
            os.close(fd)
        self.sink._fds.clear()
        self.journal.close()


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "inbox"


@pytest.fixture
def runs(dest: Path) -> Iterator[list[Run]]:
    made: list[Run] = []
    yield made
    for run in made:
        run.stop()


@pytest.fixture
def first(dest: Path, runs: list[Run]) -> Run:
    """The earlier run, started fresh (nothing journaled yet)."""
    run = Run(dest)
    runs.append(run)
    run.resume()
    return run


def next_run(dest: Path, runs: list[Run], *, overwrite: bool = False) -> Run:
    for run in runs:
        run.stop()
    run = Run(dest, overwrite=overwrite)
    runs.append(run)
    return run


def temp(dest: Path, file_index: int) -> Path:
    final = dest / NAMES[file_index]
    return final.with_name(f".{final.name}.{SESSION[:12]}.ferry-part")


def every_chunk() -> list[tuple[int, int]]:
    return [fc for f in range(len(SIZES)) for fc in all_chunks(f)]


# -- a fresh start ---------------------------------------------------------------------------


def test_nothing_to_resume(dest: Path, runs: list[Run]) -> None:
    run = next_run(dest, runs)
    kept = run.resume()
    assert kept == Recovered()
    assert run.session.bytes_resumed == 0
    assert run.session.complete_unconfirmed() == [2]  # only the empty file
    assert run.wanted() == every_chunk()
    assert run.journal.read(FILE_CHUNKS).valid_length > 0  # a fresh journal was started


# -- (a) synced chunks ---------------------------------------------------------------------


def test_synced_chunks_are_restored_without_reading(
    dest: Path, runs: list[Run], first: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    first.write([(0, 0), (0, 2), (3, 1)])
    first.sync()
    run = next_run(dest, runs)

    def no_reading(index: int, offset: int, length: int) -> bytes:
        raise AssertionError("a synced chunk was read back")

    monkeypatch.setattr(run.sink, "read_at", no_reading)
    kept = run.resume()
    assert kept.sure == {(0, 0): digest(0, 0), (0, 2): digest(0, 2), (3, 1): digest(3, 1)}
    assert run.session.held(0) == {0: digest(0, 0), 2: digest(0, 2)}
    assert run.session.held(3) == {1: digest(3, 1)}
    assert run.session.bytes_resumed == 16 + 8 + 4
    assert run.wanted() == [(0, 1), (1, 0), (1, 1), (3, 0)]


# -- (b) the unsure tail -------------------------------------------------------------------


def test_unsure_chunks_matching_the_disk_are_restored(
    dest: Path, runs: list[Run], first: Run
) -> None:
    first.write([(0, 0)])
    first.sync()
    first.write([(0, 1), (1, 0)])  # after the last sync: unsure
    assert set(first.journal.read(FILE_CHUNKS).unsure) == {(0, 1), (1, 0)}
    run = next_run(dest, runs)
    kept = run.resume()
    assert set(kept.sure) == {(0, 0), (0, 1), (1, 0)}
    assert run.session.bytes_resumed == 3 * CHUNK
    assert run.wanted() == [(0, 2), (1, 1), (3, 0), (3, 1)]


@pytest.mark.parametrize("damage", ["torn", "lost", "zeroed"])
def test_unsure_chunks_changed_on_disk_are_fetched_again(
    dest: Path, runs: list[Run], first: Run, damage: str
) -> None:
    first.write([(0, 0)])
    first.sync()
    first.write([(0, 1), (0, 2), (3, 0)])
    run = next_run(dest, runs)
    with open(temp(dest, 0), "r+b") as f:
        if damage == "torn":  # half of chunk 1 never reached the disk
            f.seek(CHUNK + CHUNK // 2)
            f.write(bytes(CHUNK // 2))
        elif damage == "lost":  # chunk 2, the file's tail, was cut off
            f.truncate(2 * CHUNK)
        else:  # both unsure chunks of file 0 lost
            f.seek(CHUNK)
            f.write(bytes(SIZES[0] - CHUNK))
    kept = run.resume()
    dropped = {"torn": {(0, 1)}, "lost": {(0, 2)}, "zeroed": {(0, 1), (0, 2)}}[damage]
    assert set(kept.sure) == {(0, 0), (0, 1), (0, 2), (3, 0)} - dropped
    restored = sum(run.session.chunk_length(f, c) for f, c in kept.sure)
    assert run.session.bytes_resumed == restored
    assert run.wanted() == sorted(set(every_chunk()) - set(kept.sure))


def test_sure_chunks_are_trusted_unread(dest: Path, runs: list[Run], first: Run) -> None:
    # Only the unsure tail is re-verified: a synced chunk changed on disk is still kept
    # (the whole-file digest catches it later).
    first.write([(1, 0)])
    first.sync()
    run = next_run(dest, runs)
    with open(temp(dest, 1), "r+b") as f:
        f.write(bytes(CHUNK))
    assert set(run.resume().sure) == {(1, 0)}


# -- (c) and (d) finished files --------------------------------------------------------------


def test_finished_file_in_place_is_confirmed(dest: Path, runs: list[Run], first: Run) -> None:
    first.write(all_chunks(0))  # finish fsyncs the file: no SYNCED needed
    first.finish(0)
    first.write([(1, 0)])
    first.sync()
    assert (dest / NAMES[0]).read_bytes() == content(0)
    run = next_run(dest, runs)
    kept = run.resume()
    assert kept.finished == {0}
    assert set(kept.sure) == {*all_chunks(0), (1, 0)}
    assert run.session.file_confirmed(0)
    assert 0 not in run.session.complete_unconfirmed()
    assert run.session.complete_unconfirmed() == [2]
    assert run.session.digest(0) == file_digest(digest(0, c) for c in range(3))
    assert run.session.bytes_resumed == SIZES[0] + CHUNK
    assert run.wanted() == [(1, 1), (3, 0), (3, 1)]
    assert not temp(dest, 0).exists()


def test_finished_empty_file_is_confirmed(dest: Path, runs: list[Run], first: Run) -> None:
    first.finish(2)
    assert (dest / NAMES[2]).read_bytes() == b""
    run = next_run(dest, runs)
    kept = run.resume()
    assert kept.finished == {2}
    assert run.session.file_confirmed(2)
    assert run.session.complete_unconfirmed() == []


def test_finished_file_deleted_meanwhile_is_fetched_again(
    dest: Path, runs: list[Run], first: Run
) -> None:
    first.write(all_chunks(3))
    first.finish(3)
    first.write([(0, 0)])
    first.sync()
    (dest / NAMES[3]).unlink()
    run = next_run(dest, runs)
    kept = run.resume()
    assert kept.finished == set()
    assert set(kept.sure) == {(0, 0)}
    assert not run.session.file_confirmed(3)
    assert run.session.held(3) == {}
    assert run.session.bytes_resumed == CHUNK
    assert run.wanted() == sorted(set(every_chunk()) - {(0, 0)})


def test_finished_file_changed_in_size_is_not_clobbered(
    dest: Path, runs: list[Run], first: Run
) -> None:
    first.write(all_chunks(1))
    first.finish(1)
    (dest / NAMES[1]).write_bytes(b"the user's own text")
    run = next_run(dest, runs)
    with pytest.raises(DestinationExistsError):
        run.resume()
    assert (dest / NAMES[1]).read_bytes() == b"the user's own text"


def test_finished_file_changed_in_size_is_fetched_again_with_overwrite(
    dest: Path, runs: list[Run], first: Run
) -> None:
    first.write(all_chunks(1))
    first.finish(1)
    (dest / NAMES[1]).write_bytes(b"the user's own text")
    run = next_run(dest, runs, overwrite=True)
    kept = run.resume()
    assert kept == Recovered()
    assert run.wanted() == every_chunk()


# -- (e) temporary files gone ----------------------------------------------------------------


def test_chunks_whose_temp_file_was_deleted_are_dropped(
    dest: Path, runs: list[Run], first: Run
) -> None:
    first.write([(0, 0), (0, 1), (3, 0)])
    first.sync()
    first.write([(3, 1)])
    run = next_run(dest, runs)
    temp(dest, 3).unlink()
    kept = run.resume()
    assert set(kept.sure) == {(0, 0), (0, 1)}
    assert run.session.held(3) == {}
    assert run.session.bytes_resumed == 2 * CHUNK
    assert run.wanted() == [(0, 2), (1, 0), (1, 1), (3, 0), (3, 1)]


# -- (f) the compact journal -----------------------------------------------------------------


def test_compact_journal_holds_exactly_what_was_kept(
    dest: Path, runs: list[Run], first: Run
) -> None:
    first.write(all_chunks(0))
    first.finish(0)
    first.write([(1, 0), (3, 0)])
    first.sync()
    first.write([(1, 1), (3, 1)])  # unsure; (3, 1) will be torn
    run = next_run(dest, runs)
    with open(temp(dest, 3), "r+b") as f:
        f.seek(CHUNK)
        f.write(b"\xff")
    kept = run.resume()
    expected = {*all_chunks(0), (1, 0), (1, 1), (3, 0)}
    assert set(kept.sure) == expected
    assert kept.finished == {0}
    assert kept.unsure == {}
    again = Journal(run.journal.path, CHUNK, FINGERPRINT).read(FILE_CHUNKS)
    assert again.sure == kept.sure == {fc: digest(*fc) for fc in expected}
    assert again.unsure == {}
    assert again.finished == {0}
    assert again.valid_length == run.journal.path.stat().st_size
    # ...and a third run straight after restores the same, reading nothing unsure.
    third = next_run(dest, runs)
    assert third.resume() == Recovered(sure=kept.sure, finished={0})
    assert third.session.bytes_resumed == run.session.bytes_resumed


def test_resumed_run_keeps_journaling(dest: Path, runs: list[Run], first: Run) -> None:
    first.write([(0, 0)])
    first.sync()
    second = next_run(dest, runs)
    second.resume()
    second.write([(0, 1)])
    second.sync()
    second.write([(0, 2)])
    third = next_run(dest, runs)
    kept = third.resume()
    assert set(kept.sure) == {(0, 0), (0, 1), (0, 2)}
    assert third.wanted() == [(1, 0), (1, 1), (3, 0), (3, 1)]


# -- (g) bytes_resumed -----------------------------------------------------------------------


def test_bytes_resumed_is_the_restored_bytes(dest: Path, runs: list[Run], first: Run) -> None:
    first.write(all_chunks(3))
    first.finish(3)
    first.write([(0, 2), (1, 1)])  # the short last chunk of file 0, and a whole one
    run = next_run(dest, runs)
    kept = run.resume()
    assert set(kept.sure) == {(3, 0), (3, 1), (0, 2), (1, 1)}
    assert run.session.bytes_resumed == SIZES[3] + 8 + 16
    assert run.session.bytes_verified == run.session.bytes_resumed


def test_another_transfers_journal_is_ignored(dest: Path, runs: list[Run], first: Run) -> None:
    first.write([(0, 0)])
    first.sync()
    first.stop()
    other = Journal(first.journal.path, CHUNK * 2, FINGERPRINT)  # another chunk size
    other_session = ReceiveSession(SIZES, CHUNK * 2)
    files = [SinkFile(PurePosixPath(n), s, 0o644, 0) for n, s in zip(NAMES, SIZES, strict=True)]
    other_sink = FileSink(dest, files, SESSION, overwrite=False)
    other_chunks = [chunk_count(s, CHUNK * 2) for s in SIZES]
    try:
        assert resume_from_journal(other_sink, other, other_session, other_chunks) == Recovered()
        assert other_session.bytes_resumed == 0
    finally:
        other.close()


@pytest.mark.parametrize("synced", [True, False])
def test_killed_between_moving_a_file_in_place_and_journaling_it(
    dest: Path, runs: list[Run], first: Run, synced: bool
) -> None:
    first.write(all_chunks(0))
    if synced:
        first.sync()
    first.sink.finish(0)  # in place, temporary file gone, but no FINISHED record
    first.stop()
    run = next_run(dest, runs)
    run.resume()
    assert 0 not in run.session.complete_unconfirmed()
    assert run.session.file_confirmed(0)
    assert run.session.digest(0) == file_digest(digest(0, c) for c in range(FILE_CHUNKS[0]))
    assert (0, 0) not in run.wanted()


def test_killed_before_journaling_a_file_that_was_then_changed(
    dest: Path, runs: list[Run], first: Run
) -> None:
    first.write(all_chunks(0))
    first.sink.finish(0)
    first.stop()
    final = dest / NAMES[0]
    final.write_bytes(bytes(SIZES[0]))  # same size, other bytes: not ours any more
    run = next_run(dest, runs)
    with pytest.raises(DestinationExistsError):
        run.resume()
