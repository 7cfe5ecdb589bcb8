"""Receiver-side path safety: nothing is ever written outside the destination folder.

A manifest path comes from the other peer and is untrusted. The sender sends the names it
has (a legal name on its side is never refused there); the receiver decides where each one may
be written, in four steps:

0. :func:`local_paths` (pure) maps every manifest path to a safe local one, deterministically:
   the same manifest always gives the same local paths (so a resumed transfer, whose journal
   knows files by their index, finds its temporary files again). A safe path is kept as it
   is; otherwise, per segment, a control character, DEL, a backslash or a colon becomes
   ``%XX`` (its code in hex: ``a\x1bb`` -> ``a%1Bb``, ``c:x`` -> ``c%3Ax``), trailing dots and
   spaces go (``notes.`` -> ``notes``), a Windows device name gets an underscore
   (``aux.c`` -> ``aux_.c``), a segment over 255 bytes is cut (keeping its extension), and a
   path that would land on an earlier one on a case-insensitive file system (``makefile``
   after ``Makefile``, a file named like a folder) gets `` (2)``, `` (3)``... before its
   extension. Only what has no safe form is refused: an empty or absolute path, an empty,
   ``.`` or ``..`` segment, or a path too long even when mapped.
1. :func:`sanitize_relative_path` (pure) checks one local path's text: relative, ``/``-separated,
   no ``.``/``..``/empty segments, no backslash, colon, control character, Windows device
   name or trailing space/dot, bounded length, valid Unicode.
2. :func:`check_manifest_paths` (pure) checks the local paths as a whole: no duplicates, also
   after case folding and Unicode normalization (case-insensitive file systems), and no path
   that is both a file and the folder of another path. What `local_paths` returns always
   passes 1 and 2; they stay as the gate in front of the disk.
3. :func:`resolve_destination`, :func:`make_parents` and :func:`check_no_overwrite` look at the
   destination on disk: no existing component may be a symlink, new folders are created one at a
   time and checked to be real folders, and existing files are not overwritten unless asked.

The disk checks use ``os.lstat`` and are not atomic: a local process that can write into the
destination folder while a transfer runs can still race them. They protect against a malicious
*peer*, which can only choose the names.
"""

from __future__ import annotations

import contextlib
import os
import stat
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ferry.errors import FerryError
from ferry.files.display import escape_name

__all__ = [
    "MAX_PATH_BYTES",
    "MAX_SEGMENT_BYTES",
    "DestinationExistsError",
    "UnsafePathError",
    "check_manifest_paths",
    "check_no_overwrite",
    "local_paths",
    "local_segment",
    "make_parents",
    "resolve_destination",
    "sanitize_relative_path",
]

MAX_SEGMENT_BYTES = 255
"""The longest file or folder name, in UTF-8 bytes (ext4, APFS, NTFS all allow about this)."""

MAX_PATH_BYTES = 4096
"""The longest relative path, in UTF-8 bytes (Linux PATH_MAX)."""

_WINDOWS_DEVICE_NAMES = frozenset(
    {"con", "prn", "aux", "nul", "conin$", "conout$"}
    | {f"{prefix}{digit}" for prefix in ("com", "lpt") for digit in "123456789\u00b9\u00b2\u00b3"}
)

_SHOWN_EXISTING = 3
_SHOWN_CHARS = 160


def _shorten(shown: str) -> str:
    """Cut an escaped path for a message, keeping its start and its end (the file name)."""
    if len(shown) <= _SHOWN_CHARS:
        return shown
    return f"{shown[: _SHOWN_CHARS - 60]}\u2026{shown[-59:]}"


