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
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from google.protobuf.duration_pb2 import Duration

from ferry.client._broker import DEFAULT_PATIENCE, BrokerError, BrokerLink, LinkFactory
from ferry.client._candidates import peer_info
from ferry.client._channel import ChannelTLS, parse_broker_address
from ferry.client._errors import (
    SourceChangedError,
    TransferOver,
)
from ferry.client._events import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_PORTS,
    DEFAULT_STALL_TIMEOUT,
    Via,
    check_via,
)
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
from ferry.client._session import (
    FINAL,
    State,
    ended,
)
from ferry.client._tls import Identity
from ferry.files import (
    ManifestError,
    SourceStamp,
    scan_sources,
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
        These settings do not apply to a `LinkFactory`."""
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
    ) -> Outgoing:
        """Offer files and folders; the returned Outgoing carries the one-time code.

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
            try:
                response = await link.create_offer(request)
            except BrokerError as exc:
                # A broker that restarted after recording our first try cannot show that
                # offer's code again: nobody knows it, so it simply expires. Offer anew.
                if not (exc.retried and exc.reason == "REQUEST_ID_REUSED"):
                    raise
                request.request_id = uuid.uuid4().hex
                response = await link.create_offer(request)
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
    ) -> Outgoing:
        """Come back to an offer this side made earlier (after a crash or a kill).

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
            exchange, key = await self._sender_key(link, session, code, pake_state)
            identity = Identity.generate()
            if session.state != State.STATE_COMPLETED:  # else: only the result is left to show
                me = sign(self._peer_info(identity), key, PeerRole.SENDER)
                session = await link.resume(name, me)
            if key is not None and not session.sender.key_confirmation:
                # A store-and-forward offer whose first run died before it confirmed.
                session = await confirm_as_sender(link, session, key, identity.cert_der)
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
            key=key,
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
                response = await link.claim_offer(
                    parsed.nameplate, request_id, claim_verifier=claim_verifier(key)
                )
                session = response.session
            else:
                exchange = exchange or KeyExchange(PeerRole.RECEIVER, parsed.password)
                response = await link.claim_offer(
                    parsed.nameplate, request_id, pake_message=exchange.message
                )
                session = response.session
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
