"""The sender's bookkeeping: requests checked against the manifest, digests of sent chunks."""

from __future__ import annotations

import pytest

from ferry.protocol import (
    FILE_DIGEST_ALGORITHM,
    ChunkWork,
    LocalProtocolError,
    RemoteProtocolError,
    SendSession,
    chunk_digest,
    file_digest,
)
from ferry.protocol.sender import MAX_REQUEST_CHUNKS
from ferry.v1 import peer_pb2

CHUNK = 4


def request(*ranges: tuple[int, int, int]) -> peer_pb2.ChunkRequest:
    message = peer_pb2.ChunkRequest()
    for file_index, first, count in ranges:
        message.ranges.add(file_index=file_index, first_chunk=first, chunk_count=count)
    return message


def digest_of(work: ChunkWork) -> bytes:
    return chunk_digest(bytes([work.file_index, work.chunk_index % 256]) * work.length)


@pytest.mark.parametrize("chunk_size", [0, -1])
def test_refuses_non_positive_chunk_size(chunk_size: int) -> None:
    with pytest.raises(LocalProtocolError, match="chunk size"):
        SendSession([10], chunk_size)


@pytest.mark.parametrize("size", [-1, -5])
def test_refuses_negative_file_size(size: int) -> None:
    with pytest.raises(LocalProtocolError, match="negative"):
        SendSession([size], CHUNK)


def test_on_request_lists_the_work_in_order() -> None:
    session = SendSession([9, 0, 3 * CHUNK], CHUNK)
    assert session.chunk_size == CHUNK
    work = session.on_request(request((2, 1, 2), (0, 0, 3)))
    assert work == [
        ChunkWork(2, 1, 4, 4),
        ChunkWork(2, 2, 8, 4),
        ChunkWork(0, 0, 0, 4),
        ChunkWork(0, 1, 4, 4),
        ChunkWork(0, 2, 8, 1),  # the last chunk is shorter
    ]


def test_empty_request_asks_for_nothing() -> None:
    assert SendSession([9], CHUNK).on_request(request()) == []


def test_unknown_file() -> None:
    session = SendSession([9], CHUNK)
    with pytest.raises(RemoteProtocolError, match="unknown file 1"):
        session.on_request(request((1, 0, 1)))


@pytest.mark.parametrize(
    ("first", "count"),
    [(0, 0), (0, 4), (1, 3), (3, 1), (2, 2), (2**64 - 1, 1)],
)
def test_range_out_of_bounds(first: int, count: int) -> None:
    session = SendSession([9], CHUNK)  # 3 chunks
    with pytest.raises(RemoteProtocolError, match=f"chunks {first}..\\+{count} of file 0"):
        session.on_request(request((0, first, count)))


def test_no_chunk_of_an_empty_file() -> None:
    session = SendSession([0], CHUNK)
    with pytest.raises(RemoteProtocolError, match="which has 0"):
        session.on_request(request((0, 0, 1)))


def test_one_bad_range_spoils_the_request() -> None:
    session = SendSession([9], CHUNK)
    with pytest.raises(RemoteProtocolError):
        session.on_request(request((0, 0, 1), (0, 3, 1)))


def test_largest_request() -> None:
    session = SendSession([MAX_REQUEST_CHUNKS], 1)
    work = session.on_request(request((0, 0, MAX_REQUEST_CHUNKS)))
    assert len(work) == MAX_REQUEST_CHUNKS


@pytest.mark.parametrize(
    "ranges",
    [
        [(0, 0, MAX_REQUEST_CHUNKS + 1)],
        [(0, 0, MAX_REQUEST_CHUNKS), (0, 0, 1)],
        [(0, 0, 2**63)],
    ],
)
def test_too_many_chunks_at_once(ranges: list[tuple[int, int, int]]) -> None:
    session = SendSession([2 * MAX_REQUEST_CHUNKS], 1)
    with pytest.raises(RemoteProtocolError, match="chunks at once"):
        session.on_request(request(*ranges))


def test_missing_digests_and_file_end() -> None:
    session = SendSession([9, 0], CHUNK)
    assert session.missing_digests(0) == [
        ChunkWork(0, 0, 0, 4),
        ChunkWork(0, 1, 4, 4),
        ChunkWork(0, 2, 8, 1),
    ]
    assert session.missing_digests(1) == []
    assert session.digest(0) is None
    assert session.digest(1) == file_digest([])
    with pytest.raises(RemoteProtocolError, match="digest of file 0 asked before its chunks"):
        session.file_end(0)
    work = session.on_request(request((0, 0, 3)))
    for w in reversed(work):  # order of recording does not matter
        session.chunk_sent(w, digest_of(w))
        if w.chunk_index == 1:
            assert session.missing_digests(0) == [ChunkWork(0, 0, 0, 4)]
    assert session.missing_digests(0) == []
    assert session.digest(0) == file_digest(digest_of(w) for w in work)
    message = session.file_end(0)
    assert message.WhichOneof("kind") == "file_end"
    assert message.file_end.file_index == 0
    assert message.file_end.algorithm == FILE_DIGEST_ALGORITHM
    assert message.file_end.digest == file_digest(digest_of(w) for w in work)


def test_file_end_of_an_empty_file() -> None:
    message = SendSession([0], CHUNK).file_end(0)
    assert message.file_end.digest == file_digest([])


def test_file_end_after_partial_digests() -> None:
    session = SendSession([9], CHUNK)
    for w in session.on_request(request((0, 0, 2))):
        session.chunk_sent(w, digest_of(w))
    with pytest.raises(RemoteProtocolError, match="before its chunks"):
        session.file_end(0)


def test_resend_records_the_latest_digest() -> None:
    session = SendSession([CHUNK], CHUNK)
    (w,) = session.on_request(request((0, 0, 1)))
    session.chunk_sent(w, b"a" * 32)
    session.chunk_sent(w, b"b" * 32)
    assert session.file_end(0).file_end.digest == file_digest([b"b" * 32])


@pytest.mark.parametrize("file_index", [2, -1])
def test_unknown_file_for_digests(file_index: int) -> None:
    session = SendSession([9, 0], CHUNK)
    with pytest.raises(RemoteProtocolError, match=f"unknown file {file_index}"):
        session.missing_digests(file_index)
    with pytest.raises(RemoteProtocolError, match=f"unknown file {file_index}"):
        session.file_end(file_index)
    with pytest.raises(RemoteProtocolError, match=f"unknown file {file_index}"):
        session.digest(file_index)
