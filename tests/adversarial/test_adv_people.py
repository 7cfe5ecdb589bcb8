"""People on a real broker process, tried as a stranger, another user and a revoked device
would (issue 13): enrollment, sign-in, access tokens, inbox, TakeOffer, policy and audit.

Two users in one organisation (alice with two devices, bob with one) and carol in another.
Every call as the wrong user is refused; a revoked device can do nothing; quotas answer with
their reasons; the audit log has every step and no secret.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
import pytest
import pytest_asyncio

from ferry.broker.people import User
from ferry.protocol import identity
from ferry.protocol.identity import DeviceKeys
from ferry.protocol.pake import PeerRole
from ferry.v1 import broker_pb2, broker_pb2_grpc
from tests.conftest import BrokerFactory
from tests.support.broker_flow import auth, offer_request, receiver_peer
from tests.support.people import (
    PersonDevice,
    T,
    add_user,
    enroll,
    enroll_request,
    enrollment,
    offer_to,
    person_offer_request,
    sign_in,
    sqlite_directory,
)
from tests.support.processes import BrokerProcess
from tests.support.rpc import reason_of

if TYPE_CHECKING:
    from ferry.v1.broker_pb2_grpc import BrokerServiceAsyncStub as Stub

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio]

S = broker_pb2.Session


async def _refused(call: object) -> str:
    """'STATUS/REASON' of a refused call (fails the test if it succeeds)."""
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return f"{error.code().name}/{reason_of(error)}"
    raise AssertionError("the call succeeded")


class People:
    """A broker process, a stub to it, its directory, and the test's devices."""

    def __init__(self, broker: BrokerProcess, stub: Stub) -> None:
        self.broker = broker
        self.stub = stub
        self.store, self.directory = sqlite_directory(broker.data_dir)

    async def setup(self) -> None:
        await self.directory.add_user(User("carol", "elsewhere", time.time()))
        self.alice1 = await enroll(self.stub, self.directory, "alice", "laptop")
        self.alice2 = await enroll(self.stub, self.directory, "alice", "phone")
        self.bob = await enroll(self.stub, self.directory, "bob", "desk")
        self.carol = await enroll(self.stub, self.directory, "carol", "tablet")


@pytest_asyncio.fixture
async def people(broker_factory: BrokerFactory) -> AsyncIterator[People]:
    broker = broker_factory("--presence-ttl", "3", "--user-offers-per-hour", "50")
    async with grpc.aio.insecure_channel(broker.address) as channel:
        world = People(broker, broker_pb2_grpc.BrokerServiceStub(channel))
        await world.setup()
        yield world
        await world.store.close()


async def _read_until_it_ends(watch: object) -> None:
    while True:
        await watch.read()  # type: ignore[attr-defined]


def _watch(stub: Stub, device: PersonDevice) -> Any:
    """An open WatchInbox call of ``device`` (read it with ``await call.read()``)."""
    return stub.WatchInbox(broker_pb2.WatchInboxRequest(), metadata=device.meta(), timeout=30)


async def _inbox(stub: Stub, device: PersonDevice) -> list[broker_pb2.Session]:
    response = await stub.ListInbox(
        broker_pb2.ListInboxRequest(), metadata=device.meta(), timeout=T
    )
    return list(response.offers)


async def test_enrollment_takes_one_valid_token_once_and_proof_of_the_key(
    people: People,
) -> None:
    stub, directory = people.stub, people.directory
    keys = DeviceKeys.generate()
    token = await enrollment(directory, "alice")
    wrong = await _refused(stub.EnrollDevice(enroll_request("nope", keys, "x"), timeout=T))
    assert wrong == "UNAUTHENTICATED/ENROLLMENT_INVALID"
    # A signature by another key than the one enrolled proves nothing: refused, token kept.
    forged = enroll_request(token, keys, "x")
    forged.key_signature = DeviceKeys.generate().sign(b"anything")
    assert await _refused(stub.EnrollDevice(forged, timeout=T)) == (
        "INVALID_ARGUMENT/SIGNATURE_INVALID"
    )
    first = await stub.EnrollDevice(enroll_request(token, keys, "x"), timeout=T)
    assert first.device.user == "alice"
    assert first.organization == "default"
    assert first.device.signing_key == keys.signing_key
    again = await _refused(stub.EnrollDevice(enroll_request(token, keys, "x"), timeout=T))
    assert again == "UNAUTHENTICATED/ENROLLMENT_INVALID"


