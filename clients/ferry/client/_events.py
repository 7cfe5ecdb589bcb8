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
    "PathInfo",
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
class PathInfo:
    """How the peers connected on the attempt that moved the bytes (or why they did not).

    ``route``: "host" (a host address of the sender answered: same LAN, or no NAT on its
    side), "punched" (its public address, through the NATs: TCP simultaneous open) or
    "store" (no pair worked; ``reason`` says why). ``local`` and ``remote`` are the
    receiver's and the sender's end of the pair ("ip:port"), ``setup_seconds`` the time from
    the start of the checks to the first authenticated connection (or to giving up), and
    ``tries`` the connection attempts that took."""

    route: str
    local: str = ""
    remote: str = ""
    setup_seconds: float = 0.0
    tries: int = 0
    reason: str = ""

    def to_report(self) -> broker_pb2.PathReport:
        """The broker's form of it (ReportProgress)."""
        report = broker_pb2.PathReport(
            route=self.route,
            local=self.local,
            remote=self.remote,
            tries=self.tries,
            reason=self.reason[:1000],
        )
        report.setup.FromNanoseconds(round(self.setup_seconds * 1e9))
        return report

    @classmethod
    def from_report(cls, report: broker_pb2.PathReport) -> PathInfo | None:
        """What the receiver reported (None if it did not)."""
        if not report.route:
            return None
        return cls(
            report.route,
            report.local,
            report.remote,
            report.setup.ToNanoseconds() / 1e9,
            report.tries,
            report.reason,
        )

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "route": self.route,
            "setup_seconds": round(self.setup_seconds, 3),
            "tries": self.tries,
        }
        if self.local or self.remote:
            out["local"], out["remote"] = self.local, self.remote
        if self.reason:
            out["reason"] = self.reason
        return out


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
    #: How the peers connected (the sender knows it from the receiver's report), if known.
    connection: PathInfo | None = None
    #: The receiver's: seconds from its acceptance (or resume) to its first verified chunk.
    first_chunk_seconds: float | None = None


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