class UnsafePathError(FerryError, ValueError):
    """A path from a manifest could not be used safely; the message says why, on one line.

    ``path`` is the offending path as received and ``reason`` the problem alone.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f'unsafe path "{_shorten(escape_name(path))}": {reason}')


class DestinationExistsError(FerryError, FileExistsError):
    """Files to be received already exist in the destination and overwriting was not allowed.

    ``paths`` lists all of them; the message names the first few.
    """

    def __init__(self, paths: Sequence[PurePosixPath]) -> None:
        self.paths = list(paths)
        shown = ", ".join(f'"{escape_name(str(p))}"' for p in self.paths[:_SHOWN_EXISTING])
        more = len(self.paths) - _SHOWN_EXISTING
        suffix = f" and {more} more" if more > 0 else ""
        count = (
            "1 file already exists"
            if len(self.paths) == 1
            else f"{len(self.paths)} files already exist"
        )
        super().__init__(
            f"{count} in the destination: {shown}{suffix} (allow overwriting to replace)"
        )


def _is_control(ch: str) -> bool:
    cp = ord(ch)
    return cp < 0x20 or 0x7F <= cp <= 0x9F


def _check_segment(path: str, segment: str, *, first: bool) -> None:
    if segment == "":
        raise UnsafePathError(path, "empty segment (double or trailing slash)")
    if segment in (".", ".."):
        raise UnsafePathError(path, f'"{segment}" segment')
    if ":" in segment:
        # Not only "C:" first: on Windows, joining a later segment "c:x" restarts the path on
        # drive C:, and "name:stream" writes an alternate data stream.
        what = "drive letter" if first else "drive letter or Windows stream"
        raise UnsafePathError(path, f"contains a colon ({what})")
    if segment.endswith((" ", ".")):
        raise UnsafePathError(path, "a segment ends in a space or a dot")
    stem = segment.split(".", 1)[0].rstrip(" ").lower()
    if stem in _WINDOWS_DEVICE_NAMES:
        raise UnsafePathError(path, f'"{escape_name(segment)}" is a Windows device name')
    if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
        raise UnsafePathError(path, f"a segment is longer than {MAX_SEGMENT_BYTES} bytes")


def sanitize_relative_path(path: str) -> PurePosixPath:
    """Return the manifest path ``path`` (``/``-separated) as a validated relative path.

    Raises UnsafePathError, naming the problem, if the path is empty or absolute; contains a
    backslash, a NUL, another C0/C1 control character or DEL, or a lone surrogate; has an
    empty, ``.`` or ``..`` segment; has a colon anywhere (``C:``, ``c:foo``, ``a/c:x``); has a
    segment that is a Windows device name (CON, PRN, AUX, NUL, COM1-9, LPT1-9, any case, also
    with an extension such as ``nul.txt``) or ends in a space or dot; or is too long (a segment
    over 255 UTF-8 bytes, the whole over 4096).
    """
    if not isinstance(path, str):
        raise TypeError(f"a path must be a str, not {type(path).__name__}")
    if path == "":
        raise UnsafePathError(path, "empty path")
    try:
        size = len(path.encode("utf-8"))
    except UnicodeEncodeError:
        raise UnsafePathError(path, "invalid Unicode (lone surrogate)") from None
    if size > MAX_PATH_BYTES:
        raise UnsafePathError(path, f"longer than {MAX_PATH_BYTES} bytes")
    if "\x00" in path:
        raise UnsafePathError(path, "contains a NUL character")
    if any(_is_control(ch) for ch in path):
        raise UnsafePathError(path, "contains a control character")
    if "\\" in path:
        raise UnsafePathError(path, "contains a backslash")
    if path.startswith("/"):
        raise UnsafePathError(path, "absolute path")
    segments = path.split("/")
    for index, segment in enumerate(segments):
        _check_segment(path, segment, first=index == 0)
    return PurePosixPath(path)


def _fold(path: PurePosixPath) -> str:
    """The key under which a case-insensitive, normalizing file system would store ``path``."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", str(path)).casefold())


def check_manifest_paths(paths: Sequence[str]) -> list[PurePosixPath]:
    """Sanitize every path of a manifest and check that they can coexist in one folder.

    Raises UnsafePathError for the first path that is unsafe, a duplicate (also one differing
    only in case or Unicode normalization, like ``A.txt`` and ``a.txt``), or both a file and the
    folder of another path (``a`` and ``a/b``).
    """
    result = [sanitize_relative_path(p) for p in paths]
    seen: dict[str, PurePosixPath] = {}
    for raw, rel in zip(paths, result, strict=True):
        key = _fold(rel)
        if key in seen:
            other = seen[key]
            if other == rel:
                raise UnsafePathError(raw, "duplicate path")
            raise UnsafePathError(
                raw, f'same name as "{escape_name(str(other))}" on a case-insensitive file system'
            )
        seen[key] = rel
    folders: dict[str, PurePosixPath] = {}
    for rel in result:
        for parent in list(rel.parents)[:-1]:  # without the final "."
            folders.setdefault(_fold(parent), rel)
    for raw, rel in zip(paths, result, strict=True):
        child = folders.get(_fold(rel))
        if child is not None:
            raise UnsafePathError(
                raw, f'is a file but also the folder of "{escape_name(str(child))}"'
            )
    return result


