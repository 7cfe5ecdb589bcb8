"""Where received bytes go: hidden temporary files, moved into place once verified.

Each file is written at its offsets into `.<name>.<session>.ferry-part` beside its final
place (so the final move is an atomic rename on one filesystem). Only after the sender's
whole-file digest matched the verified chunks is the file fsynced, given its mode and
mtime, and linked to its final name (never replacing an existing file unless overwrite
was asked). Every path goes through `ferry.files` sanitizing first: nothing is written
outside the destination or through a symlink.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ferry.files import (
    check_manifest_paths,
    check_no_overwrite,
    make_parents,
    resolve_destination,
)
from ferry.files.paths import DestinationExistsError
from ferry.protocol import ReceiveSession

__all__ = ["FileSink", "SinkFile"]


@dataclass(frozen=True)
class SinkFile:
    """One file of the manifest as the receiver will write it."""

    rel: PurePosixPath
    size: int
    mode: int
    mtime_ns: int


class FileSink:
    """The destination folder of one transfer."""

    def __init__(
        self, dest: Path, files: Sequence[SinkFile], session_id: str, *, overwrite: bool
    ) -> None:
        self.dest = dest
        self.files = list(files)
        self.overwrite = overwrite
        self._tag = session_id[:12]
        self._fds: dict[int, int] = {}
        self._temps: dict[int, Path] = {}
        self._final: list[Path | None] = [None] * len(self.files)
        self._lock = threading.Lock()
        # Sanitize the whole manifest (collisions included) before anything is written.
        check_manifest_paths([f.rel.as_posix() for f in self.files])

    def prepare(self, finished: Iterable[int] = ()) -> None:
        """Check every target before the first byte: inside dest, no symlinks, no clobber.

        ``finished`` are files an earlier run of this transfer already put in place.
        """
        done = set(finished)
        self.dest.mkdir(parents=True, exist_ok=True)
        todo = [f.rel for i, f in enumerate(self.files) if i not in done]
        check_no_overwrite(self.dest, todo, self.overwrite)
        for index, f in enumerate(self.files):
            self._final[index] = resolve_destination(self.dest, f.rel)

    def final_ok(self, index: int) -> bool:
        """Whether file ``index`` is in place with its size (finished by an earlier run)."""
        try:
            st = os.lstat(resolve_destination(self.dest, self.files[index].rel))
        except (OSError, ValueError):
            return False
        return stat.S_ISREG(st.st_mode) and st.st_size == self.files[index].size

    def has_temp(self, index: int) -> bool:
        """Whether file ``index`` has a temporary file from an earlier run."""
        try:
            final = resolve_destination(self.dest, self.files[index].rel)
            st = os.lstat(final.with_name(f".{final.name}.{self._tag}.ferry-part"))
        except (OSError, ValueError):
            return False
        return stat.S_ISREG(st.st_mode)

    def read_final(self, index: int, chunk: int, session: ReceiveSession) -> bytes:
        """One chunk of a file already in place (to re-verify it after a crash)."""
        path = resolve_destination(self.dest, self.files[index].rel)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            return os.pread(fd, session.chunk_length(index, chunk), chunk * session.chunk_size)
        finally:
            os.close(fd)

    def read_at(self, index: int, offset: int, length: int) -> bytes:
        """Bytes already written to file ``index``'s temporary file (to re-verify them)."""
        return os.pread(self.fd(index), length, offset)

    def open_fds(self) -> list[int]:
        """The descriptors of the temporary files being written (for the journal's sync)."""
        with self._lock:
            return list(self._fds.values())

    def temp_path(self, index: int) -> Path:
        """The hidden temporary file of file ``index``."""
        final = self._final[index]
        assert final is not None, "prepare() first"
        return final.with_name(f".{final.name}.{self._tag}.ferry-part")

    def fd(self, index: int) -> int:
        """The temporary file's descriptor, created on first use."""
        fd = self._fds.get(index)
        if fd is not None:
            return fd
        with self._lock:
            fd = self._fds.get(index)
            if fd is None:
                f = self.files[index]
                make_parents(self.dest, f.rel)
                resolve_destination(self.dest, f.rel)  # re-check after creating folders
                temp = self.temp_path(index)
                # No O_TRUNC: a resumed transfer keeps the chunks its journal vouches for.
                flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = os.open(temp, flags, 0o600)
                self._temps[index] = temp
                os.ftruncate(fd, f.size)
                self._fds[index] = fd
            return fd

    def write(self, index: int, offset: int, data: memoryview) -> None:
        """Write verified bytes at their offset."""
        fd = self.fd(index)
        while data:
            n = os.pwrite(fd, data, offset)
            data, offset = data[n:], offset + n

    def finish(self, index: int) -> Path:
        """Make a verified file durable and move it into place; return its final path."""
        fd = self.fd(index)
        f = self.files[index]
        os.fsync(fd)
        os.fchmod(fd, f.mode & 0o777 or 0o644)
        os.utime(fd, ns=(f.mtime_ns, f.mtime_ns))
        with self._lock:
            os.close(self._fds.pop(index))
        temp = self._temps.pop(index)
        final = resolve_destination(self.dest, f.rel)
        if self.overwrite:
            os.replace(temp, final)
        else:
            try:
                os.link(temp, final)  # fails if the name was taken meanwhile: never clobber
            except FileExistsError:
                self._temps[index] = temp
                raise DestinationExistsError([f.rel]) from None
            os.unlink(temp)
        dir_fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return final

    def discard_leftovers(self) -> None:
        """Delete the temporary files an earlier run of this transfer left behind."""
        for index, f in enumerate(self.files):
            try:
                final = resolve_destination(self.dest, f.rel)
            except (OSError, ValueError):
                continue
            temp = final.with_name(f".{final.name}.{self._tag}.ferry-part")
            with contextlib.suppress(OSError):
                if stat.S_ISREG(os.lstat(temp).st_mode):
                    os.unlink(temp)
            self._temps.pop(index, None)

    def discard(self) -> None:
        """Close and delete every temporary file (after a failed transfer)."""
        with self._lock:
            for fd in self._fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._fds.clear()
            for temp in self._temps.values():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)
            self._temps.clear()
