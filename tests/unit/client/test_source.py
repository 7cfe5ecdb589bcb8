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


# --- Finding 11: nothing is followed between the offer and the read -----------------


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_file_swapped_for_a_symlink_is_refused_before_a_byte_is_read(tmp_path: Path) -> None:
    secret = tmp_path / "outside"
    secret.write_bytes(b"s" * 40)
    source = offer(tmp_path, data(40))
    source.paths[0].unlink()
    source.paths[0].symlink_to(secret)
    with pytest.raises(SourceChanged, match="changed since it was offered: it is now a symlink"):
        source.fd(0)
    assert source._fds == {}


def test_a_symlink_to_a_fifo_neither_blocks_nor_is_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    source = offer(tmp_path, data(40))
    source.paths[0].unlink()
    source.paths[0].symlink_to(fifo)
    with pytest.raises(SourceChanged, match="symlink"):
        source.fd(0)
    with pytest.raises(SourceChanged, match="symlink"):
        source.fill_digests(SendSession([40], CHUNK), stamped=False)
    # Nobody opened it for reading: a writer that does not wait finds no reader.
    with pytest.raises(OSError, match="No such device or address"):
        os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)


def test_a_fifo_in_place_of_the_file_is_not_read(tmp_path: Path) -> None:
    source = offer(tmp_path, data(40))
    source.paths[0].unlink()
    os.mkfifo(source.paths[0])
    with pytest.raises(SourceChanged, match="no longer a regular file"):
        source.fill_digests(SendSession([40], CHUNK), stamped=False)
    with pytest.raises(SourceChanged, match="no longer a regular file"):
        source.fd(0)


def test_a_folder_on_the_path_swapped_for_a_symlink_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "album" / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    inside = tmp_path / "album" / "sub" / "b.txt"
    inside.write_bytes(data(40))
    source = Source([inside], [SourceStamp.of(os.stat(inside))], CHUNK)
    # The same file, reached through a link: even its own inode is not read that way.
    os.rename(tmp_path / "album" / "sub", tmp_path / "elsewhere" / "sub")
    (tmp_path / "album" / "sub").symlink_to(tmp_path / "elsewhere" / "sub")
    with pytest.raises(SourceChanged, match="a folder on its path is now a symlink"):
        source.fd(0)


def test_another_file_with_the_same_size_and_mtime_is_refused(tmp_path: Path) -> None:
    source = offer(tmp_path, data(40))
    st = os.stat(source.paths[0])
    other = tmp_path / "other"
    other.write_bytes(data(40, 9))
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, source.paths[0])
    with pytest.raises(SourceChanged, match="changed since it was offered"):
        source.fd(0)


def test_one_folder_descriptor_is_kept_and_closed(tmp_path: Path) -> None:
    before = open_fds()
    source = offer(tmp_path, data(40), data(20), data(0))
    for i in range(3):
        source.fd(i)
        source.release(i)
    assert len(open_fds() - before) == 1  # the folder of the files, kept for the next open
    source.close()
    assert open_fds() == before
    source.fill_digests(SendSession([40, 20, 0], CHUNK), stamped=False)
    assert open_fds() == before
