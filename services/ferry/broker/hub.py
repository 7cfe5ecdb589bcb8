"""In-process fan-out of session changes to WatchSession streams (asyncio, no polling).

Each watcher owns a bounded deque of (version, snapshot) and an asyncio.Event. Publishing
appends and sets the event; a slow watcher loses its oldest snapshots, never the newest, so
memory per watcher is bounded and the final state always arrives. Subscriptions are removed in
`finally`, so cancelled calls leave nothing behind.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ferry.v1 import broker_pb2

Snapshot = tuple[int, broker_pb2.Session]


class Watcher:
    """One subscriber's mailbox."""

    def __init__(self, depth: int) -> None:
        self._items: collections.deque[Snapshot] = collections.deque(maxlen=depth)
        self._ready = asyncio.Event()
        self.closed = False

    def push(self, item: Snapshot) -> None:
        self._items.append(item)
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def next(self) -> Snapshot | None:
        """The next snapshot, or None once the hub is closed."""
        while not self._items:
            if self.closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


class Hub:
    """Session id -> watchers."""

    def __init__(self, depth: int = 64) -> None:
        self._depth = depth
        self._watchers: dict[str, set[Watcher]] = {}
        self._closed = False

    def publish(self, session_id: str, version: int, session: broker_pb2.Session) -> None:
        """Hand a snapshot of the session to everyone watching it."""
        for watcher in self._watchers.get(session_id, ()):
            snapshot = broker_pb2.Session()
            snapshot.CopyFrom(session)
            watcher.push((version, snapshot))

    @asynccontextmanager
    async def subscribe(self, session_id: str) -> AsyncIterator[Watcher]:
        """Watch a session for the duration of the block."""
        watcher = Watcher(self._depth)
        if self._closed:
            watcher.close()
        watchers = self._watchers.setdefault(session_id, set())
        watchers.add(watcher)
        try:
            yield watcher
        finally:
            watchers.discard(watcher)
            if not watchers and self._watchers.get(session_id) is watchers:
                del self._watchers[session_id]

    def watcher_count(self) -> int:
        """How many watchers are subscribed (for tests and metrics)."""
        return sum(len(w) for w in self._watchers.values())

    def close(self) -> None:
        """End every watch (on shutdown)."""
        self._closed = True
        for watchers in self._watchers.values():
            for watcher in watchers:
                watcher.close()
