"""Port-range allocation: first fit, never overlapping, always inside the allowed range."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.broker import leases

pytestmark = pytest.mark.timeout(60)


def test_first_fit() -> None:
    assert leases.allocate((1000, 1010), 3, []) == (1000, 1002)
    assert leases.allocate((1000, 1010), 3, [(1000, 1002)]) == (1003, 1005)
    assert leases.allocate((1000, 1010), 2, [(1003, 1005), (1000, 1001)]) == (1006, 1007)
    assert leases.allocate((1000, 1010), 1, [(1001, 1010)]) == (1000, 1000)
    assert leases.allocate((1000, 1010), 2, [(900, 1004)]) == (1005, 1006)


def test_full() -> None:
    with pytest.raises(leases.NoPortsAvailable):
        leases.allocate((1000, 1005), 3, [(1002, 1003)])
    with pytest.raises(leases.NoPortsAvailable):
        leases.allocate((1000, 1001), 3, [])


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="port range"):
        leases.allocate((0, 10), 1, [])
    with pytest.raises(ValueError, match="count"):
        leases.allocate((1, 10), 0, [])


def test_live_filters_expired() -> None:
    assert leases.live([(1, 2, 5.0), (3, 4, 15.0)], now=10.0) == [(3, 4)]


@settings(max_examples=300, deadline=None)
@given(
    first=st.integers(1, 65535),
    width=st.integers(0, 200),
    counts=st.lists(st.integers(1, 12), max_size=40),
    releases=st.lists(st.integers(0, 39), max_size=10),
)
def test_never_overlap_and_stay_inside(
    first: int, width: int, counts: list[int], releases: list[int]
) -> None:
    last = min(65535, first + width)
    held: list[leases.Span] = []
    for i, count in enumerate(counts):
        if i in releases and held:
            held.pop(i % len(held))
        try:
            span = leases.allocate((first, last), count, held)
        except leases.NoPortsAvailable:
            # Honest refusal: no gap of `count` ports exists.
            taken = {p for a, b in held for p in range(a, b + 1)}
            free_run = run = 0
            for port in range(first, last + 1):
                run = 0 if port in taken else run + 1
                free_run = max(free_run, run)
            assert free_run < count
            continue
        assert first <= span[0] <= span[1] <= last
        assert span[1] - span[0] + 1 == count
        for a, b in held:
            assert span[1] < a or b < span[0]
        held.append(span)
