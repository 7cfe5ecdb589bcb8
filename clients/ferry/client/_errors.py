"""The client library's errors: one tree, each class a case a program may want to tell apart.

::

    FerryError                      (ferry.errors) anything Ferry raises on purpose
    ├── BrokerError                 the broker refused a call, or could not be reached
    │   │                           (.code: the gRPC status, .reason: ErrorInfo's reason)
    │   └── BrokerTLSError          (_broker) reached, but not securely: its certificate is
    │                               untrusted, expired or another host's, ours was refused,
    │                               or one side speaks no TLS (.kind); raised at once, never
    │                               waited out like a broker that is down
    ├── BrokerSettingsError         (_channel; also a ValueError) the broker address or the TLS
    │                               settings cannot be used (plaintext off loopback, a
    │                               certificate without its key, an unreadable CA file)
    └── TransferError               the transfer did not complete
        ├── TransferOver            the session ended on the broker: a rerun cannot continue it
        │   ├── Declined            ... because the receiver declined
        │   └── TamperedError       ... because a check under the code's key failed: a wrong
        │                           code, or someone in the middle (the code is used up)
        ├── SourceChangedError      a file changed since it was offered (the session is failed)
        ├── PeerProtocolError       the peer broke the protocol (bad chunks, garbage, its abort)
        ├── Stalled                 the peer sent nothing for the stall timeout (data kept)
        └── StorageFull             the receiver's destination is full (data kept)

A plain TransferError is everything else that a rerun of the same command may fix (the broker
was unreachable for longer than the client waits, the object store failed): the message says
so. Every message is a sentence for people; `ferry` prints it after ``ferry: error:``.

What comes from the other side is untrusted: a message that quotes the peer's or the
broker's words (an Abort's reason, a decline or failure reason) quotes them through
`ferry.files.shown` -- escaped and cut -- (`told`). What goes to the other side says nothing
about this machine's file system (`for_peer`): names only as the transfer has them, never
a destination folder, a home directory or a user name.
"""

from __future__ import annotations

import os

from ferry.errors import FerryError
from ferry.files import DestinationExistsError, UnsafePathError, shown
from ferry.protocol import PeerAborted, ProtocolError

__all__ = [
    "Declined",
    "FerryError",
    "PeerProtocolError",
    "SourceChangedError",
    "Stalled",
    "StorageFull",
    "TamperedError",
    "TransferError",
    "TransferOver",
    "for_peer",
    "told",
]


def told(exc: BaseException) -> str:
    """``exc`` as a message of this side shows it: the peer's own words (its Abort's reason)
    escaped and cut, this side's errors as they are."""
    if isinstance(exc, PeerAborted):
        return shown(str(exc))
    return str(exc)


def for_peer(exc: BaseException) -> str:
    """What this side tells the other peer (an Abort, a failure report, a decline) about ``exc``.

    Nothing about this machine's folders reaches the other side: an error with a text meant
    for the peer (``for_peer``, as the receiver's `StorageError` has) gives that; a path or
    protocol error gives its message (it names files only by their path in the transfer);
    any other OSError only its cause (``os.strerror``), never its file names; anything else
    only its kind.
    """
    text = getattr(exc, "for_peer", None)
    if isinstance(text, str):
        return text
    if isinstance(exc, PeerAborted):
        return shown(str(exc))
    if isinstance(exc, UnsafePathError | DestinationExistsError | ProtocolError):
        return str(exc)
    if isinstance(exc, OSError):
        return os.strerror(exc.errno) if exc.errno else type(exc).__name__
    return f"an unexpected error ({type(exc).__name__})"


class TransferError(FerryError):
    """The transfer did not complete; the message says why, for people."""


class TransferOver(TransferError):
    """The session ended on the broker (failed, cancelled, declined, expired): a rerun of
    the same command cannot continue it."""


class Declined(TransferOver):
    """The receiver declined the offer."""


class TamperedError(TransferOver):
    """The connection details were tampered with, or the code was wrong.

    A check under the key that the code's PAKE gave failed: the other side's proof of the
    key, the manifest or a certificate the broker relayed. Nothing was received. The session
    is ended (the code is used up, so a guesser gets one try): offer the files again and
    give the code over a channel you trust.
    """


class SourceChangedError(TransferError):
    """A file changed since it was offered; the session is failed rather than mixing old and
    new bytes. Offer the files again for a new code."""


class PeerProtocolError(TransferError):
    """The peer broke the protocol (chunks that keep failing their digest, garbage, a wrong
    certificate) or gave up; the message says what it did or said."""


class Stalled(TransferError):
    """The peer could not be reached, or sent nothing, for the stall timeout. What was
    verified is kept: run the same command again to resume."""


class StorageFull(TransferError):
    """The receiver's destination ran out of space (or quota). What was verified is kept:
    free some space and run the same command again."""
