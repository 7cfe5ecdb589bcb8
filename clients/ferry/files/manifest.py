"""Building the sender's manifest from the PATH arguments of ``ferry send``.

Rules (what the user sees):

- A file argument is sent under its base name: ``ferry send ~/a/report.pdf`` sends ``report.pdf``.
  A symlink given *as an argument* is followed, like ``cp`` does, and sent under the link's name.
- A folder argument is walked recursively, in sorted order, and its files are sent as
  ``<folder name>/<relative path>``: ``ferry send photos`` sends ``photos/2024/a.jpg``.
- Inside a folder nothing is followed: a symlink is refused with an error naming it, and so is
  anything that is not a regular file or a folder (fifo, socket, device). Nothing is skipped
  silently; the user removes or replaces the entry and tries again.
- Empty folders are not transferred (the manifest lists files only); if nothing at all is left to
  send, that is an error.
- Every path must pass :func:`ferry.files.paths.sanitize_relative_path` and the set must pass
  :func:`ferry.files.paths.check_manifest_paths`, so a sender never produces a manifest that an
  honest receiver refuses (two arguments with the same name, ``A.txt`` next to ``a.txt``, ...).

A :class:`SourceStamp` is what the sender remembers of each file to notice that it changed
after the offer: device, inode, size, mtime and ctime. What it catches: any write through the
file system (it moves ctime, and a user cannot set ctime back: ``touch -r`` restores mtime
only), a replacement by rename (a new inode), truncation. What it cannot: a change made while
the clock is set back, by root editing the block device or a file system that fakes ctime, or
a write within one timestamp tick of the offer on a file system with coarse timestamps. It
also flags harmless changes: ``chmod``, ``chown`` or a new hard link move ctime too, and a
remount of a file system whose inode numbers are not stable (FAT, some network file systems).
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
from ferry.files.paths import UnsafePathError, check_manifest_paths, sanitize_relative_path
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


def _check_name(rel: str, source: Path) -> None:
    try:
        sanitize_relative_path(rel)
    except UnsafePathError as e:
        raise ManifestError(f"cannot send {_shown(source)}: {e.reason}") from e


def _walk(folder: Path, prefix: str, out: list[tuple[str, Path, os.stat_result]]) -> None:
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise ManifestError(f"cannot read folder {_shown(folder)}: {e.strerror}") from e
    for entry in entries:
        source = Path(entry.path)
        rel = f"{prefix}/{entry.name}"
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError as e:
            raise ManifestError(f"cannot read {_shown(source)}: {e.strerror}") from e
        if stat.S_ISLNK(st.st_mode):
            raise ManifestError(
                f"{_shown(source)} is a symlink; symlinks inside folders are not sent "
                "(replace it with the file or remove it)"
            )
        _check_name(rel, source)
        if stat.S_ISDIR(st.st_mode):
            _walk(source, rel, out)
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


def scan_sources(paths: Sequence[Path], chunk_size: int) -> Scan:
    """Return the manifest for ``paths`` and the absolute source path of each of its files.

    The two are in the same order. Raises ManifestError if an argument is missing, unreadable,
    or not a file or folder; if a folder holds a symlink or a special file; if a name is unsafe or
    two names collide; or if there is no file to send. Raises ValueError if ``chunk_size`` < 1.
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
            _walk(source, name, found)
        elif stat.S_ISREG(st.st_mode):
            found.append((name, source, st))
        else:
            raise ManifestError(f"{_shown(arg)} is not a regular file or a folder")
    if not found:
        raise ManifestError("nothing to send: the folders given hold no files")
    try:
        check_manifest_paths([rel for rel, _, _ in found])
    except UnsafePathError as e:
        raise ManifestError(f"cannot send {_shown(e.path)}: {e.reason}") from e
    manifest = broker_pb2.Manifest(
        files=[_entry(rel, st) for rel, _, st in found], chunk_size_bytes=chunk_size
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
