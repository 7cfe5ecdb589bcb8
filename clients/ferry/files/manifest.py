"""Building the sender's manifest from the PATH arguments of ``ferry send``.

Rules (what the user sees):

- A file argument is sent under its base name: ``ferry send ~/a/report.pdf`` sends ``report.pdf``.
  A symlink given *as an argument* is followed, like ``cp`` does, and sent under the link's name.
- A folder argument is walked recursively, in sorted order, and its files are sent as
  ``<folder name>/<relative path>``: ``ferry send photos`` sends ``photos/2024/a.jpg``.
- Inside a folder nothing is followed: a symlink is refused with an error naming it, and so is
  anything that is not a regular file or a folder (fifo, socket, device). Nothing is skipped
  silently; the user removes or replaces the entry and tries again. (Refused rather than
  skipped: a folder that arrives without some of its files, silently, is worse than a clear
  error before the offer; ``cp -r``/``rsync`` would copy the link itself, which the receiver
  must never create.)
- The walk itself follows nothing either: each folder is listed through a descriptor opened
  relative to its parent's with O_NOFOLLOW, and checked to be the folder its ``lstat`` saw. A
  folder swapped for a link to ``/etc`` while the scan runs is refused ("changed while it was
  being read"), never listed, so no file outside the tree is ever stamped as offered.
- The sources returned are real paths (arguments resolved once, here): the sender opens each
  file later by walking that path without following any symlink (`ferry.files.nofollow`) and
  checks the descriptor against the file's stamp before reading it.
- Empty folders are not transferred (the manifest lists files only); if nothing at all is left to
  send, that is an error.
- Every name this machine can hold is sent as it is, also one the receiver cannot write as it
  is (a control character, ``aux.c``, ``notes.``, ``Makefile`` beside ``makefile``): the
  receiver maps it to a safe local name and shows the mapping
  (:func:`ferry.files.paths.local_paths`).
  The manifest carries names as UTF-8 text with ``/`` between them and no backslash (the
  broker refuses one: it is a separator on Windows), so two things are written as ``%XX``
  (their byte in hex) on the wire: a byte of a name that is not UTF-8 (``caf\xe9.txt`` from a
  Latin-1 system is sent as ``caf%E9.txt``: a lossy substitute such as U+FFFD would make
  different names equal, and refusing would fail a whole folder over one name), and a
  backslash. Refused are only two arguments with the same name, and a path longer than the
  protocol carries.

A :class:`SourceStamp` is what the sender remembers of each file to notice that it changed
after the offer: device, inode, size, mtime and ctime. What it catches: any write through the
file system (it moves ctime, and a user cannot set ctime back: ``touch -r`` restores mtime
only), a replacement by rename (a new inode, even with the size and mtime put back), a swap
for a link to another file (opened without following, and that file's inode differs anyway),
truncation. It is compared on the opened descriptor, never on a path, and after a restart the
saved stamps are the only tie to the offer: there are no handles left from the first run.
What it cannot: a change made while the clock is set back, by root editing the block device or
a file system that fakes ctime, or a write within one timestamp tick of the offer on a file
system with coarse timestamps. It also flags harmless changes: ``chmod``, ``chown`` or a new
hard link move ctime too, and a remount of a file system whose inode numbers are not stable
(FAT, some network file systems). That price is kept for ctime: without it, ``touch -r`` after
an edit in place would let a sender vouch for bytes the receiver never agreed to.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from ferry.errors import FerryError
from ferry.files.display import escape_name
from ferry.files.nofollow import Swapped, open_folder
from ferry.files.paths import MAX_PATH_BYTES
from ferry.v1 import broker_pb2

__all__ = [
    "ManifestError",
    "Scan",
    "SourceStamp",
    "build_manifest",
    "chunk_count",
    "free_space_ok",
    "scan_sources",
    "total_size",
]


class ManifestError(FerryError):
    """The given files cannot be sent as they are; the message names the file and the reason."""


@dataclass(frozen=True)
class SourceStamp:
    """What identifies one version of a source file: its inode, size and both timestamps."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> SourceStamp:
        """The stamp of a file as ``os.stat``/``os.fstat`` describes it now."""
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def matches(self, st: os.stat_result) -> bool:
        """Whether the file ``st`` describes is still this version."""
        return self == SourceStamp.of(st)

    def to_text(self) -> str:
        """A compact form to keep in local state: ``dev:ino:size:mtime_ns:ctime_ns``."""
        return f"{self.dev}:{self.ino}:{self.size}:{self.mtime_ns}:{self.ctime_ns}"

    @classmethod
    def from_text(cls, text: str) -> SourceStamp:
        """Parse `to_text`'s form; ValueError if it is not that."""
        parts = text.split(":")
        if len(parts) != 5:
            raise ValueError(f"not a source stamp: {text!r}")
        dev, ino, size, mtime, ctime = (int(p) for p in parts)
        return cls(dev, ino, size, mtime, ctime)


