"""One peer connection, each side's view of it (sans-I/O, in the manner of h11's Connection).

Bytes in, events out; events in, bytes out::

    conn.wanted                 # how many bytes the next receive_data must be given
    conn.receive_data(view)     # exactly `wanted` bytes, read by the I/O layer into its buffer
    conn.next_event()           # the event they complete, or NEED_DATA
    conn.send_...(...)          # the bytes of one message, to write to the socket as they are

The connection checks every move against the conversation's table (`conversation.MOVES`)
and hands the content of each message to its collaborator: the receiver's `ReceiveSession`
(which chunks to ask for, whether a chunk or a file digest is the expected one) or the
sender's `SendSession` (whether a request is within the manifest, the digests of sent
chunks). A session serves all the streams of a transfer, so the I/O layer calls every
method that may consult it (`next_event`, the `send_` methods, `next_requests`,
`chunk_checked`, `awaiting`) under the one lock that guards the session.

Chunk payloads are never copied: the I/O layer reads a payload straight into its own
buffer (`expecting_payload` says the next `wanted` bytes are one) and `ChunkData` hands
back that very view; the sender writes the head from `send_chunk` in front of a payload
it read into its own buffer and sends both at once. Hashing stays with the I/O layer,
outside the lock: the receiver reports each chunk's verdict with `chunk_checked`.
"""

from __future__ import annotations

from collections import deque

from ferry.protocol.conversation import Conversation, Kind, Role, State, Way
from ferry.protocol.events import (
    NEED_DATA,
    ChunkArrived,
    ChunkData,
    ChunksRequested,
    DigestRequested,
    Event,
    FileConfirmed,
    Finished,
    Greeted,
    NeedData,
)
from ferry.protocol.frames import (
    ChunkPayload,
    ChunkStart,
    Control,
    FrameReader,
    LocalProtocolError,
    RemoteProtocolError,
    encode_chunk_head,
    encode_control,
)
from ferry.protocol.handshake import abort, aborted, check_hello, done, hello
from ferry.protocol.receiver import ReceiveSession
from ferry.protocol.sender import MAX_OUTSTANDING_CHUNKS, ChunkWork, SendSession
from ferry.v1 import peer_pb2

__all__ = ["ReceiverConnection", "SenderConnection"]

_KINDS = {kind.value: kind for kind in Kind if kind is not Kind.CHUNK}


