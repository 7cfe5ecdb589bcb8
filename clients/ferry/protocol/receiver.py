"""The receiver's side of a transfer (sans-I/O): what to ask for, what to accept.

One `ReceiveSession` serves all the parallel streams of a transfer; the I/O layer calls it
under one lock and does the slow work (reading, hashing, writing) outside it::

    request = session.request(stream)          # ChunkRequest to send, or None
    target = session.chunk_start(stream, ev)   # is this chunk expected? where does it go?
    ok = chunk_digest(payload) == ev.digest    # outside the lock
    write payload at target.offset             # outside the lock, only if ok
    finished = session.chunk_done(stream, ev, ok)   # files whose every chunk is verified
    session.claim_digests(stream)              # complete files whose digest to ask for
    session.file_end(message)                  # compare the sender's whole-file digest

Chunks are handed out in file order, at most `window` in flight per stream, so one slow
stream holds back only its own window; `stream_lost` gives a dead stream's chunks back, and
the digest requests it had asked, so that another stream asks them again.
A chunk that fails its digest is asked for again, at most `max_retries` times in all.

A chunk moves: pending -> in flight on one stream -> verified (or back to pending).
A file moves: receiving -> chunks verified -> digest confirmed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from ferry.protocol.digests import FILE_DIGEST_ALGORITHM, file_digest
from ferry.protocol.frames import (
    MAX_CHUNK_PAYLOAD,
    ChunkStart,
    LocalProtocolError,
    RemoteProtocolError,
)
from ferry.protocol.ranges import chunk_count, runs
from ferry.protocol.sender import MAX_REQUEST_CHUNKS
from ferry.v1 import peer_pb2

__all__ = ["ChunkTarget", "ReceiveSession", "TooManyCorruptChunks"]


class TooManyCorruptChunks(RemoteProtocolError):
    """Chunks kept failing their digest check; the transfer was stopped."""


@dataclass(frozen=True, slots=True)
class ChunkTarget:
    """Where an accepted chunk's payload goes."""

    file_index: int
    chunk_index: int
    offset: int
    length: int


@dataclass(slots=True)
class _File:
    size: int
    chunks: int
    digests: list[bytes | None]
    missing: int
    confirmed: bool = False


@dataclass(slots=True)
class _Stream:
    in_flight: set[tuple[int, int]] = field(default_factory=set)
    digests_asked: set[int] = field(default_factory=set)