async def test_sign_in_needs_this_devices_signature_of_a_fresh_challenge(
    people: People,
) -> None:
    stub, alice = people.stub, people.alice1
    info = await stub.GetBrokerInfo(broker_pb2.GetBrokerInfoRequest(), timeout=T)
    ask = broker_pb2.CreateChallengeRequest(device_id=alice.device_id)
    challenge = (await stub.CreateChallenge(ask, timeout=T)).challenge

    def request(keys: DeviceKeys, data: bytes, broker_id: str = info.broker_id) -> object:
        signed = identity.sign_in_bytes(broker_id, alice.device_id, data)
        return stub.SignIn(
            broker_pb2.SignInRequest(
                device_id=alice.device_id, challenge=data, signature=keys.sign(signed)
            ),
            timeout=T,
        )

    # bob's key, a challenge the broker never made, one signed for another broker
    assert await _refused(request(people.bob.keys, challenge)) == (
        "UNAUTHENTICATED/SIGNATURE_INVALID"
    )
    assert await _refused(request(alice.keys, b"\0" * len(challenge))) == (
        "UNAUTHENTICATED/CHALLENGE_INVALID"
    )
    assert await _refused(request(alice.keys, challenge, "another-broker")) == (
        "UNAUTHENTICATED/SIGNATURE_INVALID"
    )
    # a challenge made for bob's device does not sign alice in
    bobs = (
        await stub.CreateChallenge(
            broker_pb2.CreateChallengeRequest(device_id=people.bob.device_id), timeout=T
        )
    ).challenge
    assert await _refused(request(alice.keys, bobs)) == "UNAUTHENTICATED/CHALLENGE_INVALID"
    signed_in = await request(alice.keys, challenge)  # type: ignore[misc]
    assert signed_in.device.device_id == alice.device_id
    assert await _refused(request(alice.keys, challenge)) == "UNAUTHENTICATED/CHALLENGE_INVALID"


async def test_access_tokens_cannot_be_forged_or_swapped(people: People) -> None:
    stub, bob = people.stub, people.bob
    prefix, payload, mac = bob.access_token.split(".")
    _user, _device_id, org, expire = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged_payload = json.dumps(["alice", people.alice1.device_id, org, expire]).encode()
    forged = f"{prefix}.{base64.urlsafe_b64encode(forged_payload).decode().rstrip('=')}.{mac}"
    ask = broker_pb2.ListInboxRequest()
    for token, reason in (
        (forged, "ACCESS_TOKEN_INVALID"),
        ("", "ACCESS_TOKEN_MISSING"),
        ("fa1.garbage", "ACCESS_TOKEN_INVALID"),
    ):
        meta = auth(token) if token else None
        assert await _refused(stub.ListInbox(ask, metadata=meta, timeout=T)) == (
            f"UNAUTHENTICATED/{reason}"
        )
    # a party token is no access token, and an access token no party token
    code_offer = await stub.CreateOffer(offer_request(), timeout=T)
    assert await _refused(
        stub.ListInbox(ask, metadata=auth(code_offer.party_token), timeout=T)
    ) == ("UNAUTHENTICATED/ACCESS_TOKEN_INVALID")
    get = broker_pb2.GetSessionRequest(name=code_offer.session.name)
    assert await _refused(stub.GetSession(get, metadata=bob.meta(), timeout=T)) == (
        "UNAUTHENTICATED/TOKEN_INVALID"
    )


