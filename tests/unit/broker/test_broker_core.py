"""The Broker domain with an injected clock, and the in-process server's watch bookkeeping:
each on both stores (SqliteStore, and RedisStore on a real redis-server)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

import ferry.broker
from ferry.broker import states
from ferry.broker.config import BrokerConfig
from ferry.broker.core import Broker
from ferry.broker.errors import AlreadyExists, Reason
from ferry.broker.store import Store
from ferry.v1 import broker_pb2, broker_pb2_grpc
from tests.support.broker_flow import (
    FakeClock,
    claim_confirmed,
    offer_request,
    receiver_peer,
)
from tests.support.redis import StoreFactory

pytestmark = pytest.mark.timeout(30)


def test_public_surface() -> None:
    assert sorted(ferry.broker.__all__) == [
        "BrokerConfig",
        "RunningBroker",
        "add_arguments",
        "config_from_arguments",
        "configure_logging",
        "serve",
        "start_server",
    ]
    for name in ferry.broker.__all__:  # the server's names are loaded on first use
        assert getattr(ferry.broker, name) is not None
    with pytest.raises(AttributeError):
        _ = ferry.broker.nothing_of_that_name


@pytest.mark.asyncio
async def test_ttl_clamped_and_sweep(store: Store, tmp_path: Path) -> None:
    clock = FakeClock()
    broker = Broker(BrokerConfig(data_dir=tmp_path), store, clock=clock)
    offer = await broker.create_offer(offer_request(), "10.0.0.1")
    assert offer.session.expire_time.seconds == int(clock.now) + 600
    claim = await claim_confirmed(broker, offer, "10.0.0.2")
    accepted = await broker.accept(
        offer.session.name, claim.party_token, receiver_peer(), "10.0.0.2"
    )
    assert accepted.plan.listener_ports.first_port == 9000
    assert accepted.expire_time.seconds == int(clock.now) + 24 * 3600
    clock.now += 24 * 3600 + 1
    assert await broker.sweep() == 1
    got = await broker.get(offer.session.name, offer.party_token)
    assert got.state == states.EXPIRED
    # the lease was released: a new session gets the same ports again
    second = await broker.create_offer(offer_request(), "10.0.0.1")
    claim2 = await claim_confirmed(broker, second, "10.0.0.2")
    plan = (
        await broker.accept(second.session.name, claim2.party_token, receiver_peer(), None)
    ).plan
    assert plan.listener_ports.first_port == 9000


@pytest.mark.asyncio
async def test_expired_before_sweep(store: Store, tmp_path: Path) -> None:
    clock = FakeClock()
    broker = Broker(BrokerConfig(data_dir=tmp_path), store, clock=clock)
    offer = await broker.create_offer(offer_request(), None)
    claim = await claim_confirmed(broker, offer)
    clock.now += 601
    with pytest.raises(states.IllegalTransition, match="expired"):
        await broker.accept(offer.session.name, claim.party_token, receiver_peer(), None)


@pytest.mark.asyncio
async def test_request_id_after_restart(stores: StoreFactory, tmp_path: Path) -> None:
    clock = FakeClock()
    first = Broker(BrokerConfig(data_dir=tmp_path), stores(), clock=clock)
    offer = await first.create_offer(offer_request("r1"), None)
    assert (await first.create_offer(offer_request("r1"), None)).code == offer.code
    restarted = Broker(BrokerConfig(data_dir=tmp_path), stores(), clock=clock)  # its own store
    if stores.kind == "redis":  # the ledger is shared: a restart (or a replica) answers alike
        again = await restarted.create_offer(offer_request("r1"), None)
        assert (again.code, again.party_token) == (offer.code, offer.party_token)
        assert again.session.name == offer.session.name
        return
    # SQLite: the answer was in the first process's memory; the offer exists, so the retry is
    # refused (a second offer would leave the first one orphaned).
    with pytest.raises(AlreadyExists) as info:
        await restarted.create_offer(offer_request("r1"), None)
    assert info.value.reason == Reason.REQUEST_ID_REUSED


@pytest.mark.asyncio
async def test_cancelled_watches_do_not_leak(stores: StoreFactory, tmp_path: Path) -> None:
    config = BrokerConfig(
        listen="127.0.0.1:0",
        data_dir=tmp_path,
        store_url=stores.url,  # None: SQLite in data_dir
        sweep_interval_s=0.1,
        watches_per_party=50,
        watches_per_address=50,
    )
    running = await ferry.broker.start_server(config)
    try:
        assert (
            type(running.store).__name__
            == {"sqlite": "SqliteStore", "redis": "RedisStore"}[stores.kind]
        )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = broker_pb2_grpc.BrokerServiceStub(channel)
            offer = await stub.CreateOffer(offer_request(), timeout=5)
            metadata = (("authorization", f"Bearer {offer.party_token}"),)
            calls = [
                stub.WatchSession(
                    broker_pb2.WatchSessionRequest(name=offer.session.name),
                    metadata=metadata,
                    timeout=10,
                )
                for _ in range(50)
            ]
            for call in calls:
                first = await call.read()
                assert isinstance(first, broker_pb2.WatchSessionResponse)
            assert running.broker.hub.watcher_count() == 50
            for call in calls:
                call.cancel()
            for _ in range(100):
                if running.broker.hub.watcher_count() == 0:
                    break
                await asyncio.sleep(0.02)
            assert running.broker.hub.watcher_count() == 0
    finally:
        await running.stop(grace=1)
