"""The receiver's one intake, on a real disk: verify, write, journal, verdict, finish."""

from __future__ import annotations

import errno
import os
from pathlib import Path, PurePosixPath

import pytest

from ferry.client import _intake
from ferry.client._intake import Intake
from ferry.client._journal import Journal
from ferry.client._sink import FileSink, SinkFile, StorageError
from ferry.protocol import (
    FILE_DIGEST_ALGORITHM,
    ChunkStart,
    ReceiveSession,
    RemoteProtocolError,
    chunk_count,
    chunk_digest,
    file_digest,
)
from ferry.protocol.journal import Recovered, manifest_fingerprint
from ferry.v1 import peer_pb2

CHUNK = 16
SESSION = "0123456789abcdef"
FINGERPRINT = manifest_fingerprint(f"sessions/{SESSION}", b"manifest")
NAMES = ["a.bin", "empty.txt", "sub/b.bin"]
SIZES = [40, 0, 20]  # chunks: (16, 16, 8), none, (16, 4)
FILE_CHUNKS = [chunk_count(s, CHUNK) for s in SIZES]


def content(file_index: int) -> bytes:
    return bytes((file_index * 53 + i * 7) % 251 for i in range(SIZES[file_index]))


def piece(file_index: int, chunk_index: int) -> bytes:
    return content(file_index)[chunk_index * CHUNK : (chunk_index + 1) * CHUNK]