@dataclass(frozen=True)
class Scan:
    """The manifest of some PATH arguments, their source files and each file's stamp."""

    manifest: broker_pb2.Manifest
    sources: list[Path]
    stamps: list[SourceStamp]


def _shown(path: Path | str) -> str:
    return f'"{escape_name(str(path))}"'


def _entry(rel: str, st: os.stat_result) -> broker_pb2.FileEntry:
    modify_time = Timestamp()
    modify_time.FromNanoseconds(st.st_mtime_ns)
    return broker_pb2.FileEntry(
        path=rel, size_bytes=st.st_size, mode=st.st_mode & 0o777, modify_time=modify_time
    )


def _wire_char(ch: str) -> str:
    cp = ord(ch)
    if 0xDC80 <= cp <= 0xDCFF:  # a byte that is not UTF-8, as os.fsdecode keeps it
        return f"%{cp - 0xDC00:02X}"
    if ch == "\\":
        return "%5C"
    return ch


def _wire_path(rel: str) -> str:
    """The manifest's form of the local relative path ``rel``: itself, except that a byte that
    is not UTF-8 and a backslash are written ``%XX`` (see the module docstring)."""
    if rel.isascii() and "\\" not in rel:
        return rel
    return "".join(map(_wire_char, rel))


def _check_name(rel: str, source: Path) -> None:
    """Refuse only what the protocol cannot carry: the receiver makes every name safe."""
    if len(_wire_path(rel)) > MAX_PATH_BYTES:
        raise ManifestError(
            f"cannot send {_shown(source)}: its path is longer than {MAX_PATH_BYTES} characters"
        )


def _check_distinct(wires: Sequence[str], sources: Sequence[Path]) -> None:
    """Two files may not be offered under one name (two arguments with the same name)."""
    seen: dict[str, Path] = {}
    for wire, source in zip(wires, sources, strict=True):
        other = seen.setdefault(wire, source)
        if other is not source:
            raise ManifestError(
                f"cannot send {_shown(source)}: {_shown(other)} is sent under the same name "
                f"{_shown(wire)} (send one of them from another folder)"
            )


def _changed(source: Path) -> ManifestError:
    return ManifestError(f"{_shown(source)} changed while it was being read; try again")


