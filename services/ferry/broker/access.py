"""Sign-in challenges and access tokens: stateless, under keys derived from the broker's key.

A **challenge** (CreateChallenge) is 16 random bytes, the device id's hash, an expiry and a MAC
over them: the broker keeps nothing for it, so an anonymous caller asking for millions of
challenges costs the broker a MAC each and no memory. SignIn checks the MAC, the expiry and
the device's signature, and only then remembers the challenge (in the ledger, until it
expires: shared by the replicas on Redis), so that a signature is good for one sign-in.

An **access token** says which device of which user signed in, and until when, under a MAC:
``fa1.<payload>.<mac>`` (URL-safe base64; the payload is JSON). It is checked without a store
read, but every call that accepts one also reads the device (`People.principal`), so a revoked
device is refused at its next call, whatever its token says. Tokens and challenges need the
same key on every replica: it is derived from the broker's token key (on Redis, kept in the
store; on SQLite, token.key in the data dir), so a restart does not sign anyone out.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import secrets
import struct

from ferry.broker.errors import Reason, Unauthenticated

__all__ = ["TOKEN_PREFIX", "AccessToken", "Keys"]

TOKEN_PREFIX = "fa1."  # noqa: S105 - the format's marker, not a secret
_CHALLENGE_MAC = 16
_CHALLENGE_BYTES = 16 + 16 + 8 + _CHALLENGE_MAC
#: Longest token this broker makes is ~200 characters; anything far longer is not one.
_MAX_TOKEN_CHARS = 1024


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclasses.dataclass(frozen=True, slots=True)
class AccessToken:
    """What an access token says."""

    user: str
    device_id: str
    organization: str
    expire_s: float


def looks_like_access_token(token: str | None) -> bool:
    """Whether a bearer token is an access token (else it may be a party token)."""
    return bool(token) and str(token).startswith(TOKEN_PREFIX)


class Keys:
    """The MAC keys of challenges and access tokens, derived from the broker's token key."""

    def __init__(self, token_key: bytes) -> None:
        self._challenge_key = hmac.digest(token_key, b"ferry/v1 challenge key", "sha256")
        self._token_key = hmac.digest(token_key, b"ferry/v1 access-token key", "sha256")

    # -- challenges -------------------------------------------------------------------------

    def challenge(self, device_id: str, expire_s: float) -> bytes:
        """A fresh challenge for ``device_id``, good until ``expire_s``."""
        body = secrets.token_bytes(16) + _device_hash(device_id) + struct.pack(">d", expire_s)
        return body + self._challenge_mac(body)

    def check_challenge(self, device_id: str, challenge: bytes, now: float) -> None:
        """Raise Unauthenticated (CHALLENGE_INVALID) unless this broker made ``challenge``
        for ``device_id`` and it has not expired."""
        if len(challenge) == _CHALLENGE_BYTES:
            body, mac = challenge[:-_CHALLENGE_MAC], challenge[-_CHALLENGE_MAC:]
            (expire_s,) = struct.unpack(">d", body[32:40])
            if (
                hmac.compare_digest(mac, self._challenge_mac(body))
                and hmac.compare_digest(body[16:32], _device_hash(device_id))
                and now < expire_s
            ):
                return
        raise Unauthenticated(
            Reason.CHALLENGE_INVALID,
            "the sign-in challenge is not one this broker made for this device, or it expired;"
            " ask for a new one",
        )

    def _challenge_mac(self, body: bytes) -> bytes:
        return hmac.digest(self._challenge_key, body, "sha256")[:_CHALLENGE_MAC]

    # -- access tokens ----------------------------------------------------------------------

    def issue(self, token: AccessToken) -> str:
        """The bearer token for ``token``."""
        payload = json.dumps(
            [token.user, token.device_id, token.organization, round(token.expire_s, 3)],
            separators=(",", ":"),
        ).encode()
        mac = hmac.digest(self._token_key, payload, "sha256")
        return f"{TOKEN_PREFIX}{_b64(payload)}.{_b64(mac)}"

    def read(self, bearer: str | None, now: float) -> AccessToken:
        """What a bearer access token says, once its MAC checks and it has not expired;
        Unauthenticated otherwise (ACCESS_TOKEN_MISSING, _INVALID or _EXPIRED)."""
        if not bearer:
            raise Unauthenticated(
                Reason.ACCESS_TOKEN_MISSING,
                "this call needs a signed-in device: 'authorization: Bearer <access_token>'"
                " metadata (SignIn)",
            )
        invalid = Unauthenticated(Reason.ACCESS_TOKEN_INVALID, "the access token is invalid")
        if len(bearer) > _MAX_TOKEN_CHARS or not bearer.startswith(TOKEN_PREFIX):
            raise invalid
        payload_text, _, mac_text = bearer[len(TOKEN_PREFIX) :].partition(".")
        try:
            payload, mac = _unb64(payload_text), _unb64(mac_text)
        except ValueError:
            raise invalid from None
        if not hmac.compare_digest(mac, hmac.digest(self._token_key, payload, "sha256")):
            raise invalid
        try:
            user, device_id, organization, expire_s = json.loads(payload)
            token = AccessToken(str(user), str(device_id), str(organization), float(expire_s))
        except (ValueError, TypeError):
            raise invalid from None
        if now >= token.expire_s:
            raise Unauthenticated(
                Reason.ACCESS_TOKEN_EXPIRED, "the access token expired; sign in again"
            )
        return token


def _device_hash(device_id: str) -> bytes:
    return hashlib.sha256(b"ferry/v1 challenge device\0" + device_id.encode()).digest()[:16]


def challenge_key(challenge: bytes) -> str:
    """Where the ledger remembers a used challenge."""
    return "challenge:" + hashlib.sha256(challenge).hexdigest()
