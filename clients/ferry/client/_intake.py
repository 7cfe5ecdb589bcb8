"""Where every receiving path hands its chunks: verify, write, journal, then the verdict.

One `Intake` per accepted transfer owns what all its paths share -- the `ReceiveSession`
(which chunks are wanted, which are held), the `FileSink` (where bytes go), the `Journal`
(what survives a crash), the lock that guards the session, and the stream ids. The direct
path's streams and the object store's workers alike are streams of it; a new path (hole
punched, relayed) is one more caller of the same four steps::

    stream = intake.open_stream()       # a new stream of the session (or the id a dial named)
    finished = intake.chunk(file, chunk, offset, digest, payload, verdict)
        # outside the lock: BLAKE3(payload) == digest?  if so: write at offset, journal it
        # under the lock: verdict(ok) -> the files this chunk completed; wake the others
    intake.refuse(verdict)               # the path found it corrupt itself: verdict(False)
    intake.file_end(end) / intake.file_confirmed(i)
        # the whole-file digest matched: fsync + move in place, journal FINISHED, on_file
    intake.sync()                        # the syncer's step: fsync data, then SYNCED
    intake.close_stream(stream)          # its chunks in flight go back to the others

The journal's record of a chunk always follows the chunk's write, and a chunk that fails
its digest is neither written nor journaled. ``verdict`` is how the path tells the session:
the direct path's `ReceiverConnection.chunk_checked` (the conversation must hear it too),
or `ReceiveSession.chunk_done` for a path with no conversation. The session is called only
holding `lock`; `wake` (on that lock) is notified whenever work may have come back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from ferry.client._journal import Journal
from ferry.client._sink import FileSink
from ferry.protocol import ReceiveSession, chunk_digest
from ferry.v1 import peer_pb2

__all__ = ["SYNC_INTERVAL", "Intake"]

#: How often the journal is made durable while chunks arrive (seconds).
SYNC_INTERVAL = 0.5


class Intake:
    """The receiving end of one transfer, shared by every path that brings it chunks."""

    def __init__(
        self,
        session: ReceiveSession,
        sink: FileSink,
        journal: Journal,
        *,
        on_file: Callable[[int], None] | None = None,
    ) -> None:
        self.session = session
        self.sink = sink
        self.journal = journal
        self.on_file = on_file
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self._next_stream = 0
        #: When (time.monotonic()) this run verified its first chunk, by any path.
        self.first_chunk_at: float | None = None
        self._synced = time.monotonic()

    @property
    def chunk_size(self) -> int:
        """The transfer's chunk size."""
        return self.session.chunk_size

    @property
    def done(self) -> bool:
        """True when every file is verified and in place."""
        return self.session.done

    @property
    def bytes_verified(self) -> int:
        """Bytes verified so far (from the journal and from every path)."""
        return self.session.bytes_verified

    # -- streams ------------------------------------------------------------------------

    @property
    def next_stream(self) -> int:
        """The id the next stream gets (a dial names it in its Hello before it opens)."""
        return self._next_stream

    def open_stream(self, stream: int | None = None) -> int:
        """Open a stream of the session: the next id, or ``stream`` (then ids go past it)."""
        with self.lock:
            if stream is None:
                stream = self._next_stream
            self._next_stream = max(self._next_stream, stream + 1)
            self.session.open_stream(stream)
            return stream

    def close_stream(self, stream: int) -> None:
        """Forget a stream: its chunks in flight and digests asked are due again."""
        with self.lock:
            self.session.stream_lost(stream)
            self.wake.notify_all()

    # -- chunks and files ---------------------------------------------------------------

    def chunk(
        self,
        file_index: int,
        chunk_index: int,
        offset: int,
        digest: bytes,
        payload: memoryview,
        verdict: Callable[[bool], Sequence[int]],
    ) -> Sequence[int]:
        """Take one announced chunk: return the files it completed (zero or one).

        The payload is hashed outside the lock and, only if it matches ``digest``, written
        at ``offset`` and then journaled; ``verdict(ok)`` is called holding the lock.
        Raises StorageError (this side's disk) before any verdict is given.
        """
        ok = chunk_digest(payload) == digest
        if ok:
            self.sink.write(file_index, offset, payload)
            self.journal.chunk(file_index, chunk_index, digest)
        with self.wake:
            if ok and self.first_chunk_at is None:
                self.first_chunk_at = time.monotonic()
            finished = verdict(ok)
            self.wake.notify_all()
        return finished

    def refuse(self, verdict: Callable[[bool], Sequence[int]]) -> None:
        """Turn down an announced chunk that its path found corrupt before any digest
        (a sealed chunk that did not open): nothing is written or journaled, and
        ``verdict(False)`` is given holding the lock, as for a digest mismatch."""
        with self.wake:
            verdict(False)
            self.wake.notify_all()

    def file_end(self, end: peer_pb2.FileEnd) -> None:
        """Check a whole-file digest against the chunks held; if it matches, finish the file.

        Raises RemoteProtocolError if it does not match (nothing is moved into place).
        """
        with self.lock:
            self.session.file_end(end)
        self.file_confirmed(end.file_index)

    def file_confirmed(self, index: int) -> None:
        """A file's whole-file digest matched: make it durable, move it in place, journal it."""
        self.sink.finish(index)
        self.journal.finished(index)
        if self.on_file is not None:
            self.on_file(index)
        with self.wake:
            self.wake.notify_all()

    # -- durability ---------------------------------------------------------------------

    def sync(self) -> None:
        """The syncer's step: every `SYNC_INTERVAL`, make what is journaled durable.

        Raises StorageError if the data or the journal cannot be synced.
        """
        now = time.monotonic()
        if now - self._synced < SYNC_INTERVAL:
            return
        self._synced = now
        self.journal.sync(self.sink.open_fds())
