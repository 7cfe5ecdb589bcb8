"""The watch fan-out across replicas (ferry.broker.relay) on a real redis-server: a change
announced by one replica reaches another replica's watchers; a replica's own announcements
are not delivered twice; changes missed while the channel was down are caught up."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.broker import states
from ferry.broker.hub import Hub, Watcher
from ferry.broker.redis_store import RedisStore
from ferry.broker.relay import Loader, RedisRelay
from ferry.broker.store import Store
from ferry.v1 import broker_pb2
from tests.support.redis import RedisServer, session_record

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as running:
        yield running


def _load(store: Store) -> Loader:
    async def load(session_id: str) -> tuple[int, broker_pb2.Session] | None:
        record = await store.get_session(session_id)
        return None if record is None else (record.version, record.session)

    return load


async def _next(watcher: Watcher) -> tuple[int, broker_pb2.Session]:
    item = await asyncio.wait_for(watcher.next(), 5)
    assert item is not None
    return item


@pytest.mark.asyncio
async def test_a_change_on_one_replica_reaches_the_watchers_of_another(server: RedisServer) -> None:
    async def go() -> None:
        store_a, store_b = RedisStore.from_url(server.url), RedisStore.from_url(server.url)
        hub_a, hub_b = Hub(), Hub()
        relay_a = RedisRelay(server.url, hub_a, _load(store_a))
        relay_b = RedisRelay(server.url, hub_b, _load(store_b))
        await relay_a.start()
        await relay_b.start()
        try:
            record = session_record("s1")
            await store_a.create_session(record)
            async with hub_b.subscribe(record.session_id, "sender") as watcher:
                record.session.state = states.ACCEPTED
                stored = await store_a.update_session(record)
                hub_a.publish(stored.session_id, stored.version, stored.session)  # on A
                version, seen = await _next(watcher)
                assert (version, seen.state) == (1, states.ACCEPTED)
            # A replica's own announcement is not delivered again to its hub.
            await asyncio.sleep(0.2)
            assert relay_a.delivered == 0
            assert relay_b.delivered == 1
        finally:
            await relay_a.close()
            await relay_b.close()
            await store_a.close()
            await store_b.close()

    await go()


@pytest.mark.asyncio
async def test_changes_missed_while_the_channel_was_down_are_caught_up(server: RedisServer) -> None:
    async def go() -> None:
        store = RedisStore.from_url(server.url)
        hub = Hub()
        relay = RedisRelay(server.url, hub, _load(store))
        await relay.start()
        try:
            record = session_record("s2")
            await store.create_session(record)
            async with hub.subscribe(record.session_id, "receiver") as watcher:
                relay.subscribed.clear()
                admin = server.client()
                admin.client_kill_filter(_type="pubsub")  # the channel drops
                record.session.state = states.CONNECTING
                await store.update_session(record)  # announced to nobody
                await asyncio.wait_for(relay.subscribed.wait(), 10)  # resubscribed
                version, seen = await _next(watcher)
                assert (version, seen.state) == (1, states.CONNECTING)
        finally:
            await relay.close()
            await store.close()

    await go()
