"""In-process fan-out of session changes to WatchSession streams (asyncio, no polling).

Each watcher holds one slot: the latest (version, snapshot) it has not taken yet, and an
asyncio.Event. Publishing copies the session once, into a snapshot that every watcher of the
session shares (nobody changes it after), and puts it in each watcher's slot, replacing
whatever older version was there: a slow watcher gets the latest state, never a backlog, and
the final state always arrives. So an update costs one copy of the session whatever the
number of watchers, and a watcher holds at most one snapshot that others share too (issue 10,
finding 1: with a copy per watcher in a 64-deep queue, 20 idle watchers and a loop of
ResumeSession calls grew the broker by 1.5 GiB in 3 s).

How many watchers there may be is bounded three ways, checked when one subscribes (each a
:class:`WatchLimits` field; a subscription over a limit is refused with RESOURCE_EXHAUSTED,
reason TOO_MANY_WATCHES, before it holds anything):

- per party of a session: a client needs one watch (two while it re-subscribes), and the bound
  is per party so that neither side can take the other's watches;
- per caller (its address; an IPv6 address by its /64): bounds what one client can hold over
  many sessions;
- in total: bounds the broker;
- in bytes: each watch counts the session's size when it subscribed (a manifest of up to
  max_manifest_bytes), because a watcher that does not read keeps about that much in gRPC's
  buffers; without it, 4,096 watches of 1 MiB sessions would pin 4 GiB.

Subscriptions are removed in `finally`, so cancelled calls leave nothing behind.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from ferry.broker.errors import Reason, ResourceExhausted
from ferry.v1 import broker_pb2

Snapshot = tuple[int, broker_pb2.Session]
K = TypeVar("K")


@dataclasses.dataclass(frozen=True, slots=True)
class WatchLimits:
    """How many watchers the hub admits (BrokerConfig's watches_* settings)."""

    per_party: int = 4
    per_caller: int = 32
    total: int = 4096
    bytes_total: int = 256 << 20


class Watcher:
    """One subscriber's mailbox: the latest snapshot not yet taken (coalesced)."""

    __slots__ = ("_latest", "_ready", "caller", "closed", "party_key")

    def __init__(self, party_key: tuple[str, str], caller: str) -> None:
        self._latest: Snapshot | None = None
        self._ready = asyncio.Event()
        self.closed = False
        self.party_key = party_key
        self.caller = caller

    def push(self, item: Snapshot) -> None:
        """Make `item` the next snapshot, replacing an older one not taken yet (never a newer
        one: snapshots of one session may arrive out of order, as a relay's read that
        awaited the store and a local commit can)."""
        if self._latest is not None and self._latest[0] > item[0]:
            return
        self._latest = item
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def next(self) -> Snapshot | None:
        """The latest snapshot, or None once the hub is closed and none is left.

        The snapshot is shared with the session's other watchers: read it, never change it.
        """
        while self._latest is None:
            if self.closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        item, self._latest = self._latest, None
        return item


class Hub:
    """Session id -> watchers, within :class:`WatchLimits`."""

    def __init__(self, limits: WatchLimits | None = None) -> None:
        self._limits = limits or WatchLimits()
        self._watchers: dict[str, set[Watcher]] = {}
        self._per_party: collections.Counter[tuple[str, str]] = collections.Counter()
        self._per_caller: collections.Counter[str] = collections.Counter()
        self._total = 0
        self._bytes = 0
        self._closed = False
        #: Where this replica's own changes go besides its watchers (session id, version).
        self.forward: Callable[[str, int], None] | None = None

    def publish(self, session_id: str, version: int, session: broker_pb2.Session) -> None:
        """A change committed here: to this hub's watchers, and to `forward` (the other
        replicas, ferry.broker.relay) if set."""
        self.deliver(session_id, version, session)
        if self.forward is not None:
            self.forward(session_id, version)

    def watched(self, session_id: str) -> bool:
        """Whether anyone here watches the session."""
        return bool(self._watchers.get(session_id))

    def watched_sessions(self) -> list[str]:
        """The sessions someone here watches."""
        return [sid for sid, watchers in self._watchers.items() if watchers]

    def deliver(self, session_id: str, version: int, session: broker_pb2.Session) -> None:
        """Hand a snapshot of the session to everyone watching it here (one copy for all)."""
        watchers = self._watchers.get(session_id)
        if not watchers:
            return
        snapshot = broker_pb2.Session()
        snapshot.CopyFrom(session)
        for watcher in watchers:
            watcher.push((version, snapshot))

    def _admit(self, party_key: tuple[str, str], caller: str, weight: int) -> None:
        """Refuse a subscription over a limit (ResourceExhausted, TOO_MANY_WATCHES)."""
        limits = self._limits
        if self._per_party[party_key] >= limits.per_party:
            raise ResourceExhausted(
                Reason.TOO_MANY_WATCHES,
                f"the {party_key[1]} of this session already has {limits.per_party} open"
                " watches; end one first",
            )
        if self._per_caller[caller] >= limits.per_caller:
            raise ResourceExhausted(
                Reason.TOO_MANY_WATCHES,
                f"{limits.per_caller} watches are open from this address already; end one first",
            )
        if self._total >= limits.total or self._bytes + weight > limits.bytes_total:
            raise ResourceExhausted(
                Reason.TOO_MANY_WATCHES, "the broker has too many open watches; try again later"
            )

    @asynccontextmanager
    async def subscribe(
        self, session_id: str, party: str = "", caller: str = "unknown", weight: int = 0
    ) -> AsyncIterator[Watcher]:
        """Watch a session for the duration of the block, as `party` of it, for `caller`;
        `weight` is the session's size in bytes, counted against `bytes_total`.

        Raises ResourceExhausted (TOO_MANY_WATCHES) when a limit is reached.
        """
        party_key = (session_id, party)
        self._admit(party_key, caller, weight)
        watcher = Watcher(party_key, caller)
        if self._closed:
            watcher.close()
        watchers = self._watchers.setdefault(session_id, set())
        watchers.add(watcher)
        self._count(watcher, +1)
        self._bytes += weight
        try:
            yield watcher
        finally:
            watchers.discard(watcher)
            self._count(watcher, -1)
            self._bytes -= weight
            if not watchers and self._watchers.get(session_id) is watchers:
                del self._watchers[session_id]

    def _count(self, watcher: Watcher, delta: int) -> None:
        self._total += delta
        _add(self._per_party, watcher.party_key, delta)
        _add(self._per_caller, watcher.caller, delta)

    def watcher_count(self) -> int:
        """How many watchers are subscribed (for tests and metrics)."""
        return self._total

    def close(self) -> None:
        """End every watch (on shutdown)."""
        self._closed = True
        for watchers in self._watchers.values():
            for watcher in watchers:
                watcher.close()


def _add(counter: collections.Counter[K], key: K, delta: int) -> None:
    """Count `delta` more for `key`, dropping keys that reach zero (the counter stays small)."""
    counter[key] += delta
    if counter[key] <= 0:
        del counter[key]
