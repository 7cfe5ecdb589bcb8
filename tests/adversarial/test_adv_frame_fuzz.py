"""Fuzzing the peer protocol's parsers: whatever a peer sends, only the protocol's own errors.

A hostile peer controls every byte after the knock. Hypothesis builds streams out of
well-formed frames carrying arbitrary PeerMessages, CONTROL frames with arbitrary bodies,
CHUNK frames with arbitrary heads and lengths, and plain garbage, and feeds them to the
sans-I/O `FrameReader`, `SenderConnection` and `ReceiverConnection` exactly as the I/O layer
does (`wanted` bytes at a time). Each must answer with events, or with ProtocolError or
PeerAborted -- never another exception -- and what it asks the I/O layer to buffer (`wanted`)
and what it queues (the sender's requested chunks) stay within stated bounds. The knock
checker likewise refuses arbitrary bytes with BadKnock only.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferry.protocol import (
    NEED_DATA,
    ChunkData,
    ChunksRequested,
    Event,
    FrameReader,
    PeerAborted,
    ProtocolError,
    ReceiverConnection,
    ReceiveSession,
    SenderConnection,
    SendSession,
    chunk_digest,
    encode_control,
)
from ferry.protocol.frames import CHUNK_HEAD_SIZE, DIGEST_SIZE, MAX_CONTROL_SIZE, FrameType
from ferry.protocol.knock import KNOCK_MAGIC, KNOCK_SIZE, BadKnock, Knocker
from ferry.protocol.sender import MAX_OUTSTANDING_CHUNKS
from ferry.v1 import peer_pb2

SESSION = "sessions/fuzz"
CHUNK = 16
SIZES = [40, 0, 16]  # three files: 3 chunks, none, 1 chunk
FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

u32 = st.integers(0, 2**32 - 1)
u64 = st.one_of(st.integers(0, 8), st.integers(0, 2**64 - 1))
small_index = st.one_of(st.integers(0, 4), u32)


@st.composite
def messages(draw: st.DrawFn) -> peer_pb2.PeerMessage:
    """A PeerMessage of any kind with arbitrary (often plausible) fields."""
    m = peer_pb2.PeerMessage()
    kind = draw(
        st.sampled_from(["hello", "request", "file_end", "done", "abort", "digest_request"])
    )
    if kind == "hello":
        m.hello.session = draw(st.one_of(st.just(SESSION), st.text(max_size=20)))
        m.hello.protocol_version = draw(st.integers(0, 3))
        m.hello.stream_index = draw(small_index)
    elif kind == "request":
        m.request.SetInParent()
        ranges = st.tuples(small_index, u64, st.one_of(st.integers(0, 5), st.integers(0, 9000)))
        for file_index, first, count in draw(st.lists(ranges, max_size=6)):
            m.request.ranges.add(file_index=file_index, first_chunk=first, chunk_count=count)
    elif kind == "file_end":
        m.file_end.file_index = draw(small_index)
        m.file_end.algorithm = draw(st.sampled_from(["blake3-chunks", "", "md5"]))
        m.file_end.digest = draw(st.binary(max_size=40))
    elif kind == "done":
        m.done.SetInParent()
    elif kind == "abort":
        m.abort.reason = draw(st.text(max_size=30))
        m.abort.retryable = draw(st.booleans())
    else:
        m.digest_request.file_index = draw(small_index)
    return m


def _header(kind: int, length: int) -> bytes:
    return bytes([kind]) + b"\0\0\0" + struct.pack(">I", length)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """One piece of a stream: a frame (well-formed or not) or garbage."""
    choice = draw(st.integers(0, 4))
    if choice == 0:
        return encode_control(draw(messages()))
    if choice == 1:  # a CONTROL frame whose body is anything
        body = draw(st.binary(max_size=64))
        return _header(FrameType.CONTROL, len(body)) + body
    if choice == 2:  # a CHUNK frame, its length maybe lying
        payload = draw(st.binary(max_size=2 * CHUNK))
        digest = draw(st.sampled_from([chunk_digest(payload) if payload else b"", b""]))
        digest = (digest or draw(st.binary(min_size=DIGEST_SIZE, max_size=DIGEST_SIZE)))[:32]
        head = struct.pack(">IQ32s", draw(small_index), draw(u64), digest)
        length = draw(st.one_of(st.just(CHUNK_HEAD_SIZE + len(payload)), u32))
        return _header(FrameType.CHUNK, length) + head + payload
    if choice == 3:  # a header with any type and length, nothing after
        return bytes([draw(st.integers(0, 255))]) + draw(st.binary(min_size=7, max_size=7))
    return draw(st.binary(max_size=64))


streams = st.lists(frames(), max_size=12).map(b"".join)

#: The most a parser may ask the I/O layer to buffer at once.
WANTED_BOUND = max(MAX_CONTROL_SIZE, CHUNK)


def _events(conn: SenderConnection | ReceiverConnection, data: bytes) -> Iterator[Event]:
    """Feed ``data`` as the I/O layer does (`wanted` bytes at a time); yield the events.

    Stops where the stream ends inside a frame (the I/O layer would wait for more)."""
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        n = conn.wanted
        assert 0 < n <= WANTED_BOUND
        if n > len(view) - pos:
            return
        conn.receive_data(view[pos : pos + n])
        pos += n
        event = conn.next_event()
        if event is not NEED_DATA:
            assert isinstance(event, Event)
            yield event


def _hello() -> bytes:
    m = peer_pb2.PeerMessage()
    m.hello.session = SESSION
    m.hello.protocol_version = 1
    return encode_control(m)


@FUZZ
@given(streams)
def test_frame_reader_takes_any_stream(data: bytes) -> None:
    reader = FrameReader(max_payload=CHUNK)
    pos = 0
    try:
        while pos < len(data):
            n = reader.wanted
            assert 0 < n <= WANTED_BOUND
            if n > len(data) - pos:
                return
            reader.feed(memoryview(data)[pos : pos + n])
            pos += n
    except ProtocolError:
        return


@FUZZ
@given(streams, st.booleans(), st.booleans())
def test_sender_connection_takes_any_stream(data: bytes, greet: bool, drain: bool) -> None:
    """The sender, greeted properly or not, meets any stream; its queue stays in the window."""
    conn = SenderConnection(SESSION, SendSession(SIZES, CHUNK))
    try:
        if greet:
            list(_events(conn, _hello()))
            conn.send_hello()
        for event in _events(conn, data):
            if isinstance(event, ChunksRequested) and drain:
                while conn.work:  # the I/O layer sends them
                    conn.send_chunk(conn.work[0], bytes(DIGEST_SIZE))
            assert len(conn.work) <= MAX_OUTSTANDING_CHUNKS
    except (ProtocolError, PeerAborted):
        pass
    assert len(conn.work) <= MAX_OUTSTANDING_CHUNKS


@FUZZ
@given(streams, st.booleans())
def test_receiver_connection_takes_any_stream(data: bytes, verdict: bool) -> None:
    """The receiver, having said Hello and asked for a window of chunks, meets any stream."""
    session = ReceiveSession(SIZES, CHUNK, window=4)
    conn = ReceiverConnection(SESSION, 0, session)
    conn.send_hello()
    session.open_stream(0)
    try:
        list(_events(conn, _hello()))
        conn.next_requests()
        for event in _events(conn, data):
            if isinstance(event, ChunkData):
                conn.chunk_checked(verdict)
    except (ProtocolError, PeerAborted):
        pass


@FUZZ
@given(st.binary(max_size=2 * KNOCK_SIZE), st.integers(0, 2**32 - 1), st.binary(min_size=16))
def test_knock_checker_refuses_anything_but_its_knock(
    data: bytes, stream: int, nonce: bytes
) -> None:
    knocker = Knocker(bytes(range(32)), SESSION, 1)
    forged = KNOCK_MAGIC + data[: KNOCK_SIZE - len(KNOCK_MAGIC)]
    for attempt in (data, forged):
        try:
            knocker.check(attempt)
        except BadKnock:
            pass
        else:  # a 2**-256 chance: only the knock itself passes
            raise AssertionError("a made-up knock passed")
        assert Knocker.refuses_prefix(attempt) == (attempt[:4] != KNOCK_MAGIC[: len(attempt)])
    right = knocker.knock(stream, nonce[:16])
    assert not Knocker.refuses_prefix(right)
    assert knocker.check(right) == stream
    try:
        knocker.check(right)
    except BadKnock:
        pass
    else:
        raise AssertionError("a knock was accepted twice")
