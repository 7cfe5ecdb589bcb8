"""The receiver's bookkeeping: the chunk schedule, what it accepts, and whole-file digests."""

from __future__ import annotations

import pytest

from ferry.protocol import (
    FILE_DIGEST_ALGORITHM,
    ChunkStart,
    ChunkTarget,
    LocalProtocolError,
    ReceiveSession,
    RemoteProtocolError,
    TooManyCorruptChunks,
    chunk_digest,
    file_digest,
)
from ferry.v1 import peer_pb2

CHUNK = 4


def requested(message: peer_pb2.PeerMessage | None) -> list[tuple[int, int]]:
    """The (file, chunk) pairs a ChunkRequest asks for, in wire order."""
    assert message is not None
    assert message.WhichOneof("kind") == "request"
    return [
        (r.file_index, c)
        for r in message.request.ranges
        for c in range(r.first_chunk, r.first_chunk + r.chunk_count)
    ]


def content(file_index: int, chunk_index: int, length: int) -> bytes:
    return bytes([(file_index * 31 + chunk_index + i) % 256 for i in range(length)])


def start(session: ReceiveSession, file_index: int, chunk_index: int) -> ChunkStart:
    """The ChunkStart an honest sender sends for a chunk."""
    length = session.chunk_length(file_index, chunk_index)
    digest = chunk_digest(content(file_index, chunk_index, length))
    return ChunkStart(file_index, chunk_index, digest, length)


def deliver(
    session: ReceiveSession, stream: int, file_index: int, chunk_index: int, ok: bool = True
) -> list[int]:
    ev = start(session, file_index, chunk_index)
    session.chunk_start(stream, ev)
    return session.chunk_done(stream, ev, ok)


def file_end(
    file_index: int, digest: bytes, algorithm: str = FILE_DIGEST_ALGORITHM
) -> peer_pb2.FileEnd:
    return peer_pb2.FileEnd(file_index=file_index, algorithm=algorithm, digest=digest)


