"""STUN Binding over TCP, the part of RFC 8489 that Ferry needs (sans-I/O).

A client behind a NAT learns the public side of its data socket by connecting *from* that
socket to the broker's reflexive responder and asking a STUN Binding request; the answer
carries the address and port the responder saw the connection come from. Every message is
a 20-byte header and its attributes (TLVs, each padded to 4 bytes)::

    type u16 (first two bits 0) | length u16 (of the attributes) | cookie 0x2112A442 u32 |
    transaction id (12 bytes) | attributes: type u16 | length u16 | value | padding to 4

    Binding request           0x0001   no attributes needed (any are skipped, up to a cap)
    Binding success response  0x0101   XOR-MAPPED-ADDRESS (0x0020); MAPPED-ADDRESS (0x0001)
                                       from servers that predate it
    Binding error response    0x0111   ERROR-CODE (0x0009)

    XOR-MAPPED-ADDRESS value: 0 u8 | family u8 (1 IPv4, 2 IPv6) | port ^ cookie's top 16 bits |
                              address ^ cookie (IPv4) or ^ cookie + transaction id (IPv6)

Over TCP a message is framed by its own header: `message_size` says how long the message
a header starts is. The two sides:

- the responder feeds a connection's bytes to a `RequestReader`, which says how many bytes
  it wants next (never more than the rest of one message, so the I/O layer never reads
  further) and hands out each whole request's transaction id; it refuses, on the first
  byte that shows it, anything that is not a Binding request (`StunError`). The answer is
  `binding_success`; an IPv4 peer seen on a dual-stack socket (``::ffff:a.b.c.d``) is
  answered as the IPv4 address it is.
- the client sends `binding_request` (a fresh random transaction id, the caller's) and
  reads the answer with `parse_binding_response`, which checks that it is the success
  response to that very request.

Reader states (its transition table)::

    HEADER  --20 bytes of a Binding request header-->  BODY     (wants the attributes)
    BODY    --the attributes------------------------>  HEADER   emits the transaction id
    HEADER  --a request with no attributes---------->  HEADER   emits the transaction id
"""

from __future__ import annotations

import ipaddress
import struct

from ferry.protocol.frames import RemoteProtocolError

__all__ = [
    "HEADER_SIZE",
    "MAGIC_COOKIE",
    "MAX_REQUEST_ATTRIBUTES",
    "MAX_RESPONSE_ATTRIBUTES",
    "TRANSACTION_ID_SIZE",
    "RequestReader",
    "StunError",
    "binding_request",
    "binding_success",
    "message_size",
    "parse_binding_response",
]

MAGIC_COOKIE = 0x2112A442
HEADER_SIZE = 20
TRANSACTION_ID_SIZE = 12
#: Bytes of attributes a request may carry (ours carry none; other clients' a few dozen).
MAX_REQUEST_ATTRIBUTES = 512
#: Bytes of attributes a response may carry (ours carries 12 or 24).
MAX_RESPONSE_ATTRIBUTES = 2048

BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
BINDING_ERROR = 0x0111
MAPPED_ADDRESS = 0x0001
XOR_MAPPED_ADDRESS = 0x0020
ERROR_CODE = 0x0009

_HEADER = struct.Struct(">HHI12s")
_ATTRIBUTE = struct.Struct(">HH")
_ADDRESS_HEAD = struct.Struct(">BBH")
_COOKIE = MAGIC_COOKIE.to_bytes(4, "big")
_FAMILIES = {1: 4, 2: 16}  # address family -> address length
#: The first 8 bytes of every Binding request: type, then the length (not known yet), cookie.
_REQUEST_TYPE = BINDING_REQUEST.to_bytes(2, "big")


class StunError(RemoteProtocolError):
    """The other side sent something that is not the STUN message expected here."""


def _check_transaction_id(transaction_id: bytes) -> None:
    if len(transaction_id) != TRANSACTION_ID_SIZE:
        raise ValueError(f"a STUN transaction id is {TRANSACTION_ID_SIZE} bytes")


def binding_request(transaction_id: bytes) -> bytes:
    """A Binding request (no attributes) with ``transaction_id``: 12 fresh random bytes."""
    _check_transaction_id(transaction_id)
    return _HEADER.pack(BINDING_REQUEST, 0, MAGIC_COOKIE, transaction_id)


def _padded(length: int) -> int:
    return (length + 3) & ~3


