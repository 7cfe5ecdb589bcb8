"""Test files: random contents written in pieces, and digests to compare copies by."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["random_file", "sha256"]


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
