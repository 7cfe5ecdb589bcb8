"""Test files: random contents written in pieces, digests to compare copies by, and small
volumes of their own (a real tmpfs, to fill up)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

__all__ = ["random_file", "sha256", "tmpfs"]


def random_file(path: Path, size: int) -> Path:
    """Write ``size`` random bytes to ``path`` (8 MiB at a time) and return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, 8 << 20)
            f.write(os.urandom(n))
            left -= n
    return path


def sha256(path: Path) -> str:
    """The hex SHA-256 of a file's bytes (an independent check of Ferry's own digests)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "32M") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (created) for the block (the tests run as root)."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)
