"""One stream's two connection objects, and every message that either may not receive.

`Pair` links a `ReceiverConnection` and a `SenderConnection` in memory (like h11's
ConnectionPair); `feed` hands one side raw frames, so a test can play a peer that breaks
the protocol and see the right error type and state.
"""

from __future__ import annotations

import pytest

from ferry.protocol import (
    NEED_DATA,
    ChunkArrived,
    ChunkData,
    ChunksRequested,
    DigestRequested,
    Event,
    FileConfirmed,
    Finished,
    Greeted,
    LocalProtocolError,
    PeerAborted,
    ReceiverConnection,
    ReceiveSession,
    RemoteProtocolError,
    SenderConnection,
    SendSession,
    State,
    abort,
    chunk_digest,
    done,
    encode_chunk_head,
    encode_control,
    hello,
)
from ferry.v1 import peer_pb2

SESSION = "sessions/pair"
DATA = bytes(range(10))  # one file, chunks of 4: 4 + 4 + 2 bytes


def feed(conn: ReceiverConnection | SenderConnection, data: bytes) -> list[Event]:
    """Hand ``data`` to ``conn`` in the pieces it wants; return the events, NEED_DATA left out."""
    events: list[Event] = []
    view = memoryview(data)
    while view:
        n = conn.wanted
        conn.receive_data(view[:n])
        view = view[n:]
        ev = conn.next_event()
        if ev is not NEED_DATA:
            events.append(ev)
    return events


class Pair:
    def __init__(self) -> None:
        self.rs = ReceiveSession([len(DATA)], 4, window=4)
        self.ss = SendSession([len(DATA)], 4)
        self.receiver = ReceiverConnection(SESSION, 0, self.rs)
        self.sender = SenderConnection(SESSION, self.ss)

    def open(self) -> None:
        assert feed(self.sender, self.receiver.send_hello()) == [Greeted(0)]
        assert feed(self.receiver, self.sender.send_hello()) == [Greeted(0)]
        self.rs.open_stream(0)

    def chunk_frame(self, chunk_index: int, *, digest: bytes | None = None) -> bytes:
        payload = DATA[chunk_index * 4 : chunk_index * 4 + 4]
        head = encode_chunk_head(0, chunk_index, digest or chunk_digest(payload), len(payload))
        return head + payload


def message(kind: str) -> peer_pb2.PeerMessage:
    m = peer_pb2.PeerMessage()
    if kind == "hello":
        return hello(SESSION, 0)
    if kind == "abort":
        return abort("no")
    if kind == "done":
        return done()
    if kind == "request":
        m.request.ranges.add(file_index=0, first_chunk=0, chunk_count=1)
    elif kind == "digest_request":
        m.digest_request.file_index = 0
    else:
        assert kind == "file_end"
        m.file_end.file_index = 0
        m.file_end.algorithm = "blake3-chunks"
        m.file_end.digest = b"x" * 32
    return m


# -- a whole conversation -----------------------------------------------------------------


def test_a_whole_transfer_on_one_stream() -> None:
    pair = Pair()
    pair.open()
    assert pair.receiver.state is State.OPEN
    assert pair.sender.state is State.OPEN
    requests = pair.receiver.next_requests()
    assert pair.receiver.awaiting
    (asked,) = feed(pair.sender, requests)
    assert isinstance(asked, ChunksRequested)
    assert [w.chunk_index for w in asked.work] == [0, 1, 2]
    out = b""
    while pair.sender.work:
        work = pair.sender.work[0]
        payload = DATA[work.offset : work.offset + work.length]
        out += pair.sender.send_chunk(work, chunk_digest(payload)) + payload
    events = feed(pair.receiver, out[:52])
    assert events == [ChunkArrived(0, 0, 0, 4, chunk_digest(DATA[:4]))]
    assert pair.receiver.expecting_payload
    data_event = feed(pair.receiver, out[52:56])
    assert len(data_event) == 1
    assert isinstance(data_event[0], ChunkData)
    assert bytes(data_event[0].data) == DATA[:4]
    with pytest.raises(LocalProtocolError, match="verdict"):
        pair.receiver.receive_data(b"\0" * pair.receiver.wanted)
    assert pair.receiver.chunk_checked(True) == []
    rest = feed(pair.receiver, out[56:112])
    assert [type(e) for e in rest] == [ChunkArrived, ChunkData]
    with pytest.raises(LocalProtocolError, match="verdict"):
        feed(pair.receiver, out[112:])
    assert pair.receiver.chunk_checked(True) == []
    feed(pair.receiver, out[112:])
    assert pair.receiver.chunk_checked(True) == [0]
    digest_request = pair.receiver.next_requests()
    assert feed(pair.sender, digest_request) == [DigestRequested(0)]
    assert feed(pair.receiver, pair.sender.send_file_end(0)) == [FileConfirmed(0)]
    assert not pair.receiver.awaiting
    assert pair.rs.done
    assert feed(pair.sender, pair.receiver.send_done()) == [Finished()]
    assert pair.receiver.state is State.DONE
    assert pair.sender.state is State.DONE