def _same_inode(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _open_listed(name: str, dir_fd: int, source: Path, st: os.stat_result) -> int:
    """Open sub-folder ``name`` of ``dir_fd`` to list it: the one ``st`` described.

    A folder swapped for a symlink between its ``lstat`` and this open is not followed
    (O_NOFOLLOW), and one swapped for another folder is caught by its inode.
    """
    try:
        fd = open_folder(Path(name), listed=True, dir_fd=dir_fd)
    except Swapped:
        raise _changed(source) from None
    except OSError as e:
        raise ManifestError(f"cannot read folder {_shown(source)}: {e.strerror}") from e
    if not _same_inode(os.fstat(fd), st):
        os.close(fd)
        raise _changed(source)
    return fd


def _walk(
    dir_fd: int, folder: Path, prefix: str, out: list[tuple[str, Path, os.stat_result]]
) -> None:
    """Add the files under ``folder`` (open as ``dir_fd``) to ``out``, following nothing.

    Every entry is ``lstat``-ed relative to its folder's descriptor and every sub-folder
    opened relative to it with O_NOFOLLOW: a folder swapped for a symlink while the walk
    runs is never listed, so no stamp of a file outside the tree is ever taken.
    """
    try:
        with os.scandir(dir_fd) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise ManifestError(f"cannot read folder {_shown(folder)}: {e.strerror}") from e
    for entry in entries:
        source = folder / entry.name
        rel = f"{prefix}/{entry.name}"
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            raise _changed(source) from None
        except OSError as e:
            raise ManifestError(f"cannot read {_shown(source)}: {e.strerror}") from e
        if stat.S_ISLNK(st.st_mode):
            raise ManifestError(
                f"{_shown(source)} is a symlink; symlinks inside folders are not sent "
                "(replace it with the file or remove it)"
            )
        _check_name(rel, source)
        if stat.S_ISDIR(st.st_mode):
            sub = _open_listed(entry.name, dir_fd, source, st)
            try:
                _walk(sub, source, rel, out)
            finally:
                os.close(sub)
        elif stat.S_ISREG(st.st_mode):
            out.append((rel, source, st))
        else:
            raise ManifestError(f"{_shown(source)} is not a regular file or a folder")


def build_manifest(
    paths: Sequence[Path], chunk_size: int
) -> tuple[broker_pb2.Manifest, list[Path]]:
    """The manifest of ``paths`` and their source files, in the same order (see `scan_sources`)."""
    scan = scan_sources(paths, chunk_size)
    return scan.manifest, scan.sources


def _open_real(real: Path, *, listed: bool) -> int:
    """Open folder ``real`` (a real path, from `os.path.realpath`), following nothing."""
    try:
        return open_folder(real, listed=listed)
    except Swapped:
        raise _changed(real) from None
    except OSError as e:
        raise ManifestError(f"cannot read folder {_shown(real)}: {e.strerror}") from e


def _open_argument(real: Path, st: os.stat_result) -> int:
    """Open folder argument ``real`` (its real path) to list it: the one ``st`` described.

    The user's argument was followed once, to ``real``; walking that again without
    following anything, and comparing inodes, makes sure nothing was swapped in between.
    """
    fd = _open_real(real, listed=True)
    if not _same_inode(os.fstat(fd), st):
        os.close(fd)
        raise _changed(real)
    return fd


def _argument_file(real: Path, st: os.stat_result) -> tuple[Path, os.stat_result]:
    """File argument ``real`` (its real path) and its stamp, taken through its folder."""
    folder = _open_real(real.parent, listed=False)
    try:
        link_free = os.stat(real.name, dir_fd=folder, follow_symlinks=False)
    except OSError:
        raise _changed(real) from None
    finally:
        os.close(folder)
    if not stat.S_ISREG(link_free.st_mode) or not _same_inode(link_free, st):
        raise _changed(real)
    return real, link_free


def scan_sources(paths: Sequence[Path], chunk_size: int) -> Scan:
    """Return the manifest for ``paths`` and the real path of each of its files.

    The two are in the same order. A real path has no symlink on it (an argument that is
    or goes through a symlink is resolved once, here): the sender opens each file later by
    walking its real path without following anything (`ferry.files.nofollow`) and checks
    what it opened against its stamp. Raises ManifestError if an argument is missing,
    unreadable, or not a file or folder; if a folder holds a symlink or a special file; if
    something changes while it is read; if a name is unsafe or two names collide; or if
    there is no file to send. Raises ValueError if ``chunk_size`` < 1.
    """
    if chunk_size < 1:
        raise ValueError(f"the chunk size must be positive: {chunk_size}")
    if not paths:
        raise ManifestError("nothing to send: no files or folders given")
    found: list[tuple[str, Path, os.stat_result]] = []
    for arg in paths:
        source = Path(os.path.abspath(arg))
        name = source.name
        if name == "":
            raise ManifestError(f"cannot send {_shown(arg)}: it has no name (the root folder)")
        try:
            st = os.stat(source)
        except FileNotFoundError:
            raise ManifestError(f"{_shown(arg)} does not exist") from None
        except OSError as e:
            raise ManifestError(f"cannot read {_shown(arg)}: {e.strerror}") from e
        _check_name(name, source)
        if stat.S_ISDIR(st.st_mode):
            real = Path(os.path.realpath(source))
            top = _open_argument(real, st)
            try:
                _walk(top, real, name, found)
            finally:
                os.close(top)
        elif stat.S_ISREG(st.st_mode):
            found.append((name, *_argument_file(Path(os.path.realpath(source)), st)))
        else:
            raise ManifestError(f"{_shown(arg)} is not a regular file or a folder")
    if not found:
        raise ManifestError("nothing to send: the folders given hold no files")
    wires = [_wire_path(rel) for rel, _, _ in found]
    _check_distinct(wires, [source for _, source, _ in found])
    manifest = broker_pb2.Manifest(
        files=[_entry(wire, st) for wire, (_, _, st) in zip(wires, found, strict=True)],
        chunk_size_bytes=chunk_size,
    )
    return Scan(
        manifest,
        [source for _, source, _ in found],
        [SourceStamp.of(st) for _, _, st in found],
    )


def total_size(manifest: broker_pb2.Manifest) -> int:
    """Return the sum of the sizes of the manifest's files, in bytes."""
    return sum(entry.size_bytes for entry in manifest.files)


def chunk_count(size: int, chunk_size: int) -> int:
    """Return how many chunks a file of ``size`` bytes has; an empty file has none."""
    if size < 0:
        raise ValueError(f"a size cannot be negative: {size}")
    if chunk_size < 1:
        raise ValueError(f"the chunk size must be positive: {chunk_size}")
    return -(-size // chunk_size)


def free_space_ok(dest: Path, needed: int) -> tuple[bool, int]:
    """Return whether the file system of ``dest`` has ``needed`` bytes free, and how many it has.

    If ``dest`` does not exist yet, its nearest existing parent folder is measured.
    """
    probe = Path(os.path.abspath(dest))
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    return free >= needed, free
