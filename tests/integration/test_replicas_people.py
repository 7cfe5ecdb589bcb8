"""People across two `ferry serve` replicas on one Redis (issue 13 on issue 12's scale-out).

A device signed in on one replica is signed in on both (one token key in the store); its
presence is in the store, so the other replica lists it online; an offer made through
replica A wakes the recipient's inbox stream held by replica B (the relay's inbox keys); the
device takes it through B and the sender sees that through A. Presence outlives a replica's
restart (it is the store's, until its TTL), and the stream comes back on the other replica.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
import pytest_asyncio

from ferry.broker.people import Directory
from ferry.broker.redis_store import RedisStore
from ferry.v1 import broker_pb2, broker_pb2_grpc
from tests.support.broker_flow import auth
from tests.support.people import T, enroll, offer_to
from tests.support.processes import BrokerProcess, start_replica
from tests.support.redis import RedisServer

if TYPE_CHECKING:
    from ferry.v1.broker_pb2_grpc import BrokerServiceAsyncStub as Stub

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio]


@pytest_asyncio.fixture
async def shared(tmp_path: Path) -> AsyncIterator[tuple[str, Directory]]:
    with RedisServer(tmp_path / "redis") as server:
        store = RedisStore.from_url(server.url)
        yield server.url, store.directory()
        await store.close()


async def _online(stub: Stub, meta: tuple[tuple[str, str], ...], user: str) -> bool:
    peers = await stub.ListPeers(broker_pb2.ListPeersRequest(), metadata=meta, timeout=T)
    return any(d.online for p in peers.peers if p.user == user for d in p.devices)


async def test_an_offer_through_one_replica_reaches_an_inbox_held_by_the_other(
    tmp_path: Path, shared: tuple[str, Directory]
) -> None:
    url, directory = shared
    a = start_replica(tmp_path, "a", url)
    b = start_replica(tmp_path, "b", url)
    brokers: list[BrokerProcess] = [a, b]
    try:
        async with (
            grpc.aio.insecure_channel(a.address) as on_a,
            grpc.aio.insecure_channel(b.address) as on_b,
        ):
            stub_a: Stub = broker_pb2_grpc.BrokerServiceStub(on_a)
            stub_b: Stub = broker_pb2_grpc.BrokerServiceStub(on_b)
            bob = await enroll(stub_a, directory, "bob")
            alice = await enroll(stub_b, directory, "alice")  # signed in through B
            assert not await _online(stub_a, bob.meta(), "alice")
            watch: Any = stub_b.WatchInbox(
                broker_pb2.WatchInboxRequest(), metadata=alice.meta(), timeout=60
            )
            assert list((await watch.read()).offers) == []
            # presence is the store's: replica A lists alice online
            assert await _online(stub_a, bob.meta(), "alice")
            offer = await offer_to(stub_a, bob, "alice")  # through A
            update = await asyncio.wait_for(watch.read(), 20)
            while not update.offers:
                update = await asyncio.wait_for(watch.read(), 20)
            assert [o.name for o in update.offers] == [offer.name]
            # alice's access token (from B) works on A, and she takes it there
            taken = await stub_a.TakeOffer(
                broker_pb2.TakeOfferRequest(name=offer.name), metadata=alice.meta(), timeout=T
            )
            gone = await asyncio.wait_for(watch.read(), 20)
            assert [g.person.receiver_device_id for g in gone.gone] == [alice.device_id]
            # the sender, through A, sees the session claimed by her device
            seen = await stub_a.GetSession(
                broker_pb2.GetSessionRequest(name=offer.name),
                metadata=auth(offer.party_token),
                timeout=T,
            )
            assert seen.session.claimed
            assert seen.session.person.receiver_device_id == alice.device_id
            assert taken.party_token
            # B dies: alice's stream ends, her presence stays the store's until its TTL;
            # she re-opens the stream on A
            b.kill()
            with pytest.raises(grpc.aio.AioRpcError):
                await asyncio.wait_for(watch.read(), 20)
            assert await _online(stub_a, bob.meta(), "alice")
            again: Any = stub_a.WatchInbox(
                broker_pb2.WatchInboxRequest(), metadata=alice.meta(), timeout=60
            )
            assert list((await again.read()).offers) == []
            again.cancel()
    finally:
        for broker in brokers:
            broker.kill()