def _check_length(length: int, limit: int) -> None:
    if length % 4:
        raise StunError(f"a STUN message length of {length}, not a multiple of 4")
    if length > limit:
        raise StunError(f"a STUN message with {length} bytes of attributes, over {limit}")


def message_size(
    header: bytes | bytearray | memoryview, limit: int = MAX_RESPONSE_ATTRIBUTES
) -> int:
    """The whole size of the message that ``header`` (its first 20 bytes) begins.

    StunError if it cannot begin a STUN message: first two bits not zero, no magic cookie,
    a length that is not a multiple of 4 or is over ``limit`` bytes of attributes.
    """
    if len(header) < HEADER_SIZE:
        raise ValueError(f"a STUN header is {HEADER_SIZE} bytes, not {len(header)}")
    kind, length, cookie, _ = _HEADER.unpack_from(header)
    if kind & 0xC000:
        raise StunError("not a STUN message (its first two bits are not zero)")
    if cookie != MAGIC_COOKIE:
        raise StunError("not a STUN message of RFC 5389 or later (no magic cookie)")
    _check_length(length, limit)
    return HEADER_SIZE + int(length)


def _attributes(body: bytes | bytearray | memoryview) -> list[tuple[int, bytes]]:
    """The (type, value) of each attribute in ``body``; StunError if one overruns it.

    ``body``'s length is a multiple of 4 (`message_size` checked), and so is each padded
    attribute's: an attribute header is never cut off, only a value can overrun.
    """
    found = []
    offset = 0
    while offset < len(body):
        kind, length = _ATTRIBUTE.unpack_from(body, offset)
        start = offset + _ATTRIBUTE.size
        if start + length > len(body):
            raise StunError(f"STUN attribute 0x{kind:04x} runs past the end of its message")
        found.append((int(kind), bytes(body[start : start + length])))
        offset = start + _padded(length)
    return found


class RequestReader:
    """The responder's side of one connection: bytes in, Binding requests out.

    `wanted` is how many bytes complete the header or the attributes under way: the I/O
    layer reads at most that many and hands them to `feed`, so it never holds more than
    one message of at most ``HEADER_SIZE + max_attributes`` bytes.
    """

    def __init__(self, max_attributes: int = MAX_REQUEST_ATTRIBUTES) -> None:
        self._max = max_attributes
        self._buffer = bytearray()
        self._size = HEADER_SIZE  # of the part under way: the header, then the whole message
        self._transaction_id = b""

    @property
    def wanted(self) -> int:
        """Bytes still missing from the header or the message under way (at least 1)."""
        return self._size - len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> bytes | None:
        """Take the next bytes (at most `wanted`); the transaction id of a request they
        complete, else None. StunError as soon as the bytes cannot be a Binding request."""
        if len(data) > self.wanted:
            raise ValueError(f"fed {len(data)} bytes, wanted at most {self.wanted}")
        start = len(self._buffer)
        self._buffer += data
        if start < HEADER_SIZE:
            self._check_header_prefix()
            if len(self._buffer) < HEADER_SIZE:
                return None
            self._size = message_size(self._buffer, self._max)
            self._transaction_id = bytes(self._buffer[8:HEADER_SIZE])
        if len(self._buffer) < self._size:
            return None
        _attributes(memoryview(self._buffer)[HEADER_SIZE:])  # well-formed, else StunError
        transaction_id = self._transaction_id
        self._buffer = bytearray()
        self._size = HEADER_SIZE
        return transaction_id

    def _check_header_prefix(self) -> None:
        """Refuse a header on its first wrong byte: type, then cookie (length: when whole)."""
        head = bytes(self._buffer[:8])
        if head[:1] and head[0] & 0xC0:
            raise StunError("not a STUN message (its first two bits are not zero)")
        if head[:2] != _REQUEST_TYPE[: len(head[:2])]:
            kind = int.from_bytes(head[:2], "big")
            raise StunError(f"a STUN message of type 0x{kind:04x}, not a Binding request")
        cookie = head[4:8]
        if cookie != _COOKIE[: len(cookie)]:
            raise StunError("not a STUN message of RFC 5389 or later (no magic cookie)")


def _xor_key(transaction_id: bytes) -> bytes:
    return _COOKIE + transaction_id


