"""Placeholder PAKE traffic for broker tests that only need a claimed, confirmed session.

The broker relays SPAKE2 messages and key confirmations without being able to check them
(see ferry.broker.core), so tests of everything else can post fixed bytes of the right sizes:
the sender's offer carries `SENDER_PAKE`, the claim `RECEIVER_PAKE`, then the receiver and
the sender confirm, in that order (`confirm_keys`). After that the receiver sees the offer
and may accept it. Each helper has an in-process `Broker` flavour and a gRPC stub one
(``..._rpc``).

A store-and-forward offer has no PAKE: its request carries `CLAIM_VERIFIER` instead
(`store_and_forward`), its sender may confirm at once, and its claim presents the verifier.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ferry.v1 import broker_pb2

if TYPE_CHECKING:
    from ferry.broker.core import Broker
    from ferry.v1.broker_pb2_grpc import BrokerServiceAsyncStub

__all__ = [
    "CLAIM_VERIFIER",
    "RECEIVER_CONFIRMATION",
    "RECEIVER_PAKE",
    "SENDER_CERTIFICATE_MAC",
    "SENDER_CONFIRMATION",
    "SENDER_PAKE",
    "FakeClock",
    "auth",
    "claim_confirmed",
    "claim_confirmed_rpc",
    "confirm_keys",
    "confirm_keys_rpc",
    "offer_request",
    "pake_sender",
    "receiver_peer",
    "store_and_forward",
]

#: A SPAKE2 message is 33 bytes (a side byte and an Ed25519 point); these are not points.
SENDER_PAKE = b"\x41" + bytes(range(32))
RECEIVER_PAKE = b"\x42" + bytes(range(32, 64))
#: HMAC-SHA256 values are 32 bytes.
RECEIVER_CONFIRMATION = b"r" * 32
SENDER_CONFIRMATION = b"s" * 32
SENDER_CERTIFICATE_MAC = b"m" * 32
#: A store-and-forward offer's claim verifier (32 bytes, derived from the code's secret).
CLAIM_VERIFIER = b"v" * 32

_T = 5.0  # deadline of every call, seconds


def auth(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries a party token."""
    return (("authorization", f"Bearer {token}"),)


def pake_sender(peer: broker_pb2.PeerInfo) -> broker_pb2.PeerInfo:
    """``peer`` (changed in place) with the placeholder SPAKE2 message of a live offer."""
    peer.pake_message = SENDER_PAKE
    return peer


class FakeClock:
    """A broker clock that tests move by hand (seconds since the epoch, from 2023-11-14)."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def offer_request(request_id: str = "", last_port: int = 9100) -> broker_pb2.CreateOfferRequest:
    """A live offer of one 1-byte file, the sender's ports 9000..`last_port`."""
    return broker_pb2.CreateOfferRequest(
        manifest=broker_pb2.Manifest(
            files=[broker_pb2.FileEntry(path="a.txt", size_bytes=1)], chunk_size_bytes=1 << 20
        ),
        sender=pake_sender(
            broker_pb2.PeerInfo(
                allowed_ports=broker_pb2.PortRange(first_port=9000, last_port=last_port),
                certificate_der=b"cert",
            )
        ),
        request_id=request_id,
    )


def receiver_peer() -> broker_pb2.PeerInfo:
    """A receiver's connection details for AcceptOffer."""
    return broker_pb2.PeerInfo(
        allowed_ports=broker_pb2.PortRange(first_port=1, last_port=2), certificate_der=b"c"
    )


def store_and_forward(request: broker_pb2.CreateOfferRequest) -> broker_pb2.CreateOfferRequest:
    """``request`` (changed in place) as a store-and-forward offer: `CLAIM_VERIFIER`, no PAKE."""
    request.sender.ClearField("pake_message")
    request.claim_verifier = CLAIM_VERIFIER
    return request


# -- in-process Broker ------------------------------------------------------------------------


async def confirm_keys(
    broker: Broker, name: str, sender_token: str, receiver_token: str
) -> broker_pb2.Session:
    """Post the receiver's, then the sender's placeholder confirmation; the sender's view."""
    await broker.confirm_key(name, receiver_token, RECEIVER_CONFIRMATION, b"")
    return await broker.confirm_key(name, sender_token, SENDER_CONFIRMATION, SENDER_CERTIFICATE_MAC)


async def claim_confirmed(
    broker: Broker,
    offer: broker_pb2.CreateOfferResponse,
    peer_ip: str | None = None,
    request_id: str = "",
) -> broker_pb2.ClaimOfferResponse:
    """Claim ``offer`` with a placeholder PAKE message and confirm both keys.

    The response's session is the receiver's view after the confirmations (the whole offer),
    as a claim showed it before codes were PAKE-bound.
    """
    claim = await broker.claim_offer(offer.code, peer_ip, request_id, pake_message=RECEIVER_PAKE)
    name = offer.session.name
    await confirm_keys(broker, name, offer.party_token, claim.party_token)
    claim.session.CopyFrom(await broker.get(name, claim.party_token))
    return claim


# -- gRPC stub --------------------------------------------------------------------------------


async def confirm_keys_rpc(
    stub: BrokerServiceAsyncStub, name: str, sender_token: str, receiver_token: str
) -> broker_pb2.Session:
    """`confirm_keys` through a BrokerService stub."""
    await stub.ConfirmKey(
        broker_pb2.ConfirmKeyRequest(name=name, key_confirmation=RECEIVER_CONFIRMATION),
        metadata=auth(receiver_token),
        timeout=_T,
    )
    response = await stub.ConfirmKey(
        broker_pb2.ConfirmKeyRequest(
            name=name,
            key_confirmation=SENDER_CONFIRMATION,
            certificate_mac=SENDER_CERTIFICATE_MAC,
        ),
        metadata=auth(sender_token),
        timeout=_T,
    )
    return response.session


async def claim_confirmed_rpc(
    stub: BrokerServiceAsyncStub, offer: broker_pb2.CreateOfferResponse, request_id: str = ""
) -> broker_pb2.ClaimOfferResponse:
    """`claim_confirmed` through a BrokerService stub."""
    claim = await stub.ClaimOffer(
        broker_pb2.ClaimOfferRequest(
            code=offer.code, request_id=request_id, pake_message=RECEIVER_PAKE
        ),
        timeout=_T,
    )
    name = offer.session.name
    await confirm_keys_rpc(stub, name, offer.party_token, claim.party_token)
    got = await stub.GetSession(
        broker_pb2.GetSessionRequest(name=name), metadata=auth(claim.party_token), timeout=_T
    )
    claim.session.CopyFrom(got.session)
    return claim
