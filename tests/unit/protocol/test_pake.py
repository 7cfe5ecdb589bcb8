"""The code and its key (ferry.protocol.pake): split codes, SPAKE2, and the MACs under the key."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from spake2 import SPAKE2_A, SPAKE2_B  # type: ignore[import-untyped]
from spake2.parameters.ed25519 import ParamsEd25519  # type: ignore[import-untyped]

from ferry.errors import FerryError
from ferry.protocol import pake
from ferry.protocol.pake import (
    TAMPERED,
    Code,
    CodeError,
    KeyExchange,
    KeyMismatch,
    PeerRole,
    SessionKey,
    manifest_digest,
)
from ferry.protocol.words import WORDS
from ferry.v1 import broker_pb2

pytestmark = pytest.mark.timeout(60)


def _pair(sender_password: str, receiver_password: str) -> tuple[SessionKey, SessionKey]:
    sender = KeyExchange(PeerRole.SENDER, sender_password)
    receiver = KeyExchange(PeerRole.RECEIVER, receiver_password)
    return sender.finish(receiver.message), receiver.finish(sender.message)


def _manifest() -> broker_pb2.Manifest:
    return broker_pb2.Manifest(
        chunk_size_bytes=1 << 20,
        files=[
            broker_pb2.FileEntry(
                path="a/b.txt", size_bytes=5, mode=0o644, modify_time=Timestamp(seconds=7, nanos=9)
            )
        ],
    )


# -- codes ---------------------------------------------------------------------------------


def test_a_code_splits_into_nameplate_and_password() -> None:
    code = Code.parse("  007 Orbit_lantern  QUIET ")
    assert code == Code("7-orbit", "lantern-quiet")
    assert str(code) == "7-orbit-lantern-quiet"
    assert not code.forwardable


def test_a_store_and_forward_code_carries_a_long_secret() -> None:
    password, secret = Code.new_password(forwardable=True)
    code = Code("12-acorn", password, secret)
    assert len(secret) == pake.SECRET_CHARS
    assert Code.parse(str(code)) == code
    assert code.forwardable
    # The same key from the code alone, and a verifier that is not the key.
    assert code.forward_key().secret == Code.parse(str(code)).forward_key().secret
    assert pake.claim_verifier(code.forward_key()) != code.forward_key().secret
    other = Code("12-acorn", password, Code.new_password(forwardable=True)[1])
    assert other.forward_key().secret != code.forward_key().secret


@pytest.mark.parametrize(
    "bad",
    ["", "orbit-lantern-quiet", "7-orbit-lantern", "0-a-b-c", "7-a-b-c-d", "7-a-b-1", "x-a-b-c",
     "¹-orbit-lantern-quiet", "٣-orbit-lantern-quiet"],
)  # fmt: skip
def test_malformed_codes_are_refused(bad: str) -> None:
    with pytest.raises(CodeError, match="not a Ferry code"):
        Code.parse(bad)
    assert issubclass(CodeError, FerryError)


def test_fresh_passwords_are_random_words() -> None:
    passwords = {Code.new_password()[0] for _ in range(300)}
    assert len(passwords) > 290
    for password in passwords:
        words = password.split("-")
        assert len(words) == pake.PASSWORD_WORDS
        assert all(w in WORDS for w in words)
    assert Code.new_password()[1] == ""


def test_the_stated_entropy() -> None:
    assert math.log2(len(WORDS) ** pake.PASSWORD_WORDS) > 19
    assert pake.SECRET_CHARS * 5 + math.log2(len(WORDS) ** pake.PASSWORD_WORDS) >= 128


# -- the exchange --------------------------------------------------------------------------


def test_the_same_password_gives_both_sides_the_same_key() -> None:
    sender, receiver = _pair("lantern-quiet", "lantern-quiet")
    assert sender.secret == receiver.secret
    assert len(sender.secret) == 32
    assert sender.verification_words() == receiver.verification_words()
    assert sender.store_key == receiver.store_key != sender.secret


def test_a_wrong_password_gives_another_key_and_every_check_fails() -> None:
    sender, receiver = _pair("lantern-quiet", "lantern-quilt")
    assert sender.secret != receiver.secret
    with pytest.raises(KeyMismatch, match=TAMPERED):
        sender.check_confirmation(PeerRole.RECEIVER, receiver.confirmation(PeerRole.RECEIVER))
    with pytest.raises(KeyMismatch):
        receiver.check_certificate(
            PeerRole.SENDER, b"cert", sender.certificate_mac(PeerRole.SENDER, b"cert")
        )
    assert sender.verification_words() != receiver.verification_words()


def test_a_saved_exchange_finishes_after_a_restart() -> None:
    sender = KeyExchange(PeerRole.SENDER, "lantern-quiet")
    receiver = KeyExchange(PeerRole.RECEIVER, "lantern-quiet")
    restored = KeyExchange.restore(PeerRole.SENDER, sender.state())
    assert restored.message == sender.message
    assert restored.finish(receiver.message).secret == receiver.finish(sender.message).secret
    with pytest.raises(ValueError, match="not a saved key exchange"):
        KeyExchange.restore(PeerRole.RECEIVER, sender.state())
    with pytest.raises(ValueError, match="not a saved key exchange"):
        KeyExchange.restore(PeerRole.SENDER, b"garbage")


@pytest.mark.parametrize("message", [b"", b"\x00" * 33, b"B" + b"\x01" * 32, b"A" * 200])
def test_garbage_or_reflected_messages_are_a_mismatch(message: bytes) -> None:
    sender = KeyExchange(PeerRole.SENDER, "lantern-quiet")
    with pytest.raises(KeyMismatch):
        sender.finish(message)


def test_a_reflected_message_is_a_mismatch() -> None:
    sender = KeyExchange(PeerRole.SENDER, "lantern-quiet")
    with pytest.raises(KeyMismatch):
        KeyExchange.restore(PeerRole.SENDER, sender.state()).finish(sender.message)
    # the same point with the other side's byte is still our own message
    with pytest.raises(KeyMismatch):
        sender.finish(b"B" + sender.message[1:])


def test_an_exchange_finishes_once() -> None:
    sender = KeyExchange(PeerRole.SENDER, "lantern-quiet")
    receiver = KeyExchange(PeerRole.RECEIVER, "lantern-quiet")
    sender.finish(receiver.message)
    with pytest.raises(KeyMismatch):
        sender.finish(receiver.message)


# -- the same SPAKE2 as the spake2 package (magic-wormhole's), message for message ---------


def _entropy(seed: int) -> Callable[[int], bytes]:
    return lambda n: hashlib.sha256(seed.to_bytes(4, "big")).digest() * (n // 32)


def test_m_and_n_are_the_spake2_packages() -> None:
    assert ParamsEd25519.M.to_bytes() == pake._M
    assert ParamsEd25519.N.to_bytes() == pake._N


@pytest.mark.parametrize("seed", range(8))
def test_messages_and_keys_are_the_spake2_packages(seed: int) -> None:
    password = Code.new_password()[0]
    ids = {"idA": b"ferry-sender", "idB": b"ferry-receiver"}
    ours_a = KeyExchange(PeerRole.SENDER, password, entropy=_entropy(seed))
    theirs_a = SPAKE2_A(password.encode(), entropy_f=_entropy(seed), **ids)
    assert ours_a.message == theirs_a.start()  # the same scalar gives the same message
    ours_b = KeyExchange(PeerRole.RECEIVER, password, entropy=_entropy(seed + 100))
    theirs_b = SPAKE2_B(password.encode(), entropy_f=_entropy(seed + 100), **ids)
    assert ours_b.message == theirs_b.start()
    # Ours against theirs, both ways: the raw SPAKE2 key, then our HKDF over it.
    raw_a = theirs_a.finish(ours_b.message)
    raw_b = theirs_b.finish(ours_a.message)
    assert raw_a == raw_b
    assert ours_a.finish(ours_b.message).secret == pake._hkdf(raw_a, b"ferry/v1 session")
    assert ours_b.finish(ours_a.message).secret == pake._hkdf(raw_b, b"ferry/v1 session")


# -- what the key vouches for --------------------------------------------------------------


def test_confirmations_are_bound_to_role_and_manifest() -> None:
    key, _ = _pair("a-b", "a-b")
    manifest = _manifest()
    proof = key.confirmation(PeerRole.SENDER, manifest)
    key.check_confirmation(PeerRole.SENDER, proof, manifest)
    changed = broker_pb2.Manifest()
    changed.CopyFrom(manifest)
    changed.files[0].path = "a/evil.sh"
    with pytest.raises(KeyMismatch):
        key.check_confirmation(PeerRole.SENDER, proof, changed)
    with pytest.raises(KeyMismatch):
        key.check_confirmation(PeerRole.RECEIVER, proof)
    with pytest.raises(ValueError, match="covers the manifest"):
        key.confirmation(PeerRole.SENDER)


def test_certificate_macs_are_bound_to_role_and_certificate() -> None:
    key, _ = _pair("a-b", "a-b")
    mac = key.certificate_mac(PeerRole.RECEIVER, b"cert-1")
    key.check_certificate(PeerRole.RECEIVER, b"cert-1", mac)
    for role, cert in [(PeerRole.SENDER, b"cert-1"), (PeerRole.RECEIVER, b"cert-2")]:
        with pytest.raises(KeyMismatch):
            key.check_certificate(role, cert, mac)
    with pytest.raises(KeyMismatch):
        key.check_certificate(PeerRole.RECEIVER, b"", key.certificate_mac(PeerRole.RECEIVER, b""))


@pytest.mark.parametrize(
    "change",
    [
        lambda m: setattr(m, "chunk_size_bytes", 2 << 20),
        lambda m: setattr(m.files[0], "path", "a/c.txt"),
        lambda m: setattr(m.files[0], "size_bytes", 6),
        lambda m: setattr(m.files[0], "mode", 0o755),
        lambda m: setattr(m.files[0].modify_time, "seconds", 8),
        lambda m: setattr(m.files[0].modify_time, "nanos", 10),
        lambda m: m.files.add(path="x", size_bytes=0),
    ],
)
def test_the_manifest_digest_covers_every_field(change: object) -> None:
    manifest = _manifest()
    before = manifest_digest(manifest)
    assert manifest_digest(_manifest()) == before  # canonical: the same manifest, the same
    change(manifest)  # type: ignore[operator]
    assert manifest_digest(manifest) != before


def test_a_session_key_is_32_bytes() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        SessionKey(b"short")