def honest_digest(session: ReceiveSession, file_index: int, size: int) -> bytes:
    n = -(-size // session.chunk_size)
    return file_digest(
        chunk_digest(content(file_index, c, session.chunk_length(file_index, c))) for c in range(n)
    )


# -- construction ------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [0, -4])
def test_refuses_non_positive_chunk_size(chunk_size: int) -> None:
    with pytest.raises(LocalProtocolError, match="chunk size"):
        ReceiveSession([10], chunk_size)


def test_refuses_empty_window() -> None:
    with pytest.raises(LocalProtocolError, match="window"):
        ReceiveSession([10], CHUNK, window=0)


@pytest.mark.parametrize("size", [-1, -5])
def test_refuses_negative_file_size(size: int) -> None:
    # A manifest size is an int64. Taken as is, -1 passes for an empty file, and -5 gives
    # a file that is neither empty nor ever complete (nothing is requested, never done).
    with pytest.raises(LocalProtocolError, match="negative"):
        ReceiveSession([10, size], CHUNK)


def test_defaults() -> None:
    session = ReceiveSession([10], CHUNK)
    assert session.window == 8
    assert session.max_retries == 8
    assert session.retries == 0
    assert session.bytes_verified == 0


def test_no_files_is_done_at_once() -> None:
    session = ReceiveSession([], CHUNK)
    assert session.file_count == 0
    assert session.done
    assert session.empty_files() == []
    session.open_stream(0)
    assert session.request(0) is None


def test_has_in_flight() -> None:
    session = ReceiveSession([2 * CHUNK], CHUNK)
    assert not session.has_in_flight(0)  # unknown stream
    session.open_stream(0)
    assert not session.has_in_flight(0)
    session.request(0)
    assert session.has_in_flight(0)
    deliver(session, 0, 0, 0)
    assert session.has_in_flight(0)
    deliver(session, 0, 0, 1)
    assert not session.has_in_flight(0)
    session.request(0)
    assert not session.has_in_flight(0)  # nothing left to ask for
    session.stream_lost(0)
    assert not session.has_in_flight(0)


def test_open_stream_twice() -> None:
    session = ReceiveSession([10], CHUNK)
    session.open_stream(0)
    with pytest.raises(LocalProtocolError, match="already open"):
        session.open_stream(0)


# -- scheduling --------------------------------------------------------------------------


def test_chunk_lengths_last_chunk_shorter() -> None:
    session = ReceiveSession([9, 8, 1], CHUNK)
    assert [session.chunk_length(0, c) for c in range(3)] == [4, 4, 1]
    assert [session.chunk_length(1, c) for c in range(2)] == [4, 4]
    assert session.chunk_length(2, 0) == 1


def test_first_request_fills_the_window_in_file_order() -> None:
    session = ReceiveSession([10 * CHUNK], CHUNK, window=4)
    session.open_stream(0)
    message = session.request(0)
    assert requested(message) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert message is not None
    assert [(r.file_index, r.first_chunk, r.chunk_count) for r in message.request.ranges] == [
        (0, 0, 4)
    ]


def test_top_up_waits_for_half_the_window() -> None:
    session = ReceiveSession([20 * CHUNK], CHUNK, window=4)
    session.open_stream(0)
    assert requested(session.request(0)) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert session.request(0) is None  # window full
    deliver(session, 0, 0, 0)
    assert session.request(0) is None  # 1 free < half of 4
    deliver(session, 0, 0, 1)
    assert requested(session.request(0)) == [(0, 4), (0, 5)]  # 2 free: top up
    assert session.request(0) is None


def test_request_is_short_when_few_chunks_are_left() -> None:
    session = ReceiveSession([3 * CHUNK], CHUNK, window=8)
    session.open_stream(0)
    assert requested(session.request(0)) == [(0, 0), (0, 1), (0, 2)]
    for c in range(3):
        deliver(session, 0, 0, c)
    assert session.request(0) is None


def test_window_of_one() -> None:
    session = ReceiveSession([3 * CHUNK], CHUNK, window=1)
    session.open_stream(0)
    for c in range(3):
        assert requested(session.request(0)) == [(0, c)]
        assert session.request(0) is None
        deliver(session, 0, 0, c)
    assert session.request(0) is None


def test_odd_window_half_rounds_down() -> None:
    # window 3: "half the window" is 3 // 2 == 1 free slot.
    session = ReceiveSession([10 * CHUNK], CHUNK, window=3)
    session.open_stream(0)
    assert requested(session.request(0)) == [(0, 0), (0, 1), (0, 2)]
    deliver(session, 0, 0, 0)
    assert requested(session.request(0)) == [(0, 3)]


def test_multi_file_request_skips_empty_files() -> None:
    session = ReceiveSession([5, 0, 9, 0], CHUNK, window=8)
    assert session.file_count == 4
    assert session.empty_files() == [1, 3]
    session.open_stream(0)
    message = session.request(0)
    assert message is not None
    assert [(r.file_index, r.first_chunk, r.chunk_count) for r in message.request.ranges] == [
        (0, 0, 2),
        (2, 0, 3),
    ]
    assert session.request(0) is None


def test_streams_share_one_schedule() -> None:
    session = ReceiveSession([3 * CHUNK, 3 * CHUNK], CHUNK, window=2)
    session.open_stream(0)
    session.open_stream(1)
    assert requested(session.request(0)) == [(0, 0), (0, 1)]
    assert requested(session.request(1)) == [(0, 2), (1, 0)]
    deliver(session, 0, 0, 0)
    deliver(session, 0, 0, 1)
    assert requested(session.request(0)) == [(1, 1), (1, 2)]
    assert session.request(1) is None
    assert session.request(0) is None


def test_request_on_unopened_stream() -> None:
    session = ReceiveSession([10], CHUNK)
    with pytest.raises(KeyError):
        session.request(0)


def test_request_after_everything_is_verified() -> None:
    session = ReceiveSession([CHUNK], CHUNK, window=2)
    session.open_stream(0)
    assert requested(session.request(0)) == [(0, 0)]
    deliver(session, 0, 0, 0)
    assert session.request(0) is None
    assert session.request(0) is None  # the cursor stays at the end


# -- chunk_start -------------------------------------------------------------------------


def test_chunk_start_returns_the_target() -> None:
    session = ReceiveSession([9], CHUNK)
    session.open_stream(0)
    session.request(0)
    assert session.chunk_start(0, start(session, 0, 1)) == ChunkTarget(0, 1, 4, 4)
    assert session.chunk_start(0, start(session, 0, 2)) == ChunkTarget(0, 2, 8, 1)


def test_chunk_start_refuses_an_unrequested_chunk() -> None:
    session = ReceiveSession([20 * CHUNK], CHUNK, window=2)
    session.open_stream(0)
    session.request(0)
    with pytest.raises(RemoteProtocolError, match="chunk 5 of file 0, which was not asked"):
        session.chunk_start(0, start(session, 0, 5))


def test_chunk_start_refuses_a_chunk_of_an_unknown_file() -> None:
    session = ReceiveSession([CHUNK], CHUNK)
    session.open_stream(0)
    session.request(0)
    with pytest.raises(RemoteProtocolError, match="not asked for"):
        session.chunk_start(0, ChunkStart(3, 0, bytes(32), CHUNK))


def test_chunk_start_refuses_a_chunk_asked_for_on_another_stream() -> None:
    session = ReceiveSession([4 * CHUNK], CHUNK, window=2)
    session.open_stream(0)
    session.open_stream(1)
    assert requested(session.request(0)) == [(0, 0), (0, 1)]
    assert requested(session.request(1)) == [(0, 2), (0, 3)]
    with pytest.raises(RemoteProtocolError, match="not asked for"):
        session.chunk_start(1, start(session, 0, 0))


def test_chunk_start_on_an_unknown_stream() -> None:
    session = ReceiveSession([CHUNK], CHUNK)
    session.open_stream(0)
    session.request(0)
    with pytest.raises(RemoteProtocolError, match="not asked for"):
        session.chunk_start(7, start(session, 0, 0))


@pytest.mark.parametrize("length", [0, 1, 3, 5])
def test_chunk_start_refuses_the_wrong_length(length: int) -> None:
    session = ReceiveSession([2 * CHUNK], CHUNK)
    session.open_stream(0)
    session.request(0)
    with pytest.raises(RemoteProtocolError, match=f"sent {length} bytes for chunk 0"):
        session.chunk_start(0, ChunkStart(0, 0, bytes(32), length))


def test_chunk_start_refuses_a_full_length_last_chunk() -> None:
    session = ReceiveSession([CHUNK + 1], CHUNK)
    session.open_stream(0)
    session.request(0)
    with pytest.raises(RemoteProtocolError, match="it has 1"):
        session.chunk_start(0, ChunkStart(0, 1, bytes(32), CHUNK))


def test_chunk_is_refused_after_it_was_delivered() -> None:
    session = ReceiveSession([2 * CHUNK], CHUNK)
    session.open_stream(0)
    session.request(0)
    deliver(session, 0, 0, 0)
    with pytest.raises(RemoteProtocolError, match="not asked for"):
        session.chunk_start(0, start(session, 0, 0))


# -- chunk_done --------------------------------------------------------------------------


def test_chunk_done_reports_completed_files_and_counts_bytes() -> None:
    session = ReceiveSession([CHUNK + 1, CHUNK], CHUNK)
    session.open_stream(0)
    session.request(0)
    assert deliver(session, 0, 0, 1) == []
    assert session.bytes_verified == 1
    assert not session.file_complete(0)
    assert deliver(session, 0, 0, 0) == [0]
    assert session.file_complete(0)
    assert session.bytes_verified == CHUNK + 1
    assert deliver(session, 0, 1, 0) == [1]
    assert session.bytes_verified == 2 * CHUNK + 1


def test_empty_files_are_complete_from_the_start() -> None:
    session = ReceiveSession([0, CHUNK], CHUNK)
    assert session.file_complete(0)
    assert not session.file_complete(1)
    assert not session.file_confirmed(0)
    assert not session.done


def test_corrupt_chunk_is_asked_for_again_first() -> None:
    session = ReceiveSession([10 * CHUNK], CHUNK, window=2)
    session.open_stream(0)
    assert requested(session.request(0)) == [(0, 0), (0, 1)]
    assert deliver(session, 0, 0, 1, ok=False) == []
    assert session.retries == 1
    assert session.bytes_verified == 0
    # chunk 1 is pending again; it is not in flight any more
    with pytest.raises(RemoteProtocolError):
        session.chunk_start(0, start(session, 0, 1))
    deliver(session, 0, 0, 0)
    assert requested(session.request(0)) == [(0, 1), (0, 2)]
    assert deliver(session, 0, 0, 1) == []
    assert session.bytes_verified == 2 * CHUNK


def test_too_many_corrupt_chunks() -> None:
    session = ReceiveSession([2 * CHUNK], CHUNK, window=1, max_retries=2)
    session.open_stream(0)
    for attempt in range(2):
        assert requested(session.request(0)) == [(0, 0)]
        deliver(session, 0, 0, 0, ok=False)
        assert session.retries == attempt + 1
    assert requested(session.request(0)) == [(0, 0)]
    with pytest.raises(TooManyCorruptChunks, match="3 chunks failed"):
        deliver(session, 0, 0, 0, ok=False)
    assert issubclass(TooManyCorruptChunks, RemoteProtocolError)


def test_zero_retries_allowed() -> None:
    session = ReceiveSession([CHUNK], CHUNK, max_retries=0)
    session.open_stream(0)
    session.request(0)
    with pytest.raises(TooManyCorruptChunks):
        deliver(session, 0, 0, 0, ok=False)


def test_retries_count_over_all_chunks_and_streams() -> None:
    session = ReceiveSession([4 * CHUNK], CHUNK, window=2, max_retries=2)
    session.open_stream(0)
    session.open_stream(1)
    session.request(0)
    session.request(1)
    deliver(session, 0, 0, 0, ok=False)
    deliver(session, 1, 0, 2, ok=False)
    with pytest.raises(TooManyCorruptChunks):
        deliver(session, 1, 0, 3, ok=False)


def test_duplicate_verdict_is_ignored() -> None:
    session = ReceiveSession([2 * CHUNK], CHUNK)
    session.open_stream(0)
    session.request(0)
    ev = start(session, 0, 0)
    session.chunk_start(0, ev)
    assert session.chunk_done(0, ev, True) == []
    assert session.chunk_done(0, ev, True) == []
    assert session.bytes_verified == CHUNK
    assert not session.file_complete(0)


def test_requeued_chunk_already_verified_is_skipped() -> None:
    # Only reachable when the I/O layer reports a chunk twice: the queue then holds a
    # chunk that is already verified, and `request` must not ask for it again.
    session = ReceiveSession([3 * CHUNK], CHUNK, window=2)
    session.open_stream(0)
    assert requested(session.request(0)) == [(0, 0), (0, 1)]
    ev = start(session, 0, 0)
    session.chunk_start(0, ev)
    session.chunk_done(0, ev, False)  # queued again
    session.chunk_done(0, ev, True)  # then reported good
    deliver(session, 0, 0, 1)
    assert requested(session.request(0)) == [(0, 2)]


def test_verdict_for_a_chunk_never_requested_is_recorded_and_skipped() -> None:
    # `chunk_done` trusts its caller (the I/O layer calls it only after `chunk_start`
    # accepted the chunk); a verified chunk ahead of the cursor is then not asked for.
    session = ReceiveSession([3 * CHUNK], CHUNK, window=8)
    session.open_stream(0)
    assert session.chunk_done(0, start(session, 0, 1), True) == []
    assert requested(session.request(0)) == [(0, 0), (0, 2)]


# -- stream_lost -------------------------------------------------------------------------


def test_lost_stream_chunks_are_asked_for_again_first() -> None:
    session = ReceiveSession([12 * CHUNK], CHUNK, window=4)
    session.open_stream(0)
    session.open_stream(1)
    assert requested(session.request(0)) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert requested(session.request(1)) == [(0, 4), (0, 5), (0, 6), (0, 7)]
    deliver(session, 0, 0, 1)
    session.stream_lost(0)
    with pytest.raises(RemoteProtocolError):
        session.chunk_start(0, start(session, 0, 0))
    for c in (4, 5):
        deliver(session, 1, 0, c)
    assert requested(session.request(1)) == [(0, 0), (0, 2)]
    deliver(session, 1, 0, 6)
    deliver(session, 1, 0, 7)
    assert requested(session.request(1)) == [(0, 3), (0, 8)]


def test_lost_stream_chunks_go_to_a_new_stream() -> None:
    session = ReceiveSession([3 * CHUNK], CHUNK, window=8)
    session.open_stream(0)
    assert requested(session.request(0)) == [(0, 0), (0, 1), (0, 2)]
    session.stream_lost(0)
    session.open_stream(0)  # the index may be reused
    session.open_stream(1)
    assert requested(session.request(1)) == [(0, 0), (0, 1), (0, 2)]
    assert session.request(0) is None


def test_verdict_after_the_stream_was_lost() -> None:
    """The I/O layer hashes and writes outside the session's lock, so `stream_lost` (say,
    from a watchdog) can land between `chunk_start` and `chunk_done` of that stream. The
    late verdict must not crash the session, and a good chunk must not be fetched twice."""
    session = ReceiveSession([2 * CHUNK], CHUNK, window=2)
    session.open_stream(0)
    session.open_stream(1)
    assert requested(session.request(0)) == [(0, 0), (0, 1)]
    ev = start(session, 0, 0)
    session.chunk_start(0, ev)
    session.stream_lost(0)
    session.chunk_done(0, ev, True)
    assert requested(session.request(1)) == [(0, 1)]


def test_losing_an_unknown_stream_is_harmless() -> None:
    session = ReceiveSession([CHUNK], CHUNK)
    session.stream_lost(3)
    session.open_stream(0)
    session.stream_lost(0)
    session.stream_lost(0)
    session.open_stream(1)
    assert requested(session.request(1)) == [(0, 0)]


# -- whole files -------------------------------------------------------------------------


def complete(sizes: list[int]) -> ReceiveSession:
    session = ReceiveSession(sizes, CHUNK, window=64)
    session.open_stream(0)
    message = session.request(0)
    if message is not None:
        for f, c in requested(message):
            deliver(session, 0, f, c)
    return session


def test_digest_and_digest_request_need_a_complete_file() -> None:
    session = ReceiveSession([CHUNK], CHUNK)
    with pytest.raises(LocalProtocolError, match="not complete"):
        session.digest(0)
    with pytest.raises(LocalProtocolError, match="not complete"):
        session.digest_request(0)


def test_digest_request() -> None:
    session = complete([5, 0])
    message = session.digest_request(1)
    assert message.WhichOneof("kind") == "digest_request"
    assert message.digest_request.file_index == 1
    assert session.digest(1) == file_digest([])
    assert session.digest(0) == honest_digest(session, 0, 5)


def test_file_end_confirms_and_finishes() -> None:
    sizes = [5, 0, 2 * CHUNK]
    session = complete(sizes)
    assert all(session.file_complete(i) for i in range(3))
    for i, size in enumerate(sizes):
        assert not session.done
        session.file_end(file_end(i, honest_digest(session, i, size)))
        assert session.file_confirmed(i)
    assert session.done
    # a repeated FileEnd is harmless
    session.file_end(file_end(0, honest_digest(session, 0, 5)))
    assert session.done


def test_file_end_for_an_unknown_file() -> None:
    session = complete([5])
    with pytest.raises(RemoteProtocolError, match="unknown file 1"):
        session.file_end(file_end(1, b""))


def test_file_end_with_an_unknown_algorithm() -> None:
    session = complete([5])
    with pytest.raises(RemoteProtocolError, match="unknown digest algorithm 'sha256'"):
        session.file_end(file_end(0, honest_digest(session, 0, 5), "sha256"))
    with pytest.raises(RemoteProtocolError, match="algorithm ''"):
        session.file_end(file_end(0, honest_digest(session, 0, 5), ""))
    assert not session.file_confirmed(0)


def test_file_end_for_an_incomplete_file() -> None:
    session = ReceiveSession([2 * CHUNK], CHUNK)
    session.open_stream(0)
    session.request(0)
    deliver(session, 0, 0, 0)
    with pytest.raises(RemoteProtocolError, match="incomplete file 0"):
        session.file_end(file_end(0, b"x" * 32))


def test_file_end_with_a_wrong_digest() -> None:
    session = complete([5])
    with pytest.raises(RemoteProtocolError, match="does not match"):
        session.file_end(file_end(0, b"\0" * 32))
    assert not session.file_confirmed(0)
    assert not session.done


# -- digest requests ------------------------------------------------------------------------


def test_digests_are_claimed_once_and_come_back_when_the_stream_is_lost() -> None:
    session = ReceiveSession([0, 4, 0], 4)
    session.open_stream(0)
    session.open_stream(1)
    assert session.claim_digests(0) == [0, 2]  # empty files: due from the start
    assert session.claim_digests(1) == []
    session.stream_lost(0)
    assert session.claim_digests(1) == [0, 2]


def test_a_completed_file_is_due_once_and_not_after_its_confirmation() -> None:
    session = ReceiveSession([4], 4)
    session.open_stream(0)
    session.request(0)
    start = ChunkStart(0, 0, chunk_digest(b"abcd"), 4)
    assert session.chunk_done(0, start, True) == [0]
    assert session.claim_digests(0) == [0]
    assert session.claim_digests(0) == []
    end = peer_pb2.FileEnd(file_index=0, algorithm=FILE_DIGEST_ALGORITHM, digest=session.digest(0))
    session.file_end(end)
    session.stream_lost(0)
    session.open_stream(1)
    assert session.claim_digests(1) == []


def test_restored_and_confirmed_files() -> None:
    session = ReceiveSession([4, 4], 4)
    session.restore(0, 0, b"d" * 32)
    session.restore(1, 0, b"e" * 32)
    session.mark_confirmed(1)
    session.open_stream(0)
    assert session.claim_digests(0) == [0]
