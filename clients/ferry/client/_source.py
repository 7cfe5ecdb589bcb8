"""The sender's files as offered: where every sending path reads its bytes from.

A `Source` holds the offered files and the `SourceStamp` each had when it was offered.
Every sending path (the direct `SendPeer`, the `StoreUploader`, the digests shown at the
end) reads through one, so the rules live here once::

    fd(i)                     open file i on first use; refused unless it is still as stamped
    read(i, offset, into)     preadv straight into the caller's (reused) buffer; a short
                              read means the file shrank: SourceChanged
    check_unchanged(i)        before vouching for a file (its FileEnd, its digests object):
                              a file written to while it was read would mix old and new
                              chunks whose digests all check out
    fill_digests(session)     hash the chunks whose digests a SendSession does not know yet
    file_digest(i)            the whole-file digest, every chunk read and hashed
    release(i) / close()      close one file's descriptor / all of them

The hash is the caller's or is computed here without any lock held; reading needs none
(`preadv` at an offset on a shared descriptor). A `Source` belongs to one path: the path
that closes it must be the only one reading from it (a new `fd` reopens, checked again).

Every open follows no symlink on the way (`ferry.files.nofollow`: the folders of the path
walked one by one from ``/``, the file itself ``O_NOFOLLOW|O_NONBLOCK``) and is then checked
against the stamp taken at the offer — device and inode, size, mtime and ctime — on the
descriptor itself, before a byte is read. A file or a folder on its path swapped for a
symlink, a fifo or another file since the offer is SourceChanged, never read. The same
holds after a restart: the stamps saved with the offer are what the files must still be.
The folder of the last file opened is kept open (one descriptor): files are read in
manifest order, so most opens are one ``openat`` relative to it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from ferry.files import SourceStamp, escape_name
from ferry.files.nofollow import Swapped, open_folder, open_regular
from ferry.protocol import SendSession, chunk_digest, file_digest

__all__ = ["Source", "SourceChanged", "digest_file"]


class SourceChanged(Exception):
    """A file being sent changed since it was offered.

    Its message names the file by its path on this machine, for the user; the receiver is
    told only :attr:`for_peer` (`ferry.client._errors.for_peer`).
    """

    for_peer = "a file being sent changed on the sender's side since it was offered"


class Source:
    """The offered files, read by one sending path."""

    def __init__(
        self, paths: Sequence[Path], stamps: Sequence[SourceStamp], chunk_size: int
    ) -> None:
        if len(paths) != len(stamps):
            raise ValueError("one stamp per source file is needed")
        self.paths = list(paths)
        self.stamps = list(stamps)
        self.sizes = [stamp.size for stamp in self.stamps]
        self.chunk_size = chunk_size
        self._fds: dict[int, int] = {}
        self._folder: tuple[Path, int] | None = None  # the last file's folder, open
        self._lock = threading.Lock()

    def _shown(self, index: int) -> str:
        return escape_name(str(self.paths[index]))

    def fd(self, index: int) -> int:
        """File ``index``'s descriptor, opened (and checked against its stamp) on first use."""
        fd = self._fds.get(index)
        if fd is not None:
            return fd
        with self._lock:
            fd = self._fds.get(index)
            if fd is None:
                fd = self._open(index)
                try:
                    self._check(index, fd)
                except SourceChanged:
                    os.close(fd)
                    raise
                self._fds[index] = fd
            return fd

    def _open(self, index: int) -> int:
        """Open file ``index`` as it is now, following no symlink (the lock is held)."""
        path = self.paths[index]
        try:
            return open_regular(path.name, self._folder_of(path), path)
        except Swapped as exc:
            raise SourceChanged(
                f"{self._shown(index)} changed since it was offered: {exc.why}"
            ) from exc

    def _folder_of(self, path: Path) -> int:
        """A descriptor of ``path``'s folder: the kept one if it is that folder."""
        if self._folder is not None and self._folder[0] == path.parent:
            return self._folder[1]
        self._close_folder()
        fd = open_folder(path.parent)
        self._folder = (path.parent, fd)
        return fd

    def _close_folder(self) -> None:
        if self._folder is not None:
            os.close(self._folder[1])
            self._folder = None

    def read(self, index: int, offset: int, into: memoryview) -> None:
        """Fill ``into`` with file ``index``'s bytes from ``offset`` (SourceChanged if short)."""
        _read_into(self.fd(index), into, offset, self.paths[index])

    def check_unchanged(self, index: int) -> None:
        """Raise SourceChanged unless file ``index`` is still the version offered."""
        self._check(index, self.fd(index))

    def _check(self, index: int, fd: int) -> None:
        if not self.stamps[index].matches(os.fstat(fd)):
            raise SourceChanged(f"{self._shown(index)} changed since it was offered")

    def release(self, index: int) -> None:
        """Close file ``index`` (done with it; a later read opens and checks it again)."""
        with self._lock:
            fd = self._fds.pop(index, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        """Close every open file."""
        with self._lock:
            fds = list(self._fds.values())
            self._fds.clear()
            self._close_folder()
        for fd in fds:
            os.close(fd)

    def fill_digests(
        self,
        session: SendSession,
        indexes: Iterable[int] | None = None,
        *,
        lock: AbstractContextManager[object] | None = None,
        stamped: bool = True,
    ) -> None:
        """Hash the chunks of files ``indexes`` (all) whose digests ``session`` lacks.

        ``lock`` guards ``session`` (taken only around its calls, never around a read or
        a hash). ``stamped=False`` reads the files as they are now, without the stamp
        check (still no symlink followed, nothing but a regular file opened), through
        descriptors of its own (for the digests shown once the receiver has everything).
        """
        guard = nullcontext() if lock is None else lock
        try:
            self._fill_digests(session, indexes, guard, stamped)
        finally:
            if not stamped:  # its folder too: nothing may close this Source after
                with self._lock:
                    self._close_folder()

    def _fill_digests(
        self,
        session: SendSession,
        indexes: Iterable[int] | None,
        guard: AbstractContextManager[object],
        stamped: bool,
    ) -> None:
        buffer: memoryview | None = None
        for index in range(len(self.paths)) if indexes is None else indexes:
            with guard:
                missing = session.missing_digests(index)
            if not missing:
                continue
            if buffer is None:
                buffer = memoryview(bytearray(self.chunk_size))
            fd = self.fd(index) if stamped else self._open_unstamped(index)
            try:
                for item in missing:
                    view = buffer[: item.length]
                    _read_into(fd, view, item.offset, self.paths[index])
                    digest = chunk_digest(view)
                    with guard:
                        session.chunk_sent(item, digest)
            finally:
                if not stamped:
                    os.close(fd)

    def _open_unstamped(self, index: int) -> int:
        with self._lock:
            return self._open(index)

    def file_digest(self, index: int) -> bytes:
        """File ``index``'s blake3-chunks digest, every chunk read and hashed; closes it."""
        size = self.sizes[index]
        buffer = memoryview(bytearray(min(self.chunk_size, size)))
        try:
            digests = []
            for at in range(0, size, self.chunk_size):
                view = buffer[: min(self.chunk_size, size - at)]
                self.read(index, at, view)
                digests.append(chunk_digest(view))
            if not digests:
                self.fd(index)  # an empty file is still opened and checked
            return file_digest(digests)
        finally:
            self.release(index)


def _read_into(fd: int, into: memoryview, offset: int, path: Path) -> None:
    got, length = 0, len(into)
    while got < length:
        n = os.preadv(fd, [into[got:]], offset + got)
        if n == 0:
            raise SourceChanged(f"{escape_name(str(path))} shrank since it was offered")
        got += n


def digest_file(path: Path, chunk_size: int) -> bytes:
    """A whole file's blake3-chunks digest, read from disk (what `ferry digest` prints)."""
    buffer = memoryview(bytearray(chunk_size))
    digests = []
    with open(path, "rb") as f:
        while n := f.readinto(buffer):
            digests.append(chunk_digest(buffer[:n]))
    return file_digest(digests)
