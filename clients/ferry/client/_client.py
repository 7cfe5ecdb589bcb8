"""The async client library: offer files, claim a code, accept or decline, transfer.

This is the whole flow of one transfer, written once for programs and the CLI alike::

    sender                      broker                      receiver
    offer() ---CreateOffer--->  nameplate                   claim(code) ---ClaimOffer-->
    transfer(): WatchSession    <-- ConfirmKey both ways: the PAKE on the code's password -->
                                <---AcceptOffer(plan)---    accept(dest)
      listen on leased port     <-- TLS, certificates pinned and vouched for by the key -- dial
      serve chunk requests      <------ ReportProgress (CONNECTING..COMPLETED) -- verify, write

The code's password never goes to the broker: see _keys for the order of the key exchange and
what each side checks before it trusts anything the broker relays.

`Client` makes offers (`Outgoing`, in _outgoing) and claims codes (`Incoming`, in _incoming).
The data path itself runs in threads (`_send`, `_receive`, `_store`); _session runs the
broker conversation around it on asyncio and turns the progress into events (_events).

The broker is a collaborator: an address to dial, or any `LinkFactory` (one new `BrokerLink`
per offer, claim or look-up) such as `ferry.client.testing.InProcessBroker`.
"""

from __future__ import annotations

import contextlib
import functools
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

from google.protobuf.duration_pb2 import Duration

from ferry.client._broker import DEFAULT_PATIENCE, BrokerError, BrokerLink, LinkFactory
from ferry.client._candidates import peer_info
from ferry.client._channel import ChannelTLS, parse_broker_address
from ferry.client._errors import (
    SourceChangedError,
    TamperedError,
    TransferOver,
)
from ferry.client._events import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_PORTS,
    DEFAULT_STALL_TIMEOUT,
    Via,
    check_via,
)
from ferry.client._identity import Device, KnownDevices, OfferReplayed, TakenOffers
from ferry.client._incoming import Incoming
from ferry.client._keys import (
    VerifyWords,
    burn,
    check_offer,
    confirm_as_sender,
    receiver_key,
    sign,
    tampered,
    wait_confirmed,
)
from ferry.client._outgoing import Outgoing
from ferry.client._people import (
    InboxOffer,
    InboxUpdate,
    NotEnrolled,
    Peer,
    PeerDevice,
    SignedIn,
    enroll,
    open_offer,
    person_offer,
)
from ferry.client._session import (
    FINAL,
    State,
    ended,
)
from ferry.client._tls import Identity
from ferry.errors import FerryError
from ferry.files import (
    ManifestError,
    Scan,
    SourceStamp,
    scan_sources,
    shown,
)
from ferry.protocol.pake import (
    Code,
    KeyExchange,
    KeyMismatch,
    PeerRole,
    SessionKey,
    claim_verifier,
    forward_key,
)
from ferry.v1 import broker_pb2

__all__ = ["Client", "new_claim_exchange"]

_T = TypeVar("_T")


def new_claim_exchange(code: str) -> KeyExchange | None:
    """The receiver's side of the code's PAKE, made before `Client.claim` so that its
    secret ``state()`` can be kept first (see there); None for a store-and-forward code,
    which needs none. CodeError if ``code`` is not shaped like one."""
    parsed = Code.parse(code)
    if parsed.forwardable:
        return None
    return KeyExchange(PeerRole.RECEIVER, parsed.password)