def _address_value(ip: str, port: int, transaction_id: bytes) -> bytes:
    address = ipaddress.ip_address(ip.split("%", 1)[0])  # a link-local scope is not sent
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    packed = address.packed
    family = 1 if address.version == 4 else 2
    key = _xor_key(transaction_id)
    xored = bytes(a ^ k for a, k in zip(packed, key, strict=False))
    return _ADDRESS_HEAD.pack(0, family, port ^ (MAGIC_COOKIE >> 16)) + xored


def binding_success(transaction_id: bytes, ip: str, port: int) -> bytes:
    """The Binding success response to ``transaction_id``: XOR-MAPPED-ADDRESS ip:port.

    ``ip`` is an IPv4 or IPv6 address as a string (an IPv4-mapped IPv6 one is answered as
    IPv4; a ``%scope`` suffix is dropped). ValueError if it is not one, or the port is not
    in 0-65535.
    """
    _check_transaction_id(transaction_id)
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"not a port: {port}")
    value = _address_value(ip, port, transaction_id)
    attribute = _ATTRIBUTE.pack(XOR_MAPPED_ADDRESS, len(value)) + value
    return _HEADER.pack(BINDING_SUCCESS, len(attribute), MAGIC_COOKIE, transaction_id) + attribute


def _address(value: bytes, xor_key: bytes | None) -> tuple[str, int]:
    """The (ip, port) of a MAPPED-ADDRESS value, or of an XOR-MAPPED-ADDRESS one."""
    if len(value) < _ADDRESS_HEAD.size:
        raise StunError("a STUN address attribute is cut off")
    _, family, port = _ADDRESS_HEAD.unpack_from(value)
    size = _FAMILIES.get(family)
    if size is None:
        raise StunError(f"a STUN address of unknown family {family}")
    if len(value) != _ADDRESS_HEAD.size + size:
        raise StunError(f"a STUN address of family {family} that is {len(value)} bytes")
    packed = value[_ADDRESS_HEAD.size :]
    if xor_key is not None:
        port ^= MAGIC_COOKIE >> 16
        packed = bytes(a ^ k for a, k in zip(packed, xor_key, strict=False))
    if port == 0:
        raise StunError("a STUN mapped address with port 0")
    address = ipaddress.ip_address(packed)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address), int(port)


def _error_text(value: bytes) -> str:
    """'420 Unknown Attribute' of an ERROR-CODE value (the reason phrase shortened, quoted)."""
    if len(value) < 4:
        return "no valid error code"
    code = (value[2] & 0x07) * 100 + value[3]
    reason = value[4:132].decode("utf-8", errors="replace")
    return f"{code} {reason!r}" if reason else str(code)


def parse_binding_response(
    data: bytes | bytearray | memoryview, transaction_id: bytes
) -> tuple[str, int]:
    """The (ip, port) that a whole Binding success response to ``transaction_id`` maps.

    XOR-MAPPED-ADDRESS is taken; MAPPED-ADDRESS only when there is none. Other attributes
    (SOFTWARE, MESSAGE-INTEGRITY, FINGERPRINT, ...) are skipped. StunError, saying why, for
    an error response, another transaction's answer, another kind of message, or bytes that
    are not a well-formed STUN message.
    """
    _check_transaction_id(transaction_id)
    if len(data) < HEADER_SIZE:
        raise StunError(f"a STUN message is at least {HEADER_SIZE} bytes, not {len(data)}")
    size = message_size(data)
    if size != len(data):
        raise StunError(f"a STUN message of {len(data)} bytes whose header says {size}")
    kind, _, _, their_id = _HEADER.unpack_from(data)
    if their_id != transaction_id:
        raise StunError("a STUN answer to another transaction")
    attributes = _attributes(memoryview(data)[HEADER_SIZE:])
    if kind == BINDING_ERROR:
        text = next((_error_text(v) for t, v in attributes if t == ERROR_CODE), "no error code")
        raise StunError(f"the STUN server refused the Binding request: {text}")
    if kind != BINDING_SUCCESS:
        raise StunError(f"a STUN message of type 0x{kind:04x}, not a Binding success response")
    xored = [v for t, v in attributes if t == XOR_MAPPED_ADDRESS]
    if xored:
        return _address(xored[0], _xor_key(transaction_id))
    plain = [v for t, v in attributes if t == MAPPED_ADDRESS]
    if plain:
        return _address(plain[0], None)
    raise StunError("a STUN Binding success response with no mapped address")
