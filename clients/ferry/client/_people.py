"""People: a device's enrollment and sign-in, its peers, its inbox, and offers to a person.

An offer to a person has no code. Its key is 32 random bytes (`SessionKey`, what a code's
PAKE would have given), so from the offer on everything runs as for a store-and-forward
code, whose key is known at once: the sender confirms at once, certificates are MACed
under the key, the store path seals under ``key.store_key``. What the code did, the
devices' keys do (`ferry.protocol.identity`)::

    sender device                          broker                 each device of alice
    ListPeers -> alice's devices, pinned
    key = random; envelope = seal(key, device) for each of alice's devices
    sign(offer_bytes(me, alice, manifest, not_after, envelopes))
    CreateOffer(recipient=alice, ...) --> inbox of alice --------> WatchInbox / ListInbox
    ConfirmKey(proof over the manifest, MAC of my certificate)
                                                                   check the signature with the
                                                                   sender device's key (pinned on
                                                                   first use), not_after, open my
                                                                   envelope -> key
                                       <-- TakeOffer (first device wins; the others see it gone)
                                                                   check_offer under the key, then
                                                                   AcceptOffer as after a claim

A device signs in with a signature over a fresh challenge and gets a short-lived access
token (`SignedIn`), renewed transparently when the broker says it expired. Every device
key this machine relies on is pinned (`KnownDevices`): a known device whose keys changed
is refused (`DeviceKeyChanged`).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from ferry.client._broker import BrokerError, BrokerLink
from ferry.client._errors import TamperedError, TransferOver
from ferry.client._events import OfferedFile, files_of
from ferry.client._identity import Device, KnownDevices
from ferry.client._store import StoreUnavailable
from ferry.errors import FerryError
from ferry.files import shown
from ferry.protocol.identity import (
    DeviceKeys,
    EnvelopeError,
    enroll_bytes,
    fingerprint,
    offer_bytes,
    seal_key,
    sign_in_bytes,
    verify,
)
from ferry.protocol.pake import KEY_BYTES, SessionKey
from ferry.v1 import broker_pb2

__all__ = [
    "DeviceRevoked",
    "GoneOffer",
    "InboxOffer",
    "InboxUpdate",
    "NotEnrolled",
    "Peer",
    "PeerDevice",
    "SignedIn",
    "enroll",
    "open_offer",
    "person_offer",
    "store_refused",
]

_T = TypeVar("_T")
#: Sign in again this long before the access token expires.
_RENEW_MARGIN_S = 30.0
#: How long one inbox stream stays open before it is opened anew (a fresh deadline).
_INBOX_STREAM_S = 3600.0
_RESUBSCRIBE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}
)
_TOKEN_STALE = frozenset({"ACCESS_TOKEN_EXPIRED", "ACCESS_TOKEN_INVALID"})
#: The name of a device, user or offer as a message shows it.
_NAME_CHARS = 64


class DeviceRevoked(BrokerError):
    """The broker's operator revoked this device: it can do nothing there any more."""


class NotEnrolled(FerryError):
    """This machine has no device at that broker: ``ferry login`` with a token first."""


def _people_error(exc: BrokerError) -> BrokerError:
    """``exc``, or DeviceRevoked with the sentence people need."""
    if exc.reason == "DEVICE_REVOKED":
        return DeviceRevoked(
            exc.code,
            "this device was revoked by the broker's operator; "
            "ferry login with a new enrollment token",
            exc.reason,
            retried=exc.retried,
        )
    return exc


def store_refused(exc: BaseException) -> bool:
    """Whether a failed store-and-forward transfer failed because this broker keeps no files
    for a receiver who has not taken them (no bucket, or store-and-forward off): then the
    sender can only wait for the receiver."""
    cause = exc.__cause__
    return isinstance(cause, StoreUnavailable) or (
        isinstance(cause, BrokerError)
        and cause.reason in ("STORE_UNAVAILABLE", "STORE_FORWARD_DISABLED")
    )


def _seconds(ts: object) -> float:
    return float(getattr(ts, "seconds", 0)) + float(getattr(ts, "nanos", 0)) / 1e9


