"""ResumeSession in the Broker domain: new PeerInfo, attempts, leases and watchers.

Every test runs on both stores: SqliteStore, and RedisStore on a real redis-server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from ferry.broker import states
from ferry.broker.config import BrokerConfig
from ferry.broker.core import Broker
from ferry.broker.errors import Aborted, InvalidArgument, Reason, ResourceExhausted, Unauthenticated
from ferry.broker.store import SessionRecord, StaleRecord
from ferry.v1 import broker_pb2
from tests.support.broker_flow import claim_confirmed, pake_sender
from tests.support.redis import STORE_KINDS, StoreFactory

pytestmark = pytest.mark.timeout(30)

REFLEXIVE = broker_pb2.Candidate.KIND_SERVER_REFLEXIVE


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def _peer(cert: bytes, first: int = 9000, last: int = 9100, host: str = "") -> broker_pb2.PeerInfo:
    return broker_pb2.PeerInfo(
        candidates=[
            broker_pb2.Candidate(ip="192.0.2.1", kind=broker_pb2.Candidate.KIND_HOST),
            broker_pb2.Candidate(ip="203.0.113.9", kind=REFLEXIVE),  # dropped by the broker
        ],
        allowed_ports=broker_pb2.PortRange(first_port=first, last_port=last),
        certificate_der=cert,
        host_id=host,
    )


@dataclass
class Session:
    name: str
    sender: str
    receiver: str


@dataclass
class Env:
    broker: Broker
    clock: FakeClock
    stores: StoreFactory

    async def offer(self, host: str = "laptop", claim: bool = True) -> Session:
        request = broker_pb2.CreateOfferRequest(
            manifest=broker_pb2.Manifest(
                files=[broker_pb2.FileEntry(path="a.txt", size_bytes=1)], chunk_size_bytes=1 << 20
            ),
            sender=pake_sender(_peer(b"sender-1", host=host)),
        )
        offer = await self.broker.create_offer(request, "10.0.0.1")
        # claimed: with both keys confirmed, so that the receiver sees the offer and may accept
        receiver = (
            (await claim_confirmed(self.broker, offer, "10.0.0.2")).party_token if claim else ""
        )
        return Session(offer.session.name, offer.party_token, receiver)

    async def accepted(self, host: str = "laptop") -> Session:
        s = await self.offer(host)
        await self.broker.accept(s.name, s.receiver, _peer(b"receiver-1", 1, 2), "10.0.0.2")
        return s

    def leases(self) -> list[tuple[str, int, int]]:
        return [(f"sessions/{sid}", first, last) for sid, first, last in self.stores.leases()]


@pytest_asyncio.fixture(params=STORE_KINDS)
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    clock = FakeClock()
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else None
    async with StoreFactory(request.param, tmp_path, url) as stores:
        config = BrokerConfig(data_dir=tmp_path, stream_count=4)
        yield Env(Broker(config, stores(), clock=clock), clock, stores)


def _reflexive(peer: broker_pb2.PeerInfo) -> list[str]:
    return [c.ip for c in peer.candidates if c.kind == REFLEXIVE]


@pytest.mark.asyncio
async def test_offered_sender_replaces_its_peer(env: Env) -> None:
    s = await env.offer(claim=False)
    before = await env.broker.get(s.name, s.sender)
    env.clock.now += 5
    got = await env.broker.resume(s.name, s.sender, _peer(b"sender-2", 9500, 9600), "10.0.0.7")
    assert got.state == states.OFFERED
    assert got.attempt == 0
    assert got.sender.certificate_der == b"sender-2"
    assert got.sender.allowed_ports.first_port == 9500
    assert _reflexive(got.sender) == ["10.0.0.7"]
    assert not got.HasField("plan")
    assert got.expire_time == before.expire_time
    assert got.update_time.seconds == int(env.clock.now)
    assert env.leases() == []


@pytest.mark.asyncio
async def test_offered_claimed_receiver_may_resume(env: Env) -> None:
    s = await env.offer()
    got = await env.broker.resume(s.name, s.receiver, _peer(b"receiver-0", 1, 2), "10.0.0.8")
    assert (got.state, got.attempt, got.claimed) == (states.OFFERED, 0, True)
    assert got.receiver.certificate_der == b"receiver-0"
    assert got.sender.certificate_der == b"sender-1"
    assert env.leases() == []
    # accepting afterwards still works and starts attempt 1 with the accept's details
    accepted = await env.broker.accept(s.name, s.receiver, _peer(b"receiver-1", 1, 2), None)
    assert (accepted.state, accepted.attempt) == (states.ACCEPTED, 1)
    assert accepted.receiver.certificate_der == b"receiver-1"


@pytest.mark.asyncio
async def test_accept_starts_attempt_one(env: Env) -> None:
    s = await env.accepted()
    got = await env.broker.get(s.name, s.sender)
    assert (got.state, got.attempt) == (states.ACCEPTED, 1)


@pytest.mark.asyncio
@pytest.mark.parametrize("reached", [states.ACCEPTED, states.CONNECTING, states.TRANSFERRING])
async def test_resume_after_accept_starts_next_attempt(env: Env, reached: states.State) -> None:
    s = await env.accepted()
    for state in (states.CONNECTING, states.TRANSFERRING):
        if state <= reached:
            await env.broker.report(s.name, s.sender, state, 10, "")
    before = await env.broker.get(s.name, s.sender)
    env.clock.now += 60
    got = await env.broker.resume(s.name, s.receiver, _peer(b"receiver-2", 3, 4), "10.0.0.9")
    assert got.state == states.ACCEPTED
    assert got.attempt == 2
    assert got.receiver.certificate_der == b"receiver-2"
    assert _reflexive(got.receiver) == ["10.0.0.9"]
    assert got.sender == before.sender  # the other party's details are untouched
    assert got.expire_time == before.expire_time
    assert got.bytes_done == before.bytes_done
    assert got.update_time.seconds == int(env.clock.now)
    plan = got.plan
    assert plan.listener == broker_pb2.ConnectionPlan.ROLE_SENDER
    assert plan.stream_count == 4
    assert plan.connect_deadline.seconds == int(env.clock.now) + 30
    assert plan.lease_expire_time == got.expire_time
    # the freed ports may be reused: the receiver's resume keeps the sender's span
    assert plan.listener_ports == before.plan.listener_ports
    assert env.leases() == [(s.name, 9000, 9005)]
    # the next attempt reports forward again
    assert (await env.broker.report(s.name, s.sender, states.CONNECTING, 0, "")).state == (
        states.CONNECTING
    )


@pytest.mark.asyncio
async def test_sender_resume_leases_from_its_new_range(env: Env) -> None:
    s = await env.accepted()
    got = await env.broker.resume(s.name, s.sender, _peer(b"sender-2", 9500, 9600), "10.0.0.1")
    assert (got.attempt, got.sender.certificate_der) == (2, b"sender-2")
    assert got.receiver.certificate_der == b"receiver-1"
    ports = got.plan.listener_ports
    assert (ports.first_port, ports.last_port) == (9500, 9505)
    assert env.leases() == [(s.name, 9500, 9505)]


@pytest.mark.asyncio
async def test_two_resumes_leave_one_lease_and_no_overlap(env: Env) -> None:
    a = await env.accepted()
    b = await env.accepted()  # same host: takes the next span
    assert env.leases() == sorted([(a.name, 9000, 9005), (b.name, 9006, 9011)])
    await env.broker.resume(a.name, a.sender, _peer(b"sender-2", 9003, 9100, "laptop"), None)
    got = await env.broker.resume(a.name, a.receiver, _peer(b"receiver-2", 1, 2), None)
    assert got.attempt == 3
    ports = got.plan.listener_ports
    assert (ports.first_port, ports.last_port) == (9012, 9017)  # not over b's 9006-9011
    assert env.leases() == sorted([(a.name, 9012, 9017), (b.name, 9006, 9011)])
    # ending the session after resumes still frees its (only) lease
    await env.broker.cancel(a.name, a.sender, "")
    assert env.leases() == [(b.name, 9006, 9011)]


@pytest.mark.asyncio
async def test_expiry_after_resumes_frees_the_lease(env: Env) -> None:
    s = await env.accepted()
    await env.broker.resume(s.name, s.receiver, _peer(b"receiver-2", 1, 2), None)
    await env.broker.resume(s.name, s.sender, _peer(b"sender-2"), None)
    assert len(env.leases()) == 1
    env.clock.now += 24 * 3600 + 1
    assert await env.broker.sweep() == 1
    assert env.leases() == []
    with pytest.raises(states.IllegalTransition, match="expired; nothing to resume"):
        await env.broker.resume(s.name, s.sender, _peer(b"sender-3"), None)


@pytest.mark.asyncio
async def test_no_ports_keeps_the_old_attempt(env: Env) -> None:
    a = await env.accepted()
    await env.accepted()
    with pytest.raises(ResourceExhausted) as info:  # 9006-9011 is b's; 6 don't fit in 9006-9010
        await env.broker.resume(a.name, a.sender, _peer(b"sender-2", 9006, 9010, "laptop"), None)
    assert info.value.reason == Reason.NO_PORTS
    got = await env.broker.get(a.name, a.sender)
    assert (got.attempt, got.sender.certificate_der) == (1, b"sender-1")
    assert (a.name, 9000, 9005) in env.leases()


async def _finish(env: Env, s: Session, final: states.State) -> None:
    if final == states.DECLINED:
        return
    await env.broker.accept(s.name, s.receiver, _peer(b"receiver-1", 1, 2), None)
    if final == states.COMPLETED:
        await env.broker.report(s.name, s.receiver, states.TRANSFERRING, 0, "")
        await env.broker.report(s.name, s.receiver, states.COMPLETED, 1, "")
    elif final == states.CANCELLED:
        await env.broker.cancel(s.name, s.sender, "bye")
    elif final == states.FAILED:
        await env.broker.report(s.name, s.sender, states.FAILED, 0, "disk full")
    elif final == states.EXPIRED:
        env.clock.now += 24 * 3600 + 1


@pytest.mark.asyncio
@pytest.mark.parametrize("final", sorted(states.FINAL_STATES))
async def test_final_states_refuse(env: Env, final: states.State) -> None:
    s = await env.offer()
    if final == states.DECLINED:
        await env.broker.decline(s.name, s.receiver, "no")
    await _finish(env, s, final)
    for token in (s.sender, s.receiver):
        with pytest.raises(states.IllegalTransition) as info:
            await env.broker.resume(s.name, token, _peer(b"new"), None)
        assert str(info.value) == f"the session is {states.state_name(final)}; nothing to resume"
    assert env.leases() == []


@pytest.mark.asyncio
async def test_peer_is_validated(env: Env) -> None:
    s = await env.accepted()
    with pytest.raises(InvalidArgument) as info:
        await env.broker.resume(s.name, s.receiver, _peer(b""), None)
    assert info.value.reason == Reason.INVALID_PEER
    assert "receiver" in str(info.value)
    with pytest.raises(Unauthenticated) as unauthenticated:
        await env.broker.resume(s.name, None, _peer(b"x"), None)
    assert unauthenticated.value.reason == Reason.TOKEN_MISSING
    assert (await env.broker.get(s.name, s.sender)).attempt == 1


@pytest.mark.asyncio
async def test_watchers_see_the_new_attempt(env: Env) -> None:
    s = await env.accepted()
    await env.broker.report(s.name, s.sender, states.TRANSFERRING, 5, "")
    seen: list[broker_pb2.Session] = []
    got = asyncio.Event()  # the watcher took an update (it keeps only the latest one)

    async def watch() -> None:
        async for session in env.broker.watch(s.name, s.sender):
            seen.append(session)
            got.set()
            if session.state in states.FINAL_STATES:
                return

    async def then(action: Callable[[], Awaitable[object]]) -> None:
        await asyncio.wait_for(got.wait(), 5)
        got.clear()
        await action()

    task = asyncio.create_task(watch())
    await then(lambda: env.broker.resume(s.name, s.receiver, _peer(b"receiver-2", 1, 2), None))
    await then(lambda: env.broker.resume(s.name, s.sender, _peer(b"sender-2"), None))
    await then(lambda: env.broker.cancel(s.name, s.sender, ""))
    await asyncio.wait_for(task, 5)
    assert [(x.state, x.attempt) for x in seen] == [
        (states.TRANSFERRING, 1),
        (states.ACCEPTED, 2),
        (states.ACCEPTED, 3),
        (states.CANCELLED, 3),
    ]
    assert seen[1].receiver.certificate_der == b"receiver-2"
    assert seen[2].sender.certificate_der == b"sender-2"


@pytest.mark.asyncio
async def test_conflict_puts_the_lease_back(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    s = await env.accepted()

    def stale(record: object) -> object:
        raise StaleRecord("raced")

    monkeypatch.setattr(env.broker.store, "update_session", stale)
    with pytest.raises(Aborted) as info:
        await env.broker.resume(s.name, s.sender, _peer(b"sender-2", 9500, 9600, "laptop"), None)
    assert info.value.reason == Reason.CONFLICT
    assert env.leases() == [(s.name, 9000, 9005)]  # the stored plan's ports, not 9500-9505


@pytest.mark.asyncio
async def test_receiver_completes_from_accepted_after_a_resume(env: Env) -> None:
    s = await env.accepted()
    await env.broker.report(s.name, s.sender, states.TRANSFERRING, 10, "")
    resumed = await env.broker.resume(s.name, s.sender, _peer(b"sender-2"), None)
    assert (resumed.state, resumed.attempt) == (states.ACCEPTED, 2)
    done = await env.broker.report(s.name, s.receiver, states.COMPLETED, 1, "")
    assert (done.state, done.attempt, done.bytes_done) == (states.COMPLETED, 2, 1)
    assert env.leases() == []


@pytest.mark.asyncio
async def test_receiver_completes_right_after_accepting(env: Env) -> None:
    s = await env.accepted()
    done = await env.broker.report(s.name, s.receiver, states.COMPLETED, 1, "")
    assert done.state == states.COMPLETED
    assert await env.broker.get(s.name, s.sender) == done


@pytest.mark.asyncio
async def test_completed_again_changes_nothing(env: Env) -> None:
    s = await env.accepted()
    session_id = s.name.removeprefix("sessions/")
    done = await env.broker.report(s.name, s.receiver, states.COMPLETED, 1, "")
    stored = await env.broker.store.get_session(session_id)
    assert stored is not None
    env.clock.now += 30
    async with env.broker.hub.subscribe(session_id) as watcher:
        again = await env.broker.report(s.name, s.receiver, states.COMPLETED, 0, "")
        assert again == done  # same bytes_done, same update_time
        with pytest.raises(TimeoutError):  # nothing was published
            await asyncio.wait_for(watcher.next(), 0.05)
    after = await env.broker.store.get_session(session_id)
    assert after is not None
    assert (after.version, after.session) == (stored.version, stored.session)
    with pytest.raises(states.NotPermitted):
        await env.broker.report(s.name, s.sender, states.COMPLETED, 1, "")
    with pytest.raises(states.IllegalTransition):  # other reports stay refused
        await env.broker.report(s.name, s.receiver, states.TRANSFERRING, 1, "")


@pytest.mark.asyncio
async def test_accept_negotiates_like_a_resume(env: Env) -> None:
    s = await env.offer()
    env.clock.now += 7
    got = await env.broker.accept(s.name, s.receiver, _peer(b"receiver-1", 1, 2), "10.0.0.2")
    assert (got.state, got.attempt) == (states.ACCEPTED, 1)
    assert got.expire_time.seconds == int(env.clock.now) + 24 * 3600
    assert _reflexive(got.receiver) == ["10.0.0.2"]
    plan = got.plan
    assert plan.listener == broker_pb2.ConnectionPlan.ROLE_SENDER
    assert (plan.listener_ports.first_port, plan.listener_ports.last_port) == (9000, 9005)
    assert plan.stream_count == 4
    assert plan.connect_deadline.seconds == int(env.clock.now) + 30
    assert plan.lease_expire_time == got.expire_time
    assert env.leases() == [(s.name, 9000, 9005)]


@pytest.mark.asyncio
async def test_accept_conflict_gives_the_lease_back(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = await env.offer()
    store = env.broker.store
    real_update = store.update_session

    def stale(record: object) -> object:
        raise StaleRecord("raced")

    monkeypatch.setattr(store, "update_session", stale)
    with pytest.raises(Aborted) as info:
        await env.broker.accept(s.name, s.receiver, _peer(b"receiver-1", 1, 2), None)
    assert info.value.reason == Reason.CONFLICT
    assert env.leases() == []  # the stored session is OFFERED: it holds no ports
    got = await env.broker.get(s.name, s.sender)
    assert (got.state, got.attempt, got.HasField("plan")) == (states.OFFERED, 0, False)
    monkeypatch.setattr(store, "update_session", real_update)
    accepted = await env.broker.accept(s.name, s.receiver, _peer(b"receiver-1", 1, 2), None)
    assert (accepted.state, accepted.attempt) == (states.ACCEPTED, 1)
    assert env.leases() == [(s.name, 9000, 9005)]


@pytest.mark.asyncio
async def test_an_illegal_accept_leases_nothing(env: Env) -> None:
    s = await env.offer()
    with pytest.raises(states.NotPermitted):  # the sender may not accept
        await env.broker.accept(s.name, s.sender, _peer(b"receiver-1", 1, 2), None)
    assert env.leases() == []


@pytest.mark.asyncio
async def test_sweep_skips_a_session_changed_meanwhile(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await env.accepted()
    b = await env.accepted()
    store = env.broker.store
    real_update = store.update_session
    raced = a.name.removeprefix("sessions/")

    async def update(record: SessionRecord) -> SessionRecord:
        if record.session_id == raced:
            raise StaleRecord("another replica wrote it")
        return await real_update(record)

    monkeypatch.setattr(store, "update_session", update)
    env.clock.now += 24 * 3600 + 1
    assert await env.broker.sweep() == 1  # b expires; a is left for the next sweep
    assert (await env.broker.get(b.name, b.sender)).state == states.EXPIRED
    monkeypatch.setattr(store, "update_session", real_update)
    assert await env.broker.sweep() == 1
    assert (await env.broker.get(a.name, a.sender)).state == states.EXPIRED