class Client:
    """A connection to a Ferry broker, from which offers are made and codes claimed."""

    def __init__(
        self,
        broker: str | LinkFactory,
        *,
        ports: tuple[int, int] = DEFAULT_PORTS,
        timeout: float = 10.0,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
        broker_wait: float = DEFAULT_PATIENCE,
        on_broker_wait: Callable[[BrokerError], None] | None = None,
        broker_ca: str | Path | None = None,
        broker_cert: str | Path | None = None,
        broker_key: str | Path | None = None,
        insecure_plaintext: bool = False,
        device: Device | None = None,
        known_devices: KnownDevices | None = None,
        taken_offers: TakenOffers | None = None,
        on_new_device: Callable[[str, PeerDevice], None] | None = None,
    ) -> None:
        """``broker``: its address, or a `LinkFactory` that makes each new link (such
        as `ferry.client.testing.InProcessBroker`). ``timeout`` bounds each broker call;
        ``broker_wait`` is how long, in all, a call keeps trying a broker that is down,
        restarting or too slow (``on_broker_wait`` hears when one starts waiting).

        The address says the channel's security: ``grpcs://host:port`` is TLS,
        ``grpc://host:port`` plaintext (loopback only, unless ``insecure_plaintext``), a bare
        ``host:port`` TLS unless the host is loopback. TLS checks the broker against the
        system's CA certificates, or ``broker_ca`` (a PEM file); ``broker_cert`` and
        ``broker_key`` are this client's certificate for a broker that requires one. A
        malformed address or unusable setting raises BrokerSettingsError (a FerryError and
        ValueError) here; a TLS failure raises BrokerTLSError from the first call, at once.
        These settings do not apply to a `LinkFactory`.

        ``device``: this machine's device at the broker (`Device.load`, or `login`), for the
        people calls (`peers`, `inbox`, `offer` with ``to``, `take`). ``known_devices``: the
        pins of the devices seen (default: the config dir's); ``on_new_device`` hears of each
        device pinned for the first time (its user and the device); ``taken_offers``: the
        offers to a person taken here (default: the config dir's), so that the broker cannot
        show one again as a new offer (`OfferReplayed`)."""
        #: The broker's address, or the name of the link factory, for messages.
        self.broker: str
        self._links: LinkFactory
        if isinstance(broker, str):
            tls = ChannelTLS(
                ca_file=Path(broker_ca) if broker_ca else None,
                cert_file=Path(broker_cert) if broker_cert else None,
                key_file=Path(broker_key) if broker_key else None,
                insecure_plaintext=insecure_plaintext,
            )
            parse_broker_address(broker, insecure_plaintext=insecure_plaintext)  # fail here
            self.broker, self._links = broker, functools.partial(BrokerLink, broker, tls=tls)
        else:
            self.broker, self._links = str(getattr(broker, "address", broker)), broker
        self.ports = ports
        self.timeout = timeout
        self.stall_timeout = stall_timeout
        self.broker_wait = broker_wait
        self.on_broker_wait = on_broker_wait
        self.known_devices = known_devices
        #: The offers to a person this machine took (a replayed one is refused).
        self.taken_offers = taken_offers or TakenOffers()
        self.on_new_device = on_new_device
        self._signed: SignedIn | None = None
        self.device = device

    @property
    def device(self) -> Device | None:
        """This machine's device at the broker, if it has one."""
        return self._signed.device if self._signed is not None else None

    @device.setter
    def device(self, device: Device | None) -> None:
        self._signed = None
        if device is not None:
            self._signed = SignedIn(device, self._link, self.known_devices, self.on_new_device)

    def _people(self) -> SignedIn:
        if self._signed is None:
            raise NotEnrolled(
                f"this machine has no device at the broker {shown(self.broker)}: "
                "ferry login with an enrollment token first"
            )
        return self._signed

    def _link(self) -> BrokerLink:
        return self._links(
            timeout=self.timeout,
            patience=self.broker_wait,
            on_wait=self.on_broker_wait,
        )

    async def broker_id(self) -> str:
        """The broker's id: the same wherever it listens, new if it lost its state."""
        link = self._link()
        try:
            return await link.broker_id()
        finally:
            await link.close()

    async def session(self, name: str, token: str) -> broker_pb2.Session:
        """A session as the broker has it now, seen with a party's ``token``."""
        link = self._link()
        link.token = token
        try:
            return await link.get(name)
        finally:
            await link.close()

    def _peer_info(self, identity: Identity) -> broker_pb2.PeerInfo:
        return peer_info(identity, self.ports)

    async def offer(
        self,
        paths: Sequence[Path | str],
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        ttl: float = 600.0,
        via: Via = "auto",
        verify: VerifyWords | None = None,
        to: str | None = None,
    ) -> Outgoing:
        """Offer files and folders; the returned Outgoing carries the one-time code.

        ``to``: offer them to that user instead (needs ``device``): no code, the offer waits
        in the inbox of each of the user's devices; `Outgoing.key` (a secret: keep its
        ``secret``, mode 0600) is then what `resume_offer` needs.

        ``via``: see `Via`. With "store", `Outgoing.transfer` uploads right away (before the
        receiver even claims the code) and returns once every file is stored; its code is a
        store-and-forward code, longer, as it carries the key. ``verify``, if given, is shown
        the verification words once the receiver proved the code, and the offer goes on only
        if it says they match the receiver's (``ferry send --verify``).

        Keep `Outgoing.pake_state` (a secret) with the session to resume it after a crash.
        """
        check_via(via)
        scan = scan_sources([Path(p) for p in paths], chunk_size)
        identity = Identity.generate()
        if to is not None:
            return await self._offer_to(to, identity, scan, ttl, via)
        password, secret = Code.new_password(forwardable=via == "store")
        sender = self._peer_info(identity)
        exchange: KeyExchange | None = None
        key: SessionKey | None = None
        verifier = b""
        if secret:  # store-and-forward: the key is in the code, no PAKE
            key = forward_key(password, secret)
            verifier = claim_verifier(key)
        else:
            exchange = KeyExchange(PeerRole.SENDER, password)
            sender.pake_message = exchange.message
        link = self._link()
        try:
            request = broker_pb2.CreateOfferRequest(
                manifest=scan.manifest,
                sender=sender,
                ttl=Duration(seconds=int(ttl)),
                request_id=uuid.uuid4().hex,
                claim_verifier=verifier,
            )
            offer = functools.partial(_create_offer, request=request)
            try:
                response = await self._as_anyone(offer, link)
            except BrokerError as exc:
                # A broker that restarted after recording our first try cannot show that
                # offer's code again: nobody knows it, so it simply expires. Offer anew.
                if not (exc.retried and exc.reason == "REQUEST_ID_REUSED"):
                    raise
                request.request_id = uuid.uuid4().hex
                response = await self._as_anyone(offer, link)
            session = response.session
            if key is not None:  # nothing to wait for: confirm the key (and manifest) now
                session = await confirm_as_sender(link, session, key, identity.cert_der)
        except BaseException:
            await link.close()
            raise
        code = str(Code(response.code, password, secret))
        return Outgoing(
            link,
            session,
            code,
            scan.sources,
            identity,
            via,
            scan.stamps,
            exchange=exchange,
            key=key,
            verify=verify,
        )

    async def _offer_to(
        self,
        to: str,
        identity: Identity,
        scan: Scan,
        ttl: float,
        via: Via,
    ) -> Outgoing:
        """An offer to a person: see `ferry.client._people`."""
        signed = self._people()
        sender = self._peer_info(identity)
        link = self._link()
        try:
            for tries in (1, 2):
                recipient = await self.recipient(to)
                request, key = person_offer(
                    signed.device, recipient, scan.manifest, sender, ttl, uuid.uuid4().hex
                )
                try:
                    response = await signed.call(
                        functools.partial(_create_offer, request=request), link
                    )
                    break
                except BrokerError as exc:
                    # The envelopes missed a device enrolled (or revoked) meanwhile: ask anew.
                    if tries == 2 or exc.reason != "INVALID_ARGUMENT":
                        raise
            session = await confirm_as_sender(link, response.session, key, identity.cert_der)
        except BaseException:
            await link.close()
            raise
        return Outgoing(
            link,
            session,
            "",
            scan.sources,
            identity,
            via,
            scan.stamps,
            key=key,
        )

    async def _as_anyone(self, call: Callable[[BrokerLink], Awaitable[_T]], link: BrokerLink) -> _T:
        """A code's CreateOffer or ClaimOffer: anonymous, or, on a broker that takes codes
        from signed-in devices only (ANONYMOUS_DISABLED), again as this device if it has one.
        The call then keeps the party token it answers with, as an anonymous one does."""
        try:
            return await call(link)
        except BrokerError as exc:
            if exc.reason != "ANONYMOUS_DISABLED":
                raise
            if self.device is None:
                raise BrokerError(
                    exc.code,
                    "this broker takes codes from signed-in devices only: ferry login with"
                    " the enrollment token its operator gave you",
                    exc.reason,
                    retried=exc.retried,
                ) from None
        return await self._people().call(call, link)

    async def recipient(self, user: str) -> broker_pb2.Peer:
        """``user`` as ListPeers shows it now, its devices pinned (DeviceKeyChanged if one
        is known by other keys); FerryError if this device may not offer to it."""
        for peer in await self._people().peer_protos(user):  # only it: cheap in a big org
            if peer.user == user:
                return peer
        raise FerryError(
            f"no user {shown(user, 64)} at this broker that this device may send to "
            "(ferry peers lists them)"
        )

    async def login(self, token: str, display_name: str) -> Device:
        """Enroll this machine as a new device with the operator's one-time enrollment
        ``token``, save it (`Device.save`, mode 0600) and use it from now on. The private
        keys are made here and never leave the machine."""
        link = self._link()
        try:
            device = await enroll(link, token.strip(), display_name, self.broker)
        finally:
            await link.close()
        device.save()
        self.device = device
        self._people().pin(
            [
                broker_pb2.Device(
                    device_id=device.device_id,
                    user=device.user,
                    display_name=device.display_name,
                    signing_key=device.keys.signing_key,
                    encryption_key=device.keys.encryption_key,
                )
            ]
        )
        return device

    async def sign_in(self) -> None:
        """Sign this device in now (else the first people call does): DeviceRevoked if the
        operator revoked it."""
        await self._people().token(fresh=True)

    async def peers(self, user: str = "") -> list[Peer]:
        """The users this device may offer files to (or only ``user``, a cheap look-up in a
        large organisation), with their devices (pinned: a known device whose keys changed
        raises DeviceKeyChanged)."""
        return await self._people().peers(user)

    async def list_inbox(self) -> list[InboxOffer]:
        """The offers waiting for this device's user now, oldest first."""
        return await self._people().list_inbox()

    def inbox(self, seconds: float | None = None) -> AsyncGenerator[InboxUpdate, None]:
        """The inbox now, then after every change (an async iterator of InboxUpdate), for
        ``seconds`` (None: until the caller stops). This device is online meanwhile."""
        return self._people().inbox(seconds)

    async def take(self, name: str) -> Incoming:
        """Take an offer made to this device's user (an InboxOffer's ``name``): check it
        (the sender device's signature, expiry, its pinned key, this device's envelope),
        take it (the first device wins: BrokerError OFFER_TAKEN for the others), check it
        under its key as a claim is; then accept or decline the Incoming. Keep
        `Incoming.key` and `Incoming.token` to resume it with `resume_claim`."""
        signed = self._people()
        offered = {o.name: o for o in await signed.list_inbox()}
        seen = offered.get(name)
        key = None
        if seen is not None:
            key = open_offer(signed.device, signed, seen.session)
            self.taken_offers.check(seen.session.person.offer_signature, name)
        link = self._link()
        try:
            response = await signed.call(functools.partial(_take_offer, name=name), link)
            session = response.session
            try:
                taken_key = open_offer(signed.device, signed, session)
                self.taken_offers.check(session.person.offer_signature, name)
            except (TamperedError, TransferOver, OfferReplayed):
                await burn(link, session)
                raise
            if key is not None and key.secret != taken_key.secret:
                raise await tampered(link, session)
            person = session.person
            self.taken_offers.add(
                person.offer_signature, name, person.not_after.seconds, time.time()
            )
            session = await check_offer(link, session, taken_key)
        except BaseException:
            await link.close()
            raise
        return Incoming(
            link, session, key=taken_key, ports=self.ports, stall_timeout=self.stall_timeout
        )

    async def resume_offer(
        self,
        name: str,
        token: str,
        paths: Sequence[Path | str],
        code: str = "",
        via: Via = "auto",
        stamps: Sequence[SourceStamp] | None = None,
        pake_state: bytes = b"",
        verify: VerifyWords | None = None,
        key: bytes = b"",
    ) -> Outgoing:
        """Come back to an offer this side made earlier (after a crash or a kill).

        For an offer to a person, ``key`` (`Outgoing.key.secret` of the first run) stands
        for the code.
        ``stamps`` are `Outgoing.stamps` of the first run: with them, a file edited in place
        with its mtime put back (``touch -r``), or replaced by another, is caught too.
        ``code`` and ``pake_state`` (`Outgoing.code` and `.pake_state` of the first run) give
        back the key. Raises SourceChangedError if the files changed since they were offered
        (the session is then failed, so the receiver never mixes old and new bytes),
        TransferOver if the session ended meanwhile, TamperedError if what the broker now
        says does not check under the key.
        """
        link = self._link()
        link.token = token
        try:
            session = await link.get(name)
            if session.state in FINAL and session.state != State.STATE_COMPLETED:
                raise TransferOver(f"that transfer is over ({ended(session)})")
            why = ""
            try:
                scan = scan_sources([Path(p) for p in paths], session.manifest.chunk_size_bytes)
            except ManifestError as exc:  # gone, unreadable, a symlink now: changed as well
                why = f": {exc}"
                same = False
            else:
                same = scan.manifest.SerializeToString(
                    deterministic=True
                ) == session.manifest.SerializeToString(deterministic=True)
                if stamps is not None and list(stamps) != scan.stamps:
                    same = False
            if not same:
                reason = "the files changed since they were offered"
                if session.state == State.STATE_OFFERED:  # not accepted yet: withdraw it
                    with contextlib.suppress(BrokerError):
                        await link.cancel(name, reason)
                elif session.state != State.STATE_COMPLETED:
                    await link.report_failed(name, reason)
                raise SourceChangedError(f"{reason}{why}; send them again for a new code")
            exchange: KeyExchange | None = None
            session_key: SessionKey | None = SessionKey(key) if key else None
            if not key:
                exchange, session_key = await self._sender_key(link, session, code, pake_state)
            identity = Identity.generate()
            if session.state != State.STATE_COMPLETED:  # else: only the result is left to show
                me = sign(self._peer_info(identity), session_key, PeerRole.SENDER)
                session = await link.resume(name, me)
            if session_key is not None and not session.sender.key_confirmation:
                # A store-and-forward offer whose first run died before it confirmed.
                session = await confirm_as_sender(link, session, session_key, identity.cert_der)
        except BaseException:
            await link.close()
            raise
        return Outgoing(
            link,
            session,
            code,
            scan.sources,
            identity,
            via,
            list(stamps or scan.stamps),
            exchange=exchange,
            key=session_key,
            verify=verify,
        )

    async def _sender_key(
        self, link: BrokerLink, session: broker_pb2.Session, code: str, pake_state: bytes
    ) -> tuple[KeyExchange | None, SessionKey | None]:
        """The resumed sender's key exchange, and its key if the receiver proved it already."""
        try:
            parsed = Code.parse(code)
            if parsed.forwardable:
                return None, parsed.forward_key()
            exchange = KeyExchange.restore(PeerRole.SENDER, pake_state)
        except ValueError:
            reason = "this offer's key was not kept here; send the files again for a new code"
            await burn(link, session, reason)
            raise TransferOver(reason) from None
        if not session.sender.key_confirmation:
            return exchange, None  # the receiver's proof (if any) is checked in transfer()
        try:
            return exchange, receiver_key(exchange, session)
        except KeyMismatch:
            raise await tampered(link, session) from None

    async def claim(
        self,
        code: str,
        request_id: str = "",
        exchange: KeyExchange | None = None,
        *,
        on_words: Callable[[str], None] | None = None,
    ) -> Incoming:
        """Redeem a one-time code: see what is offered, then accept or decline.

        Only the code's nameplate goes to the broker. For a live offer this runs the PAKE
        with the sender (through the broker) and returns once the sender has proved the code
        too, and the manifest and certificate it vouched for check (TamperedError if not: a
        wrong code or someone in the middle; the code is then used up). CodeError if
        ``code`` is not shaped like one.

        Keep ``request_id`` (a random secret) and ``exchange.state()`` (`new_claim_exchange`,
        a secret) before calling: if this process dies before it sees the answer, claiming
        again with both (``KeyExchange.restore``) gets the same session, token and key.
        Without them, random ones still cover this call's own retries. Keep `Incoming.key`
        to resume later.

        ``on_words`` is given the verification words as soon as the key is known, before
        the sender is waited for: a sender that runs ``--verify`` waits for its person to
        compare them with these.
        """
        parsed = Code.parse(code)
        request_id = request_id or uuid.uuid4().hex
        link = self._link()
        try:
            if parsed.forwardable:
                key = parsed.forward_key()
                claim = functools.partial(
                    _claim_offer, parsed.nameplate, request_id, claim_verifier=claim_verifier(key)
                )
                session = (await self._as_anyone(claim, link)).session
            else:
                exchange = exchange or KeyExchange(PeerRole.RECEIVER, parsed.password)
                claim = functools.partial(
                    _claim_offer, parsed.nameplate, request_id, pake_message=exchange.message
                )
                session = (await self._as_anyone(claim, link)).session
                try:
                    key = exchange.finish(session.sender.pake_message)
                except KeyMismatch:
                    raise await tampered(link, session) from None
                if on_words is not None:
                    on_words(key.verification_words())
                if not session.sender.key_confirmation:
                    proof = key.confirmation(PeerRole.RECEIVER)
                    session = await wait_confirmed(
                        link,
                        session,
                        self.stall_timeout,
                        first=functools.partial(link.confirm_key, session.name, proof),
                    )
            session = await check_offer(link, session, key)
        except BaseException:
            await link.close()
            raise
        return Incoming(link, session, key=key, ports=self.ports, stall_timeout=self.stall_timeout)

    async def resume_claim(self, name: str, token: str, key: bytes) -> Incoming:
        """Come back to an offer this side claimed earlier, to finish receiving it.

        ``key`` is `Incoming.key.secret` of the first run."""
        session_key = SessionKey(key)
        link = self._link()
        link.token = token
        try:
            session = await link.get(name)
            if session.state not in FINAL:
                session = await check_offer(link, session, session_key)
        except BaseException:
            await link.close()
            raise
        return Incoming(
            link, session, key=session_key, ports=self.ports, stall_timeout=self.stall_timeout
        )


async def _create_offer(
    link: BrokerLink, *, request: broker_pb2.CreateOfferRequest
) -> broker_pb2.CreateOfferResponse:
    return await link.create_offer(request)


async def _claim_offer(
    nameplate: str,
    request_id: str,
    link: BrokerLink,
    *,
    pake_message: bytes = b"",
    claim_verifier: bytes = b"",
) -> broker_pb2.ClaimOfferResponse:
    return await link.claim_offer(
        nameplate, request_id, pake_message=pake_message, claim_verifier=claim_verifier
    )


async def _take_offer(link: BrokerLink, *, name: str) -> broker_pb2.TakeOfferResponse:
    return await link.take_offer(name)
