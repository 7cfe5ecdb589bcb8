"""The sender's side of a transfer (sans-I/O): which bytes to send for each request.

One `SendSession` serves all the streams of a transfer. For each ChunkRequest it checks
every range against the manifest and returns the chunks to send (`ChunkWork`: where to
read, how much); the I/O layer reads, hashes and sends them, and records each digest with
`chunk_sent`. A DigestRequest is answered from the recorded digests (`file_end`); when some
were never computed in this run (a resumed transfer), `missing_digests` names the chunks
the I/O layer must hash first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ferry.protocol.digests import FILE_DIGEST_ALGORITHM, file_digest
from ferry.protocol.frames import MAX_CHUNK_PAYLOAD, LocalProtocolError, RemoteProtocolError
from ferry.protocol.ranges import chunk_count
from ferry.v1 import peer_pb2

__all__ = ["MAX_OUTSTANDING_CHUNKS", "MAX_REQUEST_CHUNKS", "ChunkWork", "SendSession"]

#: The most chunks one ChunkRequest may ask for.
MAX_REQUEST_CHUNKS = 4096
#: The window the protocol promises: the most chunks a receiver may have asked for and not
#: yet been sent on one connection (a receiver's window is at most `MAX_REQUEST_CHUNKS`, and
#: what it has asked for and not received includes all the sender still owes it). A sender
#: fails a connection that asks beyond it: its queue of requested chunks stays bounded.
MAX_OUTSTANDING_CHUNKS = MAX_REQUEST_CHUNKS


@dataclass(frozen=True, slots=True)
class ChunkWork:
    """One chunk to read from the source and send."""

    file_index: int
    chunk_index: int
    offset: int
    length: int


class SendSession:
    """Validates requests against the manifest and keeps the digests of sent chunks."""

    def __init__(self, sizes: Sequence[int], chunk_size: int) -> None:
        if not 0 < chunk_size <= MAX_CHUNK_PAYLOAD:
            raise LocalProtocolError(f"chunk size must be 1..{MAX_CHUNK_PAYLOAD} bytes")
        self.chunk_size = chunk_size
        self._sizes = list(sizes)
        try:
            self._chunks = [chunk_count(size, chunk_size) for size in sizes]
        except ValueError as exc:
            raise LocalProtocolError(str(exc)) from None
        self._digests: list[dict[int, bytes]] = [{} for _ in sizes]

    @property
    def file_count(self) -> int:
        """How many files the transfer has."""
        return len(self._sizes)

    def on_request(self, request: peer_pb2.ChunkRequest) -> list[ChunkWork]:
        """The chunks a request asks for, in order; raise if any range is out of bounds."""
        total = sum(r.chunk_count for r in request.ranges)
        if total > MAX_REQUEST_CHUNKS:
            raise RemoteProtocolError(f"peer asked for {total} chunks at once")
        work: list[ChunkWork] = []
        for r in request.ranges:
            if r.file_index >= len(self._sizes):
                raise RemoteProtocolError(f"peer asked for unknown file {r.file_index}")
            n = self._chunks[r.file_index]
            if r.chunk_count < 1 or r.first_chunk + r.chunk_count > n:
                raise RemoteProtocolError(
                    f"peer asked for chunks {r.first_chunk}..+{r.chunk_count} of file "
                    f"{r.file_index}, which has {n}"
                )
            for chunk_index in range(r.first_chunk, r.first_chunk + r.chunk_count):
                offset = chunk_index * self.chunk_size
                length = min(self.chunk_size, self._sizes[r.file_index] - offset)
                work.append(ChunkWork(r.file_index, chunk_index, offset, length))
        return work

    def chunk_sent(self, work: ChunkWork, digest: bytes) -> None:
        """Record the digest of a chunk as it was read from the source."""
        self._digests[work.file_index][work.chunk_index] = digest

    def missing_digests(self, file_index: int) -> list[ChunkWork]:
        """The chunks of a file whose digest is not known yet."""
        self._check_file(file_index)
        known = self._digests[file_index]
        size, step = self._sizes[file_index], self.chunk_size
        return [
            ChunkWork(file_index, i, i * step, min(step, size - i * step))
            for i in range(self._chunks[file_index])
            if i not in known
        ]

    def digest(self, file_index: int) -> bytes | None:
        """The whole-file digest, or None while some chunk digest is unknown."""
        self._check_file(file_index)
        known = self._digests[file_index]
        if len(known) != self._chunks[file_index]:
            return None
        return file_digest(known[i] for i in range(self._chunks[file_index]))

    def file_end(self, file_index: int) -> peer_pb2.PeerMessage:
        """The FileEnd answering a DigestRequest; every chunk digest must be known."""
        self._check_file(file_index)
        digest = self.digest(file_index)
        if digest is None:
            raise RemoteProtocolError(f"digest of file {file_index} asked before its chunks")
        message = peer_pb2.PeerMessage()
        message.file_end.file_index = file_index
        message.file_end.algorithm = FILE_DIGEST_ALGORITHM
        message.file_end.digest = digest
        return message

    def _check_file(self, file_index: int) -> None:
        if not 0 <= file_index < len(self._sizes):
            raise RemoteProtocolError(f"peer named unknown file {file_index}")
