"""Frame layer of the peer wire protocol (sans-I/O).

The byte stream between two peers is a sequence of frames (see proto/ferry/v1/peer.proto)::

    header  : type u8 | 3 zero bytes | body length u32 (big endian)      8 bytes
    CONTROL : body = serialized ferry.v1.PeerMessage                  <= 1 MiB
    CHUNK   : body = file_index u32 | chunk_index u64 | blake3 digest (32 bytes) | payload

`FrameReader` parses that stream without copying chunk payloads: it always says how many
bytes it wants next (`wanted`); the I/O layer reads exactly that many bytes into a buffer of
its own and hands a view of them to `feed`, which returns at most one event. For a CHUNK
frame the reader first returns `ChunkStart` (the I/O layer asks the session whether it
expects such a chunk, and can refuse before reading a byte of payload), then wants the
payload and returns `ChunkPayload` holding the very view it was fed.

States (the reader's transition table)::

    HEADER   --CONTROL-->  CONTROL_BODY --> HEADER        emits Control
    HEADER   --CHUNK---->  CHUNK_HEAD   --> PAYLOAD       emits ChunkStart
    PAYLOAD  ----------->  HEADER                         emits ChunkPayload
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import NoReturn

from google.protobuf.message import DecodeError

from ferry.v1 import peer_pb2

__all__ = [
    "CHUNK_HEAD_SIZE",
    "DIGEST_SIZE",
    "HEADER_SIZE",
    "MAX_CONTROL_SIZE",
    "ChunkPayload",
    "ChunkStart",
    "Control",
    "FrameReader",
    "FrameType",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "encode_chunk_head",
    "encode_control",
]

_HEADER = struct.Struct(">B3xI")
_CHUNK_HEAD = struct.Struct(">IQ32s")
HEADER_SIZE = _HEADER.size
CHUNK_HEAD_SIZE = _CHUNK_HEAD.size
DIGEST_SIZE = 32
MAX_CONTROL_SIZE = 1 << 20
MAX_CHUNK_PAYLOAD = 64 << 20


class ProtocolError(Exception):
    """The peer protocol was broken; the message says how, for people to read."""


class RemoteProtocolError(ProtocolError):
    """The other peer sent something the protocol does not allow."""


class LocalProtocolError(ProtocolError):
    """This side tried to do something the protocol does not allow."""


class FrameType(enum.IntEnum):
    """The first byte of every frame."""

    CONTROL = 1
    CHUNK = 2


@dataclass(frozen=True, slots=True)
class Control:
    """A CONTROL frame: one PeerMessage."""

    message: peer_pb2.PeerMessage


@dataclass(frozen=True, slots=True)
class ChunkStart:
    """The head of a CHUNK frame; `length` payload bytes follow."""

    file_index: int
    chunk_index: int
    digest: bytes
    length: int


@dataclass(frozen=True, slots=True)
class ChunkPayload:
    """The payload of the CHUNK frame announced by the last ChunkStart."""

    data: memoryview


Event = Control | ChunkStart | ChunkPayload


def encode_control(message: peer_pb2.PeerMessage) -> bytes:
    """Return the bytes of a CONTROL frame carrying ``message``."""
    body = message.SerializeToString()
    if len(body) > MAX_CONTROL_SIZE:
        raise LocalProtocolError(f"control message of {len(body)} bytes is too large")
    return _HEADER.pack(FrameType.CONTROL, len(body)) + body


def encode_chunk_head(file_index: int, chunk_index: int, digest: bytes, length: int) -> bytes:
    """Return the frame header and chunk head that precede a chunk payload of ``length``."""
    if len(digest) != DIGEST_SIZE:
        raise LocalProtocolError("chunk digest must be 32 bytes")
    if not 1 <= length <= MAX_CHUNK_PAYLOAD:
        raise LocalProtocolError(f"chunk payload of {length} bytes is out of bounds")
    try:
        head = _CHUNK_HEAD.pack(file_index, chunk_index, digest)
    except struct.error as exc:
        raise LocalProtocolError(f"chunk index out of range: {exc}") from None
    return _HEADER.pack(FrameType.CHUNK, CHUNK_HEAD_SIZE + length) + head


class _State(enum.Enum):
    HEADER = enum.auto()
    CONTROL_BODY = enum.auto()
    CHUNK_HEAD = enum.auto()
    PAYLOAD = enum.auto()
    BROKEN = enum.auto()


class FrameReader:
    """Turns the exact byte counts it asks for into frame events."""

    def __init__(self, max_payload: int = MAX_CHUNK_PAYLOAD) -> None:
        self._state = _State.HEADER
        self._wanted = HEADER_SIZE
        self._payload_after_head = 0
        self._max_payload = max_payload

    @property
    def wanted(self) -> int:
        """How many bytes the next call to `feed` must be given."""
        return self._wanted

    @property
    def expecting_payload(self) -> bool:
        """True when the next `wanted` bytes are a chunk payload."""
        return self._state is _State.PAYLOAD

    @property
    def at_frame_boundary(self) -> bool:
        """True between frames: a clean end of stream is allowed here."""
        return self._state is _State.HEADER

    def feed(self, data: bytes | memoryview) -> Event | None:
        """Consume exactly `wanted` bytes; return the event they complete, if any."""
        if len(data) != self._wanted:
            raise LocalProtocolError(f"fed {len(data)} bytes, {self._wanted} wanted")
        state = self._state
        if state is _State.HEADER:
            self._on_header(data)
            return None
        if state is _State.CONTROL_BODY:
            return self._on_control(data)
        if state is _State.CHUNK_HEAD:
            file_index, chunk_index, digest = _CHUNK_HEAD.unpack(data)
            self._state = _State.PAYLOAD
            length = self._payload_after_head
            self._wanted = length
            return ChunkStart(file_index, chunk_index, digest, length)
        if state is _State.PAYLOAD:
            self._state, self._wanted = _State.HEADER, HEADER_SIZE
            return ChunkPayload(data if isinstance(data, memoryview) else memoryview(data))
        raise LocalProtocolError("the frame reader is broken after an earlier error")

    def _on_header(self, data: bytes | memoryview) -> None:
        kind, length = _HEADER.unpack(data)
        if bytes(data[1:4]) != b"\0\0\0":
            self._fail("frame header has non-zero reserved bytes")
        if kind == FrameType.CONTROL:
            if length > MAX_CONTROL_SIZE:
                self._fail(f"control frame of {length} bytes exceeds the limit")
            self._state, self._wanted = _State.CONTROL_BODY, length
            if length == 0:
                # An empty PeerMessage has no kind: a protocol violation.
                self._fail("empty control frame")
            return None
        if kind == FrameType.CHUNK:
            payload = length - CHUNK_HEAD_SIZE
            if payload < 1 or payload > self._max_payload:
                self._fail(f"chunk frame with {payload} payload bytes is out of bounds")
            self._state, self._wanted = _State.CHUNK_HEAD, CHUNK_HEAD_SIZE
            self._payload_after_head = payload
            return None
        self._fail(f"unknown frame type {kind}")

    def _on_control(self, data: bytes | memoryview) -> Control:
        message = peer_pb2.PeerMessage()
        try:
            message.ParseFromString(bytes(data))
        except DecodeError:
            self._fail("control frame does not hold a valid PeerMessage")
        if message.WhichOneof("kind") is None:
            self._fail("control message of an unknown kind")
        self._state, self._wanted = _State.HEADER, HEADER_SIZE
        return Control(message)

    def _fail(self, reason: str) -> NoReturn:
        self._state, self._wanted = _State.BROKEN, 0
        raise RemoteProtocolError(reason)
