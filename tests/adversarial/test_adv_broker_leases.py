"""Issue 10, finding 5: port-lease exhaustion.

Before: 225 self-accepted sessions in 0.6 s held a whole default port range (47100-47999) of
one address for 24 h, and every other sender behind that address got NO_PORTS. Now a lease
counts until the plan's connect deadline and after it only while a peer reports CONNECTING or
TRANSFERRING (a resume leases again), and one owner (the receiver's address, an IPv6 /64)
holds at most leases_per_caller live leases on one sender host (TOO_MANY_LEASES beyond).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest
import pytest_asyncio

from ferry.broker import states
from ferry.broker.config import BrokerConfig
from ferry.broker.core import Broker
from ferry.broker.errors import Reason, ResourceExhausted
from ferry.broker.store import SqliteStore
from ferry.v1 import broker_pb2, broker_pb2_grpc
from tests.support.broker_flow import RECEIVER_PAKE, auth, claim_confirmed, confirm_keys_rpc
from tests.support.broker_flow import pake_sender as _pake
from tests.support.processes import FAST_BROKER, BrokerProcess
from tests.support.rpc import reason_of

pytestmark = pytest.mark.timeout(90)

MiB = 1 << 20
T = 5.0
RANGE = (47100, 47999)  # the client's default range: 900 ports, 225 leases of 4
MANIFEST = broker_pb2.Manifest(
    files=[broker_pb2.FileEntry(path="a.txt", size_bytes=1000, mode=0o644)],
    chunk_size_bytes=1 << 20,
)


def _peer(cert: bytes) -> broker_pb2.PeerInfo:
    return broker_pb2.PeerInfo(
        allowed_ports=broker_pb2.PortRange(first_port=RANGE[0], last_port=RANGE[1]),
        certificate_der=cert,
        certificate_mac=b"R" * 32,
    )


def _offer_request() -> broker_pb2.CreateOfferRequest:
    return broker_pb2.CreateOfferRequest(manifest=MANIFEST, sender=_pake(_peer(b"sender")))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Env:
    broker: Broker
    clock: FakeClock

    async def accepted(self, sender_ip: str, receiver_ip: str) -> broker_pb2.Session:
        """An offer from ``sender_ip`` claimed and accepted from ``receiver_ip``."""
        offer = await self.broker.create_offer(_offer_request(), sender_ip)
        claim = await claim_confirmed(self.broker, offer, receiver_ip)
        return await self.broker.accept(
            offer.session.name, claim.party_token, _peer(b"receiver"), receiver_ip
        )

    def held_ports(self, host: str) -> int:
        """Ports of `host` that a new lease would have to avoid now."""
        store = self.broker.store
        rows = store._db.execute(  # type: ignore[attr-defined]
            "SELECT l.first_port, l.last_port FROM leases l JOIN sessions s ON s.id = l.session_id"
            " WHERE l.host_id = ? AND l.expire_time > ? AND (l.hold_until IS NULL"
            " OR l.hold_until > ? OR s.state IN (?, ?))",
            (host, self.clock.now, self.clock.now, states.CONNECTING, states.TRANSFERRING),
        ).fetchall()
        return sum(last - first + 1 for first, last in rows)


async def _flood(env: Env, attacker: str) -> tuple[list[broker_pb2.Session], ResourceExhausted]:
    """Self-accepted offers from `attacker` until the broker refuses one (at most 300)."""
    sessions: list[broker_pb2.Session] = []
    for _ in range(300):
        try:
            sessions.append(await env.accepted(attacker, attacker))
        except ResourceExhausted as refusal:
            return sessions, refusal
    raise AssertionError("300 leases and no refusal")


@pytest_asyncio.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    clock = FakeClock()
    config = BrokerConfig(data_dir=tmp_path, offer_burst_per_address=1e9)
    environment = Env(Broker(config, SqliteStore(tmp_path / "b.sqlite3"), clock=clock), clock)
    yield environment
    await environment.broker.store.close()


@pytest.mark.asyncio
async def test_a_self_accept_flood_is_bounded_and_leaves_ports_to_the_neighbours(env: Env) -> None:
    """One address accepts its own offers as fast as it can: it stops at leases_per_caller
    (16 leases, 64 ports), and another sender behind the same address, whose receiver is
    elsewhere, still gets ports. Before: 225 leases, all 900 ports, then NO_PORTS for all."""
    attacker = "192.0.2.9"
    sessions, refusal = await _flood(env, attacker)
    assert refusal.reason == Reason.TOO_MANY_LEASES
    assert len(sessions) == env.broker.config.leases_per_caller == 16
    assert env.held_ports(f"ip:{attacker}") == 64
    legit = await env.accepted(attacker, "203.0.113.77")  # same sender address, other receiver
    assert legit.state == states.ACCEPTED
    assert legit.plan.listener_ports.first_port >= RANGE[0]
    # an IPv6 attacker's other addresses in its /64 are the same owner
    for i in range(16):
        await env.accepted(attacker, f"2001:db8:9:9::{i + 1:x}")
    with pytest.raises(ResourceExhausted) as again:
        await env.accepted(attacker, "2001:db8:9:9::ffff")
    assert again.value.reason == Reason.TOO_MANY_LEASES


@pytest.mark.asyncio
async def test_leases_nobody_connects_for_return_at_the_connect_deadline(env: Env) -> None:
    """Past the plan's deadline a lease counts only if a peer reported CONNECTING or
    TRANSFERRING; a resume leases again."""
    attacker = "192.0.2.9"
    await _flood(env, attacker)
    assert env.held_ports(f"ip:{attacker}") == 64
    env.clock.now += env.broker.config.connect_timeout_s + 0.1
    assert env.held_ports(f"ip:{attacker}") == 0
    # the ports came back: the same caller may lease again, up to its share
    for _ in range(16):
        await env.accepted(attacker, attacker)
    with pytest.raises(ResourceExhausted):
        await env.accepted(attacker, attacker)


@pytest.mark.asyncio
async def test_a_session_that_connects_keeps_its_lease_past_the_deadline(env: Env) -> None:
    offer = await env.broker.create_offer(_offer_request(), "192.0.2.20")
    claim = await claim_confirmed(env.broker, offer, "203.0.113.20")
    name = offer.session.name
    await env.broker.accept(name, claim.party_token, _peer(b"receiver"), "203.0.113.20")
    await env.broker.report(name, claim.party_token, states.CONNECTING, 0, "")
    env.clock.now += env.broker.config.connect_timeout_s + 60
    assert env.held_ports("ip:192.0.2.20") == 4
    # a resume starts a new attempt: ACCEPTED again, a fresh lease with a fresh deadline
    resumed = await env.broker.resume(name, offer.party_token, _peer(b"sender-2"), "192.0.2.20")
    assert resumed.state == states.ACCEPTED
    assert env.held_ports("ip:192.0.2.20") == 4
    env.clock.now += env.broker.config.connect_timeout_s + 0.1
    assert env.held_ports("ip:192.0.2.20") == 0


async def _accepted(
    stub: broker_pb2_grpc.BrokerServiceAsyncStub,
    receiver: broker_pb2_grpc.BrokerServiceAsyncStub,
) -> broker_pb2.Session:
    """Offer through `stub`, claim, confirm and accept through `receiver`."""
    offer = await stub.CreateOffer(_offer_request(), timeout=T)
    claim = await receiver.ClaimOffer(
        broker_pb2.ClaimOfferRequest(code=offer.code, pake_message=RECEIVER_PAKE), timeout=T
    )
    await confirm_keys_rpc(receiver, offer.session.name, offer.party_token, claim.party_token)
    response = await receiver.AcceptOffer(
        broker_pb2.AcceptOfferRequest(name=offer.session.name, receiver=_peer(b"receiver")),
        metadata=auth(claim.party_token),
        timeout=T,
    )
    return response.session


@pytest.mark.asyncio
async def test_a_real_broker_under_a_lease_flood(tmp_path: Path) -> None:
    """A real broker on 127.0.0.1 and ::1. 127.0.0.1 floods self-accepted offers; a sender
    on 127.0.0.1 whose receiver is on ::1 still gets ports; after the connect deadline the
    flood's leases are free again. Broker memory and descriptors stay bounded."""
    broker = BrokerProcess(
        data_dir=tmp_path / "data",
        args=[*FAST_BROKER, "--connect-timeout", "3", "--offer-burst-per-address", "1000"],
    )
    broker.listen = "localhost:0"
    broker.start()
    try:
        port = broker.address.rpartition(":")[2]
        process = psutil.Process(broker.proc.pid if broker.proc else 0)
        rss, fds = process.memory_info().rss, process.num_fds()
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as v4,
            grpc.aio.insecure_channel(f"[::1]:{port}") as v6,
        ):
            attacker = broker_pb2_grpc.BrokerServiceStub(v4)
            neighbour_receiver = broker_pb2_grpc.BrokerServiceStub(v6)
            answers: list[str] = []
            started = time.monotonic()
            for _ in range(225):
                try:
                    await _accepted(attacker, attacker)
                    answers.append("OK")
                except grpc.aio.AioRpcError as error:
                    answers.append(reason_of(error))
            flood_s = time.monotonic() - started
            print(
                f"flood: {answers.count('OK')} of 225 accepted in {flood_s:.1f} s,"
                f" then {sorted(set(answers) - {'OK'})}"
            )
            # 16 (leases_per_caller) at once; more only as earlier ones pass their deadline
            assert answers[:17] == ["OK"] * 16 + ["TOO_MANY_LEASES"]
            assert answers.count("OK") <= 16 * (1 + flood_s / 3.0)
            assert set(answers) == {"OK", "TOO_MANY_LEASES"}
            legit = await _accepted(attacker, neighbour_receiver)
            assert legit.state == states.ACCEPTED
            # the connect deadline passes with nobody connecting: the flood's leases return
            deadline = time.monotonic() + 20
            again: broker_pb2.Session | None = None
            while again is None and time.monotonic() < deadline:
                reason = ""
                try:
                    again = await _accepted(attacker, attacker)
                except grpc.aio.AioRpcError as error:
                    reason = reason_of(error)
                    await asyncio.sleep(0.25)  # a deadline passing: nothing to wait on
                assert reason in ("", "TOO_MANY_LEASES")
            assert again is not None, "the leases never came back"
            assert again.state == states.ACCEPTED
        grown = process.memory_info().rss - rss
        print(f"broker RSS +{grown / MiB:.1f} MiB, fds {fds} -> {process.num_fds()}")
        assert grown < 64 * MiB
        assert process.num_fds() <= fds + 16
    finally:
        broker.kill()
