"""The receiver's journal file: where verified chunks are recorded for resume.

`ferry.protocol.journal` defines the records and their recovery; this module only does
the file work: open and recover, compact, append, and sync (data first, then SYNCED).
The journal lives in the destination folder as `.ferry-<session>.journal` and is removed
once every file of the transfer is in place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from ferry.client._sink import StorageError
from ferry.protocol.journal import (
    JournalMismatch,
    Recovered,
    chunk_record,
    finished_record,
    header_record,
    recover,
    synced_record,
)

__all__ = ["Journal", "journal_path"]


def journal_path(dest: Path, session_name: str) -> Path:
    """Where the journal of the session ``sessions/{id}`` receiving into ``dest`` lives."""
    return dest / f".ferry-{session_name.rsplit('/', 1)[-1][:12]}.journal"


class Journal:
    """An open journal, appended to by the stream threads and the syncer."""

    def __init__(self, path: Path, chunk_size: int, fingerprint: bytes) -> None:
        self.path = path
        self.chunk_size = chunk_size
        self.fingerprint = fingerprint
        self._fd = -1
        self._size = 0
        self._lock = threading.Lock()

    def read(self, file_chunks: list[int]) -> Recovered:
        """What an earlier run left (nothing if there is no journal or it is another's)."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return Recovered()
        try:
            return recover(
                data,
                chunk_size=self.chunk_size,
                fingerprint=self.fingerprint,
                file_chunks=file_chunks,
            )
        except JournalMismatch:
            return Recovered()

    def start(self, known: Recovered) -> None:
        """Write a compact journal of what is known to be good, durably, and open it."""
        try:
            self._start(known)
        except OSError as exc:
            raise StorageError("writing the resume journal failed", exc) from exc

    def _start(self, known: Recovered) -> None:
        body = b"".join([header_record(self.chunk_size, self.fingerprint), *known.records()])
        body += synced_record(len(body))
        temp = self.path.with_name(self.path.name + ".new")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, self.path)
        _fsync_dir(self.path.parent)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        self._size = len(body)

    def _append(self, record: bytes) -> None:
        with self._lock:
            try:
                os.write(self._fd, record)
            except OSError as exc:
                raise StorageError("writing the resume journal failed", exc) from exc
            self._size += len(record)

    def chunk(self, file_index: int, chunk_index: int, digest: bytes) -> None:
        """Record a verified chunk that was just written (durable at the next sync)."""
        self._append(chunk_record(file_index, chunk_index, digest))

    def sync(self, data_fds: Iterable[int]) -> None:
        """Make every record so far durable: fsync the data, then the SYNCED record."""
        with self._lock:
            upto = self._size
        for fd in data_fds:
            try:
                os.fdatasync(fd)
            except OSError as exc:
                if exc.errno != errno.EBADF:  # a file finished meanwhile is synced already
                    raise StorageError("syncing received data failed", exc) from exc
        self._append(synced_record(upto))
        self._fsync()

    def finished(self, file_index: int) -> None:
        """Record, durably, that a file is in place."""
        self._append(finished_record(file_index))
        self._fsync()

    def _fsync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise StorageError("syncing the resume journal failed", exc) from exc

    def close(self) -> None:
        """Close the file (kept for the next run)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def remove(self) -> None:
        """Close and delete (with a rewrite a kill left half done): the transfer is over."""
        self.close()
        for path in (self.path, self.path.with_name(self.path.name + ".new")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        _fsync_dir(self.path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