@dataclass(frozen=True, slots=True)
class PeerDevice:
    """One device of a peer, as ListPeers shows it."""

    device_id: str
    display_name: str
    fingerprint: str
    online: bool


@dataclass(frozen=True, slots=True)
class Peer:
    """A user this device may offer files to (ListPeers), with its devices."""

    user: str
    devices: tuple[PeerDevice, ...]

    @property
    def online(self) -> bool:
        """Whether any of its devices holds an inbox stream open now."""
        return any(d.online for d in self.devices)

    @classmethod
    def from_proto(cls, peer: broker_pb2.Peer) -> Peer:
        """From ListPeers' message."""
        return cls(
            peer.user,
            tuple(
                PeerDevice(
                    d.device_id,
                    d.display_name,
                    fingerprint(d.signing_key, d.encryption_key),
                    d.online,
                )
                for d in peer.devices
            ),
        )


@dataclass(frozen=True, slots=True)
class InboxOffer:
    """An offer waiting for this device's user. Everything here is as the broker says it,
    unchecked until `Client.take` checks it (signature, expiry, pinned key, envelope)."""

    name: str
    sender_user: str
    sender_device: str
    sender_device_id: str
    sender_fingerprint: str
    files: list[OfferedFile]
    total_size: int
    #: Until when the sender vouches for the offer (seconds since the epoch).
    not_after: float
    #: When the broker drops the offer (seconds since the epoch).
    expire_time: float
    session: broker_pb2.Session = field(repr=False)

    @property
    def id(self) -> str:
        """The offer's id, as `ferry inbox` shows it (the session name without sessions/)."""
        return self.name.removeprefix("sessions/")

    @classmethod
    def from_session(cls, session: broker_pb2.Session) -> InboxOffer:
        """From an inbox's Session."""
        person = session.person
        device = person.sender_device
        files = files_of(session.manifest)
        return cls(
            name=session.name,
            sender_user=person.sender_user,
            sender_device=device.display_name,
            sender_device_id=device.device_id,
            sender_fingerprint=fingerprint(device.signing_key, device.encryption_key),
            files=files,
            total_size=sum(f.size for f in files),
            not_after=_seconds(person.not_after),
            expire_time=_seconds(session.expire_time),
            session=session,
        )


@dataclass(frozen=True, slots=True)
class GoneOffer:
    """An offer that left the inbox: taken by a device (``taken_by``), or ended."""

    name: str
    #: The device that took it ("" if none did).
    taken_by: str
    #: The session's state name, e.g. "cancelled", "expired" ("" if not known).
    state: str
    reason: str

    @property
    def id(self) -> str:
        """The offer's id, as `ferry inbox` shows it."""
        return self.name.removeprefix("sessions/")


@dataclass(frozen=True, slots=True)
class InboxUpdate:
    """The inbox now, and what left it since the last update."""

    offers: list[InboxOffer]
    gone: list[GoneOffer]


def _gone(session: broker_pb2.Session) -> GoneOffer:
    state = ""
    if session.state:
        state = broker_pb2.Session.State.Name(session.state).removeprefix("STATE_").lower()
    return GoneOffer(
        session.name, session.person.receiver_device_id, state, shown(session.failure_reason)
    )


async def enroll(link: BrokerLink, token: str, display_name: str, broker: str) -> Device:
    """Enroll a new device with the operator's one-time ``token``: its keys are made here
    and only their public halves leave. The device, not saved yet."""
    keys = DeviceKeys.generate()
    broker_id = await link.broker_id()
    request = broker_pb2.EnrollDeviceRequest(
        enrollment_token=token,
        display_name=display_name,
        signing_key=keys.signing_key,
        encryption_key=keys.encryption_key,
        key_signature=keys.sign(enroll_bytes(keys.signing_key, keys.encryption_key, display_name)),
    )
    try:
        response = await link.enroll_device(request)
    except BrokerError as exc:
        if exc.reason == "ENROLLMENT_INVALID":
            lost = " (an earlier try may have used it, its answer lost)" if exc.retried else ""
            raise BrokerError(
                exc.code,
                f"the enrollment token is unknown, used or expired{lost}: ask the broker's "
                "operator for a new one (ferry admin enroll USER)",
                exc.reason,
                retried=exc.retried,
            ) from None
        raise
    return Device(
        broker_id=broker_id,
        broker=broker,
        user=response.device.user,
        organization=response.organization,
        device_id=response.device.device_id,
        display_name=response.device.display_name,
        keys=keys,
    )


class SignedIn:
    """A device signed in at its broker: its access token, fetched when first needed and
    again when the broker says it expired."""

    def __init__(
        self,
        device: Device,
        links: Callable[[], BrokerLink],
        pins: KnownDevices | None = None,
        on_new_device: Callable[[str, PeerDevice], None] | None = None,
    ) -> None:
        """``links`` makes a new link (closed by whoever gets it); ``on_new_device`` hears
        of every device pinned for the first time (its user and the device)."""
        self.device = device
        self._links = links
        self.pins = pins if pins is not None else KnownDevices()
        self.on_new_device = on_new_device
        self._token = ""
        self._expires = 0.0
        self._lock = asyncio.Lock()

    async def _sign_in(self) -> None:
        device = self.device
        link = self._links()
        try:
            challenge = (await link.create_challenge(device.device_id)).challenge
            signature = device.keys.sign(
                sign_in_bytes(device.broker_id, device.device_id, challenge)
            )
            response = await link.sign_in(
                broker_pb2.SignInRequest(
                    device_id=device.device_id, challenge=challenge, signature=signature
                )
            )
        except BrokerError as exc:
            raise _people_error(exc) from None
        finally:
            await link.close()
        self._token = response.access_token
        self._expires = _seconds(response.expire_time)

    async def token(self, *, fresh: bool = False) -> str:
        """The access token: a new one if ``fresh`` or if it is about to expire."""
        async with self._lock:
            if fresh or not self._token or time.time() > self._expires - _RENEW_MARGIN_S:
                await self._sign_in()
            return self._token

    async def call(
        self, rpc: Callable[[BrokerLink], Awaitable[_T]], link: BrokerLink | None = None
    ) -> _T:
        """``rpc`` on ``link`` (else a link of its own) with the access token; signed in
        again, and tried once more, if the broker says the token expired."""
        own = link is None
        used = link if link is not None else self._links()
        try:
            used.token = await self.token()
            try:
                return await rpc(used)
            except BrokerError as exc:
                if exc.reason not in _TOKEN_STALE:
                    raise _people_error(exc) from None
            used.token = await self.token(fresh=True)
            try:
                return await rpc(used)
            except BrokerError as exc:
                raise _people_error(exc) from None
        finally:
            if own:
                await used.close()

    def pin(self, devices: Sequence[broker_pb2.Device]) -> None:
        """Pin ``devices`` (DeviceKeyChanged if a known one changed); tell of new ones."""
        for new in self.pins.pin(self.device.broker_id, devices):
            if self.on_new_device is not None and new.device_id != self.device.device_id:
                fp = fingerprint(new.signing_key, new.encryption_key)
                self.on_new_device(
                    new.user, PeerDevice(new.device_id, new.display_name, fp, new.online)
                )

    async def peer_protos(self, user: str = "") -> list[broker_pb2.Peer]:
        """ListPeers (every peer, or only ``user``), every device key pinned
        (DeviceKeyChanged if one changed)."""
        peers = await self.call(lambda link: link.list_peers(user))
        self.pin([d for p in peers for d in p.devices])
        return peers

    async def peers(self, user: str = "") -> list[Peer]:
        """The users this device may offer files to (or only ``user``), with their devices."""
        return [Peer.from_proto(p) for p in await self.peer_protos(user)]

    async def inbox(self, seconds: float | None = None) -> AsyncGenerator[InboxUpdate, None]:
        """The inbox now, then after every change, for ``seconds`` (None: until the caller
        stops): the stream is opened again after a broker restart (with backoff) and after
        a new sign-in. Offers that left while no stream was open are in the next ``gone``."""
        until = None if seconds is None else time.monotonic() + seconds
        known: set[str] = set()
        pause = 0.2
        while until is None or time.monotonic() < until:
            left = _INBOX_STREAM_S if until is None else until - time.monotonic()
            link = self._links()
            try:
                link.token = await self.token()
                first = True
                async for response in link.watch_inbox(max(min(left, _INBOX_STREAM_S), 0.1)):
                    pause = 0.2
                    offers = list(response.offers)
                    gone = [_gone(s) for s in response.gone]
                    now = {s.name for s in offers}
                    if first:  # what left while no stream was open
                        told = {g.name for g in gone}
                        gone += [GoneOffer(n, "", "", "") for n in known - now - told]
                        first = False
                    known = now
                    yield InboxUpdate([InboxOffer.from_session(s) for s in offers], gone)
            except BrokerError as exc:
                if exc.reason in _TOKEN_STALE:
                    await self.token(fresh=True)  # then open the stream again
                elif exc.code not in _RESUBSCRIBE or exc.reason:
                    raise _people_error(exc) from None
            finally:
                await link.close()
            wait = pause if until is None else min(pause, max(until - time.monotonic(), 0))
            await asyncio.sleep(wait)
            pause = min(pause * 2, 5.0)

    async def list_inbox(self) -> list[InboxOffer]:
        """The offers waiting now, oldest first."""
        sessions = await self.call(lambda link: link.list_inbox())
        return [InboxOffer.from_session(s) for s in sessions]


