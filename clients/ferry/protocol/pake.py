"""The code and what it proves, sans-I/O: split codes, SPAKE2 between the peers, and the
key that confirms everything the broker relays.

A code has two parts, and the broker only ever sees the first::

    7-orbit  -  lantern-quiet                    a code for a live transfer
    \\_____/     \\___________/
    nameplate   password                         2 words, made by the sender, never sent

    7-orbit  -  lantern-quiet-kq4zv7xw2mb5ndtr6hsyca   a store-and-forward code
                              \\____________________/
                              secret: 22 base32 characters, never sent

The broker allocates the **nameplate** (a number and a word) and finds the offer by it. The
**password** is the password of a SPAKE2 exchange between the two peers (`KeyExchange`); the
broker relays the two SPAKE2 messages, which tell it nothing, and never learns the key. Each
side then proves it holds the same key (`SessionKey.confirmation`) and vouches for its
certificate with a MAC under it (`SessionKey.certificate_mac`), so neither the broker nor
anyone on its links can swap a certificate, read the manifest before the receiver proved the
code, or pass for either peer. A wrong password, a swapped SPAKE2 message and a swapped
certificate all look the same: a MAC that does not check (`KeyMismatch`).

A store-and-forward code (the sender uploads and leaves before anyone claims) cannot use a
PAKE: nobody is there to answer. Its key comes from the code itself, so the code carries a
secret long enough that no offline search can find it: the broker keeps only a claim
verifier derived from it (`Code.claim_verifier`), and the bucket only ciphertext.

Entropy and guessing
--------------------
With N = len(WORDS) = 748 words: a nameplate has 999 * N ~ 2**19.5 values, a password
N**2 ~ 2**19.1. A PAKE gives an attacker one online guess per code: the claim burns the offer
whatever the guess, so a guess succeeds with probability 2**-19.1, about 1 in 560,000, and a
failed one is seen by both people (the transfer fails with the tampering message). Nothing the
broker stores or relays allows an offline guess. A store-and-forward code adds 22 base32
characters (110 bits): 129 bits in all, beyond any offline search of the verifier or of the
sealed objects.

SPAKE2 here is the `spake2` package's (the one magic-wormhole uses), message for message and
key for key: the Ed25519 group, its M and N, its password-to-scalar and transcript, identities
``ferry-sender`` (side A) and ``ferry-receiver`` (side B). The group arithmetic is libsodium's
(PyNaCl's bindings) rather than that package's pure Python, which costs ~35 ms to import and
~8 ms per side and step on this machine kind: too much for a 1 KiB transfer's 30 ms budget.
The tests check every message and key against the `spake2` package itself.

Key schedule: SPAKE2 gives 32 bytes; every use has its own HKDF-SHA256 sub-key (``ferry/v1
confirm``, ``... certificate``, ``... store``, ``... verify``). A store-and-forward code's key is
HKDF-SHA256 of its password and secret.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nacl import bindings as sodium
from nacl.exceptions import CryptoError

from ferry.errors import FerryError
from ferry.protocol.words import WORDS
from ferry.v1 import broker_pb2

__all__ = [
    "PASSWORD_WORDS",
    "SECRET_CHARS",
    "TAMPERED",
    "Code",
    "CodeError",
    "KeyExchange",
    "KeyMismatch",
    "PeerRole",
    "SessionKey",
    "claim_verifier",
    "forward_key",
    "manifest_digest",
]

PASSWORD_WORDS = 2
SECRET_CHARS = 22  # base32: 5 bits each, 110 bits
KEY_BYTES = 32
MAX_NAMEPLATE_NUMBER = 999_999  # the broker uses 1..999; room to grow without a new format

_BASE32 = "abcdefghijklmnopqrstuvwxyz234567"
_SEPARATORS = re.compile(r"[\s_-]+")
_SECRET = re.compile(rf"[{_BASE32}]{{{SECRET_CHARS}}}")
_ID_A, _ID_B = b"ferry-sender", b"ferry-receiver"
# The `spake2` package's Ed25519 M and N (its arbitrary_element of b"M" and b"N"): points
# nobody knows the discrete log of. The tests recompute them with that package.
_M = bytes.fromhex("15cfd18e385952982b6a8f8c7854963b58e34388c8e6dae891db756481a02312")
_N = bytes.fromhex("f04f2e7eb734b2a8f8b472eaf9c3c632576ac64aea650b496a8a20ff00e583c3")
_L = 2**252 + 27742317777372353535851937790883648493  # the order of the prime subgroup
_STATE_MAGIC = b"ferry-spake2-v1\0"


#: What both people read when a check under the key fails. It is also the reason a side
#: gives the broker when it ends the session for that, so the other side can say the same.
TAMPERED = "the connection details were tampered with, or the code was wrong"


class CodeError(FerryError, ValueError):
    """That is not a Ferry code: it looks like 7-orbit-lantern-quiet."""


class KeyMismatch(Exception):
    """A check under the session key failed: `TAMPERED`."""

    def __init__(self) -> None:
        super().__init__(TAMPERED)


class PeerRole(StrEnum):
    """Which side of a transfer: what every MAC names, so one side's is never the other's."""

    SENDER = "sender"
    RECEIVER = "receiver"


def _words_ok(parts: list[str]) -> bool:
    return all(p.isascii() and p.isalpha() for p in parts)


@dataclass(frozen=True)
class Code:
    """A one-time code: the broker's nameplate and the peers' password (and, for a
    store-and-forward code, its secret)."""

    nameplate: str
    password: str
    secret: str = ""

    @classmethod
    def parse(cls, text: str) -> Code:
        """Read a code as people type it: any case, spaces or ``_`` for ``-``."""
        parts = [p for p in _SEPARATORS.split(text.strip().lower()) if p]
        secret = ""
        if len(parts) == 3 + PASSWORD_WORDS and _SECRET.fullmatch(parts[-1]):
            secret = parts.pop()
        if (
            len(parts) != 2 + PASSWORD_WORDS
            or not (parts[0].isascii() and parts[0].isdigit())
            or not 1 <= int(parts[0]) <= MAX_NAMEPLATE_NUMBER
            or not _words_ok(parts[1:])
        ):
            raise CodeError(
                "that is not a Ferry code: it looks like 7-orbit-lantern-quiet "
                "(a number and three words)"
            )
        nameplate = f"{int(parts[0])}-{parts[1]}"
        return cls(nameplate, "-".join(parts[2:]), secret)

    @staticmethod
    def new_password(*, forwardable: bool = False) -> tuple[str, str]:
        """A fresh (password, secret) for the sender; the secret is "" unless
        ``forwardable`` (a store-and-forward code)."""
        password = "-".join(secrets.choice(WORDS) for _ in range(PASSWORD_WORDS))
        secret = (
            "".join(secrets.choice(_BASE32) for _ in range(SECRET_CHARS)) if forwardable else ""
        )
        return password, secret

    @property
    def forwardable(self) -> bool:
        """Whether this is a store-and-forward code (its key is in the code, no PAKE)."""
        return bool(self.secret)

    def __str__(self) -> str:
        return "-".join(p for p in (self.nameplate, self.password, self.secret) if p)

    def forward_key(self) -> SessionKey:
        """A store-and-forward code's key (see `forward_key`)."""
        if not self.secret:
            raise CodeError("this code has no store-and-forward secret")
        return forward_key(self.password, self.secret)


