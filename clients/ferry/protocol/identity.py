"""A person's device keys and what they sign and seal, sans-I/O: the same bytes for the
client that makes them and the broker that checks them (proto: PersonOffer, EnrollDevice,
SignIn).

A device makes two key pairs once, on the device (`DeviceKeys.generate`), and never sends the
private halves anywhere:

- **Ed25519** (`signing_key`): signs its enrollment (proof that it holds the key it enrolls),
  its sign-in challenges, and every offer it makes to a person.
- **X25519** (`encryption_key`): the senders' devices seal session keys to it (libsodium's
  sealed box, `seal_key`), so only this device opens them (`DeviceKeys.open_key`).

Everything signed is a context string and fields, each prefixed with its 4-byte big-endian
length (`signed_bytes`): no two different lists of fields give the same bytes, and a
signature made for one purpose (say a sign-in) never checks for another (an offer).

What the keys make of an offer to a person: the sender's side draws a random 32-byte session
key (`ferry.protocol.pake.SessionKey`, exactly the key a code's PAKE would have given), seals
it to every device of the recipient and signs the offer (`offer_bytes`); a recipient's device
checks the signature against the sender device's key (pinned on first use by the client),
opens its envelope, and from there everything runs as with a code: the key confirms the
manifest and MACs both certificates, and seals the objects of the store path. The broker
holds public keys only: it can check the signatures, but neither make them nor open an
envelope.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox

from ferry.protocol.pake import KEY_BYTES, manifest_digest
from ferry.v1 import broker_pb2

__all__ = [
    "ENROLL",
    "OFFER",
    "PUBLIC_KEY_BYTES",
    "SEALED_KEY_BYTES",
    "SIGNATURE_BYTES",
    "SIGN_IN",
    "DeviceKeys",
    "EnvelopeError",
    "enroll_bytes",
    "fingerprint",
    "offer_bytes",
    "seal_key",
    "sign_in_bytes",
    "signed_bytes",
    "verify",
]

ENROLL = "ferry/v1 enroll"
SIGN_IN = "ferry/v1 sign-in"
OFFER = "ferry/v1 person-offer"

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
#: A sealed session key: an ephemeral X25519 public key (32), the key (32), a MAC (16).
SEALED_KEY_BYTES = 32 + KEY_BYTES + 16

_RAW = (Encoding.Raw, PublicFormat.Raw)


class EnvelopeError(ValueError):
    """A key envelope that does not open with this device's key (or is not one)."""


def signed_bytes(context: str, *fields: bytes | str) -> bytes:
    """``context`` and ``fields`` (str as UTF-8), each prefixed with its 4-byte length."""
    out = bytearray()
    for field in (context, *fields):
        data = field.encode() if isinstance(field, str) else bytes(field)
        out += struct.pack(">I", len(data)) + data
    return bytes(out)


def enroll_bytes(signing_key: bytes, encryption_key: bytes, display_name: str) -> bytes:
    """What a device signs to enroll (EnrollDeviceRequest.key_signature)."""
    return signed_bytes(ENROLL, signing_key, encryption_key, display_name)


def sign_in_bytes(broker_id: str, device_id: str, challenge: bytes) -> bytes:
    """What a device signs to sign in (SignInRequest.signature): bound to one broker."""
    return signed_bytes(SIGN_IN, broker_id, device_id, challenge)


def offer_bytes(
    sender_user: str,
    sender_device_id: str,
    recipient_user: str,
    manifest: broker_pb2.Manifest,
    not_after_s: int,
    envelopes: Sequence[broker_pb2.KeyEnvelope],
) -> bytes:
    """What the sender's device signs for an offer to a person (PersonOffer.offer_signature)."""
    fields: list[bytes | str] = [
        sender_user,
        sender_device_id,
        recipient_user,
        manifest_digest(manifest),
        str(int(not_after_s)),
    ]
    for envelope in envelopes:
        fields += [envelope.device_id, envelope.sealed_key]
    return signed_bytes(OFFER, *fields)


def verify(signing_key: bytes, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` is ``signing_key``'s Ed25519 signature of ``data``."""
    if len(signing_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(signing_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def seal_key(secret: bytes, encryption_key: bytes) -> bytes:
    """``secret`` (a session key) sealed to the device whose X25519 key is ``encryption_key``:
    only that device's private key opens it, and nobody, the sealer included, can tell to
    whom it is sealed from the bytes alone. ValueError for a key that is not 32 bytes."""
    if len(encryption_key) != PUBLIC_KEY_BYTES:
        raise ValueError("an encryption key is 32 bytes")
    return bytes(SealedBox(PublicKey(encryption_key)).encrypt(secret))


def fingerprint(signing_key: bytes, encryption_key: bytes) -> str:
    """A device's keys as people compare them: 24 base32 characters in groups of four
    (120 bits of SHA-256 over both public keys)."""
    digest = hashlib.sha256(signed_bytes("ferry/v1 fingerprint", signing_key, encryption_key))
    text = base64.b32encode(digest.digest()[:15]).decode().lower()
    return "-".join(text[i : i + 4] for i in range(0, len(text), 4))


@dataclass(frozen=True, slots=True)
class DeviceKeys:
    """A device's two private keys (secret: kept in a file of mode 0600, never sent)."""

    signing_private: bytes
    encryption_private: bytes

    @classmethod
    def generate(cls) -> DeviceKeys:
        """New random key pairs."""
        signing = Ed25519PrivateKey.generate().private_bytes_raw()
        encryption = X25519PrivateKey.generate().private_bytes_raw()
        return cls(signing, encryption)

    def __post_init__(self) -> None:
        if len(self.signing_private) != 32 or len(self.encryption_private) != 32:
            raise ValueError("a device's private keys are 32 bytes each")

    def __repr__(self) -> str:  # never print the private keys
        return f"DeviceKeys({fingerprint(self.signing_key, self.encryption_key)})"

    @property
    def signing_key(self) -> bytes:
        """The Ed25519 public key."""
        private = Ed25519PrivateKey.from_private_bytes(self.signing_private)
        return private.public_key().public_bytes(*_RAW)

    @property
    def encryption_key(self) -> bytes:
        """The X25519 public key."""
        private = X25519PrivateKey.from_private_bytes(self.encryption_private)
        return private.public_key().public_bytes(*_RAW)

    @property
    def fingerprint(self) -> str:
        """This device's `fingerprint`."""
        return fingerprint(self.signing_key, self.encryption_key)

    def sign(self, data: bytes) -> bytes:
        """The Ed25519 signature of ``data``."""
        return Ed25519PrivateKey.from_private_bytes(self.signing_private).sign(data)

    def open_key(self, sealed: bytes) -> bytes:
        """The session key in an envelope sealed to this device; EnvelopeError if it does not
        open (sealed to another device, or changed on the way)."""
        if len(sealed) != SEALED_KEY_BYTES:
            raise EnvelopeError("a key envelope is 80 bytes")
        try:
            return bytes(SealedBox(PrivateKey(self.encryption_private)).decrypt(sealed))
        except CryptoError:
            raise EnvelopeError("the key envelope does not open with this device's key") from None
