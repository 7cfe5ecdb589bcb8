"""The frame layer: encoders and `FrameReader` round-trip, and every way a stream is refused."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.protocol import (
    ChunkPayload,
    ChunkStart,
    Control,
    FrameReader,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    abort,
    chunk_digest,
    done,
    encode_chunk_head,
    encode_control,
    hello,
)
from ferry.protocol.frames import (
    CHUNK_HEAD_SIZE,
    DIGEST_SIZE,
    HEADER_SIZE,
    MAX_CHUNK_PAYLOAD,
    MAX_CONTROL_SIZE,
    Event,
    FrameType,
)
from ferry.v1 import peer_pb2

DIGEST = bytes(range(DIGEST_SIZE))


def parse(reader: FrameReader, stream: bytes) -> list[Event]:
    """Feed ``stream`` to ``reader`` in exactly the pieces it asks for; return the events."""
    events: list[Event] = []
    view = memoryview(stream)
    pos = 0
    while pos < len(view):
        n = reader.wanted
        assert 0 < n <= len(view) - pos, "stream ends inside a frame"
        event = reader.feed(view[pos : pos + n])
        pos += n
        if event is not None:
            events.append(event)
    return events


def header(kind: int, length: int, reserved: bytes = b"\0\0\0") -> bytes:
    return bytes([kind]) + reserved + struct.pack(">I", length)


def request_message(*ranges: tuple[int, int, int]) -> peer_pb2.PeerMessage:
    message = peer_pb2.PeerMessage()
    for file_index, first, count in ranges:
        message.request.ranges.add(file_index=file_index, first_chunk=first, chunk_count=count)
    return message


# -- round trips -------------------------------------------------------------------------


def test_control_round_trip() -> None:
    message = hello("sessions/abc", 3)
    reader = FrameReader()
    assert reader.at_frame_boundary
    assert not reader.expecting_payload
    assert reader.wanted == HEADER_SIZE
    frame = encode_control(message)
    assert frame[0] == FrameType.CONTROL
    assert reader.feed(frame[:HEADER_SIZE]) is None
    assert not reader.at_frame_boundary
    assert not reader.expecting_payload
    assert reader.wanted == len(frame) - HEADER_SIZE
    event = reader.feed(frame[HEADER_SIZE:])
    assert event == Control(message)
    assert reader.at_frame_boundary
    assert reader.wanted == HEADER_SIZE


def test_chunk_round_trip_returns_the_fed_view() -> None:
    payload = b"hello, ferry"
    digest = chunk_digest(payload)
    head = encode_chunk_head(7, 2**40, digest, len(payload))
    assert len(head) == HEADER_SIZE + CHUNK_HEAD_SIZE
    reader = FrameReader()
    assert reader.feed(head[:HEADER_SIZE]) is None
    assert reader.wanted == CHUNK_HEAD_SIZE
    assert not reader.at_frame_boundary
    assert not reader.expecting_payload
    start = reader.feed(memoryview(head[HEADER_SIZE:]))
    assert start == ChunkStart(7, 2**40, digest, len(payload))
    assert reader.wanted == len(payload)
    assert reader.expecting_payload
    assert not reader.at_frame_boundary
    buffer = bytearray(payload)
    view = memoryview(buffer)
    event = reader.feed(view)
    assert isinstance(event, ChunkPayload)
    assert event.data is view  # no copy
    assert reader.at_frame_boundary
    assert not reader.expecting_payload
    assert reader.wanted == HEADER_SIZE


def test_chunk_payload_given_as_bytes_comes_back_as_a_view() -> None:
    reader = FrameReader()
    parse(reader, encode_chunk_head(0, 0, DIGEST, 3))
    event = reader.feed(b"abc")
    assert isinstance(event, ChunkPayload)
    assert isinstance(event.data, memoryview)
    assert bytes(event.data) == b"abc"


def test_several_frames_back_to_back() -> None:
    stream = (
        encode_control(hello("sessions/s", 0))
        + encode_chunk_head(1, 2, DIGEST, 4)
        + b"data"
        + encode_control(done())
    )
    events = parse(FrameReader(), stream)
    assert events == [
        Control(hello("sessions/s", 0)),
        ChunkStart(1, 2, DIGEST, 4),
        ChunkPayload(memoryview(b"data")),
        Control(done()),
    ]


def test_largest_control_frame_is_accepted() -> None:
    message = abort("")
    # Tags and 3-byte length prefixes of Abort and of its reason take 8 bytes.
    message.abort.reason = "x" * (MAX_CONTROL_SIZE - 8)
    frame = encode_control(message)
    assert len(frame) - HEADER_SIZE == MAX_CONTROL_SIZE
    assert parse(FrameReader(), frame) == [Control(message)]


def test_largest_chunk_payload_header_is_accepted() -> None:
    reader = FrameReader(max_payload=10)
    reader.feed(encode_chunk_head(0, 0, DIGEST, 10)[:HEADER_SIZE])
    reader.feed(bytes(CHUNK_HEAD_SIZE))
    assert reader.wanted == 10


# -- encoder errors ----------------------------------------------------------------------


def test_encode_control_refuses_oversize_message() -> None:
    message = abort("")
    message.abort.reason = "x" * MAX_CONTROL_SIZE
    with pytest.raises(LocalProtocolError, match="too large"):
        encode_control(message)


@pytest.mark.parametrize("digest", [b"", b"x" * 31, b"x" * 33])
def test_encode_chunk_head_refuses_wrong_digest_size(digest: bytes) -> None:
    with pytest.raises(LocalProtocolError, match="32 bytes"):
        encode_chunk_head(0, 0, digest, 1)


@pytest.mark.parametrize("length", [-1, MAX_CHUNK_PAYLOAD + 1])
def test_encode_chunk_head_refuses_out_of_bounds_length(length: int) -> None:
    with pytest.raises(LocalProtocolError, match="out of bounds"):
        encode_chunk_head(0, 0, DIGEST, length)


def test_encode_chunk_head_accepts_the_largest_payload() -> None:
    head = encode_chunk_head(0, 0, DIGEST, MAX_CHUNK_PAYLOAD)
    assert struct.unpack(">I", head[4:8]) == (CHUNK_HEAD_SIZE + MAX_CHUNK_PAYLOAD,)


def test_encode_chunk_head_refuses_what_the_reader_refuses() -> None:
    """A zero-length chunk frame is a protocol violation (`FrameReader` rejects it), so the
    encoder must not produce one: the error belongs on the side that made the mistake."""
    with pytest.raises(LocalProtocolError):
        encode_chunk_head(0, 0, DIGEST, 0)


# -- reader errors -----------------------------------------------------------------------


def assert_broken(reader: FrameReader) -> None:
    """After an error the reader wants nothing and refuses everything."""
    assert reader.wanted == 0
    assert not reader.at_frame_boundary
    assert not reader.expecting_payload
    with pytest.raises(LocalProtocolError, match="broken"):
        reader.feed(b"")
    with pytest.raises(LocalProtocolError, match="wanted"):
        reader.feed(encode_control(done())[:HEADER_SIZE])


@pytest.mark.parametrize("reserved", [b"\1\0\0", b"\0\1\0", b"\0\0\xff"])
def test_non_zero_reserved_bytes(reserved: bytes) -> None:
    reader = FrameReader()
    with pytest.raises(RemoteProtocolError, match="reserved"):
        reader.feed(header(FrameType.CONTROL, 2, reserved))
    assert_broken(reader)


@pytest.mark.parametrize("kind", [0, 3, 255])
def test_unknown_frame_type(kind: int) -> None:
    reader = FrameReader()
    with pytest.raises(RemoteProtocolError, match=f"unknown frame type {kind}"):
        reader.feed(header(kind, 2))
    assert_broken(reader)


def test_oversize_control_frame() -> None:
    reader = FrameReader()
    with pytest.raises(RemoteProtocolError, match="exceeds the limit"):
        reader.feed(header(FrameType.CONTROL, MAX_CONTROL_SIZE + 1))
    assert_broken(reader)


def test_empty_control_frame() -> None:
    reader = FrameReader()
    with pytest.raises(RemoteProtocolError, match="empty control frame"):
        reader.feed(header(FrameType.CONTROL, 0))
    assert_broken(reader)


@pytest.mark.parametrize(
    "length",
    [0, CHUNK_HEAD_SIZE - 1, CHUNK_HEAD_SIZE, CHUNK_HEAD_SIZE + 17, 2**32 - 1],
)
def test_chunk_frame_payload_out_of_bounds(length: int) -> None:
    reader = FrameReader(max_payload=16)
    with pytest.raises(RemoteProtocolError, match="out of bounds"):
        reader.feed(header(FrameType.CHUNK, length))
    assert_broken(reader)


def test_default_max_payload() -> None:
    reader = FrameReader()
    with pytest.raises(RemoteProtocolError, match="out of bounds"):
        reader.feed(header(FrameType.CHUNK, CHUNK_HEAD_SIZE + MAX_CHUNK_PAYLOAD + 1))


def test_undecodable_control_body() -> None:
    reader = FrameReader()
    body = b"\x0a\x05ab"  # field 1, length 5, only 2 bytes follow
    reader.feed(header(FrameType.CONTROL, len(body)))
    with pytest.raises(RemoteProtocolError, match="valid PeerMessage"):
        reader.feed(body)
    assert_broken(reader)


def test_control_message_of_unknown_kind() -> None:
    # An empty PeerMessage with an unknown field 10 (varint): decodes, but has no kind.
    body = b"\x50\x01"
    probe = peer_pb2.PeerMessage()
    probe.ParseFromString(body)
    assert probe.WhichOneof("kind") is None
    reader = FrameReader()
    reader.feed(header(FrameType.CONTROL, len(body)))
    with pytest.raises(RemoteProtocolError, match="unknown kind"):
        reader.feed(body)
    assert_broken(reader)


@pytest.mark.parametrize("state", ["header", "control", "chunk_head", "payload"])
@pytest.mark.parametrize("delta", [-1, 1])
def test_feeding_the_wrong_number_of_bytes(state: str, delta: int) -> None:
    reader = FrameReader()
    if state == "control":
        reader.feed(encode_control(done())[:HEADER_SIZE])
    elif state == "chunk_head":
        reader.feed(encode_chunk_head(0, 0, DIGEST, 5)[:HEADER_SIZE])
    elif state == "payload":
        parse(reader, encode_chunk_head(0, 0, DIGEST, 5))
    wanted = reader.wanted
    with pytest.raises(LocalProtocolError, match=f"{wanted} wanted"):
        reader.feed(bytes(wanted + delta))
    # A local mistake does not break the reader: the right count still works.
    assert reader.wanted == wanted


def test_errors_are_protocol_errors() -> None:
    assert issubclass(LocalProtocolError, ProtocolError)
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert not issubclass(LocalProtocolError, RemoteProtocolError)


# -- property: any sequence of frames parses back to the same events ---------------------

hellos = st.builds(hello, st.text(max_size=40), st.integers(0, 2**32 - 1))
aborts = st.builds(abort, st.text(max_size=40))
dones = st.just(done())
requests = st.lists(
    st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
    min_size=1,
    max_size=5,
).map(lambda ranges: request_message(*ranges))


def _file_end(file_index: int, digest: bytes) -> peer_pb2.PeerMessage:
    message = peer_pb2.PeerMessage()
    message.file_end.file_index = file_index
    message.file_end.algorithm = "blake3-chunks"
    message.file_end.digest = digest
    return message


def _digest_request(file_index: int) -> peer_pb2.PeerMessage:
    message = peer_pb2.PeerMessage()
    message.digest_request.file_index = file_index
    return message


file_ends = st.builds(_file_end, st.integers(0, 2**32 - 1), st.binary(max_size=32))
digest_requests = st.builds(_digest_request, st.integers(0, 2**32 - 1))
controls = st.one_of(hellos, aborts, dones, requests, file_ends, digest_requests)
chunks = st.tuples(
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**64 - 1),
    st.binary(min_size=DIGEST_SIZE, max_size=DIGEST_SIZE),
    st.binary(min_size=1, max_size=64),
)
frames = st.lists(st.one_of(controls, chunks), max_size=12)


@settings(deadline=None, max_examples=150)
@given(frames)
def test_random_frames_round_trip(
    items: list[peer_pb2.PeerMessage | tuple[int, int, bytes, bytes]],
) -> None:
    stream = bytearray()
    expected: list[Event] = []
    for item in items:
        if isinstance(item, peer_pb2.PeerMessage):
            stream += encode_control(item)
            expected.append(Control(item))
        else:
            file_index, chunk_index, digest, payload = item
            stream += encode_chunk_head(file_index, chunk_index, digest, len(payload))
            stream += payload
            expected.append(ChunkStart(file_index, chunk_index, digest, len(payload)))
            expected.append(ChunkPayload(memoryview(payload)))
    reader = FrameReader()
    assert parse(reader, bytes(stream)) == expected
    assert reader.at_frame_boundary
