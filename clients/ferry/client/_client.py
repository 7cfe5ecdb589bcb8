"""The async client library: offer files, claim a code, accept or decline, transfer.

This is the whole flow of one transfer, written once for programs and the CLI alike::

    sender                      broker                      receiver
    offer() ---CreateOffer--->  code                        claim(code) ---ClaimOffer-->
    transfer(): WatchSession    <---AcceptOffer(plan)---    accept(dest)
      listen on leased port     <----------- TLS, pinned certificates ----------- dial
      serve chunk requests      <------ ReportProgress (CONNECTING..COMPLETED) -- verify, write

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
from ferry.client._outgoing import Outgoing
from ferry.client._session import (
    FINAL,
    State,
    ended,
)
from ferry.client._tls import Identity
from ferry.files import (
    SourceStamp,
    scan_sources,
)
from ferry.v1 import broker_pb2

__all__ = ["Client"]


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
    ) -> None:
        """``broker``: its ``host:port``, or a `LinkFactory` that makes each new link (such
        as `ferry.client.testing.InProcessBroker`). ``timeout`` bounds each broker call;
        ``broker_wait`` is how long, in all, a call keeps trying a broker that is down,
        restarting or too slow (``on_broker_wait`` hears when one starts waiting)."""
        #: The broker's address, or the name of the link factory, for messages.
        self.broker: str
        self._links: LinkFactory
        if isinstance(broker, str):
            self.broker, self._links = broker, functools.partial(BrokerLink, broker)
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
    ) -> Outgoing:
        """Offer files and folders; the returned Outgoing carries the one-time code.

        ``via``: see `Via`. With "store", `Outgoing.transfer` uploads right away (before the
        receiver even claims the code) and returns once every file is stored.
        """
        check_via(via)
        scan = scan_sources([Path(p) for p in paths], chunk_size)
        identity = Identity.generate()
        link = self._link()
        try:
            request = broker_pb2.CreateOfferRequest(
                manifest=scan.manifest,
                sender=self._peer_info(identity),
                ttl=Duration(seconds=int(ttl)),
                request_id=uuid.uuid4().hex,
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
        except BaseException:
            await link.close()
            raise
        return Outgoing(
            link, response.session, response.code, scan.sources, identity, via, scan.stamps
        )

    async def resume_offer(
        self,
        name: str,
        token: str,
        paths: Sequence[Path | str],
        code: str = "",
        via: Via = "auto",
        stamps: Sequence[SourceStamp] | None = None,
    ) -> Outgoing:
        """Come back to an offer this side made earlier (after a crash or a kill).

        ``stamps`` are `Outgoing.stamps` of the first run: with them, a file edited in place
        with its mtime put back (``touch -r``), or replaced by another, is caught too.
        Raises SourceChangedError if the files changed since they were offered (the session
        is then failed, so the receiver never mixes old and new bytes), TransferOver if the
        session ended meanwhile.
        """
        link = self._link()
        link.token = token
        try:
            session = await link.get(name)
            if session.state in FINAL and session.state != State.STATE_COMPLETED:
                raise TransferOver(f"that transfer is over ({ended(session)})")
            scan = scan_sources([Path(p) for p in paths], session.manifest.chunk_size_bytes)
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
                raise SourceChangedError(f"{reason}; send them again for a new code")
            identity = Identity.generate()
            if session.state != State.STATE_COMPLETED:  # else: only the result is left to show
                session = await link.resume(name, self._peer_info(identity))
        except BaseException:
            await link.close()
            raise
        return Outgoing(
            link, session, code, scan.sources, identity, via, list(stamps or scan.stamps)
        )

    async def claim(self, code: str, request_id: str = "") -> Incoming:
        """Redeem a one-time code: see what is offered, then accept or decline.

        Keep ``request_id`` (a random secret) before calling: if this process dies before it
        sees the answer, claiming again with the same id gets the same session and token.
        Without one, a random one still covers this call's own retries.
        """
        request_id = request_id or uuid.uuid4().hex
        link = self._link()
        try:
            response = await link.claim_offer(code, request_id)
        except BaseException:
            await link.close()
            raise
        return Incoming(link, response.session, ports=self.ports, stall_timeout=self.stall_timeout)

    async def resume_claim(self, name: str, token: str) -> Incoming:
        """Come back to an offer this side claimed earlier, to finish receiving it."""
        link = self._link()
        link.token = token
        try:
            session = await link.get(name)
        except BaseException:
            await link.close()
            raise
        return Incoming(link, session, ports=self.ports, stall_timeout=self.stall_timeout)
