"""Runs of chunk indices (sans-I/O).

`runs` turns sorted chunk indices into (first, count) runs, the shape in which a receiver
asks for chunks (`ChunkRange`) and, later, acknowledges what it holds (like SCTP's SACK).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

__all__ = ["chunk_count", "runs"]


def chunk_count(size: int, chunk_size: int) -> int:
    """How many chunks a file of ``size`` bytes has (an empty file has none)."""
    if chunk_size <= 0:
        raise ValueError("chunk size must be positive")
    if size < 0:
        raise ValueError(f"file size {size} is negative")
    return -(-size // chunk_size)


def runs(indices: Iterable[int]) -> Iterator[tuple[int, int]]:
    """Yield (first, count) for each run of consecutive indices, in the order given."""
    first = prev = -2
    for index in indices:
        if index == prev + 1:
            prev = index
            continue
        if first >= 0:
            yield first, prev - first + 1
        first = prev = index
    if first >= 0:
        yield first, prev - first + 1
