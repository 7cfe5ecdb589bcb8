"""The receiver's resume journal: its byte format and its recovery (sans-I/O).

The journal is an append-only file of fixed-size records beside the received files. Each
record is 49 bytes: kind (1) | file index (u32) | number (u64) | digest (32) | CRC-32 of
the first 45 bytes (u32), all big endian::

    HEADER   number = chunk size, digest = BLAKE3 of the session name and manifest
    CHUNK    a verified chunk was written: number = chunk index, digest = its BLAKE3
    SYNCED   every record before byte offset `number` is durable (its data was fsynced
             before this record was written)
    FINISHED file `file index` was verified whole and moved into place

A receiver appends CHUNK right after writing a verified chunk (no fsync), and a syncer
fsyncs the data and then appends SYNCED. After any crash, `recover` reads what is left:
records before the last SYNCED offset are sure; CHUNK records after it are *unsure* and
must be re-verified against the bytes on disk (a killed process loses nothing the kernel
already has; a crashed machine may lose or tear the tail, which the CRC catches).
"""

from __future__ import annotations

import enum
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from blake3 import blake3

__all__ = [
    "RECORD_SIZE",
    "JournalMismatch",
    "RecordKind",
    "Recovered",
    "chunk_record",
    "finished_record",
    "header_record",
    "manifest_fingerprint",
    "recover",
    "synced_record",
]

_BODY = struct.Struct(">BIQ32s")
_CRC = struct.Struct(">I")
RECORD_SIZE = _BODY.size + _CRC.size


class JournalMismatch(Exception):
    """The journal belongs to another transfer (session, manifest or chunk size)."""


class RecordKind(enum.IntEnum):
    """The first byte of a record."""

    HEADER = 1
    CHUNK = 2
    SYNCED = 3
    FINISHED = 4


def _record(kind: RecordKind, file_index: int, number: int, digest: bytes) -> bytes:
    body = _BODY.pack(kind, file_index, number, digest)
    return body + _CRC.pack(zlib.crc32(body))


def manifest_fingerprint(session: str, manifest_bytes: bytes) -> bytes:
    """What ties a journal to one transfer: the session name and its manifest."""
    return blake3(session.encode() + b"\0" + manifest_bytes).digest()


def header_record(chunk_size: int, fingerprint: bytes) -> bytes:
    """The first record of a journal."""
    return _record(RecordKind.HEADER, 0, chunk_size, fingerprint)


def chunk_record(file_index: int, chunk_index: int, digest: bytes) -> bytes:
    """A verified chunk was written."""
    return _record(RecordKind.CHUNK, file_index, chunk_index, digest)


def synced_record(upto: int) -> bytes:
    """Every record that starts before byte ``upto`` is durable."""
    return _record(RecordKind.SYNCED, 0, upto, bytes(32))


def finished_record(file_index: int) -> bytes:
    """A file was verified whole and moved into place."""
    return _record(RecordKind.FINISHED, file_index, 0, bytes(32))


@dataclass
class Recovered:
    """What a journal says, after its torn or corrupt tail was cut off."""

    valid_length: int = 0
    sure: dict[tuple[int, int], bytes] = field(default_factory=dict)
    unsure: dict[tuple[int, int], bytes] = field(default_factory=dict)
    finished: set[int] = field(default_factory=set)

    def records(self) -> Iterable[bytes]:
        """The records of a compacted journal holding what is known (after the header)."""
        for (file_index, chunk_index), digest in sorted(self.sure.items()):
            yield chunk_record(file_index, chunk_index, digest)
        for file_index in sorted(self.finished):
            yield finished_record(file_index)


def recover(
    data: bytes, *, chunk_size: int, fingerprint: bytes, file_chunks: list[int]
) -> Recovered:
    """Read a journal's bytes; raise JournalMismatch if it is another transfer's.

    Reading stops at the first record that is short, fails its CRC, or names a file or
    chunk outside the manifest: everything from there on is ignored (`valid_length`).
    """
    out = Recovered()
    if not data:
        return out
    pending: list[tuple[int, tuple[int, int], bytes]] = []
    offset = 0
    while offset + RECORD_SIZE <= len(data):
        raw = data[offset : offset + RECORD_SIZE]
        body, (crc,) = raw[: _BODY.size], _CRC.unpack(raw[_BODY.size :])
        if zlib.crc32(body) != crc:
            break
        kind, file_index, number, digest = _BODY.unpack(body)
        if offset == 0:
            if kind != RecordKind.HEADER:
                raise JournalMismatch("the journal does not start with a header")
            if number != chunk_size or digest != fingerprint:
                raise JournalMismatch("the journal belongs to another transfer")
        elif kind == RecordKind.CHUNK:
            if file_index >= len(file_chunks) or number >= file_chunks[file_index]:
                break
            pending.append((offset, (file_index, number), digest))
        elif kind == RecordKind.SYNCED:
            for at, key, chunk_digest in pending:
                if at < number:
                    out.sure[key] = chunk_digest
            pending = [p for p in pending if p[0] >= number]
        elif kind == RecordKind.FINISHED:
            if file_index >= len(file_chunks):
                break
            # The file was fsynced before FINISHED was written: its chunks are sure.
            for _, key, chunk_digest in pending:
                if key[0] == file_index:
                    out.sure[key] = chunk_digest
            pending = [p for p in pending if p[1][0] != file_index]
            out.finished.add(file_index)
        else:
            break
        offset += RECORD_SIZE
    out.valid_length = offset
    for _, key, digest in pending:
        if key not in out.sure:
            out.unsure[key] = digest
    return out
