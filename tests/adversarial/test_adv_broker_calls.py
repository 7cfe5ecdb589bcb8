"""A loop of cheap calls from one address (a sibling of findings 1 and 2).

Anyone who makes an offer holds a party token, and every authenticated call is a store
write and a publish (ReportProgress, ResumeSession), or at least a store read: one client in
a loop took as much of the broker's one event loop as it could, with nothing to stop it.
Calls of any kind are now a token bucket per source (an IPv4 address, an IPv6 /64), checked
before the request is looked at: the flooding address gets RATE_LIMITED, another address is
served as before.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import psutil
import pytest

from ferry.client import BrokerError
from ferry.client._broker import BrokerLink
from ferry.v1 import broker_pb2, broker_pb2_grpc
from tests.support.processes import FAST_BROKER, BrokerProcess
from tests.support.rpc import reason_of

if TYPE_CHECKING:
    from ferry.v1.broker_pb2_grpc import BrokerServiceAsyncStub as Stub

pytestmark = [pytest.mark.timeout(60)]

CALLS = 400


async def _flood(stub: Stub, calls: int) -> list[str]:
    """GetSession with a made-up token, `calls` times: each outcome's reason."""
    reasons = []
    request = broker_pb2.GetSessionRequest(name="sessions/0")
    for _ in range(calls):
        try:
            await stub.GetSession(request, metadata=(("authorization", "Bearer x"),), timeout=10)
            reasons.append("")
        except grpc.aio.AioRpcError as error:
            reasons.append(reason_of(error))
    return reasons


def _stub(channel: grpc.aio.Channel) -> Stub:
    return broker_pb2_grpc.BrokerServiceStub(channel)


@pytest.mark.asyncio
async def test_a_call_loop_is_limited_per_address_and_others_are_served(tmp_path: Path) -> None:
    broker = BrokerProcess(
        data_dir=tmp_path / "data",
        args=[*FAST_BROKER, "--calls-burst-per-address", "100", "--calls-rate-per-address", "2"],
    )
    broker.listen = "localhost:0"  # 127.0.0.1 and ::1: two sources
    broker.start()
    try:
        port = broker.address.rpartition(":")[2]
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as flooding,
            grpc.aio.insecure_channel(f"[::1]:{port}") as other,
        ):
            reasons = await _flood(_stub(flooding), CALLS)
            limited = reasons.count("RATE_LIMITED")
            print(f"{CALLS} calls from one address: {limited} RATE_LIMITED")
            # The burst (100) and what refilled meanwhile are answered (TOKEN_INVALID); the
            # rest is refused before the request is looked at. Before: none refused.
            assert limited >= CALLS // 2, reasons
            assert set(reasons) == {"TOKEN_INVALID", "RATE_LIMITED"}
            served = await _flood(_stub(other), 20)
            assert served == ["TOKEN_INVALID"] * 20  # the other address is not held back
            # The limited address gets calls back as its bucket refills.
            await asyncio.sleep(1.0)
            assert (await _flood(_stub(flooding), 1)) == ["TOKEN_INVALID"]
        assert broker.proc is not None
        assert psutil.Process(broker.proc.pid).num_fds() < 64
        assert "Traceback" not in broker.log[-1].read_text()
    finally:
        broker.kill()


@pytest.mark.asyncio
async def test_the_client_waits_out_a_call_limit(tmp_path: Path) -> None:
    """A neighbour behind the same address spent its calls: the client's call waits for the
    bucket to refill (saying so once) instead of failing."""
    broker = BrokerProcess(
        data_dir=tmp_path / "data",
        args=[*FAST_BROKER, "--calls-burst-per-address", "20", "--calls-rate-per-address", "1"],
    )
    broker.start()
    try:
        async with grpc.aio.insecure_channel(broker.address) as channel:
            reasons = await _flood(_stub(channel), 30)  # the neighbour
        assert "RATE_LIMITED" in reasons
        told: list[BrokerError] = []
        link = BrokerLink(broker.address, patience=20.0, on_wait=told.append)
        try:
            assert await link.broker_id()
        finally:
            await link.close()
        assert [e.reason for e in told] == ["RATE_LIMITED"]
    finally:
        broker.kill()