def forward_key(password: str, secret: str) -> SessionKey:
    """A store-and-forward code's key: from its password and secret alone (not the
    nameplate, which the broker makes after the sender needs the key)."""
    return SessionKey(_hkdf(f"{password}\0{secret}".encode(), b"ferry/v1 forward"))


def claim_verifier(key: SessionKey) -> bytes:
    """What the broker checks a store-and-forward claim against. One-way from the key, so it
    neither opens the objects nor helps guess the code."""
    return key.sub_key(b"ferry/v1 claim")


def _password_scalar(password: bytes) -> bytes:
    """The `spake2` package's password-to-scalar: HKDF-SHA256 to 48 bytes, read big-endian,
    mod L; as libsodium's 32-byte little-endian scalar."""
    oversized = HKDF(algorithm=hashes.SHA256(), length=48, salt=b"", info=b"SPAKE2 pw").derive(
        password
    )
    return (int.from_bytes(oversized, "big") % _L).to_bytes(32, "little")


class KeyExchange:
    """One side's SPAKE2 on the code's password (the sender is side A, the receiver B).

    ``message`` (side byte + the point ``x*G + pw*M`` for A, ``pw*N`` for B) goes to the
    other side through the broker; `finish` takes the other side's message and gives the
    session key. `state` (secret: it holds the password and this side's scalar) lets a
    process that dies in between finish after a restart (`restore`).
    """

    def __init__(
        self,
        role: PeerRole,
        password: str,
        *,
        entropy: Callable[[int], bytes] = secrets.token_bytes,
        _scalar: bytes | None = None,
    ) -> None:
        self.role = role
        self._password = password.encode("utf-8")
        self._pw = _password_scalar(self._password)
        scalar = _scalar
        while scalar is None or scalar == bytes(32):  # as the spake2 package: 512 bits mod L
            scalar = (int.from_bytes(entropy(64), "big") % _L).to_bytes(32, "little")
        self._x = scalar
        blind = _M if role is PeerRole.SENDER else _N
        point = sodium.crypto_core_ed25519_add(
            sodium.crypto_scalarmult_ed25519_base_noclamp(scalar),
            sodium.crypto_scalarmult_ed25519_noclamp(self._pw, blind),
        )
        self._side = b"A" if role is PeerRole.SENDER else b"B"
        self.message: bytes = self._side + point
        self._finished = False

    @classmethod
    def restore(cls, role: PeerRole, state: bytes) -> KeyExchange:
        """The exchange that `state` saved (raises ValueError if it is not one of ``role``)."""
        side = b"A" if role is PeerRole.SENDER else b"B"
        head = len(_STATE_MAGIC)
        if not state.startswith(_STATE_MAGIC) or state[head : head + 1] != side:
            raise ValueError("not a saved key exchange of this side")
        scalar, password = state[head + 1 : head + 33], state[head + 33 :]
        if len(scalar) != 32 or int.from_bytes(scalar, "little") >= _L:
            raise ValueError("not a saved key exchange of this side")
        try:
            return cls(role, password.decode("utf-8"), _scalar=scalar)
        except (UnicodeDecodeError, CryptoError, ValueError) as exc:
            raise ValueError("not a saved key exchange of this side") from exc

    def state(self) -> bytes:
        """This side's secret state, to save until `finish`."""
        return _STATE_MAGIC + self._side + self._x + self._password

    def finish(self, peer_message: bytes) -> SessionKey:
        """The session key, from the other side's message (KeyMismatch if it is not one:
        malformed, from the same side, reflected, or not a point of the prime subgroup).
        Once only: a second call is a KeyMismatch too."""
        if self._finished:
            raise KeyMismatch()
        self._finished = True
        other = b"B" if self._side == b"A" else b"A"
        theirs = peer_message[1:]
        mine = self.message[1:]
        if (
            len(peer_message) != 33
            or peer_message[:1] != other
            or theirs == mine
            or not sodium.crypto_core_ed25519_is_valid_point(theirs)
        ):
            raise KeyMismatch()
        unblind = _N if self._side == b"A" else _M
        try:
            shared = sodium.crypto_scalarmult_ed25519_noclamp(
                self._x,
                sodium.crypto_core_ed25519_sub(
                    theirs, sodium.crypto_scalarmult_ed25519_noclamp(self._pw, unblind)
                ),
            )
        except CryptoError:  # the identity: nothing anyone could share
            raise KeyMismatch() from None
        x_msg, y_msg = (mine, theirs) if self._side == b"A" else (theirs, mine)
        transcript = b"".join(
            [
                hashlib.sha256(self._password).digest(),
                hashlib.sha256(_ID_A).digest(),
                hashlib.sha256(_ID_B).digest(),
                x_msg,
                y_msg,
                shared,
            ]
        )
        return SessionKey(_hkdf(hashlib.sha256(transcript).digest(), b"ferry/v1 session"))


class SessionKey:
    """The key both peers share and the broker never sees, and everything derived from it."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) != KEY_BYTES:
            raise ValueError(f"a session key is {KEY_BYTES} bytes")
        #: The key itself: secret; save it (mode 0600) for resume, show it to nobody.
        self.secret = secret

    def sub_key(self, label: bytes) -> bytes:
        """The 32-byte sub-key for one use, named by ``label``."""
        return _hkdf(self.secret, label)

    @property
    def store_key(self) -> bytes:
        """The key that seals this session's objects in the store."""
        return self.sub_key(b"ferry/v1 store")

    @property
    def knock_key(self) -> bytes:
        """The key of the knocks that open data connections (`ferry.protocol.knock`): a
        sender's listener lets through only connections that prove it."""
        return self.sub_key(b"ferry/v1 knock")

    def confirmation(self, role: PeerRole, manifest: broker_pb2.Manifest | None = None) -> bytes:
        """``role``'s proof that it holds the key; the sender's also vouches for the
        manifest the broker will show (``manifest``)."""
        body = b"ferry/v1 confirm\0" + role.value.encode()
        if role is PeerRole.SENDER:
            if manifest is None:
                raise ValueError("the sender's confirmation covers the manifest")
            body += b"\0" + manifest_digest(manifest)
        return hmac.digest(self.sub_key(b"ferry/v1 confirm"), body, "sha256")

    def check_confirmation(
        self, role: PeerRole, value: bytes, manifest: broker_pb2.Manifest | None = None
    ) -> None:
        """Raise KeyMismatch unless ``value`` is ``role``'s confirmation under this key."""
        if not hmac.compare_digest(value, self.confirmation(role, manifest)):
            raise KeyMismatch()

    def certificate_mac(self, role: PeerRole, certificate_der: bytes) -> bytes:
        """``role``'s word that ``certificate_der`` is its certificate (on every attempt)."""
        body = b"ferry/v1 certificate\0" + role.value.encode() + b"\0"
        body += hashlib.sha256(certificate_der).digest()
        return hmac.digest(self.sub_key(b"ferry/v1 certificate"), body, "sha256")

    def check_certificate(self, role: PeerRole, certificate_der: bytes, mac: bytes) -> None:
        """Raise KeyMismatch unless ``mac`` vouches for ``certificate_der`` as ``role``'s."""
        if not certificate_der or not hmac.compare_digest(
            mac, self.certificate_mac(role, certificate_der)
        ):
            raise KeyMismatch()

    def verification_words(self, count: int = 4) -> str:
        """A few words both sides derive from the key, for people to compare out of band
        (``--verify``): the same words on both sides mean nobody sat in between."""
        material = self.sub_key(b"ferry/v1 verify")
        picks = [struct.unpack_from(">I", material, 4 * i)[0] % len(WORDS) for i in range(count)]
        return "-".join(WORDS[i] for i in picks)


def manifest_digest(manifest: broker_pb2.Manifest) -> bytes:
    """SHA-256 of a canonical encoding of the manifest, the same in any language.

    chunk size (8 bytes, big-endian), file count (4), then per file: the UTF-8 path's length
    (4) and bytes, size (8), mode (4), modify time seconds (8, signed) and nanos (4).
    """
    h = hashlib.sha256()
    h.update(b"ferry/v1 manifest\0")
    h.update(struct.pack(">qI", manifest.chunk_size_bytes, len(manifest.files)))
    for f in manifest.files:
        path = f.path.encode("utf-8")
        h.update(struct.pack(">I", len(path)) + path)
        h.update(
            struct.pack(">qIqi", f.size_bytes, f.mode, f.modify_time.seconds, f.modify_time.nanos)
        )
    return h.digest()


def _hkdf(material: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=label).derive(material)
