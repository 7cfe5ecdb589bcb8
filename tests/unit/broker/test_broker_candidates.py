"""PublishCandidates in the Broker domain (issue 11): per attempt, per party, in the plan;
and the sender's addresses hidden from the receiver until it accepted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from ferry.broker import states
from ferry.broker.config import BrokerConfig
from ferry.broker.core import Broker
from ferry.broker.errors import FailedPrecondition, InvalidArgument, Reason
from ferry.broker.store import SqliteStore
from ferry.v1 import broker_pb2
from tests.support.broker_flow import claim_confirmed, pake_sender

pytestmark = pytest.mark.timeout(30)

HOST = broker_pb2.Candidate.KIND_HOST
REFLEXIVE = broker_pb2.Candidate.KIND_SERVER_REFLEXIVE


def _peer(cert: bytes) -> broker_pb2.PeerInfo:
    return broker_pb2.PeerInfo(
        candidates=[broker_pb2.Candidate(ip="192.0.2.10", kind=HOST)],
        allowed_ports=broker_pb2.PortRange(first_port=47100, last_port=47999),
        certificate_der=cert,
    )


def _cands(*ports: int, ip: str = "198.51.100.10") -> list[broker_pb2.Candidate]:
    return [
        broker_pb2.Candidate(ip=ip, kind=HOST, ports=list(ports)),
        broker_pb2.Candidate(ip="203.0.113.2", kind=REFLEXIVE, ports=list(ports)),
    ]


@pytest_asyncio.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Broker]:
    store = SqliteStore(tmp_path / "b.sqlite3")
    try:
        yield Broker(BrokerConfig(data_dir=tmp_path, stream_count=2), store)
    finally:
        await store.close()


async def _offer(broker: Broker) -> tuple[str, str, str]:
    request = broker_pb2.CreateOfferRequest(
        manifest=broker_pb2.Manifest(
            files=[broker_pb2.FileEntry(path="a.txt", size_bytes=1)], chunk_size_bytes=1 << 20
        ),
        sender=pake_sender(_peer(b"sender")),
    )
    offer = await broker.create_offer(request, "203.0.113.1")
    receiver = (await claim_confirmed(broker, offer, "203.0.113.2")).party_token
    return offer.session.name, offer.party_token, receiver


@pytest.mark.asyncio
async def test_the_sender_s_addresses_are_hidden_until_the_receiver_accepts(broker: Broker) -> None:
    name, sender, receiver = await _offer(broker)
    before = await broker.get(name, receiver)
    assert before.manifest.files  # confirmed: the offer is shown ...
    assert list(before.sender.candidates) == []  # ... but not where the sender is
    assert (await broker.get(name, sender)).sender.candidates  # the sender sees its own
    accepted = await broker.accept(name, receiver, _peer(b"receiver"), "203.0.113.2")
    assert [c.ip for c in accepted.sender.candidates] == ["192.0.2.10", "203.0.113.1"]
    assert [c.ip for c in (await broker.get(name, receiver)).sender.candidates] == [
        "192.0.2.10",
        "203.0.113.1",
    ]


@pytest.mark.asyncio
async def test_each_party_publishes_its_candidates_into_the_plan(broker: Broker) -> None:
    name, sender, receiver = await _offer(broker)
    accepted = await broker.accept(name, receiver, _peer(b"receiver"), "203.0.113.2")
    attempt = accepted.attempt
    port = accepted.plan.listener_ports.first_port
    got = await broker.publish_candidates(name, sender, attempt, _cands(port, ip="192.0.2.10"))
    assert [list(c.ports) for c in got.plan.sender_candidates] == [[port], [port]]
    got = await broker.publish_candidates(name, receiver, attempt, _cands(40001, 40002))
    assert [list(c.ports) for c in got.plan.receiver_candidates] == [[40001, 40002]] * 2
    assert len(got.plan.sender_candidates) == 2  # the other party's stay
    assert got.state == states.ACCEPTED  # publishing moves nothing
    # Publishing again replaces the caller's own.
    got = await broker.publish_candidates(name, receiver, attempt, _cands(40003)[:1])
    assert [list(c.ports) for c in got.plan.receiver_candidates] == [[40003]]


@pytest.mark.asyncio
async def test_a_new_attempt_starts_without_candidates_and_refuses_old_ones(broker: Broker) -> None:
    name, sender, receiver = await _offer(broker)
    first = await broker.accept(name, receiver, _peer(b"receiver"), "203.0.113.2")
    await broker.publish_candidates(name, receiver, first.attempt, _cands(40001, 40002))
    second = await broker.resume(name, receiver, _peer(b"receiver-2"), "203.0.113.2")
    assert second.attempt == first.attempt + 1
    assert list(second.plan.receiver_candidates) == []
    with pytest.raises(FailedPrecondition) as refused:
        await broker.publish_candidates(name, sender, first.attempt, _cands(47100, ip="192.0.2.10"))
    assert refused.value.reason is Reason.ATTEMPT_MOVED


@pytest.mark.asyncio
async def test_candidates_are_refused_before_acceptance_and_after_the_end(broker: Broker) -> None:
    name, sender, receiver = await _offer(broker)
    with pytest.raises(FailedPrecondition) as early:
        await broker.publish_candidates(name, sender, 0, _cands(47100))
    assert early.value.reason is Reason.WRONG_STATE
    accepted = await broker.accept(name, receiver, _peer(b"receiver"), "203.0.113.2")
    await broker.cancel(name, sender, "changed my mind")
    with pytest.raises(FailedPrecondition):
        await broker.publish_candidates(name, receiver, accepted.attempt, _cands(40001))


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("candidates", "why"),
    [
        ([broker_pb2.Candidate(ip="192.0.2.1", kind=HOST)], "needs 1 to 64 ports"),
        ([broker_pb2.Candidate(ip="192.0.2.1", kind=HOST, ports=[0])], "not in 1-65535"),
        ([broker_pb2.Candidate(ip="192.0.2.1", kind=HOST, ports=[70000])], "not in 1-65535"),
        ([broker_pb2.Candidate(ip="192.0.2.1", kind=HOST, ports=[1] * 65)], "1 to 64"),
        ([broker_pb2.Candidate(ip="example.org", kind=HOST, ports=[1])], "not an IP"),
        ([broker_pb2.Candidate(ip="192.0.2.1", kind=9, ports=[1])], "kind"),  # type: ignore[arg-type]
        ([broker_pb2.Candidate(ip="192.0.2.1", kind=HOST, ports=[1])] * 33, "more than 32"),
    ],
)
async def test_malformed_candidates_are_refused(
    broker: Broker, candidates: list[broker_pb2.Candidate], why: str
) -> None:
    name, _, receiver = await _offer(broker)
    accepted = await broker.accept(name, receiver, _peer(b"receiver"), "203.0.113.2")
    with pytest.raises(InvalidArgument, match=why):
        await broker.publish_candidates(name, receiver, accepted.attempt, candidates)
    assert list((await broker.get(name, receiver)).plan.receiver_candidates) == []


@pytest.mark.asyncio
async def test_ports_in_an_offer_s_candidates_are_refused(broker: Broker) -> None:
    peer = _peer(b"sender")
    peer.candidates[0].ports.append(47100)
    request = broker_pb2.CreateOfferRequest(
        manifest=broker_pb2.Manifest(
            files=[broker_pb2.FileEntry(path="a.txt", size_bytes=1)], chunk_size_bytes=1 << 20
        ),
        sender=pake_sender(peer),
    )
    with pytest.raises(InvalidArgument, match="has ports here"):
        await broker.create_offer(request, "203.0.113.1")


@pytest.mark.asyncio
async def test_watchers_see_the_other_party_s_candidates(broker: Broker) -> None:
    name, sender, receiver = await _offer(broker)
    accepted = await broker.accept(name, receiver, _peer(b"receiver"), "203.0.113.2")

    async def go() -> broker_pb2.Session:
        watch = broker.watch(name, sender, "203.0.113.1")
        first = await anext(watch)
        assert list(first.plan.receiver_candidates) == []
        await broker.publish_candidates(name, receiver, accepted.attempt, _cands(40001, 40002))
        seen = await asyncio.wait_for(anext(watch), 5)
        await watch.aclose()
        return seen

    seen = await go()
    assert [c.ip for c in seen.plan.receiver_candidates] == ["198.51.100.10", "203.0.113.2"]


@pytest.mark.asyncio
async def test_the_receiver_s_path_report_is_kept(broker: Broker) -> None:
    name, sender, receiver = await _offer(broker)
    await broker.accept(name, receiver, _peer(b"receiver"), "203.0.113.2")
    path = broker_pb2.PathReport(
        route="punched", local="198.51.100.10:40001", remote="203.0.113.1:47100", tries=3
    )
    path.setup.FromMilliseconds(420)
    got = await broker.report(name, receiver, states.TRANSFERRING, 10, "", path)
    assert got.path == path
    assert (await broker.get(name, sender)).path == path
    # The sender's word on the path is not taken: it is the receiver's to say.
    other = broker_pb2.PathReport(route="host")
    assert (await broker.report(name, sender, states.TRANSFERRING, 10, "", other)).path == path
    with pytest.raises(InvalidArgument, match="route"):
        await broker.report(
            name, receiver, states.TRANSFERRING, 10, "", broker_pb2.PathReport(route="x")
        )
