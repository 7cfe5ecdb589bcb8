"""The legal moves of one peer connection, as a table (sans-I/O).

Each side of a connection keeps one `Conversation`: its state, and for every state the
messages it may send and receive (`MOVES`). A move that is not in the table is a protocol
error: `LocalProtocolError` if this side tried it, `RemoteProtocolError` if the peer did.
The receiver dials and speaks first; the sender answers its Hello::

    receiver  SEND_HELLO --send hello--> AWAITING_HELLO --receive hello--> OPEN
    sender    AWAITING_HELLO --receive hello--> SEND_HELLO --send hello--> OPEN

    OPEN, receiver: send request | digest_request     receive chunk | file_end
    OPEN, sender:   send chunk | file_end             receive request | digest_request
    OPEN  --done (receiver sends, sender receives)-->  DONE
    any state but DONE/ABORTED --abort, either way-->  ABORTED
    a broken move received, or a message refused   --> ERROR; only "send abort" is left
    (DONE and ABORTED stay as they are)

DONE and ABORTED are final: nothing more may be sent or received.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from ferry.protocol.frames import LocalProtocolError, RemoteProtocolError

__all__ = ["MOVES", "Conversation", "Kind", "Role", "State", "Way"]


class Role(enum.Enum):
    """Which end of the connection this side is."""

    RECEIVER = "receiver"  # dials, asks for chunks
    SENDER = "sender"  # listens, serves chunks


class State(enum.Enum):
    """Where one side's conversation is."""

    SEND_HELLO = "SEND_HELLO"  # this side's Hello is due
    AWAITING_HELLO = "AWAITING_HELLO"  # the peer's Hello is due
    OPEN = "OPEN"
    DONE = "DONE"
    ABORTED = "ABORTED"
    ERROR = "ERROR"  # a protocol error; the only move left is to send Abort


class Way(enum.Enum):
    """Which way a message goes, seen from this side."""

    SEND = "send"
    RECEIVE = "receive"


class Kind(enum.Enum):
    """A kind of message: the PeerMessage oneof names, and CHUNK for a chunk frame."""

    HELLO = "hello"
    REQUEST = "request"
    DIGEST_REQUEST = "digest_request"
    CHUNK = "chunk"
    FILE_END = "file_end"
    DONE = "done"
    ABORT = "abort"


_S, _R = Way.SEND, Way.RECEIVE

MOVES: Mapping[Role, Mapping[State, Mapping[tuple[Way, Kind], State]]] = {
    Role.RECEIVER: {
        State.SEND_HELLO: {
            (_S, Kind.HELLO): State.AWAITING_HELLO,
            (_S, Kind.ABORT): State.ABORTED,
        },
        State.AWAITING_HELLO: {
            (_R, Kind.HELLO): State.OPEN,
            (_R, Kind.ABORT): State.ABORTED,
            (_S, Kind.ABORT): State.ABORTED,
        },
        State.OPEN: {
            (_S, Kind.REQUEST): State.OPEN,
            (_S, Kind.DIGEST_REQUEST): State.OPEN,
            (_S, Kind.DONE): State.DONE,
            (_S, Kind.ABORT): State.ABORTED,
            (_R, Kind.CHUNK): State.OPEN,
            (_R, Kind.FILE_END): State.OPEN,
            (_R, Kind.ABORT): State.ABORTED,
        },
        State.DONE: {},
        State.ABORTED: {},
        State.ERROR: {(_S, Kind.ABORT): State.ABORTED},
    },
    Role.SENDER: {
        State.AWAITING_HELLO: {
            (_R, Kind.HELLO): State.SEND_HELLO,
            (_R, Kind.ABORT): State.ABORTED,
            (_S, Kind.ABORT): State.ABORTED,
        },
        State.SEND_HELLO: {
            (_S, Kind.HELLO): State.OPEN,
            (_S, Kind.ABORT): State.ABORTED,
        },
        State.OPEN: {
            (_R, Kind.REQUEST): State.OPEN,
            (_R, Kind.DIGEST_REQUEST): State.OPEN,
            (_R, Kind.DONE): State.DONE,
            (_R, Kind.ABORT): State.ABORTED,
            (_S, Kind.CHUNK): State.OPEN,
            (_S, Kind.FILE_END): State.OPEN,
            (_S, Kind.ABORT): State.ABORTED,
        },
        State.DONE: {},
        State.ABORTED: {},
        State.ERROR: {(_S, Kind.ABORT): State.ABORTED},
    },
}

_INITIAL = {Role.RECEIVER: State.SEND_HELLO, Role.SENDER: State.AWAITING_HELLO}


class Conversation:
    """One side's state, moved only along `MOVES`."""

    def __init__(self, role: Role) -> None:
        self.role = role
        self.state = _INITIAL[role]
        self._moves = MOVES[role]

    def move(self, way: Way, kind: Kind) -> State:
        """Take one move; raise the protocol error of the side that broke the table."""
        nxt = self._moves[self.state].get((way, kind))
        if nxt is None:
            state = self.state
            if way is Way.RECEIVE:
                self.fail()
                raise RemoteProtocolError(
                    f"unexpected {kind.value} from the {_peer(self.role)} in state {state.value}"
                )
            raise LocalProtocolError(
                f"the {self.role.value} may not send {kind.value} in {state.value}"
            )
        self.state = nxt
        return nxt

    def fail(self) -> None:
        """A message broke the protocol (a bad Hello, a bad range): only Abort is left."""
        if self.state not in (State.DONE, State.ABORTED):
            self.state = State.ERROR


def _peer(role: Role) -> str:
    return "sender" if role is Role.RECEIVER else "receiver"
