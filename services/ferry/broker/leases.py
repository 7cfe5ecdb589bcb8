"""Port-range allocation, sans-I/O: find `count` consecutive free ports in a host's range.

The caller passes the live leases of one host (expired ones filtered out, or passed with their
expiry and `now`); the result never overlaps any of them and lies inside the allowed range.
First fit from the low end keeps allocation deterministic and leases packed.

What counts as live is the store's business: a lease lives until its session's expiry, but
past its plan's connect deadline only while a peer has reported connecting or transferring,
and one owner (the receiver's address) may hold only so many on a host (TooManyLeases).
"""

from __future__ import annotations

from collections.abc import Iterable

Span = tuple[int, int]
"""An inclusive port range (first, last)."""


class NoPortsAvailable(Exception):
    """No free range of the wanted size is left in the ports this host allows."""


class TooManyLeases(Exception):
    """The caller already holds its share of this host's leases (issue 10, finding 5)."""


def allocate(allowed: Span, count: int, leases: Iterable[Span]) -> Span:
    """Return the lowest free inclusive range of `count` ports within `allowed`.

    `leases` are the host's live leases; they may overlap each other or lie partly outside
    `allowed`. Raises ValueError on a malformed request and NoPortsAvailable when full.
    """
    first, last = allowed
    if not 1 <= first <= last <= 65535:
        raise ValueError(f"bad port range {first}-{last}")
    if count < 1:
        raise ValueError("count must be at least 1")
    candidate = first
    for lease_first, lease_last in sorted(leases):
        if lease_last < candidate:
            continue
        if lease_first - candidate >= count:
            break
        candidate = max(candidate, lease_last + 1)
        if candidate + count - 1 > last:
            break
    if candidate + count - 1 > last:
        raise NoPortsAvailable(
            f"no {count} free consecutive ports left in {first}-{last} on this host"
        )
    return candidate, candidate + count - 1


def live(leases: Iterable[tuple[int, int, float]], now: float) -> list[Span]:
    """Keep the (first, last) of leases whose expire time (third item) is after `now`."""
    return [(f, la) for f, la, expire in leases if expire > now]
