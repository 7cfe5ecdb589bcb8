"""PAKE-bound codes (issue 9) in the Broker domain: what the broker enforces.

Nameplates instead of whole codes, exactly one of a PAKE message or a claim verifier per
offer, the receiver's view before the sender confirmed the key, ConfirmKey's order and
idempotency, AcceptOffer waiting for the confirmation, resumes that keep what the PAKE set,
and a data dir whose files give nothing away (no nameplate in the database, modes 0600/0700).
The broker cannot check SPAKE2 messages or confirmations, so placeholders stand in for them
(tests/support/broker_flow.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import sqlite3
import stat
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

import ferry.broker
from ferry.broker import codes, states
from ferry.broker.config import BrokerConfig
from ferry.broker.core import Broker
from ferry.broker.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Reason,
    ResourceExhausted,
    Unauthenticated,
)
from ferry.broker.server import load_token_key
from ferry.broker.store import SqliteStore
from ferry.protocol.words import WORDS
from ferry.v1 import broker_pb2
from tests.support.broker_flow import (
    CLAIM_VERIFIER,
    RECEIVER_CONFIRMATION,
    RECEIVER_PAKE,
    SENDER_CERTIFICATE_MAC,
    SENDER_CONFIRMATION,
    SENDER_PAKE,
    claim_confirmed,
    confirm_keys,
    pake_sender,
    store_and_forward,
)

pytestmark = pytest.mark.timeout(30)

HOST = broker_pb2.Candidate.KIND_HOST
REFLEXIVE = broker_pb2.Candidate.KIND_SERVER_REFLEXIVE
MANIFEST = broker_pb2.Manifest(
    files=[broker_pb2.FileEntry(path="secret-plans.pdf", size_bytes=4321, mode=0o644)],
    chunk_size_bytes=1 << 20,
)
NAMEPLATE = re.compile(r"[1-9][0-9]{0,2}-[a-z]+")
BURST = 3  # failed claims per IP before RATE_LIMITED (the clock only moves when told)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def _sender(cert: bytes = b"sender-cert") -> broker_pb2.PeerInfo:
    return broker_pb2.PeerInfo(
        candidates=[broker_pb2.Candidate(ip="192.0.2.1", kind=HOST)],
        allowed_ports=broker_pb2.PortRange(first_port=9000, last_port=9100),
        certificate_der=cert,
        host_id="laptop",
    )


def _receiver(cert: bytes = b"receiver-cert") -> broker_pb2.PeerInfo:
    return broker_pb2.PeerInfo(
        candidates=[broker_pb2.Candidate(ip="198.51.100.2", kind=HOST)],
        allowed_ports=broker_pb2.PortRange(first_port=1, last_port=2),
        certificate_der=cert,
        certificate_mac=b"R" * 32,
    )


def _pake_request() -> broker_pb2.CreateOfferRequest:
    return broker_pb2.CreateOfferRequest(manifest=MANIFEST, sender=pake_sender(_sender()))


def _forward_request(*, confirmed: bool = False) -> broker_pb2.CreateOfferRequest:
    """A store-and-forward offer; ``confirmed``: its sender confirms in the offer itself."""
    request = store_and_forward(_pake_request())
    if confirmed:
        request.sender.key_confirmation = SENDER_CONFIRMATION
        request.sender.certificate_mac = SENDER_CERTIFICATE_MAC
    return request


@dataclass
class Env:
    broker: Broker
    clock: FakeClock
    store: SqliteStore
    db: Path
    key: bytes

    async def offer(
        self, request: broker_pb2.CreateOfferRequest | None = None
    ) -> broker_pb2.CreateOfferResponse:
        return await self.broker.create_offer(request or _pake_request(), "10.0.0.1")

    async def claim(
        self,
        code: str,
        *,
        pake: bytes = RECEIVER_PAKE,
        verifier: bytes = b"",
        request_id: str = "",
        ip: str = "10.0.0.2",
    ) -> broker_pb2.ClaimOfferResponse:
        return await self.broker.claim_offer(
            code, ip, request_id, pake_message=pake, claim_verifier=verifier
        )

    async def version(self, name: str) -> int:
        record = await self.store.get_session(name.removeprefix("sessions/"))
        assert record is not None
        return record.version

    def leases(self) -> list[str]:
        with sqlite3.connect(self.db) as db:
            return [str(r[0]) for r in db.execute("SELECT session_id FROM leases")]


@pytest_asyncio.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    clock = FakeClock()
    db = tmp_path / "b.sqlite3"
    store = SqliteStore(db)
    key = os.urandom(32)
    config = BrokerConfig(data_dir=tmp_path, claim_burst_per_ip=BURST, claim_refill_per_ip_s=1.0)
    try:
        yield Env(Broker(config, store, clock=clock, token_key=key), clock, store, db, key)
    finally:
        await store.close()


def _assert_hidden(session: broker_pb2.Session) -> None:
    """The receiver's view before the sender confirmed: the sender's PAKE message only."""
    assert not session.HasField("manifest")
    assert session.sender == broker_pb2.PeerInfo(pake_message=session.sender.pake_message)
    assert not session.sender.candidates
    assert not session.sender.certificate_der


def _assert_shown(session: broker_pb2.Session, *, receiver: bool = False) -> None:
    """The whole offer: manifest, the sender's addresses, ports and certificate; to the
    receiver without the addresses until it accepted (issue 11)."""
    assert session.manifest == MANIFEST
    sender = session.sender
    hidden = receiver and session.state == broker_pb2.Session.STATE_OFFERED
    assert [(c.ip, c.kind) for c in sender.candidates] == (
        [] if hidden else [("192.0.2.1", HOST), ("10.0.0.1", REFLEXIVE)]
    )
    assert (sender.allowed_ports.first_port, sender.allowed_ports.last_port) == (9000, 9100)
    assert sender.certificate_der == b"sender-cert"
    assert sender.host_id == "laptop"


# -- CreateOffer --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_code_is_a_nameplate(env: Env) -> None:
    offers = [await env.offer() for _ in range(40)]
    for offer in offers:
        assert NAMEPLATE.fullmatch(offer.code), offer.code
        number, word = offer.code.split("-")
        assert 1 <= int(number) <= 999
        assert word in WORDS
        assert codes.is_well_formed(offer.code)
        assert not codes.looks_like_a_whole_code(offer.code)
    assert len({o.code for o in offers}) == len(offers)  # distinct among the held offers
    # the sender's own view of its offer is whole, with its PAKE message
    _assert_shown(offers[0].session)
    assert offers[0].session.sender.pake_message == SENDER_PAKE


@pytest.mark.asyncio
async def test_an_offer_needs_a_pake_message_or_a_verifier(env: Env) -> None:
    neither = _pake_request()
    neither.sender.ClearField("pake_message")
    both = _pake_request()
    both.claim_verifier = CLAIM_VERIFIER
    for request in (neither, both):
        with pytest.raises(InvalidArgument) as info:
            await env.offer(request)
        assert info.value.reason == Reason.INVALID_ARGUMENT
        assert "exactly one" in str(info.value)
    with sqlite3.connect(env.db) as db:
        assert db.execute("SELECT COUNT(*) FROM sessions").fetchone() == (0,)


@pytest.mark.asyncio
async def test_a_pake_offer_brings_no_key_confirmation(env: Env) -> None:
    request = _pake_request()
    request.sender.key_confirmation = SENDER_CONFIRMATION
    with pytest.raises(InvalidArgument) as info:
        await env.offer(request)
    assert info.value.reason == Reason.INVALID_ARGUMENT
    assert "ConfirmKey" in str(info.value)
    # a store-and-forward offer may: its sender has nobody to wait for
    offer = await env.offer(_forward_request(confirmed=True))
    assert offer.session.sender.key_confirmation == SENDER_CONFIRMATION


@pytest.mark.asyncio
async def test_key_fields_are_short(env: Env) -> None:
    long = b"x" * 65
    request = _pake_request()
    request.sender.pake_message = long
    with pytest.raises(InvalidArgument):
        await env.offer(request)
    request = _forward_request()
    request.claim_verifier = long
    with pytest.raises(InvalidArgument):
        await env.offer(request)
    request = _pake_request()
    request.sender.certificate_mac = long
    with pytest.raises(InvalidArgument):
        await env.offer(request)
    request = _pake_request()
    request.sender.pake_message = b"y" * 64  # the limit itself is fine
    offer = await env.offer(request)
    with pytest.raises(InvalidArgument):
        await env.claim(offer.code, pake=long)
    with pytest.raises(InvalidArgument):
        await env.claim(offer.code, verifier=long)
    claim = await env.claim(offer.code, pake=b"z" * 64)
    with pytest.raises(InvalidArgument):
        await env.broker.confirm_key(offer.session.name, claim.party_token, long, b"")
    with pytest.raises(InvalidArgument):
        await env.broker.confirm_key(offer.session.name, claim.party_token, b"c" * 32, long)


@pytest.mark.asyncio
async def test_nameplates_are_not_shared_by_held_offers(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    drawn = iter(["7-orbit", "7-orbit", "8-orbit", "7-orbit"])
    monkeypatch.setattr(codes, "generate", lambda: next(drawn))
    first = await env.offer()
    second = await env.offer()  # 7-orbit is held: drawn again
    assert (first.code, second.code) == ("7-orbit", "8-orbit")
    # a finished offer gives its nameplate back; the claim finds the new offer
    claim = await env.claim(first.code)
    await env.broker.decline(first.session.name, claim.party_token, "no")
    third = await env.offer()
    assert third.code == "7-orbit"
    assert (await env.claim("7-orbit", ip="10.0.0.3")).session.name == third.session.name
    # a broker whose draws all hit held nameplates says so
    monkeypatch.setattr(codes, "generate", lambda: "8-orbit")
    with pytest.raises(ResourceExhausted) as info:
        await env.offer()
    assert info.value.reason == Reason.NAMEPLATES_EXHAUSTED


@pytest.mark.asyncio
async def test_an_expired_offer_gives_its_nameplate_back(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(codes, "generate", lambda: "7-orbit")
    old = await env.offer()
    env.clock.now += 601
    assert await env.broker.sweep() == 1
    with pytest.raises(NotFound) as info:
        await env.claim("7-orbit")
    assert info.value.reason == Reason.CODE_NOT_FOUND  # as a wrong code (issue 10, finding 4)
    env.clock.now += 1
    new = await env.offer()
    assert new.code == old.code
    assert (await env.claim("7-orbit")).session.name == new.session.name


# -- ClaimOffer ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_whole_code_is_refused(env: Env) -> None:
    offer = await env.offer()
    number, word = offer.code.split("-")
    for whole in (
        f"{offer.code}-lantern-quiet",
        f"  {number} {word.upper()} lantern quiet ",
        f"{number}_{word}_lantern",
        f"{offer.code}-lantern-quiet-kq4zv7xw2mb5ndtr6hsyca",
    ):
        with pytest.raises(InvalidArgument) as info:
            await env.claim(whole)
        assert info.value.reason == Reason.INVALID_ARGUMENT
        assert "nameplate" in str(info.value)
    # the offer was not claimed by any of them
    got = await env.broker.get(offer.session.name, offer.party_token)
    assert not got.claimed
    assert not got.receiver.pake_message
    assert (await env.claim(offer.code)).session.claimed


@pytest.mark.asyncio
async def test_whole_codes_are_not_counted_as_failed_claims(env: Env) -> None:
    for i in range(3 * BURST):
        with pytest.raises(InvalidArgument):
            await env.claim(f"{i + 1}-orbit-lantern-quiet")
    assert "nosuchword" not in WORDS
    for i in range(BURST):  # the bucket is still full
        with pytest.raises(NotFound) as info:
            await env.claim(f"{i + 1}-nosuchword")
        assert info.value.reason == Reason.CODE_NOT_FOUND
    with pytest.raises(ResourceExhausted) as limited:
        await env.claim("9-nosuchword")
    assert limited.value.reason == Reason.RATE_LIMITED


@pytest.mark.asyncio
async def test_a_claim_needs_a_pake_message_or_a_verifier(env: Env) -> None:
    offer = await env.offer()
    for _ in range(2 * BURST):
        with pytest.raises(InvalidArgument) as info:
            await env.claim(offer.code, pake=b"")
        assert info.value.reason == Reason.INVALID_ARGUMENT
    # not counted either, and the offer is still there
    assert (await env.claim(offer.code)).session.claimed


@pytest.mark.asyncio
async def test_a_verifier_does_not_claim_a_pake_offer(env: Env) -> None:
    offer = await env.offer()
    with pytest.raises(NotFound) as info:
        await env.claim(offer.code, pake=b"", verifier=CLAIM_VERIFIER)
    assert info.value.reason == Reason.CODE_NOT_FOUND
    claim = await env.claim(offer.code)
    assert claim.session.receiver.pake_message == RECEIVER_PAKE


@pytest.mark.asyncio
async def test_store_and_forward_claim_checks_the_verifier(env: Env) -> None:
    offer = await env.offer(_forward_request(confirmed=True))
    with pytest.raises(NotFound) as unknown:
        await env.claim("999-nosuchword", verifier=CLAIM_VERIFIER)
    attempts: list[tuple[bytes, bytes]] = [
        (b"", b"w" * 32),  # a wrong verifier
        (RECEIVER_PAKE, b""),  # none: a PAKE message alone does not claim it
    ]
    for pake, verifier in attempts:
        with pytest.raises(NotFound) as info:
            await env.claim(offer.code, pake=pake, verifier=verifier)
        # exactly what an unknown code gets
        assert info.value.reason == Reason.CODE_NOT_FOUND
        assert str(info.value) == str(unknown.value)
    # all three were counted: the bucket is empty, even for the right verifier
    with pytest.raises(ResourceExhausted) as limited:
        await env.claim(offer.code, pake=b"", verifier=CLAIM_VERIFIER)
    assert limited.value.reason == Reason.RATE_LIMITED
    assert not (await env.broker.get(offer.session.name, offer.party_token)).claimed
    env.clock.now += 2  # refilled: the offer is still claimable with the right verifier
    claim = await env.claim(offer.code, pake=b"", verifier=CLAIM_VERIFIER)
    assert claim.session.claimed
    _assert_shown(claim.session, receiver=True)  # its sender confirmed in the offer: shown at once
    assert not claim.session.receiver.pake_message


@pytest.mark.asyncio
async def test_a_repeated_claim_keeps_the_first_pake_message(env: Env) -> None:
    offer = await env.offer()
    first = await env.claim(offer.code, request_id="req-1")
    again = await env.claim(offer.code, pake=b"\x42" * 33, request_id="req-1")
    assert again.party_token == first.party_token
    _assert_hidden(again.session)
    got = await env.broker.get(offer.session.name, offer.party_token)
    assert got.receiver.pake_message == RECEIVER_PAKE
    # without a PAKE message even the repeat is refused
    with pytest.raises(InvalidArgument):
        await env.claim(offer.code, pake=b"", request_id="req-1")


@pytest.mark.asyncio
async def test_a_repeated_store_and_forward_claim_needs_the_verifier(env: Env) -> None:
    offer = await env.offer(_forward_request())
    first = await env.claim(offer.code, pake=b"", verifier=CLAIM_VERIFIER, request_id="req-1")
    again = await env.claim(offer.code, pake=b"", verifier=CLAIM_VERIFIER, request_id="req-1")
    assert again.party_token == first.party_token
    with pytest.raises(NotFound) as info:
        await env.claim(offer.code, pake=b"", verifier=b"w" * 32, request_id="req-1")
    assert info.value.reason == Reason.CODE_NOT_FOUND


# -- the receiver's view ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_receiver_sees_only_the_pake_message_until_the_sender_confirms(env: Env) -> None:
    offer = await env.offer()
    name = offer.session.name
    claim = await env.claim(offer.code)
    receiver = claim.party_token
    assert claim.session.name == name
    assert (claim.session.state, claim.session.claimed) == (states.OFFERED, True)
    assert claim.session.expire_time == offer.session.expire_time
    _assert_hidden(claim.session)
    assert claim.session.sender.pake_message == SENDER_PAKE
    assert claim.session.receiver.pake_message == RECEIVER_PAKE
    _assert_hidden(await env.broker.get(name, receiver))
    _assert_hidden(await env.broker.resume(name, receiver, _receiver(), "10.0.0.2"))

    # the sender sees everything, the receiver's PAKE message too
    mine = await env.broker.get(name, offer.party_token)
    _assert_shown(mine)
    assert mine.receiver.pake_message == RECEIVER_PAKE

    # the receiver's own confirmation shows it nothing
    _assert_hidden(await env.broker.confirm_key(name, receiver, RECEIVER_CONFIRMATION, b""))
    _assert_hidden(await env.broker.get(name, receiver))
    mine = await env.broker.get(name, offer.party_token)
    _assert_shown(mine)
    assert mine.receiver.key_confirmation == RECEIVER_CONFIRMATION

    # the sender's does
    confirmed = await env.broker.confirm_key(
        name, offer.party_token, SENDER_CONFIRMATION, SENDER_CERTIFICATE_MAC
    )
    _assert_shown(confirmed)
    seen = await env.broker.get(name, receiver)
    _assert_shown(seen, receiver=True)
    assert seen.sender.key_confirmation == SENDER_CONFIRMATION
    assert seen.sender.certificate_mac == SENDER_CERTIFICATE_MAC
    assert seen.sender.pake_message == SENDER_PAKE
    # The sender's own view differs only in its addresses, which the receiver sees once it
    # accepted.
    mine = await env.broker.get(name, offer.party_token)
    del mine.sender.candidates[:]
    assert seen == mine


@pytest.mark.asyncio
async def test_the_receivers_watch_shows_the_offer_once_confirmed(env: Env) -> None:
    offer = await env.offer()
    name = offer.session.name
    receiver = (await env.claim(offer.code)).party_token
    watch: AsyncGenerator[broker_pb2.Session, None] = env.broker.watch(name, receiver)
    sender_watch: AsyncGenerator[broker_pb2.Session, None] = env.broker.watch(
        name, offer.party_token
    )
    try:
        first = await asyncio.wait_for(anext(watch), 5)
        _assert_hidden(first)
        _assert_shown(await asyncio.wait_for(anext(sender_watch), 5))
        await env.broker.confirm_key(name, receiver, RECEIVER_CONFIRMATION, b"")
        after_receiver = await asyncio.wait_for(anext(watch), 5)
        _assert_hidden(after_receiver)
        assert after_receiver.receiver.key_confirmation == RECEIVER_CONFIRMATION
        _assert_shown(await asyncio.wait_for(anext(sender_watch), 5))
        await env.broker.confirm_key(
            name, offer.party_token, SENDER_CONFIRMATION, SENDER_CERTIFICATE_MAC
        )
        shown = await asyncio.wait_for(anext(watch), 5)
        _assert_shown(shown, receiver=True)
        assert shown.sender.key_confirmation == SENDER_CONFIRMATION
    finally:
        await watch.aclose()
        await sender_watch.aclose()


@pytest.mark.asyncio
async def test_decline_and_cancel_answers_hide_the_offer(env: Env) -> None:
    declined = await env.offer()
    receiver = (await env.claim(declined.code)).party_token
    got = await env.broker.decline(declined.session.name, receiver, "no thanks")
    assert (got.state, got.failure_reason) == (states.DECLINED, "no thanks")
    _assert_hidden(got)
    _assert_hidden(await env.broker.get(declined.session.name, receiver))
    _assert_shown(await env.broker.get(declined.session.name, declined.party_token))

    cancelled = await env.offer()
    receiver = (await env.claim(cancelled.code)).party_token
    got = await env.broker.cancel(cancelled.session.name, receiver, "wrong code?")
    assert got.state == states.CANCELLED
    _assert_hidden(got)

    by_sender = await env.offer()
    receiver = (await env.claim(by_sender.code)).party_token
    got = await env.broker.cancel(by_sender.session.name, by_sender.party_token, "bye")
    assert got.state == states.CANCELLED
    _assert_shown(got)
    _assert_hidden(await env.broker.get(by_sender.session.name, receiver))


@pytest.mark.asyncio
async def test_a_store_and_forward_offer_is_shown_once_its_sender_confirmed(env: Env) -> None:
    offer = await env.offer(_forward_request())
    name = offer.session.name
    # its sender may confirm before anyone claims
    await env.broker.confirm_key(
        name, offer.party_token, SENDER_CONFIRMATION, SENDER_CERTIFICATE_MAC
    )
    claim = await env.claim(offer.code, pake=b"", verifier=CLAIM_VERIFIER)
    _assert_shown(claim.session, receiver=True)
    assert claim.session.sender.certificate_mac == SENDER_CERTIFICATE_MAC

    unconfirmed = await env.offer(_forward_request())
    claim = await env.claim(unconfirmed.code, pake=b"", verifier=CLAIM_VERIFIER)
    _assert_hidden(claim.session)
    assert not claim.session.sender.pake_message
    with pytest.raises(FailedPrecondition) as info:
        await env.broker.accept(unconfirmed.session.name, claim.party_token, _receiver(), None)
    assert info.value.reason == Reason.KEY_NOT_CONFIRMED
    await env.broker.confirm_key(
        unconfirmed.session.name, unconfirmed.party_token, SENDER_CONFIRMATION, b""
    )
    _assert_shown(await env.broker.get(unconfirmed.session.name, claim.party_token), receiver=True)
    accepted = await env.broker.accept(
        unconfirmed.session.name, claim.party_token, _receiver(), None
    )
    assert accepted.state == states.ACCEPTED


# -- ConfirmKey ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_receiver_confirms_first(env: Env) -> None:
    offer = await env.offer()
    name = offer.session.name
    sender = offer.party_token

    async def sender_confirms() -> broker_pb2.Session:
        return await env.broker.confirm_key(
            name, sender, SENDER_CONFIRMATION, SENDER_CERTIFICATE_MAC
        )

    with pytest.raises(FailedPrecondition) as info:  # nobody claimed yet
        await sender_confirms()
    assert info.value.reason == Reason.KEY_NOT_CONFIRMED
    receiver = (await env.claim(offer.code)).party_token
    with pytest.raises(FailedPrecondition) as info:  # claimed, but not proved
        await sender_confirms()
    assert info.value.reason == Reason.KEY_NOT_CONFIRMED
    assert not (await env.broker.get(name, sender)).sender.key_confirmation

    got = await env.broker.confirm_key(name, receiver, RECEIVER_CONFIRMATION, b"R" * 32)
    assert got.receiver.key_confirmation == RECEIVER_CONFIRMATION
    assert not got.receiver.certificate_mac  # the receiver's comes with AcceptOffer
    got = await sender_confirms()
    assert got.sender.key_confirmation == SENDER_CONFIRMATION
    assert got.sender.certificate_mac == SENDER_CERTIFICATE_MAC
    assert got.state == states.OFFERED
    stored = await env.store.get_session(name.removeprefix("sessions/"))
    assert stored is not None
    assert stored.session.sender.certificate_mac == SENDER_CERTIFICATE_MAC


@pytest.mark.asyncio
@pytest.mark.parametrize("party", ["receiver", "sender"])
async def test_a_confirmation_is_set_once(env: Env, party: str) -> None:
    offer = await env.offer()
    name = offer.session.name
    receiver = (await env.claim(offer.code)).party_token
    await confirm_keys(env.broker, name, offer.party_token, receiver)
    token = receiver if party == "receiver" else offer.party_token
    value = RECEIVER_CONFIRMATION if party == "receiver" else SENDER_CONFIRMATION
    before = await env.broker.get(name, offer.party_token)
    version = await env.version(name)
    env.clock.now += 5
    # the same again (a retry): a success that changes nothing, not even the MAC
    again = await env.broker.confirm_key(name, token, value, b"other-mac")
    assert again == await env.broker.get(name, token)
    assert await env.broker.get(name, offer.party_token) == before
    assert await env.version(name) == version
    with pytest.raises(FailedPrecondition) as info:
        await env.broker.confirm_key(name, token, b"another one", b"")
    assert info.value.reason == Reason.KEY_ALREADY_CONFIRMED
    assert await env.broker.get(name, offer.party_token) == before


@pytest.mark.asyncio
async def test_a_store_and_forward_sender_confirms_any_time(env: Env) -> None:
    offer = await env.offer(_forward_request())
    got = await env.broker.confirm_key(
        offer.session.name, offer.party_token, SENDER_CONFIRMATION, SENDER_CERTIFICATE_MAC
    )
    assert (got.claimed, got.sender.key_confirmation) == (False, SENDER_CONFIRMATION)
    assert got.sender.certificate_mac == SENDER_CERTIFICATE_MAC


@pytest.mark.asyncio
async def test_confirm_key_needs_a_live_offer_and_a_token(env: Env) -> None:
    offer = await env.offer()
    name = offer.session.name
    receiver = (await env.claim(offer.code)).party_token
    with pytest.raises(InvalidArgument):
        await env.broker.confirm_key(name, receiver, b"", b"")
    with pytest.raises(Unauthenticated) as unauthenticated:
        await env.broker.confirm_key(name, None, RECEIVER_CONFIRMATION, b"")
    assert unauthenticated.value.reason == Reason.TOKEN_MISSING
    await confirm_keys(env.broker, name, offer.party_token, receiver)
    await env.broker.accept(name, receiver, _receiver(), None)
    for token, value in ((receiver, RECEIVER_CONFIRMATION), (offer.party_token, b"new")):
        with pytest.raises(FailedPrecondition) as info:
            await env.broker.confirm_key(name, token, value, b"")
        assert info.value.reason == Reason.WRONG_STATE

    declined = await env.offer()
    receiver = (await env.claim(declined.code)).party_token
    await env.broker.decline(declined.session.name, receiver, "no")
    with pytest.raises(FailedPrecondition) as info:
        await env.broker.confirm_key(declined.session.name, receiver, RECEIVER_CONFIRMATION, b"")
    assert info.value.reason == Reason.WRONG_STATE

    expired = await env.offer()
    receiver = (await env.claim(expired.code)).party_token
    env.clock.now += 601
    with pytest.raises(FailedPrecondition) as info:
        await env.broker.confirm_key(expired.session.name, receiver, RECEIVER_CONFIRMATION, b"")
    assert info.value.reason == Reason.WRONG_STATE
    assert (await env.broker.get(expired.session.name, receiver)).state == states.EXPIRED


# -- AcceptOffer --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_accept_waits_for_the_senders_confirmation(env: Env) -> None:
    offer = await env.offer()
    name = offer.session.name
    receiver = (await env.claim(offer.code)).party_token
    for step in ("claimed", "receiver confirmed"):
        with pytest.raises(FailedPrecondition) as info:
            await env.broker.accept(name, receiver, _receiver(), "10.0.0.2")
        assert info.value.reason == Reason.KEY_NOT_CONFIRMED, step
        got = await env.broker.get(name, offer.party_token)
        assert (got.state, got.attempt, got.HasField("plan")) == (states.OFFERED, 0, False)
        assert env.leases() == []
        if step == "claimed":
            await env.broker.confirm_key(name, receiver, RECEIVER_CONFIRMATION, b"")
    await env.broker.confirm_key(
        name, offer.party_token, SENDER_CONFIRMATION, SENDER_CERTIFICATE_MAC
    )
    accepted = await env.broker.accept(name, receiver, _receiver(), "10.0.0.2")
    assert (accepted.state, accepted.attempt) == (states.ACCEPTED, 1)
    _assert_shown(accepted)
    assert env.leases() == [name.removeprefix("sessions/")]


# -- ResumeSession ------------------------------------------------------------------------------


def _impostor(peer: broker_pb2.PeerInfo, cert: bytes) -> broker_pb2.PeerInfo:
    """``peer`` with a new certificate and MAC, and a PAKE message and confirmation of its own."""
    peer.certificate_der = cert
    peer.certificate_mac = b"M" * 32
    peer.pake_message = b"\x99" * 33
    peer.key_confirmation = b"k" * 32
    return peer


@pytest.mark.asyncio
async def test_a_resume_keeps_the_pake_messages_and_confirmations(env: Env) -> None:
    offer = await env.offer()
    name = offer.session.name
    sender = offer.party_token

    # the sender, before any claim: a new certificate, but neither a new PAKE message nor a
    # confirmation it has not made through ConfirmKey
    got = await env.broker.resume(name, sender, _impostor(_sender(), b"sender-2"), "10.0.0.1")
    assert (got.sender.certificate_der, got.sender.certificate_mac) == (b"sender-2", b"M" * 32)
    assert got.sender.pake_message == SENDER_PAKE
    assert not got.sender.key_confirmation
    claim = await env.claim(offer.code)
    receiver = claim.party_token
    _assert_hidden(claim.session)  # the resume did not confirm anything

    # the receiver, claimed, before confirming: keeps its PAKE message, confirms nothing
    got = await env.broker.resume(name, receiver, _impostor(_receiver(), b"receiver-0"), None)
    assert got.receiver.pake_message == RECEIVER_PAKE
    assert not got.receiver.key_confirmation
    with pytest.raises(FailedPrecondition) as info:  # so the sender may not confirm yet
        await env.broker.confirm_key(name, sender, SENDER_CONFIRMATION, b"")
    assert info.value.reason == Reason.KEY_NOT_CONFIRMED

    await confirm_keys(env.broker, name, sender, receiver)
    got = await env.broker.resume(name, receiver, _impostor(_receiver(), b"receiver-1"), None)
    assert (got.receiver.pake_message, got.receiver.key_confirmation) == (
        RECEIVER_PAKE,
        RECEIVER_CONFIRMATION,
    )
    got = await env.broker.resume(name, sender, _impostor(_sender(), b"sender-3"), None)
    assert (got.sender.pake_message, got.sender.key_confirmation) == (
        SENDER_PAKE,
        SENDER_CONFIRMATION,
    )
    assert (got.sender.certificate_der, got.sender.certificate_mac) == (b"sender-3", b"M" * 32)

    # after acceptance, a resume starts the next attempt and still keeps them
    await env.broker.accept(name, receiver, _receiver(), None)
    got = await env.broker.resume(name, sender, _impostor(_sender(), b"sender-4"), None)
    assert (got.state, got.attempt) == (states.ACCEPTED, 2)
    assert (got.sender.pake_message, got.sender.key_confirmation) == (
        SENDER_PAKE,
        SENDER_CONFIRMATION,
    )
    assert got.sender.certificate_der == b"sender-4"
    got = await env.broker.resume(name, receiver, _impostor(_receiver(), b"receiver-2"), None)
    assert got.attempt == 3
    assert got.receiver.certificate_der == b"receiver-2"
    assert got.receiver.pake_message != b"\x99" * 33
    assert got.receiver.key_confirmation != b"k" * 32


@pytest.mark.asyncio
async def test_a_resume_gives_a_store_and_forward_offer_no_pake(env: Env) -> None:
    offer = await env.offer(_forward_request())
    got = await env.broker.resume(
        offer.session.name, offer.party_token, _impostor(_sender(), b"sender-2"), None
    )
    assert not got.sender.pake_message
    assert not got.sender.key_confirmation
    claim = await env.claim(offer.code, pake=b"", verifier=CLAIM_VERIFIER)
    _assert_hidden(claim.session)


@pytest.mark.asyncio
async def test_accept_keeps_the_receivers_pake_message_and_confirmation(env: Env) -> None:
    offer = await env.offer()
    claim = await claim_confirmed(env.broker, offer, "10.0.0.2")
    await env.broker.accept(offer.session.name, claim.party_token, _receiver(), "10.0.0.2")
    got = await env.broker.get(offer.session.name, offer.party_token)
    assert got.receiver.pake_message == RECEIVER_PAKE
    assert got.receiver.key_confirmation == RECEIVER_CONFIRMATION


# -- the data dir -------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _database_bytes(db: Path) -> bytes:
    """The database file and its -wal/-shm companions, as they lie on disk."""
    files = sorted(db.parent.glob(db.name + "*"))
    assert db in files
    return b"".join(path.read_bytes() for path in files)


@pytest.mark.asyncio
async def test_the_database_never_holds_a_nameplate(env: Env) -> None:
    offers = [await env.offer() for _ in range(5)] + [
        await env.offer(_forward_request(confirmed=True))
    ]
    claimed = await claim_confirmed(env.broker, offers[0], "10.0.0.2")  # claimed, still held
    data = _database_bytes(env.db)
    for offer in offers:
        nameplate = offer.code
        bare = hashlib.sha256(nameplate.encode()).digest()
        assert nameplate.encode() not in data
        assert nameplate.upper().encode() not in data
        assert bare not in data
        assert bare.hex().encode() not in data
        assert bare.hex().upper().encode() not in data
        # what it holds instead, keyed with the broker's secret (so it is the right file)
        assert codes.hash_code(env.key, nameplate).encode() in data
        assert offer.party_token.encode() not in data
    assert claimed.party_token.encode() not in data
    await env.store.close()  # checkpointed into the main file: still nothing
    data = _database_bytes(env.db)
    for offer in offers:
        assert offer.code.encode() not in data
        assert hashlib.sha256(offer.code.encode()).hexdigest().encode() not in data
        assert codes.hash_code(env.key, offer.code).encode() in data


async def _start(data_dir: Path) -> SqliteStore:
    """What start_server does with the data dir, in its order: open the store, load the key."""
    config = BrokerConfig(data_dir=data_dir)
    store = SqliteStore(config.database_path)
    load_token_key(config.token_key_path)
    await store.broker_id()  # a first write: the -wal and -shm files exist from here on
    return store


def _assert_private(data_dir: Path) -> None:
    assert _mode(data_dir) == 0o700
    db = data_dir / "broker.sqlite3"
    assert _mode(db) == 0o600
    assert _mode(data_dir / "token.key") == 0o600
    for suffix in ("-wal", "-shm"):
        companion = db.with_name(db.name + suffix)
        assert companion.exists(), companion
        assert _mode(companion) == 0o600, companion


@pytest.mark.asyncio
async def test_a_new_data_dir_is_private(tmp_path: Path) -> None:
    data_dir = tmp_path / "new" / "data"
    store = await _start(data_dir)
    try:
        _assert_private(data_dir)
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_a_loose_data_dir_is_tightened(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    await SqliteStore(data_dir / "broker.sqlite3").close()
    key = os.urandom(32)
    (data_dir / "token.key").write_bytes(key)
    for path, mode in (
        (data_dir, 0o755),
        (data_dir / "broker.sqlite3", 0o644),
        (data_dir / "token.key", 0o644),
    ):
        path.chmod(mode)
    store = await _start(data_dir)
    try:
        _assert_private(data_dir)
        assert load_token_key(data_dir / "token.key") == key  # tightened, not replaced
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_start_server_makes_the_data_dir_private(tmp_path: Path) -> None:
    data_dir = tmp_path / "served"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)
    config = BrokerConfig(listen="127.0.0.1:0", data_dir=data_dir)
    running = await ferry.broker.start_server(config)
    try:
        _assert_private(data_dir)
    finally:
        await running.stop(grace=0)
