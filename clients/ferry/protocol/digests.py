"""Digests of chunks and files (pure computation, no I/O).

A chunk's digest is BLAKE3 of its bytes (32 bytes). A file's digest, algorithm
``blake3-chunks``, is BLAKE3 over the concatenation of its chunks' digests in order, so
both peers get it for free from the per-chunk digests they compute anyway (one hash pass
per byte per side, which is what keeps the verified path near the TLS ceiling). It depends
on the chunk size, which is part of the manifest. `ferry digest FILE` recomputes it.

BLAKE3 releases the GIL on large inputs, so callers may hash on several threads at once.
"""

from __future__ import annotations

from collections.abc import Iterable

from blake3 import blake3

__all__ = ["FILE_DIGEST_ALGORITHM", "chunk_digest", "file_digest"]

FILE_DIGEST_ALGORITHM = "blake3-chunks"


def chunk_digest(data: bytes | bytearray | memoryview) -> bytes:
    """The 32-byte BLAKE3 digest of one chunk."""
    return blake3(data).digest()


def file_digest(chunk_digests: Iterable[bytes]) -> bytes:
    """The whole-file digest over the chunk digests, in chunk order."""
    hasher = blake3()
    for digest in chunk_digests:
        hasher.update(digest)
    return hasher.digest()
