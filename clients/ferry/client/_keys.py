"""The library's side of the code's key (`ferry.protocol.pake`): running the PAKE through
the broker and checking, under the key, everything the broker relays before it is trusted.

Order of a live offer (S sender, R receiver, B broker; every arrow through B)::

    S: CreateOffer(pake S)          -> nameplate; S prints nameplate-password
    R: ClaimOffer(nameplate, pake R) -> pake S;   R: key = finish(pake S)
    R: ConfirmKey(proof R)
    S: key = finish(pake R); check proof R  (else: cancel with TAMPERED, the code is burned)
    S: ConfirmKey(proof S over the manifest, MAC of S's certificate)
    R: sees the offer; checks proof S and the certificate MAC (else: cancel, TAMPERED)
    R: AcceptOffer(MAC of R's certificate); S checks it before serving; every resume sends
       a new certificate with a new MAC, which the other side checks the same way.

A store-and-forward offer skips the PAKE: its key is in the code, the sender confirms at once,
and the claim presents the verifier. A check that fails ends the session on the broker with
the reason `TAMPERED` (`burn`), so both people read the same sentence, and raises
TamperedError.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable

from ferry.client._broker import BrokerError, BrokerLink
from ferry.client._errors import Stalled, TamperedError, TransferOver
from ferry.client._session import FINAL, State, ended, watch
from ferry.protocol.pake import TAMPERED, KeyExchange, KeyMismatch, PeerRole, SessionKey
from ferry.v1 import broker_pb2

__all__ = [
    "VerifyWords",
    "burn",
    "check_certificate",
    "check_offer",
    "confirm_as_sender",
    "over",
    "receiver_key",
    "sign",
    "tampered",
    "wait_confirmed",
]

#: Shows people the verification words and says whether they match the other side's.
VerifyWords = Callable[[str], Awaitable[bool]]


async def burn(link: BrokerLink, session: broker_pb2.Session, reason: str = TAMPERED) -> None:
    """End the session on the broker because a check failed (best effort): the code is
    used up and the other side reads ``reason``."""
    with contextlib.suppress(BrokerError):
        if session.state == State.STATE_OFFERED:
            await link.cancel(session.name, reason)
        else:
            await link.report_failed(session.name, reason)


async def tampered(link: BrokerLink, session: broker_pb2.Session) -> TamperedError:
    """Burn ``session`` because a check under the key failed; the error to raise."""
    await burn(link, session)
    return TamperedError(TAMPERED)


def receiver_key(exchange: KeyExchange, session: broker_pb2.Session) -> SessionKey:
    """The sender's key from the receiver's PAKE message in ``session``, once the receiver's
    proof of it checks (KeyMismatch if either fails)."""
    key = exchange.finish(session.receiver.pake_message)
    key.check_confirmation(PeerRole.RECEIVER, session.receiver.key_confirmation)
    return key


async def confirm_as_sender(
    link: BrokerLink, session: broker_pb2.Session, key: SessionKey, certificate_der: bytes
) -> broker_pb2.Session:
    """ConfirmKey for the sender: its proof of the key over ``session``'s manifest, and the
    MAC of the certificate it now uses."""
    return await link.confirm_key(
        session.name,
        key.confirmation(PeerRole.SENDER, session.manifest),
        key.certificate_mac(PeerRole.SENDER, certificate_der),
    )


def sign(me: broker_pb2.PeerInfo, key: SessionKey | None, role: PeerRole) -> broker_pb2.PeerInfo:
    """``me`` with the MAC that vouches for its certificate (when the key is known)."""
    if key is not None:
        me.certificate_mac = key.certificate_mac(role, me.certificate_der)
    return me


async def check_certificate(
    link: BrokerLink, session: broker_pb2.Session, key: SessionKey, role: PeerRole
) -> bytes:
    """The certificate of ``role`` (the other side) that ``session`` carries, once its MAC
    checks under ``key``; else the session is burned and TamperedError raised."""
    peer = session.sender if role is PeerRole.SENDER else session.receiver
    try:
        key.check_certificate(role, peer.certificate_der, peer.certificate_mac)
    except KeyMismatch:
        raise await tampered(link, session) from None
    return peer.certificate_der


def over(session: broker_pb2.Session) -> TransferOver:
    """The error for a session that ended: TamperedError if the other side burned it."""
    if session.failure_reason == TAMPERED:
        return TamperedError(TAMPERED)
    return TransferOver(ended(session))


async def wait_confirmed(
    link: BrokerLink,
    session: broker_pb2.Session,
    patience: float,
    first: Callable[[], Awaitable[object]] | None = None,
) -> broker_pb2.Session:
    """The receiver's view of ``session`` once the sender has confirmed the key (which shows
    the offer), or TransferOver / TamperedError if it ends first, or Stalled after
    ``patience`` seconds (a sender that is gone: the claim can be repeated later).

    ``first`` (the receiver's own ConfirmKey) runs once the watch is open, so that the
    sender's answer cannot come between the two and no round trip waits for another."""
    remaining = session.expire_time.ToDatetime().timestamp() - time.time() + 5
    async for current in watch(link, session.name, max(min(remaining, patience), 1.0)):
        if current.sender.key_confirmation:
            return current
        if current.state in FINAL:
            raise over(current)
        if first is not None:
            await first()
            first = None
    raise Stalled(
        f"the sender did not answer the claim within {patience:g} s (is it still running?); "
        "run the same command again to wait for it again"
    )


async def check_offer(
    link: BrokerLink, session: broker_pb2.Session, key: SessionKey
) -> broker_pb2.Session:
    """Check the sender's proof (which covers the manifest) and certificate MAC in the
    receiver's view of ``session``; burn it and raise TamperedError if either fails."""
    try:
        key.check_confirmation(PeerRole.SENDER, session.sender.key_confirmation, session.manifest)
    except KeyMismatch:
        raise await tampered(link, session) from None
    await check_certificate(link, session, key, PeerRole.SENDER)
    return session
