"""GetBrokerInfo on real broker processes: one id per store, whatever the address."""

from __future__ import annotations

import re
import shutil

import grpc
import pytest

from ferry.v1 import broker_pb2, broker_pb2_grpc
from tests.conftest import BrokerFactory
from tests.support.processes import BrokerProcess

pytestmark = [pytest.mark.timeout(90), pytest.mark.asyncio]

T = 5.0  # deadline of every call, seconds


async def _broker_id(broker: BrokerProcess) -> str:
    """Ask the broker who it is, with no credential."""
    async with grpc.aio.insecure_channel(broker.address) as channel:
        stub = broker_pb2_grpc.BrokerServiceStub(channel)
        reply = await stub.GetBrokerInfo(broker_pb2.GetBrokerInfoRequest(), timeout=T)
    return reply.broker_id


async def test_id_survives_restarts_and_moves(broker_factory: BrokerFactory) -> None:
    broker = broker_factory()
    first = await _broker_id(broker)
    assert re.fullmatch(r"[0-9a-f]{32}", first)
    assert await _broker_id(broker) == first

    broker.restart()  # same data dir, same address
    assert await _broker_id(broker) == first

    old_address = broker.address
    broker.stop()
    broker.listen = "127.0.0.1:0"  # moved: same data dir, a new port
    broker.start()
    assert broker.address != old_address
    assert await _broker_id(broker) == first


async def test_new_store_new_id(broker_factory: BrokerFactory) -> None:
    one = broker_factory(name="one")
    two = broker_factory(name="two")
    id_one, id_two = await _broker_id(one), await _broker_id(two)
    assert id_one != id_two  # two brokers are two brokers

    one.stop()
    shutil.rmtree(one.data_dir)  # the store is lost: the broker is a new one
    one.start()
    assert await _broker_id(one) not in (id_one, id_two)