async def test_an_offer_reaches_every_device_of_its_person_and_nobody_else(
    people: People,
) -> None:
    stub = people.stub
    offer = await offer_to(stub, people.bob, "alice")
    for device in (people.alice1, people.alice2):
        (seen,) = await _inbox(stub, device)
        assert seen.name == offer.name
        assert seen.person.sender_user == "bob"
        assert list(seen.person.key_envelopes) == list(offer.request.key_envelopes)
        assert not seen.sender.candidates  # no address before consent
        for envelope in seen.person.key_envelopes:  # only its own opens
            if envelope.device_id == device.device_id:
                assert device.keys.open_key(envelope.sealed_key) == offer.key.secret
            else:
                with pytest.raises(identity.EnvelopeError):
                    device.keys.open_key(envelope.sealed_key)
        signed = identity.offer_bytes(
            "bob",
            people.bob.device_id,
            "alice",
            seen.manifest,
            seen.person.not_after.seconds,
            seen.person.key_envelopes,
        )
        assert identity.verify(
            seen.person.sender_device.signing_key, seen.person.offer_signature, signed
        )
    assert await _inbox(stub, people.bob) == []
    assert await _inbox(stub, people.carol) == []
    # neither bob nor carol can take it; carol cannot even address alice
    take = broker_pb2.TakeOfferRequest(name=offer.name)
    for stranger in (people.bob, people.carol):
        assert await _refused(stub.TakeOffer(take, metadata=stranger.meta(), timeout=T)) == (
            "NOT_FOUND/OFFER_NOT_FOUND"
        )
    peers = await stub.ListPeers(
        broker_pb2.ListPeersRequest(), metadata=people.carol.meta(), timeout=T
    )
    assert [p.user for p in peers.peers] == ["carol"]
    with pytest.raises(LookupError):
        await person_offer_request(stub, people.carol, "alice")
    request = (await person_offer_request(stub, people.bob, "alice")).request
    # bob's signed offer, replayed by carol (another organisation: alice is nobody to her)
    # and by alice's own device (which did not sign it)
    assert await _refused(stub.CreateOffer(request, metadata=people.carol.meta(), timeout=T)) == (
        "NOT_FOUND/USER_NOT_FOUND"
    )
    replayed = stub.CreateOffer(request, metadata=people.alice2.meta(), timeout=T)
    assert await _refused(replayed) == "INVALID_ARGUMENT/SIGNATURE_INVALID"
    request.recipient = "nobody"
    assert await _refused(stub.CreateOffer(request, metadata=people.bob.meta(), timeout=T)) == (
        "NOT_FOUND/USER_NOT_FOUND"
    )


async def test_a_person_offer_must_seal_to_every_device_and_be_signed(people: People) -> None:
    stub, bob = people.stub, people.bob
    short = (await person_offer_request(stub, bob, "alice")).request
    del short.key_envelopes[1:]  # alice's second device left out
    assert await _refused(stub.CreateOffer(short, metadata=bob.meta(), timeout=T)) == (
        "INVALID_ARGUMENT/INVALID_ARGUMENT"
    )
    changed = (await person_offer_request(stub, bob, "alice")).request
    changed.manifest.files[0].size_bytes += 1  # not what bob's device signed
    assert await _refused(stub.CreateOffer(changed, metadata=bob.meta(), timeout=T)) == (
        "INVALID_ARGUMENT/SIGNATURE_INVALID"
    )
    anonymous = (await person_offer_request(stub, bob, "alice")).request
    assert await _refused(stub.CreateOffer(anonymous, timeout=T)) == (
        "UNAUTHENTICATED/ACCESS_TOKEN_MISSING"
    )


