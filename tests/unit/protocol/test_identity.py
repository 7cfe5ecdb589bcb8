"""Device keys, signatures and key envelopes (ferry.protocol.identity), sans-I/O."""

from __future__ import annotations

import secrets

import pytest
from nacl.public import PrivateKey

from ferry.protocol import identity
from ferry.protocol.identity import DeviceKeys, EnvelopeError
from ferry.v1 import broker_pb2


def _manifest(size: int = 5) -> broker_pb2.Manifest:
    return broker_pb2.Manifest(
        files=[broker_pb2.FileEntry(path="a.bin", size_bytes=size)], chunk_size_bytes=1 << 20
    )


def test_the_public_keys_are_what_libsodium_derives_from_the_private_ones() -> None:
    keys = DeviceKeys.generate()
    assert bytes(PrivateKey(keys.encryption_private).public_key) == keys.encryption_key
    assert len(keys.signing_key) == len(keys.encryption_key) == 32
    assert keys.signing_private.hex() not in repr(keys)
    assert keys.encryption_private.hex() not in repr(keys)


def test_a_sealed_key_opens_only_on_its_device_and_unchanged() -> None:
    alice, bob = DeviceKeys.generate(), DeviceKeys.generate()
    secret = secrets.token_bytes(32)
    sealed = identity.seal_key(secret, alice.encryption_key)
    assert len(sealed) == identity.SEALED_KEY_BYTES
    assert alice.open_key(sealed) == secret
    assert identity.seal_key(secret, alice.encryption_key) != sealed  # fresh ephemeral key
    with pytest.raises(EnvelopeError):
        bob.open_key(sealed)
    flipped = bytes([sealed[0], sealed[1] ^ 1, *sealed[2:]])
    with pytest.raises(EnvelopeError):
        alice.open_key(flipped)
    with pytest.raises(EnvelopeError):
        alice.open_key(sealed[:-1])
    with pytest.raises(ValueError, match="32 bytes"):
        identity.seal_key(secret, b"short")


def test_signed_bytes_are_unambiguous() -> None:
    assert identity.signed_bytes("c", "ab", "c") != identity.signed_bytes("c", "a", "bc")
    assert identity.signed_bytes("c", b"") != identity.signed_bytes("c")
    assert identity.signed_bytes("x", "a") != identity.signed_bytes("y", "a")


def test_an_offer_signature_covers_every_field_and_checks_for_its_purpose_only() -> None:
    sender = DeviceKeys.generate()
    envelopes = [broker_pb2.KeyEnvelope(device_id="d1", sealed_key=b"k" * 80)]
    args = ("bob", "dev-b", "alice", _manifest(), 1_900_000_000, envelopes)
    signature = sender.sign(identity.offer_bytes(*args))
    assert identity.verify(sender.signing_key, signature, identity.offer_bytes(*args))
    changed = [
        ("eve", *args[1:]),
        (*args[:2], "mallory", *args[3:]),
        (*args[:3], _manifest(6), *args[4:]),
        (*args[:4], 1_900_000_001, args[5]),
        (*args[:5], [broker_pb2.KeyEnvelope(device_id="d2", sealed_key=b"k" * 80)]),
    ]
    for other in changed:
        assert not identity.verify(sender.signing_key, signature, identity.offer_bytes(*other))
    assert not identity.verify(
        DeviceKeys.generate().signing_key, signature, identity.offer_bytes(*args)
    )
    # a sign-in signature is no offer signature, and the reverse
    sign_in = sender.sign(identity.sign_in_bytes("broker", "dev-b", b"challenge"))
    assert not identity.verify(sender.signing_key, sign_in, identity.offer_bytes(*args))
    assert not identity.verify(sender.signing_key, b"short", b"data")
    assert not identity.verify(b"short", signature, b"data")


def test_fingerprints_differ_per_device_and_read_in_groups() -> None:
    a, b = DeviceKeys.generate(), DeviceKeys.generate()
    assert a.fingerprint != b.fingerprint
    groups = a.fingerprint.split("-")
    assert len(groups) == 6
    assert all(len(g) == 4 for g in groups)
    assert identity.fingerprint(a.signing_key, b.encryption_key) not in (
        a.fingerprint,
        b.fingerprint,
    )
