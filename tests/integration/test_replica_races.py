"""Two `ferry serve` replicas on one Redis, raced over gRPC (issue 12): in every round exactly
one of two simultaneous calls that want the same step wins, whichever replica each reaches.

- a code claimed through both replicas at once: one claim gets the offer, the other is told
  NOT_FOUND, as for any wrong code;
- a claimed offer accepted through both replicas at once, and one accepted through one replica
  while it is declined through the other: one call succeeds, the other is refused, and the
  session's final state is the winner's.

The two calls of a round leave together (asyncio.gather over one channel per replica), so many
rounds reach the store's compare-and-set within microseconds of each other; the loser is
refused either by the compare-and-set (ABORTED, which a client retries) or, when it arrives
later, by the state machine (FAILED_PRECONDITION). What is asserted holds either way.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest

from ferry.v1 import broker_pb2, broker_pb2_grpc
from tests.support.broker_flow import RECEIVER_PAKE, auth, confirm_keys_rpc, pake_sender
from tests.support.processes import FAST_BROKER, BrokerProcess
from tests.support.redis import RedisServer

pytestmark = [pytest.mark.timeout(180)]

ROUNDS = 30
T = 10.0
S = broker_pb2.Session
# Every call comes from 127.0.0.1, and the replicas share its allowances (ledger.py): the
# offers and the losers' failed claims of the rounds must not rate-limit the test.
RAISED = [
    "--claim-burst-per-ip", "100000", "--calls-burst-per-address", "100000",
    "--offer-burst-per-address", "100000",
]  # fmt: skip


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    tmp = tmp_path_factory.mktemp("races")
    with RedisServer(tmp / "redis") as server:
        brokers = [
            BrokerProcess(
                data_dir=tmp / name, args=[*FAST_BROKER, *RAISED], env={"FERRY_STORE": server.url}
            )
            for name in ("a", "b")
        ]
        try:
            for broker in brokers:
                broker.start()
            yield brokers[0].address, brokers[1].address
        finally:
            for broker in brokers:
                broker.kill()


def _peer() -> broker_pb2.PeerInfo:
    return broker_pb2.PeerInfo(
        candidates=[broker_pb2.Candidate(ip="192.0.2.7", kind=broker_pb2.Candidate.KIND_HOST)],
        allowed_ports=broker_pb2.PortRange(first_port=40000, last_port=40100),
        certificate_der=b"\x30\x82fake-der",
    )


def _offer() -> broker_pb2.CreateOfferRequest:
    manifest = broker_pb2.Manifest(
        files=[broker_pb2.FileEntry(path="a.bin", size_bytes=1234)], chunk_size_bytes=1 << 20
    )
    return broker_pb2.CreateOfferRequest(manifest=manifest, sender=pake_sender(_peer()))


async def _outcome(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def _race(addresses: tuple[str, str], kind: str) -> Counter[str]:
    seen: Counter[str] = Counter()
    async with (
        grpc.aio.insecure_channel(addresses[0]) as one,
        grpc.aio.insecure_channel(addresses[1]) as two,
    ):
        a, b = broker_pb2_grpc.BrokerServiceStub(one), broker_pb2_grpc.BrokerServiceStub(two)
        for round_ in range(ROUNDS):
            home = (a, b)[round_ % 2]
            offer = await home.CreateOffer(_offer(), timeout=T)
            name = offer.session.name
            claim = broker_pb2.ClaimOfferRequest(code=offer.code, pake_message=RECEIVER_PAKE)
            if kind == "claim":
                codes = await asyncio.gather(
                    _outcome(a.ClaimOffer(claim, timeout=T)),
                    _outcome(b.ClaimOffer(claim, timeout=T)),
                )
                assert sorted(codes, key=str) == sorted(
                    [grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND], key=str
                ), (round_, codes)
                seen["won by " + ("a" if codes[0] == grpc.StatusCode.OK else "b")] += 1
                continue
            claimed = await home.ClaimOffer(claim, timeout=T)
            token = claimed.party_token
            await confirm_keys_rpc(home, name, offer.party_token, token)
            accept = broker_pb2.AcceptOfferRequest(name=name, receiver=_peer())
            other: object
            if kind == "accept":
                other = b.AcceptOffer(accept, metadata=auth(token), timeout=T)
            else:
                decline = broker_pb2.DeclineOfferRequest(name=name, reason="no thanks")
                other = b.DeclineOffer(decline, metadata=auth(token), timeout=T)
            first, second = await asyncio.gather(
                _outcome(a.AcceptOffer(accept, metadata=auth(token), timeout=T)), _outcome(other)
            )
            assert [first, second].count(grpc.StatusCode.OK) == 1, (round_, first, second)
            loser = second if first == grpc.StatusCode.OK else first
            assert loser in (grpc.StatusCode.ABORTED, grpc.StatusCode.FAILED_PRECONDITION), loser
            seen[loser.name] += 1
            got = await home.GetSession(
                broker_pb2.GetSessionRequest(name=name), metadata=auth(offer.party_token), timeout=T
            )
            if kind == "accept" or first == grpc.StatusCode.OK:
                assert got.session.state == S.STATE_ACCEPTED
                assert got.session.attempt == 1  # accepted once, not twice
            else:
                assert got.session.state == S.STATE_DECLINED
                continue
            cancel = broker_pb2.CancelSessionRequest(name=name, reason="done")  # its ports back
            await home.CancelSession(cancel, metadata=auth(offer.party_token), timeout=T)
    return seen


def test_two_replicas_claiming_one_code_one_wins(replicas: tuple[str, str]) -> None:
    seen = asyncio.run(_race(replicas, "claim"))
    print(f"claim races: {dict(seen)}")
    assert sum(seen.values()) == ROUNDS


def test_two_replicas_accepting_one_offer_one_wins(replicas: tuple[str, str]) -> None:
    seen = asyncio.run(_race(replicas, "accept"))
    print(f"accept races, the loser's status: {dict(seen)}")
    assert sum(seen.values()) == ROUNDS


def test_an_accept_and_a_decline_on_two_replicas_one_wins(replicas: tuple[str, str]) -> None:
    seen = asyncio.run(_race(replicas, "decline"))
    print(f"accept/decline races, the loser's status: {dict(seen)}")
    assert sum(seen.values()) == ROUNDS