# -- the receiver refuses -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["request", "digest_request", "done", "file_end"])
def test_receiver_refuses_anything_but_hello_first(kind: str) -> None:
    pair = Pair()
    pair.receiver.send_hello()
    with pytest.raises(RemoteProtocolError, match=f"unexpected {kind} from the sender"):
        feed(pair.receiver, encode_control(message(kind)))
    assert pair.receiver.state is State.ERROR
    pair.receiver.send_abort("broken")
    assert pair.receiver.conversation.state is State.ABORTED


def test_receiver_refuses_a_chunk_before_hello() -> None:
    pair = Pair()
    pair.receiver.send_hello()
    with pytest.raises(RemoteProtocolError, match="unexpected chunk from the sender"):
        feed(pair.receiver, pair.chunk_frame(0))


def test_receiver_refuses_bytes_before_its_own_hello() -> None:
    pair = Pair()
    with pytest.raises(RemoteProtocolError, match="in state SEND_HELLO"):
        feed(pair.receiver, encode_control(hello(SESSION, 0)))


@pytest.mark.parametrize("kind", ["hello", "request", "digest_request", "done"])
def test_receiver_refuses_in_open(kind: str) -> None:
    pair = Pair()
    pair.open()
    with pytest.raises(RemoteProtocolError, match=f"unexpected {kind} from the sender"):
        feed(pair.receiver, encode_control(message(kind)))
    assert pair.receiver.state is State.ERROR


def test_receiver_refuses_an_unrequested_chunk() -> None:
    pair = Pair()
    pair.open()
    with pytest.raises(RemoteProtocolError, match="not asked for"):
        feed(pair.receiver, pair.chunk_frame(0))
    assert pair.receiver.state is State.ERROR


def test_receiver_refuses_an_unasked_file_end() -> None:
    pair = Pair()
    pair.open()
    with pytest.raises(RemoteProtocolError, match="unasked digest for file 0"):
        feed(pair.receiver, encode_control(message("file_end")))


def test_receiver_refuses_garbage() -> None:
    pair = Pair()
    pair.receiver.send_hello()
    with pytest.raises(RemoteProtocolError, match="unknown frame type"):
        feed(pair.receiver, b"\xee" + bytes(7))
    assert pair.receiver.state is State.ERROR


@pytest.mark.parametrize(
    ("greeting", "error"),
    [
        (hello("sessions/other", 0), "another session"),
        (peer_pb2.PeerMessage(hello=peer_pb2.Hello(session=SESSION, protocol_version=9)), "9"),
    ],
)
def test_receiver_checks_the_senders_hello(greeting: peer_pb2.PeerMessage, error: str) -> None:
    pair = Pair()
    pair.receiver.send_hello()
    with pytest.raises(RemoteProtocolError, match=error):
        feed(pair.receiver, encode_control(greeting))
    assert pair.receiver.state is State.ERROR


def test_receiver_after_done_takes_nothing() -> None:
    rs = ReceiveSession([], 4)
    receiver = ReceiverConnection(SESSION, 0, rs)
    receiver.send_hello()
    feed(receiver, encode_control(hello(SESSION, 0)))
    rs.open_stream(0)
    assert receiver.next_requests() == b""
    receiver.send_done()
    with pytest.raises(RemoteProtocolError, match="in state DONE"):
        feed(receiver, encode_control(message("file_end")))
    with pytest.raises(LocalProtocolError):
        receiver.send_abort("too late")


# -- the sender refuses -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["request", "digest_request", "done", "file_end"])
def test_sender_refuses_anything_but_hello_first(kind: str) -> None:
    pair = Pair()
    with pytest.raises(RemoteProtocolError, match=f"unexpected {kind} from the receiver"):
        feed(pair.sender, encode_control(message(kind)))
    assert pair.sender.state is State.ERROR
    pair.sender.send_abort("broken")


@pytest.mark.parametrize("kind", ["hello", "file_end"])
def test_sender_refuses_in_open(kind: str) -> None:
    pair = Pair()
    pair.open()
    with pytest.raises(RemoteProtocolError, match=f"unexpected {kind} from the receiver"):
        feed(pair.sender, encode_control(message(kind)))


def test_sender_refuses_a_chunk_before_reading_its_payload() -> None:
    pair = Pair()
    pair.open()
    frame = pair.chunk_frame(0)
    with pytest.raises(RemoteProtocolError, match="unexpected chunk from the receiver"):
        feed(pair.sender, frame[:52])
    assert pair.sender.state is State.ERROR


def test_sender_refuses_a_request_out_of_bounds() -> None:
    pair = Pair()
    pair.open()
    m = peer_pb2.PeerMessage()
    m.request.ranges.add(file_index=0, first_chunk=2, chunk_count=2)
    with pytest.raises(RemoteProtocolError, match="which has 3"):
        feed(pair.sender, encode_control(m))
    assert pair.sender.state is State.ERROR
    assert not pair.sender.work