# -- mapping manifest paths to safe local ones --------------------------------------------

#: Characters that are legal in a POSIX name but unsafe to write or to show: written as %XX.
_MAPPED_CHARS = frozenset({"\\", ":"})
#: An extension longer than this is part of the stem (cut with it, suffixed after it).
_MAX_EXTENSION_CHARS = 16


def _map_char(ch: str) -> str:
    cp = ord(ch)
    if _is_control(ch) or ch in _MAPPED_CHARS:
        return f"%{cp:02X}"
    if 0xDC80 <= cp <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"%{cp - 0xDC00:02X}"
    if 0xD800 <= cp <= 0xDFFF:  # any other lone surrogate cannot be written
        return "\ufffd"
    return ch


def _split_extension(name: str) -> tuple[str, str]:
    """``report.pdf`` -> (``report``, ``.pdf``); a hidden name or a long tail has none."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or len(ext) > _MAX_EXTENSION_CHARS:
        return name, ""
    return stem, dot + ext


def _cut_utf8(text: str, max_bytes: int) -> str:
    """The longest start of ``text`` that is at most ``max_bytes`` in UTF-8."""
    return text.encode("utf-8")[: max(max_bytes, 0)].decode("utf-8", "ignore")


def _fit(stem: str, suffix: str) -> str:
    """``stem + suffix``, the stem cut so that the whole fits `MAX_SEGMENT_BYTES`; then made
    a legal segment again (a cut may end on a space or dot)."""
    room = MAX_SEGMENT_BYTES - len(suffix.encode("utf-8"))
    stem = _cut_utf8(stem, room).rstrip(" .")
    return (stem or "_") + suffix


def _is_device(segment: str) -> bool:
    return segment.split(".", 1)[0].rstrip(" ").lower() in _WINDOWS_DEVICE_NAMES


def local_segment(segment: str) -> str:
    """Return one name (a segment of a manifest path) made safe to write, or itself if it is.

    Control characters, DEL, backslash and colon become ``%XX``, trailing dots and spaces
    go, a Windows device name gets ``_`` after its stem, and a name over 255 bytes is cut,
    keeping its extension. Deterministic: the same name always maps to the same result.
    """
    mapped = "".join(map(_map_char, segment)).rstrip(" .") or "_"
    if _is_device(mapped):
        stem, dot, rest = mapped.partition(".")
        mapped = f"{stem}_{dot}{rest}"
    if len(mapped.encode("utf-8")) > MAX_SEGMENT_BYTES:
        stem, ext = _split_extension(mapped)
        mapped = _fit(stem, ext)
    return mapped


def _numbered(name: str, n: int) -> str:
    """``name`` with `` (n)`` before its extension: ``a.txt`` -> ``a (2).txt``."""
    stem, ext = _split_extension(name)
    return _fit(stem, f" ({n}){ext}")


def _check_structure(path: str) -> None:
    """Refuse what no mapping can make safe: not a relative ``/``-separated path of names."""
    if not isinstance(path, str):
        raise TypeError(f"a path must be a str, not {type(path).__name__}")
    if path == "":
        raise UnsafePathError(path, "empty path")
    if len(path) > MAX_PATH_BYTES:
        raise UnsafePathError(path, f"longer than {MAX_PATH_BYTES} characters")
    if path.startswith("/"):
        raise UnsafePathError(path, "absolute path")
    for segment in path.split("/"):
        if segment == "":
            raise UnsafePathError(path, "empty segment (double or trailing slash)")
        if segment in (".", ".."):
            raise UnsafePathError(path, f'"{segment}" segment')


@dataclass
class _Layout:
    """The local names handed out so far, keyed as a case-insensitive file system would see
    them; a folder is owned by the manifest folder it stands for, a file by its index.

    ``tried`` remembers, per wanted name, the last number handed out for it, so that the
    next file that wants it starts there: a manifest of 10,000 names that all fold to one
    costs 10,000 steps, not 50 million.
    """

    taken: dict[str, tuple[str, str | int]] = field(default_factory=dict)
    folders: dict[str, PurePosixPath] = field(default_factory=dict)
    tried: dict[str, int] = field(default_factory=dict)

    def place(
        self, parent: PurePosixPath, name: str, owner: tuple[str, str | int]
    ) -> PurePosixPath:
        """The first of ``name``, ``name (2)``, ... under ``parent`` that nobody else owns."""
        wanted = _fold(parent / name)
        n = self.tried.get(wanted, 1)
        candidate = parent / (name if n == 1 else _numbered(name, n))
        while self.taken.setdefault(_fold(candidate), owner) != owner:
            n += 1
            candidate = parent / _numbered(name, n)
        self.tried[wanted] = n
        return candidate


def local_paths(paths: Sequence[str]) -> list[PurePosixPath]:
    """Return where each manifest path of ``paths`` is written, relative to the destination.

    A safe path is returned as it is; an unsafe one is mapped to a safe one as the module
    docstring describes, the same way every time. Distinct manifest folders stay distinct
    local folders, and no two results collide, also on a case-insensitive file system.
    Raises UnsafePathError only for a path with no safe form (empty, absolute, an empty,
    ``.`` or ``..`` segment, or over `MAX_PATH_BYTES` even when mapped).
    """
    layout = _Layout()
    result: list[PurePosixPath] = []
    for index, path in enumerate(paths):
        _check_structure(path)
        *folders, name = path.split("/")
        parent = PurePosixPath()
        for depth, folder in enumerate(folders):
            key = "/".join(folders[: depth + 1])
            known = layout.folders.get(key)
            if known is None:
                known = layout.place(parent, local_segment(folder), ("folder", key))
                layout.folders[key] = known
            parent = known
        local = layout.place(parent, local_segment(name), ("file", index))
        if len(str(local).encode("utf-8")) > MAX_PATH_BYTES:
            raise UnsafePathError(path, f"longer than {MAX_PATH_BYTES} bytes as a local path")
        result.append(local)
    # The gate in front of the disk checks what the mapping made (it always passes).
    check_manifest_paths([str(p) for p in result])
    return result


def _root(dest_root: Path) -> Path:
    root = dest_root.resolve(strict=True)
    if not root.is_dir():
        raise NotADirectoryError(
            f'the destination is not a folder: "{escape_name(str(dest_root))}"'
        )
    return root


def _is_inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def resolve_destination(dest_root: Path, rel: PurePosixPath) -> Path:
    """Return where the file ``rel`` is written under ``dest_root`` (an existing folder).

    ``rel`` is sanitized again. ``dest_root`` itself may be a symlink (it is the user's choice),
    but every existing component below it is checked with ``os.lstat``: raises UnsafePathError if
    one is a symlink, if a parent is not a folder, if the target is a folder, or if the result is
    not inside ``dest_root`` after resolution. Raises FileNotFoundError if ``dest_root`` is missing.
    """
    rel = sanitize_relative_path(rel.as_posix())
    root = _root(dest_root)
    current = root
    last = len(rel.parts) - 1
    for index, part in enumerate(rel.parts):
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            break
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePathError(
                str(rel), f'"{escape_name(part)}" is a symlink in the destination'
            )
        if index < last and not stat.S_ISDIR(st.st_mode):
            raise UnsafePathError(
                str(rel), f'"{escape_name(part)}" is not a folder in the destination'
            )
        if index == last and stat.S_ISDIR(st.st_mode):
            raise UnsafePathError(str(rel), "is a folder in the destination")
    target = root.joinpath(*rel.parts)
    if not _is_inside(os.path.realpath(target), str(root)):
        raise UnsafePathError(str(rel), "leads outside the destination")
    return target


def make_parents(dest_root: Path, rel: PurePosixPath) -> Path:
    """Create the missing folders of ``rel`` under ``dest_root`` and return the file's folder.

    Folders are made one at a time with ``os.mkdir``; after each, ``os.lstat`` must show a real
    folder, not a symlink or a file, or UnsafePathError is raised. Nothing is followed.
    """
    rel = sanitize_relative_path(rel.as_posix())
    current = _root(dest_root)
    for part in rel.parts[:-1]:
        current = current / part
        with contextlib.suppress(FileExistsError):
            os.mkdir(current, 0o777)
        st = os.lstat(current)
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePathError(
                str(rel), f'"{escape_name(part)}" is a symlink in the destination'
            )
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafePathError(
                str(rel), f'"{escape_name(part)}" is not a folder in the destination'
            )
    return current


def check_no_overwrite(dest_root: Path, rels: Iterable[PurePosixPath], overwrite: bool) -> None:
    """Raise DestinationExistsError if any of ``rels`` exists under ``dest_root`` (even as a
    dangling symlink) and ``overwrite`` is False.
    """
    if overwrite:
        return
    existing = [rel for rel in rels if os.path.lexists(dest_root.joinpath(*rel.parts))]
    if existing:
        raise DestinationExistsError(existing)
