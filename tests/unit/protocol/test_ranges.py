"""Chunk counts and runs of chunk indices."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.protocol import chunk_count, runs


@pytest.mark.parametrize(
    ("size", "chunk_size", "expected"),
    [(0, 1, 0), (0, 4, 0), (1, 4, 1), (4, 4, 1), (5, 4, 2), (8, 4, 2), (9, 4, 3), (7, 1, 7)],
)
def test_chunk_count(size: int, chunk_size: int, expected: int) -> None:
    assert chunk_count(size, chunk_size) == expected


@pytest.mark.parametrize("chunk_size", [0, -1])
def test_chunk_count_refuses_non_positive_chunk_size(chunk_size: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        chunk_count(10, chunk_size)


@pytest.mark.parametrize(
    ("indices", "expected"),
    [
        ([], []),
        ([0], [(0, 1)]),
        ([5], [(5, 1)]),
        ([0, 1, 2], [(0, 3)]),
        ([0, 2, 3, 7], [(0, 1), (2, 2), (7, 1)]),
        ([3, 4, 1, 2], [(3, 2), (1, 2)]),  # in the order given, not sorted
        ([1, 1], [(1, 1), (1, 1)]),
    ],
)
def test_runs(indices: list[int], expected: list[tuple[int, int]]) -> None:
    assert list(runs(indices)) == expected


def test_runs_accepts_any_iterable() -> None:
    assert list(runs(iter(range(3, 6)))) == [(3, 3)]


@settings(deadline=None, max_examples=200)
@given(st.sets(st.integers(0, 200)))
def test_runs_cover_sorted_indices_exactly(indices: set[int]) -> None:
    result = list(runs(sorted(indices)))
    expanded = [i for first, count in result for i in range(first, first + count)]
    assert expanded == sorted(indices)
    assert all(count >= 1 for _, count in result)
    # Maximal runs: consecutive runs never touch.
    for (a, n), (b, _) in itertools.pairwise(result):
        assert a + n < b


@pytest.mark.parametrize("size", [-1, -5])
def test_chunk_count_refuses_negative_size(size: int) -> None:
    # Sizes come from the manifest (int64 size_bytes): a negative one must not turn into
    # a negative chunk count.
    with pytest.raises(ValueError, match="size"):
        chunk_count(size, 4)