class _Connection:
    """What both sides share: the frame reader, the table, Hello and Abort."""

    role: Role

    def __init__(self, session_name: str, *, max_payload: int) -> None:
        self.session_name = session_name
        self.conversation = Conversation(self.role)
        self._reader = FrameReader(max_payload=max_payload)
        self._frame: Control | ChunkStart | ChunkPayload | None = None

    @property
    def state(self) -> State:
        """Where this side's conversation is (see `conversation.MOVES`)."""
        return self.conversation.state

    @property
    def wanted(self) -> int:
        """How many bytes the next `receive_data` must be given."""
        return self._reader.wanted

    @property
    def expecting_payload(self) -> bool:
        """True when the next `wanted` bytes are a chunk payload (read them into place)."""
        return self._reader.expecting_payload

    @property
    def at_frame_boundary(self) -> bool:
        """True between frames: a clean end of stream is allowed here."""
        return self._reader.at_frame_boundary

    def receive_data(self, data: bytes | memoryview) -> None:
        """Take exactly `wanted` bytes from the peer; `next_event` says what they complete."""
        if self._frame is not None:
            raise LocalProtocolError("take the last event with next_event before feeding more")
        self._check_feed()
        try:
            self._frame = self._reader.feed(data)
        except RemoteProtocolError:
            self.conversation.fail()
            raise

    def next_event(self) -> Event | NeedData:
        """The event the bytes fed so far complete, or NEED_DATA.

        Raises RemoteProtocolError when the peer broke the protocol, and PeerAborted when
        it sent Abort.
        """
        frame, self._frame = self._frame, None
        if frame is None:
            return NEED_DATA
        try:
            if isinstance(frame, ChunkPayload):
                return self._on_payload(frame)
            if isinstance(frame, ChunkStart):
                self.conversation.move(Way.RECEIVE, Kind.CHUNK)
                return self._on_chunk(frame)
            message = frame.message
            name = message.WhichOneof("kind")
            kind = _KINDS.get(name or "")
            if kind is None:
                raise RemoteProtocolError(f"message of an unknown kind {name}")
            before = self.conversation.state
            self.conversation.move(Way.RECEIVE, kind)
            if kind is Kind.ABORT:
                who = "peer" if before is State.AWAITING_HELLO else _peer(self.role)
                raise aborted(message.abort, f"the {who} gave up")
            if kind is Kind.HELLO:
                return Greeted(self._on_hello(message))
            return self._on_message(kind, message)
        except RemoteProtocolError:
            self.conversation.fail()
            raise

    def send_abort(self, reason: str, *, retryable: bool = False) -> bytes:
        """Give up: the Abort telling the peer why (``retryable``: this side comes back)."""
        self.conversation.move(Way.SEND, Kind.ABORT)
        return encode_control(abort(reason, retryable=retryable))

    # -- for the sides ----------------------------------------------------------------

    def _check_feed(self) -> None:
        """Raise LocalProtocolError if this side must act before reading on."""

    def _on_hello(self, message: peer_pb2.PeerMessage) -> int:
        return check_hello(message, self.session_name)

    def _on_payload(self, frame: ChunkPayload) -> Event:
        raise RemoteProtocolError("chunk payload without a chunk")  # the reader prevents it

    def _on_chunk(self, frame: ChunkStart) -> Event:  # pragma: no cover - the table refuses
        raise RemoteProtocolError(f"unexpected chunk from the {_peer(self.role)}")

    def _on_message(self, kind: Kind, message: peer_pb2.PeerMessage) -> Event:
        raise NotImplementedError  # pragma: no cover


class ReceiverConnection(_Connection):
    """The receiver's end of one stream: says Hello, asks for chunks and digests, says Done."""

    role = Role.RECEIVER

    def __init__(self, session_name: str, stream: int, session: ReceiveSession) -> None:
        super().__init__(session_name, max_payload=session.chunk_size)
        self.stream = stream
        self.session = session
        self._asked: set[int] = set()  # files whose digest this stream asked for
        self._chunk: ChunkStart | None = None  # announced, payload not read yet
        self._verdict_due: ChunkStart | None = None  # payload handed out, verdict not given

    def send_hello(self) -> bytes:
        """The Hello that opens the stream."""
        self.conversation.move(Way.SEND, Kind.HELLO)
        return encode_control(hello(self.session_name, self.stream))

    def next_requests(self) -> bytes:
        """What to ask for now: digests of complete files, then chunks to top the window up.

        Empty when nothing is due. The stream must be open in the session.
        """
        out = b""
        for file_index in self.session.claim_digests(self.stream):
            self.conversation.move(Way.SEND, Kind.DIGEST_REQUEST)
            self._asked.add(file_index)
            out += encode_control(self.session.digest_request(file_index))
        request = self.session.request(self.stream)
        if request is not None:
            self.conversation.move(Way.SEND, Kind.REQUEST)
            out += encode_control(request)
        return out

    @property
    def awaiting(self) -> bool:
        """True while the sender owes this stream chunks or digests."""
        return bool(self._asked) or self.session.has_in_flight(self.stream)

    def chunk_checked(self, verified: bool) -> list[int]:
        """The verdict on the last ChunkData's digest; returns the files it completed."""
        chunk, self._verdict_due = self._verdict_due, None
        if chunk is None:
            raise LocalProtocolError("no chunk is waiting for its verdict")
        try:
            return self.session.chunk_done(self.stream, chunk, verified)
        except RemoteProtocolError:
            self.conversation.fail()
            raise

    def send_done(self) -> bytes:
        """The Done that ends a transfer whose every file is confirmed."""
        if not self.session.done:
            raise LocalProtocolError("Done before every file was confirmed")
        self.conversation.move(Way.SEND, Kind.DONE)
        return encode_control(done())

    def _check_feed(self) -> None:
        if self._verdict_due is not None:
            raise LocalProtocolError("give the last chunk's verdict before reading on")

    def _on_chunk(self, frame: ChunkStart) -> Event:
        target = self.session.chunk_start(self.stream, frame)
        self._chunk = frame
        return ChunkArrived(
            target.file_index, target.chunk_index, target.offset, target.length, frame.digest
        )

    def _on_payload(self, frame: ChunkPayload) -> Event:
        self._verdict_due, self._chunk = self._chunk, None
        return ChunkData(frame.data)

    def _on_message(self, kind: Kind, message: peer_pb2.PeerMessage) -> Event:
        # The table lets only FILE_END through to here.
        end = message.file_end
        if end.file_index not in self._asked:
            raise RemoteProtocolError(f"peer sent an unasked digest for file {end.file_index}")
        self.session.file_end(end)
        self._asked.discard(end.file_index)
        return FileConfirmed(end.file_index)


