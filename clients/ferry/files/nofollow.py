"""Opening the sender's files without following a symlink anywhere on their path.

A sender often reads files that someone else can change: ``sudo ferry send ~alice/share``
reads a folder its owner controls. Between the offer and the send (minutes; hours for a
long TTL, or across a restart) she can swap a file, or a folder on its path, for a symlink
to ``/etc/shadow``, ``/dev/watchdog`` or a fifo. An open by path would follow it: read a
root-only file, arm a device, or block forever. So every open of a source here walks the
path one component at a time from ``/``::

    /  --O_PATH|O_DIRECTORY|O_NOFOLLOW-->  home  -->  alice  -->  share   (each relative
                                                                          to the one before)
    share  --O_RDONLY|O_NOFOLLOW|O_NONBLOCK|O_NOCTTY-->  report.pdf       (then fstat:
                                                                          a regular file)

A symlink in any folder component fails with ENOTDIR, in the last one with ELOOP; a fifo
opens at once (O_NONBLOCK) and is then refused as not a regular file, before any read; a
tty never becomes the controlling terminal. The paths walked are real paths (the scan
resolves the user's arguments once, `os.path.realpath`), so an honest tree never has a
link on them. What ties the opened file to the offer is its stamp (device, inode, size,
times; `ferry.files.manifest.SourceStamp`), checked by the caller on the descriptor.

Intermediate folders are opened with ``O_PATH`` (search permission is enough, as for an
ordinary path lookup) where the platform has it.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

__all__ = ["Swapped", "open_folder", "open_regular"]

# A folder to walk through (or to open files relative to): no read permission needed.
_THROUGH = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# A folder to list.
_LISTED = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# A file to read: a fifo must not block the open, a tty must not become ours.
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

# What an open reports when the path no longer leads, link-free, to what it led to.
_SWAPPED = {
    errno.ELOOP: "it is now a symlink",
    errno.ENOTDIR: "a folder on its path is now a symlink or a file",
    errno.ENOENT: "it is gone",
    errno.ENXIO: "it is now a socket or a device",
}


class Swapped(OSError):
    """A path no longer leads, without a symlink, to a regular file or folder.

    ``why`` says how, in a few words (``it is now a symlink``).
    """

    def __init__(self, why: str, path: Path) -> None:
        super().__init__(errno.ELOOP, why, str(path))
        self.why = why


def _swapped(exc: OSError, path: Path) -> OSError:
    why = _SWAPPED.get(exc.errno or 0)
    return exc if why is None else Swapped(why, path)


def open_folder(path: Path, *, listed: bool = False, dir_fd: int | None = None) -> int:
    """Open folder ``path`` following no symlink on the way; the caller closes it.

    ``path`` is absolute, or relative to ``dir_fd`` (the current folder if None).
    ``listed``: open it readable, for `os.scandir`, instead of as a handle to open things
    relative to. Raises Swapped if a component is a symlink, not a folder, or gone; other
    OSErrors (EACCES, EMFILE) as they are.
    """
    parts = path.parts
    here: int | None = None
    try:
        if path.is_absolute():
            here, parts = os.open(parts[0], _THROUGH), parts[1:]
        if not parts:
            parts = (".",)
        for i, part in enumerate(parts):
            flags = _LISTED if listed and i == len(parts) - 1 else _THROUGH
            at = here if here is not None else dir_fd
            step = os.open(part, flags, dir_fd=at)
            if here is not None:
                os.close(here)
            here = step
    except OSError as exc:
        if here is not None:
            os.close(here)
        raise _swapped(exc, path) from exc
    assert here is not None
    return here


def open_regular(name: str, dir_fd: int, path: Path) -> int:
    """Open regular file ``name`` in folder ``dir_fd`` for reading, following no symlink.

    ``path`` is the file's full path, for messages. Raises Swapped if ``name`` is a symlink,
    gone, or not a regular file (a fifo or a device is opened without blocking and closed
    again before a byte is read); other OSErrors as they are.
    """
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"not one name in a folder: {name!r}")
    try:
        fd = os.open(name, _READ, dir_fd=dir_fd)
    except OSError as exc:
        raise _swapped(exc, path) from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Swapped("it is no longer a regular file", path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd
