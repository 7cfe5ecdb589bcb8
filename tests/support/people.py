"""People for broker tests: users made in the broker's store, devices enrolled and signed in
over real gRPC, person offers made and signed as a client makes them (issue 13).

The users are written straight into the store's directory (what `ferry admin` does too), from
the test's process: SQLite in WAL mode takes a second writer, Redis any number.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf.timestamp_pb2 import Timestamp

from ferry.broker.people import Directory, User, enrollment_token_hash
from ferry.broker.store import SqliteStore
from ferry.protocol import identity
from ferry.protocol.identity import DeviceKeys
from ferry.protocol.pake import PeerRole, SessionKey
from ferry.v1 import broker_pb2
from tests.support.broker_flow import auth

if TYPE_CHECKING:
    from ferry.v1.broker_pb2_grpc import BrokerServiceAsyncStub as Stub

T = 10.0  # deadline of every call, seconds


def sqlite_directory(data_dir: Path) -> tuple[SqliteStore, Directory]:
    """The directory of the broker whose data dir this is (close the store after)."""
    store = SqliteStore(data_dir / "broker.sqlite3")
    return store, store.directory()


async def add_user(directory: Directory, name: str, organization: str = "default") -> None:
    await directory.add_user(User(name=name, organization=organization, create_s=time.time()))


async def enrollment(directory: Directory, user: str, ttl_s: float = 600.0) -> str:
    """A one-time enrollment token for ``user``, as `ferry admin enroll` makes one."""
    token = secrets.token_urlsafe(24)
    await directory.add_enrollment(enrollment_token_hash(token), user, time.time() + ttl_s)
    return token


@dataclasses.dataclass
class PersonDevice:
    """An enrolled device: its keys, its id, and (once signed in) its access token."""

    user: str
    keys: DeviceKeys
    device_id: str
    access_token: str = ""

    def meta(self) -> tuple[tuple[str, str], ...]:
        return auth(self.access_token)


def enroll_request(token: str, keys: DeviceKeys, name: str) -> broker_pb2.EnrollDeviceRequest:
    signing, encryption = keys.signing_key, keys.encryption_key
    return broker_pb2.EnrollDeviceRequest(
        enrollment_token=token,
        display_name=name,
        signing_key=signing,
        encryption_key=encryption,
        key_signature=keys.sign(identity.enroll_bytes(signing, encryption, name)),
    )


async def enroll(stub: Stub, directory: Directory, user: str, name: str = "laptop") -> PersonDevice:
    """A new device of ``user`` (made if it does not exist), enrolled and signed in."""
    if await directory.get_user(user) is None:
        await add_user(directory, user)
    keys = DeviceKeys.generate()
    token = await enrollment(directory, user)
    response = await stub.EnrollDevice(enroll_request(token, keys, name), timeout=T)
    device = PersonDevice(user, keys, response.device.device_id)
    device.access_token = await sign_in(stub, device)
    return device


async def sign_in(stub: Stub, device: PersonDevice) -> str:
    """A fresh access token for ``device``."""
    broker_id = (await stub.GetBrokerInfo(broker_pb2.GetBrokerInfoRequest(), timeout=T)).broker_id
    challenge = (
        await stub.CreateChallenge(
            broker_pb2.CreateChallengeRequest(device_id=device.device_id), timeout=T
        )
    ).challenge
    signature = device.keys.sign(identity.sign_in_bytes(broker_id, device.device_id, challenge))
    response = await stub.SignIn(
        broker_pb2.SignInRequest(
            device_id=device.device_id, challenge=challenge, signature=signature
        ),
        timeout=T,
    )
    return response.access_token


def sender_peer() -> broker_pb2.PeerInfo:
    return broker_pb2.PeerInfo(
        candidates=[broker_pb2.Candidate(ip="127.0.0.1", kind=broker_pb2.Candidate.KIND_HOST)],
        allowed_ports=broker_pb2.PortRange(first_port=41000, last_port=41999),
        certificate_der=b"\x30\x82sender-der",
    )


def manifest(size: int = 5) -> broker_pb2.Manifest:
    return broker_pb2.Manifest(
        files=[broker_pb2.FileEntry(path="report.pdf", size_bytes=size)], chunk_size_bytes=1 << 20
    )


@dataclasses.dataclass
class PersonOffer:
    """A person offer as the sender made it: its request, the key, and the broker's answer."""

    request: broker_pb2.CreateOfferRequest
    key: SessionKey
    name: str = ""
    party_token: str = ""


async def person_offer_request(
    stub: Stub,
    sender: PersonDevice,
    recipient: str,
    *,
    files: broker_pb2.Manifest | None = None,
    ttl_s: int = 600,
) -> PersonOffer:
    """An offer to ``recipient`` sealed to its devices (as ListPeers lists them) and signed by
    ``sender``'s device, as a client makes it."""
    peers = await stub.ListPeers(
        broker_pb2.ListPeersRequest(user=recipient), metadata=sender.meta(), timeout=T
    )
    devices = next((p.devices for p in peers.peers if p.user == recipient), None)
    if devices is None:
        raise LookupError(f"{recipient} is not among {sender.user}'s peers")
    key = SessionKey(secrets.token_bytes(32))
    envelopes = [
        broker_pb2.KeyEnvelope(
            device_id=d.device_id, sealed_key=identity.seal_key(key.secret, d.encryption_key)
        )
        for d in devices
    ]
    not_after = int(time.time()) + ttl_s
    offered = files or manifest()
    signed = identity.offer_bytes(
        sender.user, sender.device_id, recipient, offered, not_after, envelopes
    )
    request = broker_pb2.CreateOfferRequest(
        manifest=offered,
        sender=sender_peer(),
        request_id=uuid.uuid4().hex,
        recipient=recipient,
        key_envelopes=envelopes,
        offer_signature=sender.keys.sign(signed),
        not_after=Timestamp(seconds=not_after),
    )
    request.ttl.seconds = ttl_s
    return PersonOffer(request, key)


async def offer_to(
    stub: Stub, sender: PersonDevice, recipient: str, **kwargs: object
) -> PersonOffer:
    """Make a person offer and confirm its key, as the sender's client does."""
    offer = await person_offer_request(stub, sender, recipient, **kwargs)  # type: ignore[arg-type]
    response = await stub.CreateOffer(offer.request, metadata=sender.meta(), timeout=T)
    offer.name, offer.party_token = response.session.name, response.party_token
    await stub.ConfirmKey(
        broker_pb2.ConfirmKeyRequest(
            name=offer.name,
            key_confirmation=offer.key.confirmation(PeerRole.SENDER, offer.request.manifest),
            certificate_mac=offer.key.certificate_mac(
                PeerRole.SENDER, offer.request.sender.certificate_der
            ),
        ),
        metadata=auth(offer.party_token),
        timeout=T,
    )
    return offer
