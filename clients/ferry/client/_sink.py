"""Where received bytes go: hidden temporary files, moved into place once verified.

Each file is written at its offsets into `.<name>.<session>.ferry-part` beside its final
place (so the final move is an atomic rename on one filesystem); when that would be longer
than a name may be (255 bytes: the final name is 231 bytes or more), the name in it is cut
and a hash of the whole name added, `.<start of name>~<hash>.<session>.ferry-part`, so that
any name that can be written can be received, and a resumed run finds the same file again.
Only after the sender's whole-file digest matched the verified chunks is the file fsynced,
given its permissions and mtime, and linked to its final name (never replacing an existing
file unless overwrite was asked). Every path goes through `ferry.files` sanitizing first:
nothing is written outside the destination or through a symlink.

Permissions are the receiver's choice, not the sender's: the offered mode's permission bits
(never set-user-id, set-group-id or sticky), less this process's umask, as ``cp`` makes a new
file. So a file offered as 0777 arrives 0700 under umask 077 and 0755 under 022, a file
that was not executable never becomes so, and the owner can always read what arrived.

At consent, `reserve` allocates every file's full size (posix_fallocate), so that a disk
that fills up meanwhile fails the transfer before it starts rather than half way; where
the file system cannot allocate ahead, the files stay sparse. A write that fails anyway
(a full disk, a quota, an I/O error) raises `StorageError`: the receiver's fault, not the
sender's, and nothing verified so far is lost.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ferry.files import (
    MAX_SEGMENT_BYTES,
    check_manifest_paths,
    check_no_overwrite,
    make_parents,
    resolve_destination,
)
from ferry.files.paths import DestinationExistsError
from ferry.protocol import ReceiveSession

__all__ = [
    "FileSink",
    "SinkFile",
    "StorageError",
    "part_name",
    "process_umask",
    "received_mode",
    "remove_parts",
]

#: posix_fallocate's answers on a file system that cannot allocate ahead (the file stays sparse).
_NO_FALLOCATE = frozenset({errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS})


class StorageError(Exception):
    """Writing to the destination failed: a full disk, a quota, an I/O error.

    Local to the receiver: the verified data is kept, and a rerun continues once the cause is
    gone. ``full`` says whether it was space (ENOSPC, EDQUOT).
    """

    def __init__(self, what: str, exc: OSError) -> None:
        super().__init__(f"{what}: {exc.strerror or exc}")
        self.errno = exc.errno
        cause = os.strerror(exc.errno) if exc.errno else "the destination cannot be written"
        #: The same for the sender's eyes: ``what`` names files only by their path in the
        #: transfer, and an OSError's own text (which may name this side's folders) is left out.
        self.for_peer = f"{what}: {cause}"

    @property
    def full(self) -> bool:
        """Whether the destination ran out of space (or quota)."""
        return self.errno in (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class SinkFile:
    """One file of the manifest as the receiver will write it: ``rel`` is its safe local path
    (`ferry.files.local_paths`), ``mode`` the mode offered (see `received_mode`)."""

    rel: PurePosixPath
    size: int
    mode: int
    mtime_ns: int


def part_name(final: Path, session_id: str) -> Path:
    """The hidden temporary file beside ``final`` for the session ``session_id``.

    Always a legal name, whatever the length of ``final``'s (see the module docstring), and
    a function of the two alone: the same for every run of a transfer.
    """
    tag = session_id[:12]
    name = f".{final.name}.{tag}.ferry-part"
    if len(os.fsencode(name)) <= MAX_SEGMENT_BYTES:
        return final.with_name(name)
    digest = hashlib.blake2b(os.fsencode(final.name), digest_size=6).hexdigest()
    tail = f"~{digest}.{tag}.ferry-part"
    room = MAX_SEGMENT_BYTES - 1 - len(tail)
    start = os.fsencode(final.name)[:room].decode("utf-8", "ignore")
    return final.with_name(f".{start}{tail}")


def process_umask() -> int:
    """This process's umask, read without changing it where the system allows.

    Linux shows it in /proc/self/status. Elsewhere it can only be read by setting it, which
    another thread could observe, so it is set to 077 for that instant: a file created
    meanwhile is private rather than world-writable.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8) & 0o777
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o077)
    os.umask(old)
    return old & 0o777


def received_mode(offered: int, umask: int) -> int:
    """The permissions a received file gets: the offered permission bits (0644 if none), with
    owner-read always, less ``umask``; never set-id or sticky bits."""
    bits = offered & 0o777 or 0o644
    return (bits | 0o400) & ~umask & 0o777


def _part(dest: Path, rel: PurePosixPath, session_id: str) -> tuple[Path, os.stat_result] | None:
    """The temporary file of ``rel`` for ``session_id`` in ``dest``, if it is a regular file
    (an unsafe name, or anything else at that place, is no temporary file of ours)."""
    try:
        path = part_name(resolve_destination(dest, rel), session_id)
        st = os.lstat(path)
    except (OSError, ValueError):
        return None
    return (path, st) if stat.S_ISREG(st.st_mode) else None


