"""Nameplates (the broker's part of a one-time code), keyed hashes and party tokens.

A code such as ``7-orbit-lantern-quiet`` is a nameplate, ``7-orbit``, and a password,
``lantern-quiet`` (see :mod:`ferry.protocol.pake`). The broker makes and sees only the
nameplate: a number from 1 to 999 and one word of :data:`WORDS`, chosen with :mod:`secrets`,
distinct among the offers it holds. The password is the sender's, goes into a PAKE between the
peers, and never reaches the broker; so the broker, its database and its traffic can neither
use a code nor guess one offline.

Entropy and guessing math
-------------------------
A nameplate has 999 * N values, N = len(WORDS) = 748 today (at least 512 by test): about
2**19.5 (747,000). Claims of unknown nameplates are rate limited (per peer IP 10 failures in a
burst then 1/s; broker-wide 100 failures/s), so sweeping the space to find live offers takes
the whole internet about two hours, against offers that live ten minutes by default. Finding
one gains nothing but the chance of a single PAKE guess at its password (2**-19.1) and burns
the offer, which both people see. A store-and-forward offer's claim must also present a
verifier derived from its 110-bit secret: a found nameplate alone does not claim it.

The store keys nameplates by HMAC-SHA256 under the broker's secret key (a file of mode 0600),
so its database and backups hold no nameplate, and one copied without the key cannot be
matched to a code.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

from ferry.protocol.words import WORDS

MAX_NUMBER = 999

_SEPARATORS = re.compile(r"[\s_-]+")


def generate() -> str:
    """Return a fresh random nameplate, e.g. `7-orbit`."""
    return f"{secrets.randbelow(MAX_NUMBER) + 1}-{secrets.choice(WORDS)}"


def normalize(nameplate: str) -> str:
    """Lower-case, drop surrounding space, treat runs of space/`-`/`_` as one `-`, and
    drop leading zeros of the number."""
    parts = [p for p in _SEPARATORS.split(nameplate.strip().lower()) if p]
    if parts and parts[0].isdigit():
        parts[0] = str(int(parts[0]))
    return "-".join(parts)


def is_well_formed(nameplate: str) -> bool:
    """Whether a normalized nameplate has the shape number-word (the word not checked)."""
    parts = nameplate.split("-")
    return (
        len(parts) == 2
        and parts[0].isdigit()
        and 1 <= int(parts[0]) <= MAX_NUMBER
        and parts[1].isalpha()
        and parts[1].isascii()
    )


def looks_like_a_whole_code(nameplate: str) -> bool:
    """Whether a client sent more than the nameplate (its password must never be sent)."""
    return len(nameplate.split("-")) > 2


def hash_code(key: bytes, nameplate: str) -> str:
    """The keyed hash of the normalized nameplate: what the store keeps."""
    body = b"nameplate\0" + normalize(nameplate).encode("utf-8")
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def hash_token(token: str) -> str:
    """The hex sha256 of a party token (256 random bits): what the store keeps."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def derived_token(key: bytes, session_id: str, request_id: str) -> str:
    """The token a claim with ``request_id`` gets: the same for a repeated claim.

    HMAC-SHA256 under the broker's secret key, so only the broker can compute it, and only
    someone holding both the code and the claimant's secret request id can ask for it.
    """
    mac = hmac.new(key, f"claim\0{session_id}\0{request_id}".encode(), hashlib.sha256)
    return base64.urlsafe_b64encode(mac.digest()).decode("ascii").rstrip("=")


def new_token() -> str:
    """A fresh bearer token (256 random bits, URL-safe)."""
    return secrets.token_urlsafe(32)
