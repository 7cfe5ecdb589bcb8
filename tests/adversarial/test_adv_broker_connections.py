"""The broker's side of finding 8: connections a stranger opens and never uses.

gRPC held a connection that never finished its handshake (no TLS hello, no HTTP/2 preface)
for up to two minutes, a connection that made no call forever, and any number of them:
about 10 KiB and a descriptor each (15,000 idle connections: broker RSS 64 -> 221 MiB,
15,016 descriptors), so a few machines' worth would take the broker's descriptors or its
512 MiB. Now a silent connection goes at ``--handshake-timeout``, a connection without calls
at ``--connection-idle``, and at most ``--max-connections`` are held; a real client keeps
working (it reconnects). Each test counts the broker's descriptors with psutil.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator

import grpc
import psutil
import pytest

from ferry.v1 import broker_pb2, broker_pb2_grpc
from tests.conftest import BrokerFactory
from tests.support.processes import BrokerProcess
from tests.support.sampling import wait_for

pytestmark = [pytest.mark.timeout(60)]

FLOOD = 300


def _fds(broker: BrokerProcess) -> int:
    assert broker.proc is not None
    return psutil.Process(broker.proc.pid).num_fds()


@contextlib.contextmanager
def _silent_connections(broker: BrokerProcess, count: int) -> Iterator[list[socket.socket]]:
    """``count`` TCP connections to the broker that never send a byte."""
    host, _, port = broker.address.rpartition(":")
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(socket.create_connection((host, int(port)), timeout=5))
        yield socks
    finally:
        for sock in socks:
            sock.close()


async def _broker_id(address: str) -> str:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = broker_pb2_grpc.BrokerServiceStub(channel)
        reply = await stub.GetBrokerInfo(broker_pb2.GetBrokerInfoRequest(), timeout=10)
        return reply.broker_id


def test_silent_connections_are_dropped_at_the_handshake_timeout(
    broker_factory: BrokerFactory,
) -> None:
    broker = broker_factory("--handshake-timeout", "1")
    base = _fds(broker)
    with _silent_connections(broker, FLOOD):
        wait_for("the broker holds the flood", lambda: _fds(broker) >= base + FLOOD // 2, 10)
        # Before: still held 25 s later (gRPC's default gives them up to 120 s).
        wait_for("the broker dropped them", lambda: _fds(broker) <= base + 5, 10)
        assert asyncio.run(_broker_id(broker.address))


def test_the_broker_holds_at_most_max_connections(broker_factory: BrokerFactory) -> None:
    broker = broker_factory("--max-connections", "50", "--handshake-timeout", "30")
    base = _fds(broker)
    with _silent_connections(broker, FLOOD):
        time.sleep(1)  # let the broker accept (and refuse) what it will
        held = _fds(broker) - base
        print(f"{FLOOD} silent connections: the broker holds {held} descriptors more")
        assert held <= 50 + 5  # before: all 300
    # Once they are gone, clients are served again.
    wait_for("the flood's descriptors are freed", lambda: _fds(broker) <= base + 5, 10)
    assert asyncio.run(_broker_id(broker.address))


def test_a_connection_without_calls_is_closed_and_the_client_comes_back(
    broker_factory: BrokerFactory,
) -> None:
    broker = broker_factory("--connection-idle", "1")
    base = _fds(broker)

    async def idle_then_call() -> tuple[int, str]:
        async with grpc.aio.insecure_channel(broker.address) as channel:
            stub = broker_pb2_grpc.BrokerServiceStub(channel)
            await stub.GetBrokerInfo(broker_pb2.GetBrokerInfoRequest(), timeout=10)
            deadline = time.monotonic() + 10
            while _fds(broker) > base and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            after_idle = _fds(broker) - base
            reply = await stub.GetBrokerInfo(broker_pb2.GetBrokerInfoRequest(), timeout=10)
            return after_idle, reply.broker_id

    after_idle, broker_id = asyncio.run(idle_then_call())
    assert after_idle <= 0  # before: the idle connection was held for good
    assert broker_id


def test_a_request_larger_than_any_offer_is_refused_before_it_is_parsed(
    broker_factory: BrokerFactory,
) -> None:
    broker = broker_factory("--max-manifest-bytes", "65536")
    # 1 MiB of path: more than a manifest may weigh, and more than gRPC now takes in.
    big = broker_pb2.CreateOfferRequest(request_id="x" * 100)
    big.manifest.files.add(path="a" * (1 << 20))

    async def offer() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(broker.address) as channel:
            stub = broker_pb2_grpc.BrokerServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.CreateOffer(big, timeout=10)
            return info.value.code()

    assert asyncio.run(offer()) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Traceback" not in broker.log[-1].read_text()
