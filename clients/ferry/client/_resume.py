"""Picking a transfer up where an earlier run left it (receiver side).

Reads the journal, keeps what is still true on disk, re-verifies the unsure tail against
the bytes in the temporary files, hands the result to the ReceiveSession, and starts a
compact journal holding exactly that. Nothing is trusted that was not checked: a file
the journal calls finished must be in place with its size; a journaled chunk must be in
an existing temporary file, and if it was written after the last sync its digest must
match the bytes on disk.
"""

from __future__ import annotations

from ferry.client._journal import Journal
from ferry.client._sink import FileSink
from ferry.protocol import ReceiveSession, chunk_digest
from ferry.protocol.journal import Recovered

__all__ = ["resume_from_journal"]


def _matches(data: bytes, digest: bytes) -> bool:
    return chunk_digest(data) == digest


def resume_from_journal(
    sink: FileSink, journal: Journal, session: ReceiveSession, file_chunks: list[int]
) -> Recovered:
    """Restore what an earlier run verified; return what was kept (for the journal)."""
    found = journal.read(file_chunks)
    kept = Recovered()
    finished = {
        i
        for i in found.finished
        if sink.final_ok(i) and sum(1 for f, _ in found.sure if f == i) == file_chunks[i]
    }
    # Killed between moving a file into place and journaling FINISHED: every chunk is in
    # the journal, the temporary file is gone and the final one is there. The data was
    # fsynced before the move; check the unsure chunks against the final file.
    for i in range(len(file_chunks)):
        if i in finished or sink.has_temp(i) or not sink.final_ok(i):
            continue
        chunks = {c: d for (f, c), d in {**found.sure, **found.unsure}.items() if f == i}
        if len(chunks) != file_chunks[i]:
            continue
        if all(
            (i, c) in found.sure or _matches(sink.read_final(i, c, session), d)
            for c, d in chunks.items()
        ):
            found.sure.update({(i, c): d for c, d in chunks.items()})
            finished.add(i)
    sink.prepare(finished)
    for index in sorted(finished):
        for (f, chunk), digest in found.sure.items():
            if f == index:
                session.restore(index, chunk, digest)
                kept.sure[(index, chunk)] = digest
        session.mark_confirmed(index)
        kept.finished.add(index)
    with_temp: dict[int, bool] = {}
    for (index, chunk), digest in sorted({**found.sure, **found.unsure}.items()):
        if index in finished:
            continue
        if index not in with_temp:
            with_temp[index] = sink.has_temp(index)
        if not with_temp[index]:
            continue
        if (index, chunk) in found.unsure:
            length = session.chunk_length(index, chunk)
            data = sink.read_at(index, chunk * session.chunk_size, length)
            if len(data) != length or chunk_digest(data) != digest:
                continue  # written but not durable, or torn: fetch it again
        session.restore(index, chunk, digest)
        kept.sure[(index, chunk)] = digest
    journal.start(kept)
    return kept
