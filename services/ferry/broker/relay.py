"""Session changes across broker replicas: Redis pub/sub in front of each replica's `Hub`.

A replica's hub only knows the watchers connected to it. With several replicas on one Redis
store, a sender watching through replica A must see the receiver's step made through replica
B at once. So every change a replica commits is also announced on one Redis channel, as
``"{replica} {session_id} {version}"`` -- ids and versions only, never a session's content --
and every replica listens: for an announcement of a session it has watchers for, it reads the
session from the store and hands it to its hub like a local change. Its watchers skip what
they have seen (versions only go up, and a watcher's slot never trades a newer snapshot for
an older one), so an announcement that arrives twice, late, or for a change they saw already
costs one store read and nothing else. The listener awaits each read before the next
announcement; the event loop serves calls meanwhile. A replica ignores its own
announcements (its hub had the change first).

Pub/sub loses what is published while a replica is disconnected; the listener resubscribes
with a short backoff, and on every (re)subscription it re-reads every watched session, so a
watcher never stays behind a change it missed. A watch itself also reads the session when it
starts (Broker.watch).

A person's inbox streams (issue 13) are hub watchers too, under ``inbox:{user}``: a change to
an offer made to the person is announced under that key as well, and wakes them on every
replica; they read the inbox from the store themselves.

redis-py's asyncio client, in its own connection (a subscribed connection can do nothing
else); the announcement is sent without waiting for it (the committing call does not wait
for Redis twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from ferry.broker.hub import Hub
from ferry.v1 import broker_pb2

__all__ = ["Loader", "RedisRelay"]

log = logging.getLogger(__name__)

#: Loads a session by id for the relay: (version, session), or None if it is gone.
Loader = Callable[[str], Awaitable[tuple[int, broker_pb2.Session] | None]]

_BACKOFF = (0.1, 2.0)  # first and longest pause before resubscribing
#: Hub keys of the inbox streams (core.inbox_key): an announcement of one only wakes them
#: (they read the person's offers from the store themselves).
INBOX_PREFIX = "inbox:"
_WAKE = broker_pb2.Session()


class RedisRelay:
    """Announces this replica's session changes and delivers the other replicas' to `hub`."""

    def __init__(self, url: str, hub: Hub, load: Loader, *, prefix: str = "ferry:") -> None:
        self.url = url
        self.channel = f"{prefix}events"
        self.replica = secrets.token_hex(8)
        self._hub = hub
        self._load = load
        self._client: Any = None
        self._listener: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[Any]] = set()
        self.subscribed = asyncio.Event()
        #: Announcements delivered to the hub, and those dropped (no watcher here, or gone).
        self.delivered = 0

    async def start(self) -> None:
        """Connect and start listening (returns once subscribed the first time)."""
        import redis.asyncio

        self._client = redis.asyncio.Redis.from_url(self.url)
        self._listener = asyncio.create_task(self._listen(), name="ferry-broker-relay")
        self._hub.forward = self.announce
        await asyncio.wait_for(self.subscribed.wait(), 10)

    async def close(self) -> None:
        """Stop listening and close the connections."""
        self._hub.forward = None
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        if self._sends:
            await asyncio.gather(*self._sends, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    def announce(self, session_id: str, version: int) -> None:
        """Tell the other replicas that ``session_id`` is now at ``version`` (not awaited)."""
        if self._client is None:
            return
        message = f"{self.replica} {session_id} {version}"
        task = asyncio.get_running_loop().create_task(self._send(message))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _send(self, message: str) -> None:
        try:
            await self._client.publish(self.channel, message)
        except Exception as exc:  # a lost announcement: the next read catches up
            log.warning("could not announce a session change to the other replicas: %s", exc)

    async def _listen(self) -> None:
        pause = _BACKOFF[0]
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self.subscribed.set()
                pause = _BACKOFF[0]
                await self._catch_up()
                async for message in pubsub.listen():
                    await self._deliver(message.get("data"))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis went away: resubscribe
                log.warning("lost the replicas' event channel (%s); resubscribing", exc)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(pause)
            pause = min(pause * 2, _BACKOFF[1])

    async def _deliver(self, data: object) -> None:
        try:
            text = data.decode() if isinstance(data, bytes) else str(data)
            replica, session_id, version_text = text.split(" ")
            version = int(version_text)
        except ValueError:
            return  # not one of ours
        if replica == self.replica or not self._hub.watched(session_id):
            return
        if session_id.startswith(INBOX_PREFIX):  # an inbox's wake-up: nothing to load
            self.delivered += 1
            self._hub.deliver(session_id, version, _WAKE)
            return
        await self._refresh(session_id, version)

    async def _refresh(self, session_id: str, at_least: int = 0) -> None:
        found = await self._load(session_id)
        if found is None or found[0] < at_least:
            return
        self.delivered += 1
        self._hub.deliver(session_id, found[0], found[1])

    async def _catch_up(self) -> None:
        """After a (re)subscription: re-read every watched session (changes may be missed)."""
        for session_id in self._hub.watched_sessions():
            if session_id.startswith(INBOX_PREFIX):
                self._hub.deliver(session_id, 0, _WAKE)
            else:
                await self._refresh(session_id)