def remove_parts(dest: Path, rels: Iterable[PurePosixPath], session_id: str) -> None:
    """Delete the temporary files that a run of ``session_id`` left in ``dest`` for ``rels``."""
    for rel in rels:
        found = _part(dest, rel, session_id)
        if found is not None:
            with contextlib.suppress(OSError):
                os.unlink(found[0])


class FileSink:
    """The destination folder of one transfer."""

    def __init__(
        self,
        dest: Path,
        files: Sequence[SinkFile],
        session_id: str,
        *,
        overwrite: bool,
        umask: int | None = None,
    ) -> None:
        """``umask`` masks every file's permissions (default: this process's, read now)."""
        self.dest = dest
        self.files = list(files)
        self.overwrite = overwrite
        self.umask = process_umask() if umask is None else umask
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
        for rel in todo:
            self._undo_own_link(rel)
        check_no_overwrite(self.dest, todo, self.overwrite)
        for index, f in enumerate(self.files):
            self._final[index] = resolve_destination(self.dest, f.rel)

    def _undo_own_link(self, rel: PurePosixPath) -> None:
        """Take back a final name that an earlier run linked to its temporary file.

        A run killed between `_finish`'s link and its unlink leaves both names on one inode,
        and its journal never recorded the file as done: the final name is then ours, not
        someone else's file to keep. Going back to before the link (the temporary file holds
        every verified byte) lets this run finish the file again instead of refusing it as
        a file that already exists.
        """
        found = _part(self.dest, rel, self._tag)
        if found is None:
            return
        try:
            final = resolve_destination(self.dest, rel)
            st = os.lstat(final)
        except (OSError, ValueError):
            return
        if (st.st_dev, st.st_ino) == (found[1].st_dev, found[1].st_ino):
            os.unlink(final)

    def final_ok(self, index: int) -> bool:
        """Whether file ``index`` is in place with its size (finished by an earlier run)."""
        try:
            st = os.lstat(resolve_destination(self.dest, self.files[index].rel))
        except (OSError, ValueError):
            return False
        return stat.S_ISREG(st.st_mode) and st.st_size == self.files[index].size

    def has_temp(self, index: int) -> bool:
        """Whether file ``index`` has a temporary file from an earlier run."""
        return _part(self.dest, self.files[index].rel, self._tag) is not None

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
        return part_name(final, self._tag)

    def fd(self, index: int) -> int:
        """The temporary file's descriptor, created on first use."""
        fd = self._fds.get(index)
        if fd is not None:
            return fd
        try:
            return self._open(index)
        except OSError as exc:
            raise StorageError(f"cannot create {self.files[index].rel}", exc) from exc

    def _open(self, index: int) -> int:
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

    def reserve(self, skip: Iterable[int] = ()) -> None:
        """Allocate every file's full size on disk now (those not in ``skip``).

        Raises StorageError(full) when the space is not there; what an earlier run verified
        into a temporary file is kept either way.
        """
        done = set(skip)
        for index, f in enumerate(self.files):
            if index in done or f.size == 0:
                continue
            fd = self.fd(index)
            try:
                os.posix_fallocate(fd, 0, f.size)
            except OSError as exc:
                if exc.errno in _NO_FALLOCATE:
                    continue
                raise StorageError(f"cannot reserve {f.size} bytes for {f.rel}", exc) from exc

    def release_reservations(self, keep: Iterable[int]) -> None:
        """Delete the temporary files of files outside ``keep`` (they hold no verified data
        yet, only reserved space)."""
        held = set(keep)
        with self._lock:
            for index in [i for i in self._fds if i not in held]:
                with contextlib.suppress(OSError):
                    os.close(self._fds.pop(index))
                with contextlib.suppress(OSError):
                    os.unlink(self._temps.pop(index))

    def space_needed(self) -> int:
        """Bytes the destination still has to find: each file's size less what its
        temporary file (from an earlier run) already holds on disk."""
        needed = 0
        for f in self.files:
            found = _part(self.dest, f.rel, self._tag)
            needed += max(0, f.size - (found[1].st_blocks * 512 if found is not None else 0))
        return needed

    def write(self, index: int, offset: int, data: memoryview) -> None:
        """Write verified bytes at their offset."""
        fd = self.fd(index)
        try:
            while data:
                n = os.pwrite(fd, data, offset)
                data, offset = data[n:], offset + n
        except OSError as exc:
            raise StorageError(f"writing {self.files[index].rel} failed", exc) from exc

    def finish(self, index: int) -> Path:
        """Make a verified file durable and move it into place; return its final path."""
        try:
            return self._finish(index)
        except DestinationExistsError:
            raise
        except OSError as exc:
            raise StorageError(f"putting {self.files[index].rel} in place failed", exc) from exc

    def _finish(self, index: int) -> Path:
        fd = self.fd(index)
        f = self.files[index]
        os.fsync(fd)
        os.fchmod(fd, received_mode(f.mode, self.umask))
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
        remove_parts(self.dest, [f.rel for f in self.files], self._tag)
        self._temps.clear()

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