class SenderConnection(_Connection):
    """The sender's end of one stream: answers Hello, queues requested chunks, sends them.

    The queue (`work`) holds at most `MAX_OUTSTANDING_CHUNKS`: a request beyond that window
    is a protocol error, not more memory.
    """

    role = Role.SENDER

    def __init__(self, session_name: str, session: SendSession) -> None:
        super().__init__(session_name, max_payload=session.chunk_size)
        self.session = session
        self.stream: int | None = None  # the receiver names it in its Hello
        self.work: deque[ChunkWork] = deque()  # requested, not sent yet, in order
        self._asked: set[int] = set()  # files whose digest the receiver asked for

    def send_hello(self) -> bytes:
        """The Hello answering the receiver's."""
        self.conversation.move(Way.SEND, Kind.HELLO)
        assert self.stream is not None  # the table allows this only after its Hello
        return encode_control(hello(self.session_name, self.stream))

    def send_chunk(self, work: ChunkWork, digest: bytes) -> bytes:
        """The head to send in front of the payload of the next queued chunk.

        ``work`` must be the first of `work` (it is taken off); ``digest`` is the digest of
        its payload as read from the source, recorded for the file's digest.
        """
        self.conversation.move(Way.SEND, Kind.CHUNK)
        if not self.work or self.work[0] != work:
            raise LocalProtocolError(
                f"chunk {work.chunk_index} of file {work.file_index} is not the next one asked for"
            )
        self.work.popleft()
        head = encode_chunk_head(work.file_index, work.chunk_index, digest, work.length)
        self.session.chunk_sent(work, digest)
        return head

    def send_file_end(self, file_index: int) -> bytes:
        """The FileEnd answering a DigestRequest; every chunk digest must be known."""
        self.conversation.move(Way.SEND, Kind.FILE_END)
        if file_index not in self._asked:
            raise LocalProtocolError(
                f"the receiver did not ask for the digest of file {file_index}"
            )
        message = self.session.file_end(file_index)
        self._asked.discard(file_index)
        return encode_control(message)

    def _on_hello(self, message: peer_pb2.PeerMessage) -> int:
        self.stream = check_hello(message, self.session_name)
        return self.stream

    def _on_message(self, kind: Kind, message: peer_pb2.PeerMessage) -> Event:
        # The table lets only REQUEST, DIGEST_REQUEST and DONE through to here.
        if kind is Kind.REQUEST:
            work = self.session.on_request(message.request)
            if len(self.work) + len(work) > MAX_OUTSTANDING_CHUNKS:
                raise RemoteProtocolError(
                    f"the receiver asked for {len(self.work) + len(work)} chunks not yet sent, "
                    f"beyond the window of {MAX_OUTSTANDING_CHUNKS}"
                )
            self.work.extend(work)
            return ChunksRequested(tuple(work))
        if kind is Kind.DIGEST_REQUEST:
            file_index = message.digest_request.file_index
            if not 0 <= file_index < self.session.file_count:
                raise RemoteProtocolError(f"peer named unknown file {file_index}")
            self._asked.add(file_index)
            return DigestRequested(file_index)
        return Finished()


def _peer(role: Role) -> str:
    return "sender" if role is Role.RECEIVER else "receiver"
