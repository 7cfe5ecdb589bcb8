"""The sender's one source, on real files: lazy checked opens, reads, digests, changes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ferry.client._source import Source, SourceChanged, digest_file
from ferry.files import SourceStamp
from ferry.protocol import SendSession, chunk_digest, file_digest
from ferry.v1 import peer_pb2

CHUNK = 16


def data(n: int, seed: int = 0) -> bytes:
    return bytes((seed * 31 + i * 7) % 251 for i in range(n))


def offer(tmp_path: Path, *contents: bytes) -> Source:
    """Files with ``contents``, stamped as they are now."""
    paths = []
    for i, body in enumerate(contents):
        path = tmp_path / f"f{i}.bin"
        path.write_bytes(body)
        paths.append(path)
    stamps = [SourceStamp.of(os.stat(p)) for p in paths]
    return Source(paths, stamps, CHUNK)


def expected_digest(body: bytes) -> bytes:
    return file_digest(chunk_digest(body[at : at + CHUNK]) for at in range(0, len(body), CHUNK))


def touch_later(path: Path) -> None:
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_a_chunk_is_read_into_the_callers_buffer(tmp_path: Path) -> None:
    body = data(40)
    source = offer(tmp_path, body)
    buffer = memoryview(bytearray(CHUNK + 8))
    source.read(0, CHUNK, buffer[8:])
    assert bytes(buffer[8:]) == body[CHUNK : 2 * CHUNK]
    fd = source.fd(0)
    source.read(0, 32, buffer[:8])
    assert source.fd(0) == fd  # opened once, kept open
    assert bytes(buffer[:8]) == body[32:]
    source.close()


def test_a_file_changed_before_it_is_opened_is_refused(tmp_path: Path) -> None:
    source = offer(tmp_path, data(40))
    touch_later(source.paths[0])
    with pytest.raises(SourceChanged, match="changed since it was offered"):
        source.read(0, 0, memoryview(bytearray(CHUNK)))
    assert source._fds == {}  # the refused descriptor was closed


def test_a_file_that_shrank_while_open_raises(tmp_path: Path) -> None:
    source = offer(tmp_path, data(40))
    source.fd(0)
    os.truncate(source.paths[0], 20)
    with pytest.raises(SourceChanged, match="shrank since it was offered"):
        source.read(0, CHUNK, memoryview(bytearray(CHUNK)))
    with pytest.raises(SourceChanged, match="changed since it was offered"):
        source.check_unchanged(0)
    source.close()


def test_a_file_written_to_while_open_is_not_vouched_for(tmp_path: Path) -> None:
    source = offer(tmp_path, data(40))
    source.read(0, 0, memoryview(bytearray(CHUNK)))
    source.check_unchanged(0)
    with open(source.paths[0], "r+b") as f:
        f.write(b"new")
    touch_later(source.paths[0])
    with pytest.raises(SourceChanged):
        source.check_unchanged(0)
    source.close()


def test_a_released_file_is_checked_again_when_reopened(tmp_path: Path) -> None:
    source = offer(tmp_path, data(40))
    source.fd(0)
    source.release(0)
    assert source._fds == {}
    touch_later(source.paths[0])
    with pytest.raises(SourceChanged):
        source.fd(0)


def test_fill_digests_hashes_only_what_the_session_lacks(tmp_path: Path) -> None:
    bodies = (data(40, 1), data(0), data(20, 2))
    source = offer(tmp_path, *bodies)
    session = SendSession([len(b) for b in bodies], CHUNK)
    request = peer_pb2.ChunkRequest()
    request.ranges.add(file_index=0, first_chunk=1, chunk_count=1)
    (work,) = session.on_request(request)
    session.chunk_sent(work, chunk_digest(bodies[0][CHUNK : 2 * CHUNK]))
    source.fill_digests(session)
    assert [session.digest(i) for i in range(3)] == [expected_digest(b) for b in bodies]
    source.close()


def test_fill_digests_reads_the_files_as_they_are_when_not_stamped(tmp_path: Path) -> None:
    source = offer(tmp_path, data(40))
    touch_later(source.paths[0])
    with pytest.raises(SourceChanged):
        source.fill_digests(SendSession([40], CHUNK))
    session = SendSession([40], CHUNK)
    source.fill_digests(session, stamped=False)
    assert session.digest(0) == expected_digest(data(40))
    assert source._fds == {}


def test_fill_digests_of_a_shrunk_file_raises(tmp_path: Path) -> None:
    source = offer(tmp_path, data(40))
    os.truncate(source.paths[0], 30)
    with pytest.raises(SourceChanged, match="shrank"):
        source.fill_digests(SendSession([40], CHUNK), stamped=False)


def test_file_digest_reads_every_chunk_and_closes(tmp_path: Path) -> None:
    bodies = (data(40, 3), data(0), data(CHUNK, 4))
    source = offer(tmp_path, *bodies)
    for i, body in enumerate(bodies):
        assert source.file_digest(i) == expected_digest(body)
        assert digest_file(source.paths[i], CHUNK) == expected_digest(body)
    assert source._fds == {}


def test_file_digest_refuses_a_changed_file_even_an_empty_one(tmp_path: Path) -> None:
    source = offer(tmp_path, data(0))
    touch_later(source.paths[0])
    with pytest.raises(SourceChanged):
        source.file_digest(0)
    assert source._fds == {}


def test_a_stamp_per_file_is_needed(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one stamp per source"):
        Source([tmp_path / "a"], [], CHUNK)