async def test_the_first_device_to_take_wins_and_the_other_is_told(people: People) -> None:
    stub, alice1, alice2 = people.stub, people.alice1, people.alice2
    watch = _watch(stub, alice2)
    first = await watch.read()
    assert list(first.offers) == []
    offer = await offer_to(stub, people.bob, "alice")
    arrived = await watch.read()
    assert [o.name for o in arrived.offers] == [offer.name]
    take = broker_pb2.TakeOfferRequest(name=offer.name)
    outcomes = await asyncio.gather(
        stub.TakeOffer(take, metadata=alice1.meta(), timeout=T),
        stub.TakeOffer(take, metadata=alice2.meta(), timeout=T),
        return_exceptions=True,
    )
    won = [o for o in outcomes if isinstance(o, broker_pb2.TakeOfferResponse)]
    lost = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(won) == 1
    assert len(lost) == 1
    assert reason_of(lost[0]) == "OFFER_TAKEN"
    winner = won[0].session.person.receiver_device_id
    told = await watch.read()
    assert list(told.offers) == []
    assert [(g.name, g.person.receiver_device_id) for g in told.gone] == [(offer.name, winner)]
    watch.cancel()
    # the winner takes it again: the same token; it then accepts with it, as after a claim
    device = alice1 if winner == alice1.device_id else alice2
    again = await stub.TakeOffer(take, metadata=device.meta(), timeout=T)
    assert again.party_token == won[0].party_token
    receiver = receiver_peer()
    receiver.certificate_mac = offer.key.certificate_mac(
        PeerRole.RECEIVER, receiver.certificate_der
    )
    accepted = await stub.AcceptOffer(
        broker_pb2.AcceptOfferRequest(name=offer.name, receiver=receiver),
        metadata=auth(again.party_token),
        timeout=T,
    )
    assert accepted.session.state == S.STATE_ACCEPTED
    # the sender cannot accept its own offer; the other device has no token for it
    assert await _refused(
        stub.DeclineOffer(
            broker_pb2.DeclineOfferRequest(name=offer.name),
            metadata=auth(offer.party_token),
            timeout=T,
        )
    ) in ("FAILED_PRECONDITION/ILLEGAL_TRANSITION", "PERMISSION_DENIED/WRONG_PARTY")


async def test_presence_follows_the_inbox_stream(people: People) -> None:
    stub, bob = people.stub, people.bob

    async def online() -> dict[str, bool]:
        peers = await stub.ListPeers(broker_pb2.ListPeersRequest(), metadata=bob.meta(), timeout=T)
        return {
            d.display_name: d.online for p in peers.peers if p.user == "alice" for d in p.devices
        }

    assert await online() == {"laptop": False, "phone": False}
    watch = stub.WatchInbox(
        broker_pb2.WatchInboxRequest(), metadata=people.alice2.meta(), timeout=30
    )
    await watch.read()
    assert await online() == {"laptop": False, "phone": True}
    watch.cancel()
    deadline = time.monotonic() + 10
    while (await online())["phone"] and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert await online() == {"laptop": False, "phone": False}


async def test_a_revoked_device_can_do_nothing(people: People) -> None:
    stub, alice1, directory = people.stub, people.alice1, people.directory
    offer = await offer_to(stub, people.bob, "alice")
    taken = await stub.TakeOffer(
        broker_pb2.TakeOfferRequest(name=offer.name), metadata=alice1.meta(), timeout=T
    )
    watch = _watch(stub, alice1)
    await watch.read()
    await directory.revoke_device(alice1.device_id, time.time())
    revoked = "UNAUTHENTICATED/DEVICE_REVOKED"
    assert (
        await _refused(
            stub.ListInbox(broker_pb2.ListInboxRequest(), metadata=alice1.meta(), timeout=T)
        )
        == revoked
    )
    assert (
        await _refused(
            stub.GetSession(
                broker_pb2.GetSessionRequest(name=offer.name),
                metadata=auth(taken.party_token),
                timeout=T,
            )
        )
        == revoked
    )
    assert await _refused(sign_in(stub, alice1)) == revoked
    # its open stream ends too, at its next presence renewal (a third of --presence-ttl 3)
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await asyncio.wait_for(_read_until_it_ends(watch), 10)
    assert reason_of(ended.value) == "DEVICE_REVOKED"
    # and nothing may be sealed to it any more: ListPeers no longer lists it
    peers = await stub.ListPeers(
        broker_pb2.ListPeersRequest(), metadata=people.bob.meta(), timeout=T
    )
    alice = next(p for p in peers.peers if p.user == "alice")
    assert [d.device_id for d in alice.devices] == [people.alice2.device_id]


