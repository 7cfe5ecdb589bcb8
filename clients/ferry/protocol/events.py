"""What a peer connection hands the I/O layer (`next_event`), one event per message.

A receiver sees `Greeted`, then `ChunkArrived` (followed, once its payload bytes were fed,
by `ChunkData`) and `FileConfirmed`. A sender sees `Greeted`, then `ChunksRequested`,
`DigestRequested` and finally `Finished`. An Abort from the peer is not an event: it is
raised as `PeerAborted`. `NEED_DATA` means: feed `wanted` more bytes first.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ferry.protocol.sender import ChunkWork

__all__ = [
    "NEED_DATA",
    "ChunkArrived",
    "ChunkData",
    "ChunksRequested",
    "DigestRequested",
    "Event",
    "FileConfirmed",
    "Finished",
    "Greeted",
    "NeedData",
]


class NeedData(enum.Enum):
    """The type of `NEED_DATA`."""

    NEED_DATA = "NEED_DATA"


NEED_DATA = NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class Greeted:
    """The peer's Hello checked out: same session, same protocol version."""

    stream_index: int


@dataclass(frozen=True, slots=True)
class ChunkArrived:
    """A chunk this stream asked for is coming; its payload (`length` bytes) is next."""

    file_index: int
    chunk_index: int
    offset: int
    length: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class ChunkData:
    """The payload of the last ChunkArrived: the very buffer the I/O layer fed."""

    data: memoryview


@dataclass(frozen=True, slots=True)
class FileConfirmed:
    """The sender's whole-file digest matches the chunks received: the file is done."""

    file_index: int


@dataclass(frozen=True, slots=True)
class ChunksRequested:
    """The receiver asked for chunks; they were queued on the connection (`work`)."""

    work: tuple[ChunkWork, ...]


@dataclass(frozen=True, slots=True)
class DigestRequested:
    """The receiver asks for a file's whole-file digest (answer with `send_file_end`)."""

    file_index: int


@dataclass(frozen=True, slots=True)
class Finished:
    """The receiver said Done: it holds and verified everything."""


Event = (
    Greeted
    | ChunkArrived
    | ChunkData
    | FileConfirmed
    | ChunksRequested
    | DigestRequested
    | Finished
)
