"""The knock: what a receiver sends first on a data connection, before TLS (sans-I/O).

A sender's listener is open to anyone who can reach its port. So that a stranger's
connections cost it nothing, it spends no thread and no TLS work on a connection until the
connection has proved, cheaply and without any state on the sender, that it belongs to the
session -- the way SCTP's state cookie answers SYN floods. The proof is a fixed-size knock,
the first bytes the receiver sends::

    magic "FKN" | version u8 (1) | stream index u32 | nonce (16 bytes) | MAC (32 bytes)

    MAC = HMAC-SHA256(knock key, "ferry/v1 knock" 0 | session name | 0 |
                      attempt u64 | stream index u32 | nonce)

The knock key is a sub-key of the PAKE session key (`SessionKey.knock_key`), which only the
two peers hold; the attempt ties a knock to one connection attempt (an old attempt's knock
opens nothing), the stream index to the Hello that follows on the connection. A knock is
checked with one HMAC over 56 bytes. A nonce seen before on this attempt (a replayed knock
read off the wire) is refused; the memory of nonces is bounded (`SEEN_NONCES`).

A knock that does not start with the magic (a TLS ClientHello of a client that does not
knock, a scanner) is refused on its first bytes: `Knocker.refuses_prefix` lets the I/O layer
close such a connection before the whole knock arrived. The version byte lets a later knock
format be told apart from this one.

Time and randomness come in as arguments: the nonce is the caller's, and so is the clock
that bounds how long a knock may take.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections import OrderedDict

from ferry.protocol.frames import RemoteProtocolError

__all__ = ["KNOCK_MAGIC", "KNOCK_SIZE", "KNOCK_VERSION", "NONCE_SIZE", "BadKnock", "Knocker"]

KNOCK_VERSION = 1
KNOCK_MAGIC = b"FKN" + bytes([KNOCK_VERSION])
NONCE_SIZE = 16
_MAC_SIZE = 32
_HEAD = struct.Struct(">4sI16s")
KNOCK_SIZE = _HEAD.size + _MAC_SIZE
#: How many nonces of accepted knocks an attempt remembers (to refuse replays).
SEEN_NONCES = 4096


class BadKnock(RemoteProtocolError):
    """A connection's first bytes are not a knock of this session's attempt."""


class Knocker:
    """Makes and checks the knocks of one connection attempt of one session."""

    def __init__(self, key: bytes, session_name: str, attempt: int) -> None:
        if len(key) != 32:
            raise ValueError("a knock key is 32 bytes")
        self._key = key
        self._context = (
            b"ferry/v1 knock\0" + session_name.encode() + b"\0" + struct.pack(">Q", attempt)
        )
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    def _mac(self, stream: int, nonce: bytes) -> bytes:
        body = self._context + struct.pack(">I", stream) + nonce
        return hmac.digest(self._key, body, hashlib.sha256)

    def knock(self, stream: int, nonce: bytes) -> bytes:
        """The knock that opens stream ``stream`` (``nonce``: 16 fresh random bytes)."""
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"a knock's nonce is {NONCE_SIZE} bytes")
        return _HEAD.pack(KNOCK_MAGIC, stream, nonce) + self._mac(stream, nonce)

    @staticmethod
    def refuses_prefix(data: bytes | bytearray | memoryview) -> bool:
        """True if the first bytes of a connection already cannot begin a knock."""
        n = min(len(data), len(KNOCK_MAGIC))
        return bytes(data[:n]) != KNOCK_MAGIC[:n]

    def check(self, data: bytes | bytearray | memoryview) -> int:
        """The stream index of a right knock (exactly `KNOCK_SIZE` bytes); BadKnock if not."""
        if len(data) != KNOCK_SIZE:
            raise BadKnock(f"a knock is {KNOCK_SIZE} bytes, not {len(data)}")
        magic, stream, nonce = _HEAD.unpack_from(data)
        if magic != KNOCK_MAGIC:
            raise BadKnock("the connection did not open with a knock of this version")
        mac = bytes(data[_HEAD.size :])
        if not hmac.compare_digest(mac, self._mac(stream, nonce)):
            raise BadKnock("the knock is not this session's")
        if nonce in self._seen:
            raise BadKnock("the knock was used before")
        self._seen[nonce] = None
        if len(self._seen) > SEEN_NONCES:
            self._seen.popitem(last=False)
        return int(stream)
