"""Opening and closing a peer connection (sans-I/O).

The dialing side (the receiver) speaks first with Hello; the listening side (the sender)
checks the session name and version and answers with its own Hello. Either side may send
Abort instead, with a reason for people; the receiver ends a good transfer with Done.
"""

from __future__ import annotations

from ferry.protocol.frames import RemoteProtocolError
from ferry.v1 import peer_pb2

__all__ = [
    "PROTOCOL_VERSION",
    "PeerAborted",
    "abort",
    "aborted",
    "check_hello",
    "done",
    "hello",
]

PROTOCOL_VERSION = 1


class PeerAborted(Exception):
    """The other peer gave up; the message is its reason.

    ``retryable``: the peer keeps its state and means to come back on a later connection
    attempt (its disk is full, say), so the session is not over.
    """

    def __init__(self, reason: str, *, retryable: bool = False) -> None:
        super().__init__(reason)
        self.retryable = retryable


def hello(session: str, stream_index: int) -> peer_pb2.PeerMessage:
    """The Hello that opens a connection of ``session``."""
    message = peer_pb2.PeerMessage()
    message.hello.session = session
    message.hello.protocol_version = PROTOCOL_VERSION
    message.hello.stream_index = stream_index
    return message


def check_hello(message: peer_pb2.PeerMessage, session: str) -> int:
    """Check the peer's Hello for ``session``; return its stream index."""
    kind = message.WhichOneof("kind")
    if kind == "abort":
        raise aborted(message.abort, "the peer gave up")
    if kind != "hello":
        raise RemoteProtocolError(f"peer opened with {kind}, not hello")
    if message.hello.protocol_version != PROTOCOL_VERSION:
        raise RemoteProtocolError(
            f"peer speaks protocol version {message.hello.protocol_version}, "
            f"this side {PROTOCOL_VERSION}"
        )
    if message.hello.session != session:
        raise RemoteProtocolError("peer is in another session")
    return message.hello.stream_index


def abort(reason: str, *, retryable: bool = False) -> peer_pb2.PeerMessage:
    """An Abort carrying ``reason`` (cut to 1,000 characters)."""
    message = peer_pb2.PeerMessage()
    message.abort.reason = reason[:1000]
    message.abort.retryable = retryable
    return message


def aborted(message: peer_pb2.Abort, default: str) -> PeerAborted:
    """The PeerAborted that a received Abort stands for."""
    return PeerAborted(message.reason or default, retryable=message.retryable)


def done() -> peer_pb2.PeerMessage:
    """The Done that ends a verified transfer."""
    message = peer_pb2.PeerMessage()
    message.done.SetInParent()
    return message