class Recorder:
    """What reached the disk, in order: ("write", f, c) and ("journal", f, c)."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int, int]] = []


class RecordingSink(FileSink):
    def __init__(self, dest: Path, recorder: Recorder, *, full: bool = False) -> None:
        files = [SinkFile(PurePosixPath(n), s, 0o644, 0) for n, s in zip(NAMES, SIZES, strict=True)]
        super().__init__(dest, files, SESSION, overwrite=False)
        self.recorder = recorder
        self.full = full

    def write(self, index: int, offset: int, data: memoryview) -> None:
        if self.full:
            raise StorageError("writing failed", OSError(errno.ENOSPC, "No space left on device"))
        super().write(index, offset, data)
        self.recorder.log.append(("write", index, offset // CHUNK))


class RecordingJournal(Journal):
    def __init__(self, path: Path, recorder: Recorder) -> None:
        super().__init__(path, CHUNK, FINGERPRINT)
        self.recorder = recorder

    def chunk(self, file_index: int, chunk_index: int, digest: bytes) -> None:
        super().chunk(file_index, chunk_index, digest)
        self.recorder.log.append(("journal", file_index, chunk_index))


class Setup:
    def __init__(self, dest: Path, *, full: bool = False) -> None:
        self.recorder = Recorder()
        self.sink = RecordingSink(dest, self.recorder, full=full)
        self.sink.prepare()
        self.journal = RecordingJournal(dest / f".ferry-{SESSION[:12]}.journal", self.recorder)
        self.journal.start(Recovered())
        self.session = ReceiveSession(SIZES, CHUNK, window=8)
        self.files_done: list[int] = []
        self.intake = Intake(self.session, self.sink, self.journal, on_file=self.files_done.append)

    def offer(self, stream: int, file_index: int, chunk_index: int, payload: bytes) -> list[int]:
        """Announce a chunk with its true digest and hand ``payload`` to the intake."""
        digest = chunk_digest(piece(file_index, chunk_index))
        ev = ChunkStart(file_index, chunk_index, digest, len(payload))
        with self.intake.lock:
            target = self.session.chunk_start(stream, ev)
        return list(
            self.intake.chunk(
                file_index,
                chunk_index,
                target.offset,
                digest,
                memoryview(payload),
                lambda ok: self.session.chunk_done(stream, ev, ok),
            )
        )

    def ask(self, stream: int) -> None:
        with self.intake.lock:
            assert self.session.request(stream) is not None

    def recovered(self) -> Recovered:
        return self.journal.read(FILE_CHUNKS)

    def temp_bytes(self, file_index: int) -> bytes:
        return self.sink.temp_path(file_index).read_bytes()


def test_a_good_chunk_is_written_then_journaled(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    stream = s.intake.open_stream()
    s.ask(stream)
    assert s.offer(stream, 0, 1, piece(0, 1)) == []
    assert s.temp_bytes(0)[CHUNK : 2 * CHUNK] == piece(0, 1)
    assert s.recorder.log == [("write", 0, 1), ("journal", 0, 1)]
    assert s.recovered().unsure == {(0, 1): chunk_digest(piece(0, 1))}
    assert s.intake.bytes_verified == CHUNK


def test_a_corrupt_chunk_is_neither_written_nor_journaled(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    stream = s.intake.open_stream()
    s.ask(stream)
    bad = bytes(b ^ 0xFF for b in piece(0, 0))
    assert s.offer(stream, 0, 0, bad) == []
    assert s.recorder.log == []
    assert not s.sink.has_temp(0)  # nothing was ever written to that file
    assert s.recovered().unsure == {}
    assert s.session.retries == 1
    assert s.intake.bytes_verified == 0
    with s.intake.lock:  # it is asked for again
        again = s.session.request(stream)
    assert again is not None
    assert (again.request.ranges[0].file_index, again.request.ranges[0].first_chunk) == (0, 0)


def test_a_chunk_its_path_refuses_is_treated_like_a_corrupt_one(tmp_path: Path) -> None:
    """What the store path does with a sealed chunk that does not open."""
    s = Setup(tmp_path)
    stream = s.intake.open_stream()
    s.ask(stream)
    ev = ChunkStart(0, 1, chunk_digest(piece(0, 1)), CHUNK)
    verdicts: list[bool] = []

    def verdict(ok: bool) -> list[int]:
        assert s.intake.lock.locked()  # given holding the lock, as Intake.chunk does
        verdicts.append(ok)
        return s.session.chunk_done(stream, ev, ok)

    with s.intake.lock:
        s.session.chunk_start(stream, ev)
    s.intake.refuse(verdict)
    assert verdicts == [False]
    assert s.recorder.log == []
    assert not s.sink.has_temp(0)
    assert s.recovered().unsure == {}
    assert (s.session.retries, s.intake.bytes_verified) == (1, 0)
    with s.intake.lock:  # asked for again, like a chunk that failed its digest
        again = s.session.request(stream)
    assert again is not None
    assert (again.request.ranges[0].file_index, again.request.ranges[0].first_chunk) == (0, 1)


def test_a_chunk_that_cannot_be_written_is_not_journaled_nor_counted(tmp_path: Path) -> None:
    s = Setup(tmp_path, full=True)
    stream = s.intake.open_stream()
    s.ask(stream)
    with pytest.raises(StorageError) as caught:
        s.offer(stream, 0, 0, piece(0, 0))
    assert caught.value.full
    assert s.recorder.log == []
    assert s.recovered().unsure == {}
    assert s.intake.bytes_verified == 0


def test_completing_a_file_then_confirming_it_puts_it_in_place(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    stream = s.intake.open_stream()
    s.ask(stream)
    assert s.offer(stream, 2, 1, piece(2, 1)) == []
    assert s.offer(stream, 2, 0, piece(2, 0)) == [2]
    assert s.recorder.log == [
        ("write", 2, 1),
        ("journal", 2, 1),
        ("write", 2, 0),
        ("journal", 2, 0),
    ]
    expected = file_digest([chunk_digest(piece(2, 0)), chunk_digest(piece(2, 1))])
    s.intake.file_end(
        peer_pb2.FileEnd(file_index=2, algorithm=FILE_DIGEST_ALGORITHM, digest=expected)
    )
    assert (tmp_path / "sub" / "b.bin").read_bytes() == content(2)
    assert not s.sink.has_temp(2)
    assert s.session.file_confirmed(2)
    assert s.files_done == [2]
    found = s.recovered()
    assert found.finished == {2}
    assert set(found.sure) == {(2, 0), (2, 1)}  # FINISHED is synced: what came before is sure


def test_a_whole_file_digest_that_does_not_match_moves_nothing(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    stream = s.intake.open_stream()
    s.ask(stream)
    s.offer(stream, 2, 0, piece(2, 0))
    s.offer(stream, 2, 1, piece(2, 1))
    with pytest.raises(RemoteProtocolError):
        s.intake.file_end(
            peer_pb2.FileEnd(file_index=2, algorithm=FILE_DIGEST_ALGORITHM, digest=bytes(32))
        )
    assert not (tmp_path / "sub" / "b.bin").exists()
    assert s.files_done == []
    assert s.recovered().finished == set()


def test_an_empty_file_is_confirmed_without_chunks(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.intake.file_end(
        peer_pb2.FileEnd(file_index=1, algorithm=FILE_DIGEST_ALGORITHM, digest=file_digest([]))
    )
    assert (tmp_path / "empty.txt").read_bytes() == b""
    assert s.recovered().finished == {1}


def test_stream_ids_are_shared_and_never_reused(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    assert s.intake.next_stream == 0
    assert s.intake.open_stream() == 0
    assert s.intake.open_stream(3) == 3  # a dial named it in its Hello
    assert s.intake.next_stream == 4
    assert s.intake.open_stream() == 4
    s.intake.close_stream(3)
    assert s.intake.next_stream == 5


def test_a_closed_stream_gives_its_chunks_to_the_others(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    first, second = s.intake.open_stream(), s.intake.open_stream()
    s.ask(first)  # takes every chunk (window 8 > 5 chunks)
    with s.intake.lock:
        assert s.session.request(second) is None
    s.intake.close_stream(first)
    with s.intake.lock:
        assert s.session.request(second) is not None


def test_sync_makes_the_journaled_chunks_sure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = Setup(tmp_path)
    stream = s.intake.open_stream()
    s.ask(stream)
    s.offer(stream, 0, 0, piece(0, 0))
    s.intake.sync()  # too soon after the start: nothing happens
    assert set(s.recovered().sure) == set()
    monkeypatch.setattr(_intake, "SYNC_INTERVAL", 0.0)
    s.intake.sync()
    assert set(s.recovered().sure) == {(0, 0)}
    assert os.path.getsize(s.journal.path) > 0