async def test_offer_quotas_sizes_and_inbox_room_answer_with_their_reasons(
    broker_factory: BrokerFactory,
) -> None:
    broker = broker_factory(
        "--user-offers-per-hour", "3", "--max-offer-bytes", "1000", "--inbox-max-offers", "2"
    )
    store, directory = sqlite_directory(broker.data_dir)
    async with grpc.aio.insecure_channel(broker.address) as channel:
        stub = broker_pb2_grpc.BrokerServiceStub(channel)
        bob = await enroll(stub, directory, "bob")
        alice = await enroll(stub, directory, "alice")
        await add_user(directory, "dave")
        dave = await enroll(stub, directory, "dave")
        big = broker_pb2.Manifest(
            files=[broker_pb2.FileEntry(path="big.iso", size_bytes=1001)], chunk_size_bytes=1 << 20
        )
        too_big = (await person_offer_request(stub, bob, "alice", files=big)).request
        assert await _refused(stub.CreateOffer(too_big, metadata=bob.meta(), timeout=T)) == (
            "RESOURCE_EXHAUSTED/OFFER_TOO_LARGE"
        )
        await offer_to(stub, bob, "alice")
        await offer_to(stub, bob, "alice")
        full = (await person_offer_request(stub, bob, "alice")).request
        assert await _refused(stub.CreateOffer(full, metadata=bob.meta(), timeout=T)) == (
            "RESOURCE_EXHAUSTED/INBOX_FULL"
        )
        await offer_to(stub, bob, "dave")  # bob's third offer this hour
        spent = (await person_offer_request(stub, bob, "dave")).request
        assert await _refused(stub.CreateOffer(spent, metadata=bob.meta(), timeout=T)) == (
            "RESOURCE_EXHAUSTED/OFFER_QUOTA_EXCEEDED"
        )
        # the operator raises bob's own quota: his next offer goes through
        await directory.set_user_quotas("bob", 10, None)
        await offer_to(stub, bob, "dave")
        # other users' quotas are their own
        await offer_to(stub, dave, "bob")
        assert len(await _inbox(stub, alice)) == 2
    await store.close()


async def test_codes_need_a_signed_in_device_when_anonymous_use_is_off(
    broker_factory: BrokerFactory,
) -> None:
    broker = broker_factory("--anonymous", "off")
    store, directory = sqlite_directory(broker.data_dir)
    async with grpc.aio.insecure_channel(broker.address) as channel:
        stub = broker_pb2_grpc.BrokerServiceStub(channel)
        bob = await enroll(stub, directory, "bob")
        assert await _refused(stub.CreateOffer(offer_request(), timeout=T)) == (
            "PERMISSION_DENIED/ANONYMOUS_DISABLED"
        )
        made = await stub.CreateOffer(offer_request(), metadata=bob.meta(), timeout=T)
        assert made.code
        claim = broker_pb2.ClaimOfferRequest(code=made.code, pake_message=b"\x42" * 33)
        assert await _refused(stub.ClaimOffer(claim, timeout=T)) == (
            "PERMISSION_DENIED/ANONYMOUS_DISABLED"
        )
        claimed = await stub.ClaimOffer(claim, metadata=bob.meta(), timeout=T)
        assert claimed.party_token
    await store.close()


