"""Opening and closing a peer connection: Hello, Abort, Done."""

from __future__ import annotations

import pytest

from ferry.protocol import (
    PROTOCOL_VERSION,
    FrameReader,
    PeerAborted,
    RemoteProtocolError,
    abort,
    check_hello,
    done,
    encode_control,
    hello,
)
from ferry.protocol.frames import HEADER_SIZE, Control
from ferry.v1 import peer_pb2

SESSION = "sessions/0123"


def test_hello_fields() -> None:
    message = hello(SESSION, 5)
    assert message.WhichOneof("kind") == "hello"
    assert message.hello.session == SESSION
    assert message.hello.protocol_version == PROTOCOL_VERSION == 1
    assert message.hello.stream_index == 5


def test_check_hello_returns_the_stream_index() -> None:
    assert check_hello(hello(SESSION, 0), SESSION) == 0
    assert check_hello(hello(SESSION, 3), SESSION) == 3


def test_hello_survives_the_wire() -> None:
    frame = encode_control(hello(SESSION, 2))
    reader = FrameReader()
    reader.feed(frame[:HEADER_SIZE])
    event = reader.feed(frame[HEADER_SIZE:])
    assert isinstance(event, Control)
    assert check_hello(event.message, SESSION) == 2


def test_check_hello_raises_the_peers_abort_reason() -> None:
    with pytest.raises(PeerAborted, match=r"^disk full$"):
        check_hello(abort("disk full"), SESSION)


def test_check_hello_abort_without_reason() -> None:
    with pytest.raises(PeerAborted, match="the peer gave up"):
        check_hello(abort(""), SESSION)


def test_peer_aborted_is_not_a_protocol_error() -> None:
    # The peer giving up is not the peer breaking the protocol.
    assert not issubclass(PeerAborted, RemoteProtocolError)


def test_check_hello_refuses_another_kind() -> None:
    with pytest.raises(RemoteProtocolError, match="opened with done, not hello"):
        check_hello(done(), SESSION)
    request = peer_pb2.PeerMessage()
    request.request.ranges.add(file_index=0, first_chunk=0, chunk_count=1)
    with pytest.raises(RemoteProtocolError, match="opened with request"):
        check_hello(request, SESSION)


def test_check_hello_refuses_an_empty_message() -> None:
    with pytest.raises(RemoteProtocolError, match="opened with None"):
        check_hello(peer_pb2.PeerMessage(), SESSION)


@pytest.mark.parametrize("version", [0, 2, 2**32 - 1])
def test_check_hello_refuses_another_version(version: int) -> None:
    message = hello(SESSION, 0)
    message.hello.protocol_version = version
    with pytest.raises(RemoteProtocolError, match=f"version {version}, this side 1"):
        check_hello(message, SESSION)


def test_check_hello_refuses_another_session() -> None:
    with pytest.raises(RemoteProtocolError, match="another session"):
        check_hello(hello("sessions/other", 0), SESSION)


def test_abort_cuts_the_reason() -> None:
    assert abort("why").abort.reason == "why"
    assert abort("").WhichOneof("kind") == "abort"
    long = abort("é" * 5000)
    assert long.abort.reason == "é" * 1000


def test_done() -> None:
    message = done()
    assert message.WhichOneof("kind") == "done"
    # Done is empty but still a kind on the wire (the reader refuses kind-less messages).
    frame = encode_control(message)
    reader = FrameReader()
    reader.feed(frame[:HEADER_SIZE])
    assert reader.feed(frame[HEADER_SIZE:]) == Control(done())