def test_sender_refuses_a_digest_request_for_an_unknown_file() -> None:
    pair = Pair()
    pair.open()
    m = peer_pb2.PeerMessage()
    m.digest_request.file_index = 1
    with pytest.raises(RemoteProtocolError, match="unknown file 1"):
        feed(pair.sender, encode_control(m))


def test_sender_after_done_takes_nothing() -> None:
    pair = Pair()
    pair.open()
    feed(pair.sender, encode_control(done()))
    assert pair.sender.state is State.DONE
    with pytest.raises(RemoteProtocolError, match="in state DONE"):
        feed(pair.sender, encode_control(message("request")))


# -- what a side may not do ---------------------------------------------------------------


def test_sender_sends_only_the_next_requested_chunk() -> None:
    pair = Pair()
    pair.open()
    feed(pair.sender, pair.receiver.next_requests())
    first, second = pair.sender.work[0], pair.sender.work[1]
    with pytest.raises(LocalProtocolError, match="not the next one"):
        pair.sender.send_chunk(second, b"d" * 32)
    pair.sender.send_chunk(first, b"d" * 32)
    assert pair.sender.work[0] == second


def test_sender_sends_no_unasked_file_end_and_no_chunk_before_hello() -> None:
    pair = Pair()
    with pytest.raises(LocalProtocolError, match="may not send chunk in AWAITING_HELLO"):
        pair.sender.send_chunk(pair.ss.missing_digests(0)[0], b"d" * 32)
    pair.open()
    with pytest.raises(LocalProtocolError, match="did not ask for the digest of file 0"):
        pair.sender.send_file_end(0)


def test_receiver_says_done_only_when_done() -> None:
    pair = Pair()
    pair.open()
    with pytest.raises(LocalProtocolError, match="Done before"):
        pair.receiver.send_done()
    with pytest.raises(LocalProtocolError, match="no chunk"):
        pair.receiver.chunk_checked(True)


def test_receiver_may_not_say_hello_twice() -> None:
    pair = Pair()
    pair.receiver.send_hello()
    with pytest.raises(LocalProtocolError, match="may not send hello"):
        pair.receiver.send_hello()


def test_next_event_wants_its_event_taken() -> None:
    pair = Pair()
    pair.receiver.send_hello()
    frame = encode_control(hello(SESSION, 0))
    pair.receiver.receive_data(frame[:8])
    pair.receiver.receive_data(frame[8:])  # a header alone completes no event
    with pytest.raises(LocalProtocolError, match="next_event"):
        pair.receiver.receive_data(b"\0" * pair.receiver.wanted)
    assert pair.receiver.next_event() == Greeted(0)
    assert pair.receiver.next_event() is NEED_DATA


# -- aborts -------------------------------------------------------------------------------


@pytest.mark.parametrize("retryable", [False, True])
def test_abort_before_hello_is_raised_with_its_flag(retryable: bool) -> None:
    pair = Pair()
    pair.receiver.send_hello()
    with pytest.raises(PeerAborted, match=r"^disk full$") as info:
        feed(pair.receiver, encode_control(abort("disk full", retryable=retryable)))
    assert info.value.retryable is retryable
    assert pair.receiver.state is State.ABORTED


@pytest.mark.parametrize("retryable", [False, True])
def test_retryable_abort_from_the_receiver_reaches_the_sender(retryable: bool) -> None:
    pair = Pair()
    pair.open()
    data = pair.receiver.send_abort("the receiver's destination: full", retryable=retryable)
    assert pair.receiver.state is State.ABORTED
    with pytest.raises(PeerAborted, match="destination: full") as info:
        feed(pair.sender, data)
    assert info.value.retryable is retryable
    assert pair.sender.state is State.ABORTED


def test_abort_without_reason_names_the_peer() -> None:
    pair = Pair()
    pair.open()
    with pytest.raises(PeerAborted, match="the sender gave up"):
        feed(pair.receiver, encode_control(abort("")))
    with pytest.raises(PeerAborted, match="the receiver gave up"):
        feed(pair.sender, encode_control(abort("")))
    fresh = Pair()
    with pytest.raises(PeerAborted, match="the peer gave up"):
        feed(fresh.sender, encode_control(abort("")))


def test_corrupt_chunk_is_asked_again_and_limits_hold() -> None:
    rs = ReceiveSession([len(DATA)], 4, window=1, max_retries=1)
    receiver = ReceiverConnection(SESSION, 0, rs)
    receiver.send_hello()
    feed(receiver, encode_control(hello(SESSION, 0)))
    rs.open_stream(0)
    pair = Pair()
    for attempt in range(2):
        assert receiver.next_requests() != b""
        feed(receiver, pair.chunk_frame(0, digest=b"z" * 32))
        if attempt == 0:
            assert receiver.chunk_checked(False) == []
        else:
            with pytest.raises(RemoteProtocolError, match="failed their digest check"):
                receiver.chunk_checked(False)
    assert receiver.state is State.ERROR