async def test_the_audit_log_has_every_step_and_no_secret(people: People) -> None:
    stub = people.stub
    offer = await offer_to(stub, people.bob, "alice")
    taken = await stub.TakeOffer(
        broker_pb2.TakeOfferRequest(name=offer.name), metadata=people.alice1.meta(), timeout=T
    )
    await stub.DeclineOffer(
        broker_pb2.DeclineOfferRequest(name=offer.name, reason="not now"),
        metadata=auth(taken.party_token),
        timeout=T,
    )
    entries = await people.directory.read_audit()
    events = [e.event for e in entries]
    for event in ("device.enrolled", "device.signed_in", "offer.created", "offer.taken"):
        assert event in events
    assert events[-1] == "session.declined"
    created = next(e for e in entries if e.event == "offer.created")
    assert created.fields["sender"] == "bob"
    assert created.fields["recipient"] == "alice"
    assert created.fields["files"] == [{"path": "report.pdf", "size": 5}]
    assert created.fields["total_bytes"] == 5
    taken_entry = next(e for e in entries if e.event == "offer.taken")
    assert taken_entry.fields["receiver_device"] == people.alice1.device_id
    assert next(e for e in entries if e.event == "session.declined").fields["reason"] == "not now"
    text = json.dumps([[e.event, e.fields] for e in entries])
    secrets_seen = [
        people.bob.access_token,
        people.alice1.access_token,
        offer.party_token,
        taken.party_token,
        offer.key.secret.hex(),
        base64.b64encode(offer.key.secret).decode(),
        *(e.sealed_key.hex() for e in offer.request.key_envelopes),
        *(base64.b64encode(e.sealed_key).decode() for e in offer.request.key_envelopes),
        people.bob.keys.signing_private.hex(),
    ]
    for secret in secrets_seen:
        assert secret not in text
    # bob's alice-only view: bob's ListInbox never shows what he sent
    assert await _inbox(stub, people.bob) == []


async def test_an_offer_wakes_the_inbox_at_once_not_at_the_next_renewal(
    broker_factory: BrokerFactory,
) -> None:
    """The offer shows once its sender confirmed it (ConfirmKey, a commit that changes no
    state): that commit must wake the stream, which would otherwise wait up to a third of
    --presence-ttl (here 100 s) for its next renewal."""
    broker = broker_factory("--presence-ttl", "300")
    store, directory = sqlite_directory(broker.data_dir)
    async with grpc.aio.insecure_channel(broker.address) as channel:
        stub = broker_pb2_grpc.BrokerServiceStub(channel)
        bob = await enroll(stub, directory, "bob")
        alice = await enroll(stub, directory, "alice")
        watch = _watch(stub, alice)
        assert list((await watch.read()).offers) == []
        offer = await offer_to(stub, bob, "alice")
        update = await asyncio.wait_for(watch.read(), 20)
        while not update.offers:  # the create's wake may come before the confirmation
            update = await asyncio.wait_for(watch.read(), 20)
        assert [o.name for o in update.offers] == [offer.name]
        watch.cancel()
    await store.close()


async def test_a_completion_puts_the_verified_digests_in_the_audit_log(people: People) -> None:
    stub = people.stub
    offer = await offer_to(stub, people.bob, "alice")
    taken = await stub.TakeOffer(
        broker_pb2.TakeOfferRequest(name=offer.name), metadata=people.alice2.meta(), timeout=T
    )
    receiver = receiver_peer()
    receiver.certificate_mac = offer.key.certificate_mac(
        PeerRole.RECEIVER, receiver.certificate_der
    )
    meta = auth(taken.party_token)
    await stub.AcceptOffer(
        broker_pb2.AcceptOfferRequest(name=offer.name, receiver=receiver), metadata=meta, timeout=T
    )
    done = broker_pb2.ReportProgressRequest(
        name=offer.name, state=S.STATE_COMPLETED, bytes_done=5, file_digests=[b"a" * 32, b"b"]
    )
    assert await _refused(stub.ReportProgress(done, metadata=meta, timeout=T)) == (
        "INVALID_ARGUMENT/INVALID_ARGUMENT"  # two digests for one file
    )
    del done.file_digests[1:]
    await stub.ReportProgress(done, metadata=meta, timeout=T)
    completed = [e for e in await people.directory.read_audit() if e.event == "session.completed"]
    assert len(completed) == 1
    assert completed[0].fields["digests"] == [(b"a" * 32).hex()]
    assert completed[0].fields["algorithm"] == "blake3-chunks"
    assert completed[0].fields["recipient"] == "alice"
    assert completed[0].fields["bytes"] == 5


