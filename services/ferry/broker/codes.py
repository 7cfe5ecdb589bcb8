"""One-time codes such as ``7-orbit-lantern-quiet``: generate, normalize, hash.

A code is a number from 1 to 999 and three words drawn from :data:`WORDS`, all chosen with
:mod:`secrets`. The broker stores only ``sha256(normalized code)``, never the code itself.

Entropy and guessing math
-------------------------
With N = len(WORDS) words (748 today, at least 512 by test), a code has 999 * N**3 values:
log2(999) + 3 * log2(748) ~= 9.96 + 28.6 ~= 38.6 bits (at N = 512: ~37 bits).

An online guesser is held by the claim rate limits: per peer IP 10 failures in a burst then 1/s,
and broker-wide 100 failures/s. Over an offer's default 10-minute life the whole internet gets at
most about 100 * 600 = 60,000 guesses, so with K offers live at once the chance that any guess
hits any of them is about K * 60,000 / 2**38.6 ~= K * 1.4e-7 — about 1 in 7 million per live
offer. A hit on a code also yields nothing but an offer the real receiver then cannot claim
(codes are single-use), which the sender notices.

The hash keeps codes out of the database, backups and logs. It is not a defence against someone
who can read the database: 2**38.6 sha256 evaluations are feasible offline, which is acceptable
because a code lives minutes and stops working at its first claim.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

from ferry.broker._words import WORDS

WORD_COUNT = 3
MAX_NUMBER = 999

_SEPARATORS = re.compile(r"[\s_-]+")


def generate() -> str:
    """Return a fresh random code, e.g. `7-orbit-lantern-quiet`."""
    number = secrets.randbelow(MAX_NUMBER) + 1
    words = [secrets.choice(WORDS) for _ in range(WORD_COUNT)]
    return "-".join([str(number), *words])


def normalize(code: str) -> str:
    """Lower-case the code, drop surrounding space, and treat runs of space/`-`/`_` as one `-`."""
    parts = [p for p in _SEPARATORS.split(code.strip().lower()) if p]
    if parts and parts[0].isdigit():
        parts[0] = str(int(parts[0]))
    return "-".join(parts)


def is_well_formed(code: str) -> bool:
    """Whether a normalized code has the shape number-word-word-word (words not checked)."""
    parts = code.split("-")
    return (
        len(parts) == WORD_COUNT + 1
        and parts[0].isdigit()
        and 1 <= int(parts[0]) <= MAX_NUMBER
        and all(p.isalpha() and p.isascii() for p in parts[1:])
    )


def hash_code(code: str) -> str:
    """The hex sha256 of the normalized code: what the store keeps."""
    return hashlib.sha256(normalize(code).encode("utf-8")).hexdigest()


def hash_token(token: str) -> str:
    """The hex sha256 of a party token: what the store keeps."""
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
