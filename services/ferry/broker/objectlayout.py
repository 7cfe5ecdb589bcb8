"""How a file lies in the object store, sans-I/O: keys, parts of whole chunks, digests size.

One S3 object per file of a session, key ``{prefix}{session_id}/{file_index}``, uploaded as a
multipart upload whose parts are groups of whole chunks, and beside it ``{key}.digests``, the
file's 32-byte chunk digests concatenated in chunk order::

    chunks:  | 0 | 1 | 2 | 3 | 4 | 5 | 6 |        (chunks_per_part = 3)
    parts:   |    1      |    2      | 3 |        part = 1 + chunk // chunks_per_part

Every part but the last is ``part_size`` bytes: a whole number of chunks, at least 8 MiB
(S3 refuses non-last parts under 5 MiB) and large enough that a file needs at most 10,000
parts (S3's limit). An empty file is one empty part, so that its object exists too.
"""

from __future__ import annotations

DIGEST_BYTES = 32
TARGET_PART_BYTES = 8 << 20
MIN_PART_BYTES = 5 << 20
MAX_PARTS = 10_000
DIGESTS_SUFFIX = ".digests"


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def chunk_count(size: int, chunk_size: int) -> int:
    """How many chunks a file of `size` bytes has (an empty file has none)."""
    if chunk_size <= 0 or size < 0:
        raise ValueError("need chunk_size > 0 and size >= 0")
    return _ceil_div(size, chunk_size)


def chunks_per_part(size: int, chunk_size: int) -> int:
    """Chunks in every part but the last: >= 8 MiB worth, and few enough parts for S3."""
    chunks = chunk_count(size, chunk_size)
    return max(_ceil_div(TARGET_PART_BYTES, chunk_size), _ceil_div(chunks, MAX_PARTS), 1)


def part_size(size: int, chunk_size: int) -> int:
    """The size of every part but the last."""
    return chunk_size * chunks_per_part(size, chunk_size)


def part_count(size: int, chunk_size: int) -> int:
    """How many parts the file has (at least 1)."""
    return max(1, _ceil_div(size, part_size(size, chunk_size)))


def part_length(size: int, chunk_size: int, part_number: int) -> int:
    """The exact byte length of part `part_number` (1-based)."""
    count = part_count(size, chunk_size)
    if not 1 <= part_number <= count:
        raise ValueError(f"part_number must be between 1 and {count}")
    step = part_size(size, chunk_size)
    return min(step, size - (part_number - 1) * step)


def part_of_chunk(size: int, chunk_size: int, chunk_index: int) -> int:
    """The part (1-based) that holds chunk `chunk_index` (0-based)."""
    if not 0 <= chunk_index < chunk_count(size, chunk_size):
        raise ValueError("chunk_index out of range")
    return 1 + chunk_index // chunks_per_part(size, chunk_size)


def digests_size(size: int, chunk_size: int) -> int:
    """The exact size of the digests object."""
    return DIGEST_BYTES * chunk_count(size, chunk_size)


def object_key(prefix: str, session_id: str, file_index: int) -> str:
    """The key of the file's object."""
    return f"{prefix}{session_id}/{file_index}"


def digests_key(prefix: str, session_id: str, file_index: int) -> str:
    """The key of the file's digests object."""
    return object_key(prefix, session_id, file_index) + DIGESTS_SUFFIX


def parse_key(prefix: str, key: str) -> tuple[str, int] | None:
    """(session_id, file_index) of a file object's key under `prefix`, else None."""
    if not key.startswith(prefix):
        return None
    session_id, sep, index = key[len(prefix) :].partition("/")
    if not sep or not session_id or not index.isdigit():
        return None
    return session_id, int(index)