async def test_list_peers_for_one_user_answers_for_that_user_only(people: People) -> None:
    stub, bob = people.stub, people.bob

    async def peers(user: str, device: PersonDevice = bob) -> list[tuple[str, int]]:
        response = await stub.ListPeers(
            broker_pb2.ListPeersRequest(user=user), metadata=device.meta(), timeout=T
        )
        return [(p.user, len(p.devices)) for p in response.peers]

    assert await peers("alice") == [("alice", 2)]
    assert await peers("carol") == []  # another organisation: nobody, as for no such user
    assert await peers("nobody") == []
    assert await peers("alice", people.carol) == []
    assert await peers("") == [("alice", 2), ("bob", 1)]


async def test_inbox_streams_count_per_user_not_per_address(
    broker_factory: BrokerFactory,
) -> None:
    """Signed-in devices behind one address (an office's NAT) are not held to the
    anonymous per-address watch limit: each user has that many streams of its own."""
    broker = broker_factory("--watches-per-address", "2")
    store, directory = sqlite_directory(broker.data_dir)
    async with grpc.aio.insecure_channel(broker.address) as channel:
        stub = broker_pb2_grpc.BrokerServiceStub(channel)
        devices = [await enroll(stub, directory, name) for name in ("ann", "ben", "cat")]
        streams = [_watch(stub, device) for device in devices]
        for stream in streams:
            assert list((await stream.read()).offers) == []
        ann_again = [_watch(stub, devices[0]), _watch(stub, devices[0])]
        await ann_again[0].read()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await ann_again[1].read()  # ann's third: over the per-user count (2 here)
        assert reason_of(refused.value) == "TOO_MANY_WATCHES"
        for stream in [*streams, *ann_again]:
            stream.cancel()
    await store.close()


async def test_a_device_that_took_and_never_accepted_loses_the_offer_to_another(
    broker_factory: BrokerFactory,
) -> None:
    """A take holds the offer for --claim-confirm-timeout only: then another device of the
    same person may take it over (the first one's token stops working); an accepted offer
    is never taken over."""
    broker = broker_factory("--claim-confirm-timeout", "1")
    store, directory = sqlite_directory(broker.data_dir)
    async with grpc.aio.insecure_channel(broker.address) as channel:
        stub = broker_pb2_grpc.BrokerServiceStub(channel)
        bob = await enroll(stub, directory, "bob")
        laptop = await enroll(stub, directory, "alice", "laptop")
        phone = await enroll(stub, directory, "alice", "phone")
        offer = await offer_to(stub, bob, "alice")
        take = broker_pb2.TakeOfferRequest(name=offer.name)
        first = await stub.TakeOffer(take, metadata=laptop.meta(), timeout=T)
        assert await _refused(stub.TakeOffer(take, metadata=phone.meta(), timeout=T)) == (
            "FAILED_PRECONDITION/OFFER_TAKEN"
        )
        await asyncio.sleep(1.2)
        second = await stub.TakeOffer(take, metadata=phone.meta(), timeout=T)
        assert second.session.person.receiver_device_id == phone.device_id
        get = broker_pb2.GetSessionRequest(name=offer.name)
        assert await _refused(
            stub.GetSession(get, metadata=auth(first.party_token), timeout=T)
        ) == ("UNAUTHENTICATED/TOKEN_INVALID")
        # the phone's take starts a fresh clock: the laptop cannot take it back at once
        assert await _refused(stub.TakeOffer(take, metadata=laptop.meta(), timeout=T)) == (
            "FAILED_PRECONDITION/OFFER_TAKEN"
        )
        receiver = receiver_peer()
        receiver.certificate_mac = offer.key.certificate_mac(
            PeerRole.RECEIVER, receiver.certificate_der
        )
        await stub.AcceptOffer(
            broker_pb2.AcceptOfferRequest(name=offer.name, receiver=receiver),
            metadata=auth(second.party_token),
            timeout=T,
        )
        await asyncio.sleep(1.2)
        assert await _refused(stub.TakeOffer(take, metadata=laptop.meta(), timeout=T)) == (
            "FAILED_PRECONDITION/OFFER_TAKEN"  # accepted: the phone's for good
        )
        events = [e.event for e in await directory.read_audit()]
        assert "offer.retaken" in events
    await store.close()