class ReceiveSession:
    """Bookkeeping of verified chunks and the chunk schedule over several streams."""

    def __init__(
        self,
        sizes: Sequence[int],
        chunk_size: int,
        *,
        window: int = 8,
        max_retries: int = 8,
    ) -> None:
        if chunk_size <= 0:
            raise LocalProtocolError("chunk size must be positive")
        if not 1 <= window <= MAX_REQUEST_CHUNKS:
            raise LocalProtocolError(f"window must be 1..{MAX_REQUEST_CHUNKS} chunks")
        if chunk_size > MAX_CHUNK_PAYLOAD:
            raise LocalProtocolError(f"chunk size above {MAX_CHUNK_PAYLOAD} bytes")
        self.chunk_size = chunk_size
        self.window = window
        self.max_retries = max_retries
        self.retries = 0
        self.bytes_verified = 0
        self.bytes_resumed = 0
        self._files: list[_File] = []
        for size in sizes:
            try:
                n = chunk_count(size, chunk_size)
            except ValueError as exc:
                raise LocalProtocolError(str(exc)) from None
            self._files.append(_File(size, n, [None] * n, n))
        self._cursor = (0, 0)  # next never-requested (file, chunk)
        self._requeued: deque[tuple[int, int]] = deque()
        self._streams: dict[int, _Stream] = {}
        # Complete, unconfirmed files whose digest no open stream has asked for yet.
        self._digests_due: set[int] = {i for i, f in enumerate(self._files) if f.chunks == 0}

    # -- what is held -------------------------------------------------------------------

    @property
    def file_count(self) -> int:
        """How many files the transfer has."""
        return len(self._files)

    def file_complete(self, file_index: int) -> bool:
        """True when every chunk of the file is verified."""
        return self._files[file_index].missing == 0

    def file_confirmed(self, file_index: int) -> bool:
        """True when the sender's whole-file digest matched ours."""
        return self._files[file_index].confirmed

    @property
    def done(self) -> bool:
        """True when every file is verified and its digest confirmed."""
        return all(f.confirmed for f in self._files)

    def digest(self, file_index: int) -> bytes:
        """The whole-file digest of a complete file."""
        f = self._files[file_index]
        if f.missing:
            raise LocalProtocolError(f"file {file_index} is not complete")
        return file_digest(d for d in f.digests if d is not None)

    def chunk_length(self, file_index: int, chunk_index: int) -> int:
        """The length of one chunk of a file."""
        f = self._files[file_index]
        return min(self.chunk_size, f.size - chunk_index * self.chunk_size)

    # -- scheduling ---------------------------------------------------------------------

    def open_stream(self, stream: int) -> None:
        """Register a new stream; it gets chunks from the next `request`."""
        if stream in self._streams:
            raise LocalProtocolError(f"stream {stream} is already open")
        self._streams[stream] = _Stream()

    def has_in_flight(self, stream: int) -> bool:
        """True if the stream has asked for chunks it has not received yet."""
        s = self._streams.get(stream)
        return bool(s and s.in_flight)

    def stream_lost(self, stream: int) -> None:
        """Forget a stream; its chunks in flight go back to the front of the queue."""
        s = self._streams.pop(stream, None)
        if s is not None:
            self._requeued.extendleft(sorted(s.in_flight, reverse=True))
            self._digests_due.update(i for i in s.digests_asked if not self._files[i].confirmed)

    def claim_digests(self, stream: int) -> list[int]:
        """The complete files whose digest this stream should ask for now (each file once)."""
        if not self._digests_due:
            return []
        claimed = sorted(self._digests_due)
        self._digests_due.clear()
        self._streams[stream].digests_asked.update(claimed)
        return claimed

    def request(self, stream: int) -> peer_pb2.PeerMessage | None:
        """The ChunkRequest that tops the stream's window up, or None if none is due.

        A request is due when at least half the window is free (fewer, larger requests), or
        when nothing is in flight at all.
        """
        s = self._streams[stream]
        free = self.window - len(s.in_flight)
        if free <= 0 or (s.in_flight and free < max(1, self.window // 2)):
            return None
        picked: list[tuple[int, int]] = []
        while len(picked) < free:
            nxt = self._next_wanted()
            if nxt is None:
                break
            picked.append(nxt)
        if not picked:
            return None
        s.in_flight.update(picked)
        message = peer_pb2.PeerMessage()
        for file_index in sorted({f for f, _ in picked}):
            chunks = sorted(c for f, c in picked if f == file_index)
            for first, count in runs(chunks):
                message.request.ranges.add(
                    file_index=file_index, first_chunk=first, chunk_count=count
                )
        return message

    def _next_wanted(self) -> tuple[int, int] | None:
        while self._requeued:
            fc = self._requeued.popleft()
            if self._files[fc[0]].digests[fc[1]] is None:
                return fc
        file_index, chunk_index = self._cursor
        while file_index < len(self._files):
            f = self._files[file_index]
            while chunk_index < f.chunks:
                if f.digests[chunk_index] is None:
                    self._cursor = (file_index, chunk_index + 1)
                    return file_index, chunk_index
                chunk_index += 1
            file_index, chunk_index = file_index + 1, 0
        self._cursor = (file_index, 0)
        return None

    # -- chunks -------------------------------------------------------------------------

    def chunk_start(self, stream: int, ev: ChunkStart) -> ChunkTarget:
        """Check that a chunk is one this stream asked for, with the right length."""
        s = self._streams.get(stream)
        key = (ev.file_index, ev.chunk_index)
        if s is None or key not in s.in_flight:
            raise RemoteProtocolError(
                f"peer sent chunk {ev.chunk_index} of file {ev.file_index}, which was not asked for"
            )
        expected = self.chunk_length(*key)
        if ev.length != expected:
            raise RemoteProtocolError(
                f"peer sent {ev.length} bytes for chunk {ev.chunk_index} of file "
                f"{ev.file_index}; it has {expected}"
            )
        offset = ev.chunk_index * self.chunk_size
        return ChunkTarget(ev.file_index, ev.chunk_index, offset, expected)

    def chunk_done(self, stream: int, ev: ChunkStart, verified: bool) -> list[int]:
        """Record a chunk's verdict; return the files it completed (zero or one)."""
        key = (ev.file_index, ev.chunk_index)
        s = self._streams.get(stream)
        if s is not None:  # a lost stream's chunks were re-queued already
            s.in_flight.discard(key)
        f = self._files[ev.file_index]
        if not verified:
            self.retries += 1
            if self.retries > self.max_retries:
                raise TooManyCorruptChunks(
                    f"{self.retries} chunks failed their digest check; giving up"
                )
            self._requeued.appendleft(key)
            return []
        if f.digests[ev.chunk_index] is not None:
            return []
        f.digests[ev.chunk_index] = ev.digest
        f.missing -= 1
        self.bytes_verified += ev.length
        if f.missing:
            return []
        self._digests_due.add(ev.file_index)
        return [ev.file_index]

    def empty_files(self) -> list[int]:
        """Files with no chunks: complete from the start."""
        return [i for i, f in enumerate(self._files) if f.chunks == 0]

    def complete_unconfirmed(self) -> list[int]:
        """Files holding every chunk whose digest is not confirmed yet (empty or resumed)."""
        return [i for i, f in enumerate(self._files) if f.missing == 0 and not f.confirmed]

    # -- resuming -----------------------------------------------------------------------

    def restore(self, file_index: int, chunk_index: int, digest: bytes) -> None:
        """Count a chunk verified in an earlier run (from the journal) as held."""
        if self._streams:
            raise LocalProtocolError("restore chunks before opening streams")
        f = self._files[file_index]
        if not 0 <= chunk_index < f.chunks:
            raise LocalProtocolError(f"chunk {chunk_index} of file {file_index} out of range")
        if f.digests[chunk_index] is None:
            f.digests[chunk_index] = digest
            f.missing -= 1
            if not f.missing:
                self._digests_due.add(file_index)
            length = self.chunk_length(file_index, chunk_index)
            self.bytes_verified += length
            self.bytes_resumed += length

    def mark_confirmed(self, file_index: int) -> None:
        """A file finished in an earlier run: every chunk held, its digest confirmed."""
        f = self._files[file_index]
        if f.missing:
            raise LocalProtocolError(f"file {file_index} is not complete")
        f.confirmed = True
        self._digests_due.discard(file_index)

    def held(self, file_index: int) -> dict[int, bytes]:
        """The verified chunks of a file and their digests."""
        return {i: d for i, d in enumerate(self._files[file_index].digests) if d is not None}

    # -- whole files --------------------------------------------------------------------

    def digest_request(self, file_index: int) -> peer_pb2.PeerMessage:
        """The message asking the sender for a complete file's whole-file digest."""
        if not self.file_complete(file_index):
            raise LocalProtocolError(f"file {file_index} is not complete")
        message = peer_pb2.PeerMessage()
        message.digest_request.file_index = file_index
        return message

    def file_end(self, end: peer_pb2.FileEnd) -> None:
        """Compare the sender's whole-file digest with ours; mark the file confirmed."""
        if not 0 <= end.file_index < len(self._files):
            raise RemoteProtocolError(f"peer sent a digest for unknown file {end.file_index}")
        if end.algorithm != FILE_DIGEST_ALGORITHM:
            raise RemoteProtocolError(f"peer used unknown digest algorithm {end.algorithm!r}")
        if not self.file_complete(end.file_index):
            raise RemoteProtocolError(f"peer sent a digest for incomplete file {end.file_index}")
        if end.digest != self.digest(end.file_index):
            raise RemoteProtocolError(
                f"file {end.file_index}: whole-file digest does not match the chunks received"
            )
        self._files[end.file_index].confirmed = True
        self._digests_due.discard(end.file_index)
        for s in self._streams.values():
            s.digests_asked.discard(end.file_index)