def person_offer(
    device: Device,
    recipient: broker_pb2.Peer,
    manifest: broker_pb2.Manifest,
    sender: broker_pb2.PeerInfo,
    ttl_s: float,
    request_id: str,
) -> tuple[broker_pb2.CreateOfferRequest, SessionKey]:
    """An offer of ``manifest`` to ``recipient`` (its devices as ListPeers gave them, pinned
    already): a new random key sealed to each device, and signed by this device."""
    if not recipient.devices:
        user = shown(recipient.user, _NAME_CHARS)
        raise FerryError(f"{user} has no device yet: nothing can be sent to {user} before one")
    key = SessionKey(os.urandom(KEY_BYTES))
    envelopes = [
        broker_pb2.KeyEnvelope(
            device_id=d.device_id, sealed_key=seal_key(key.secret, d.encryption_key)
        )
        for d in recipient.devices
    ]
    not_after = int(time.time() + ttl_s)
    signature = device.keys.sign(
        offer_bytes(device.user, device.device_id, recipient.user, manifest, not_after, envelopes)
    )
    request = broker_pb2.CreateOfferRequest(
        manifest=manifest,
        sender=sender,
        request_id=request_id,
        recipient=recipient.user,
        key_envelopes=envelopes,
        offer_signature=signature,
    )
    request.ttl.seconds = int(ttl_s)
    request.not_after.seconds = not_after
    return request, key


def open_offer(device: Device, signed: SignedIn, session: broker_pb2.Session) -> SessionKey:
    """The key of an offer made to this device's user, once it checks: the sender device's
    signature over what the session says, not past its not_after, the sender device's keys
    pinned (first use) or unchanged, and this device's envelope opens. TamperedError (or
    TransferOver for an expired offer, DeviceKeyChanged) if not."""
    if not session.HasField("person"):
        raise TamperedError("this offer was not made to a person")
    person = session.person
    sender = person.sender_device
    if person.recipient_user != device.user:
        raise TamperedError(f"this offer is for {shown(person.recipient_user, _NAME_CHARS)}")
    if sender.user != person.sender_user:
        raise TamperedError("the offer's sender device is not its sender's")
    not_after = person.not_after.seconds
    data = offer_bytes(
        person.sender_user,
        sender.device_id,
        person.recipient_user,
        session.manifest,
        not_after,
        person.key_envelopes,
    )
    if not verify(sender.signing_key, person.offer_signature, data):
        raise TamperedError(
            "the offer's signature does not check with its sender's device key: "
            "it was not made by that device, or was changed on the way"
        )
    if time.time() > not_after:
        raise TransferOver("the offer expired (its sender vouched for it until then only)")
    signed.pin([sender])  # DeviceKeyChanged if the sender's device is known by other keys
    mine = [e for e in person.key_envelopes if e.device_id == device.device_id]
    if not mine:
        raise TamperedError("the offer carries no key for this device")
    try:
        return SessionKey(device.keys.open_key(mine[0].sealed_key))
    except EnvelopeError as exc:
        raise TamperedError(f"the offer's key does not open here ({exc})") from None
