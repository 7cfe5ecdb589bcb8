"""The public values of the library: results, events, offered files, and the `via` choice."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal

from ferry.protocol import (
    FILE_DIGEST_ALGORITHM,
)
from ferry.v1 import broker_pb2

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_PORTS",
    "DEFAULT_STALL_TIMEOUT",
    "VIAS",
    "Completed",
    "Connected",
    "Event",
    "EventHandler",
    "FileResult",
    "OfferedFile",
    "Paused",
    "Progress",
    "TransferResult",
    "Via",
    "check_via",
    "files_of",
    "path_of",
]

DEFAULT_CHUNK_SIZE = 1 << 20
DEFAULT_PORTS = (47100, 47999)
DEFAULT_STALL_TIMEOUT = 30.0
#: How bytes may travel: "direct" (peer to peer only), "store" (only through the object
#: store; the sender uploads at once and may then exit), "auto" (direct, falling back to the
#: store when no direct connection is up by the plan's deadline).
Via = Literal["auto", "direct", "store"]
VIAS: tuple[str, ...] = ("auto", "direct", "store")


@dataclass(frozen=True)
class FileResult:
    """One verified file."""

    path: str
    size: int
    digest: str
    algorithm: str = FILE_DIGEST_ALGORITHM


@dataclass(frozen=True)
class TransferResult:
    """A completed transfer, as either side saw it."""

    session: str
    files: list[FileResult]
    bytes: int
    bytes_transferred: int
    seconds: float
    path: str = "direct"
    bytes_resumed: int = 0
    chunks_retried: int = 0
    #: The sender's side of a store-and-forward: every file is in the object store, and the
    #: receiver may fetch it until the offer expires (nobody has received it yet).
    stored: bool = False


def path_of(direct: int, store: int, default: str = "direct") -> str:
    """Which path moved this run's bytes: "direct", "store" or "mixed"."""
    if direct > 0 and store > 0:
        return "mixed"
    if store > 0:
        return "store"
    if direct > 0:
        return "direct"
    return default


def check_via(via: str) -> None:
    if via not in VIAS:
        raise ValueError(f"via must be one of {', '.join(VIAS)}, not {via!r}")


@dataclass(frozen=True)
class Connected:
    """The data connection is up."""

    address: str
    streams: int


@dataclass(frozen=True)
class Progress:
    """Bytes moved so far out of the total."""

    bytes_done: int
    total: int


@dataclass(frozen=True)
class Completed:
    """The transfer completed and was verified."""

    result: TransferResult


@dataclass(frozen=True)
class Paused:
    """The peer stopped but keeps what it has and means to come back (its disk is full, say);
    this side waits for it."""

    reason: str


Event = Connected | Progress | Completed | Paused
EventHandler = Callable[[Event], None]


@dataclass(frozen=True)
class OfferedFile:
    """A file as the offer describes it.

    ``path`` is the sender's name for it, untrusted (escape it to show it: `ferry.files.shown`).
    ``local_path`` is, on the receiving side, where it is written relative to the destination:
    ``path`` itself when that is safe, else the safe name it maps to (``aux.c`` ->
    ``aux_.c``: `ferry.files.local_paths`); on the sending side it is ``path``.
    """

    path: str
    size: int
    mode: int
    local_path: str = ""

    @property
    def renamed(self) -> bool:
        """Whether the receiver writes this file under another name than the sender's."""
        return bool(self.local_path) and self.local_path != self.path


def files_of(
    manifest: broker_pb2.Manifest, local: Sequence[PurePosixPath] | None = None
) -> list[OfferedFile]:
    """The manifest's files; ``local``: where the receiver writes each (else as named)."""
    if local is None:
        return [OfferedFile(f.path, f.size_bytes, f.mode, f.path) for f in manifest.files]
    return [
        OfferedFile(f.path, f.size_bytes, f.mode, str(where))
        for f, where in zip(manifest.files, local, strict=True)
    ]
