"""Calls of one broker process interleaving between store steps (issue 12: the async store).

Every store call is awaited, and on Redis each is a round trip during which the event loop runs
other calls. What was safe only because nothing ran between a read and the write after it is
checked here with calls started together (asyncio.gather) on one Broker, on both stores:

- retries of one CreateOffer (same request_id) in flight together make one offer, and each
  gets its answer;
- two reports racing to COMPLETED: exactly one of them wrote it (what the metrics count);
- a call that finds its session past expiry while another call expires it gets the expired
  session, not a CONFLICT;
- a watcher's slot never trades a newer snapshot for an older one that arrives late.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ferry.broker import states
from ferry.broker.config import BrokerConfig
from ferry.broker.core import Broker
from ferry.broker.hub import Hub
from ferry.broker.store import Store
from ferry.v1 import broker_pb2
from tests.support.broker_flow import (
    FakeClock,
    claim_confirmed,
    offer_request,
    receiver_peer,
)
from tests.support.redis import StoreFactory

pytestmark = pytest.mark.timeout(60)

ROUNDS = 20


def _broker(store: Store, tmp_path: Path, clock: FakeClock | None = None) -> Broker:
    config = BrokerConfig(data_dir=tmp_path, offer_burst_per_address=1000, leases_per_caller=1000)
    return Broker(config, store, clock=clock or FakeClock())


@pytest.mark.asyncio
async def test_retries_in_flight_together_make_one_offer(
    stores: StoreFactory, tmp_path: Path
) -> None:
    broker = _broker(stores(), tmp_path)
    for round_ in range(ROUNDS):
        request = offer_request(f"retry-{round_}", last_port=9999)
        answers = await asyncio.gather(
            *(broker.create_offer(request, "10.0.0.1") for _ in range(4))
        )
        assert len({(a.code, a.party_token, a.session.name) for a in answers}) == 1
    assert broker._requests == {}  # nothing kept once the calls ended


@pytest.mark.asyncio
async def test_of_two_racing_completions_exactly_one_wrote(
    stores: StoreFactory, tmp_path: Path
) -> None:
    broker = _broker(stores(), tmp_path)
    for _ in range(ROUNDS):
        offer = await broker.create_offer(offer_request(last_port=9999), "10.0.0.1")
        claim = await claim_confirmed(broker, offer, "10.0.0.2")
        name, receiver = offer.session.name, claim.party_token
        await broker.accept(name, receiver, receiver_peer(), "10.0.0.2")
        await broker.report(name, receiver, states.TRANSFERRING, 0, "")
        results = await asyncio.gather(
            *(broker.report_change(name, receiver, states.COMPLETED, 1, "") for _ in range(2)),
            return_exceptions=True,
        )
        wrote = [r for r in results if isinstance(r, tuple) and r[1]]
        assert len(wrote) == 1, results
        assert wrote[0][0].state == states.COMPLETED
        assert (await broker.get(name, receiver)).state == states.COMPLETED


@pytest.mark.asyncio
async def test_a_call_racing_the_expiry_of_its_session_sees_it_expired(
    stores: StoreFactory, tmp_path: Path
) -> None:
    clock = FakeClock()
    broker = _broker(stores(), tmp_path, clock)
    offers = [
        await broker.create_offer(offer_request(last_port=9999), "10.0.0.1") for _ in range(ROUNDS)
    ]
    clock.now += 3600  # every offer is past its expiry, none expired yet
    for offer in offers:
        name, token = offer.session.name, offer.party_token
        got = await asyncio.gather(broker.get(name, token), broker.get(name, token), broker.sweep())
        assert [s.state for s in got[:2]] == [states.EXPIRED, states.EXPIRED]


@pytest.mark.asyncio
async def test_a_watcher_keeps_the_newest_snapshot() -> None:
    hub = Hub()
    async with hub.subscribe("s", "sender") as watcher:
        newer = broker_pb2.Session(name="sessions/s", state=states.COMPLETED)
        older = broker_pb2.Session(name="sessions/s", state=states.TRANSFERRING)
        hub.deliver("s", 6, newer)
        hub.deliver("s", 5, older)  # a relay's read that returned after a newer commit
        item = await asyncio.wait_for(watcher.next(), 5)
        assert item is not None
        assert (item[0], item[1].state) == (6, states.COMPLETED)
