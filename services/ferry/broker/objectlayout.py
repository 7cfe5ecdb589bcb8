"""How a file lies in the object store, sans-I/O: keys, parts of whole sealed chunks, sizes.

One S3 object per file of a session, key ``{prefix}{session_id}/{file_index}``, uploaded as a
multipart upload whose parts are groups of whole chunks, and beside it ``{key}.digests``, the
file's 32-byte chunk digests in chunk order. The sender seals both end to end
(``ferry.protocol.sealing``; the broker never has the key), which makes every chunk
`SEAL_OVERHEAD` bytes longer and the digests object too -- a fixed overhead, so every offset
stays computable from the manifest alone::

    chunks:  | 0 | 1 | 2 | 3 | 4 | 5 | 6 |        (chunks_per_part = 3)
    parts:   |    1      |    2      | 3 |        part = 1 + chunk // chunks_per_part
    sealed chunk:  | nonce 12 | ciphertext (chunk's length) | tag 16 |   chunk_size + 28
    chunk i of the object starts at i * (chunk_size + 28); only the last chunk is shorter
    digests object:  | nonce 12 | 32 * chunks | tag 16 |

Every part but the last is ``part_size`` bytes: a whole number of sealed chunks, at least
8 MiB (S3 refuses non-last parts under 5 MiB), and enough chunks that a file needs at most
10,000 parts (S3's limit). An empty file is one empty part, so that its object exists too,
and a digests object of 28 bytes (no digest, sealed).

All sizes here are what the bucket holds (sealed); ``size`` and ``chunk_size`` arguments are
the manifest's (plaintext).
"""

from __future__ import annotations

DIGEST_BYTES = 32
#: What sealing adds per chunk and per digests object: a 12-byte nonce and a 16-byte tag
#: (``ferry.protocol.sealing.OVERHEAD``; a test keeps the two equal).
SEAL_OVERHEAD = 28
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


def sealed_chunk_size(chunk_size: int) -> int:
    """The stored size of every chunk but a file's last: the chunk, sealed."""
    return chunk_size + SEAL_OVERHEAD


def object_size(size: int, chunk_size: int) -> int:
    """The exact size of the file's object: every chunk sealed."""
    return size + SEAL_OVERHEAD * chunk_count(size, chunk_size)


def chunk_offset(chunk_size: int, chunk_index: int) -> int:
    """Where chunk `chunk_index` (0-based) starts in the object."""
    if chunk_index < 0:
        raise ValueError("chunk_index out of range")
    return chunk_index * sealed_chunk_size(chunk_size)


def chunks_per_part(size: int, chunk_size: int) -> int:
    """Chunks in every part but the last: >= 8 MiB worth, and few enough parts for S3."""
    chunks = chunk_count(size, chunk_size)
    return max(_ceil_div(TARGET_PART_BYTES, chunk_size), _ceil_div(chunks, MAX_PARTS), 1)


def part_size(size: int, chunk_size: int) -> int:
    """The size of every part but the last (sealed chunks)."""
    return sealed_chunk_size(chunk_size) * chunks_per_part(size, chunk_size)


def part_count(size: int, chunk_size: int) -> int:
    """How many parts the file has (at least 1)."""
    return max(1, _ceil_div(chunk_count(size, chunk_size), chunks_per_part(size, chunk_size)))


def part_length(size: int, chunk_size: int, part_number: int) -> int:
    """The exact byte length of part `part_number` (1-based), sealed."""
    count = part_count(size, chunk_size)
    if not 1 <= part_number <= count:
        raise ValueError(f"part_number must be between 1 and {count}")
    step = part_size(size, chunk_size)
    return min(step, object_size(size, chunk_size) - (part_number - 1) * step)


def part_of_chunk(size: int, chunk_size: int, chunk_index: int) -> int:
    """The part (1-based) that holds chunk `chunk_index` (0-based)."""
    if not 0 <= chunk_index < chunk_count(size, chunk_size):
        raise ValueError("chunk_index out of range")
    return 1 + chunk_index // chunks_per_part(size, chunk_size)


def digests_size(size: int, chunk_size: int) -> int:
    """The exact size of the digests object (sealed)."""
    return DIGEST_BYTES * chunk_count(size, chunk_size) + SEAL_OVERHEAD


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
    if not sep or not session_id or not (index.isascii() and index.isdigit()):
        return None
    return session_id, int(index)
