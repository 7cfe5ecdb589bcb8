"""Nameplates (the broker's part of a one-time code), keyed hashes and party tokens.

A code such as ``7-orbit-lantern-quiet`` is a nameplate, ``7-orbit``, and a password,
``lantern-quiet`` (see :mod:`ferry.protocol.pake`). The broker makes and sees only the
nameplate: a number from 1 to 999 and one word of :data:`WORDS`, chosen with :mod:`secrets`,
distinct among the offers it holds. The password is the sender's, goes into a PAKE between the
peers, and never reaches the broker; so the broker, its database and its traffic can neither
use a code nor guess one offline.

Entropy and guessing math
-------------------------
A nameplate has 999 * N values, N = len(WORDS) = 748 today (at least 512 by test): 747,252,
about 2**19.5. A password has N**2 = 559,504 values, about 2**19.1.

What one offer can lose, for any TTL: a live (PAKE) offer is claimed once; a claim with a
wrong password fails both sides' key confirmation and the offer is burned. So a guesser who
found a live nameplate gets exactly one online guess at its password: it succeeds with
probability 1/559,504, whatever the offer's lifetime, and the sender sees the failure and
offers again. A store-and-forward offer's claim must present the verifier of its 129-bit
secret (password and 22 base32 characters); after ``claim_guesses_per_offer`` (default 100)
wrong ones the offer is given up, so it falls with probability at most 100 * 2**-129, below
2**-122, for any TTL. Nothing the broker stores allows an offline guess.

What guessing can do beyond that is burn offers, not read them: finding a live nameplate
takes claims of unknown ones, which are rate limited per source network (an IPv4 address, an
IPv6 /64; per source 10 failures in a burst, then 1/s, and 1 per 10 s while the broker as a
whole sees more than 100 failures/s). Each claim finds a given offer with probability
1/747,252, so one source needs about 8.6 days on average to sweep the space, and an offer
living T seconds is found by S sources with probability at most S * T / 747,252 (one source,
10 minutes: 0.08 %; one source, 24 hours: 12 %). A claimant that never proves the code loses
the offer to the next claim after ``claim_confirm_timeout_s``: the offer ends (its sender is
told why and can offer again), so a stranger cannot hold the real receiver out for the
offer's lifetime. An expired or used nameplate answers exactly as one that never existed,
and costs the same.

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


def _decimal(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes "¹" or "٣", which int() refuses or reads."""
    return text.isascii() and text.isdigit()


def normalize(nameplate: str) -> str:
    """Lower-case, drop surrounding space, treat runs of space/`-`/`_` as one `-`, and
    drop leading zeros of the number."""
    parts = [p for p in _SEPARATORS.split(nameplate.strip().lower()) if p]
    if parts and _decimal(parts[0]):
        parts[0] = str(int(parts[0]))
    return "-".join(parts)


def is_well_formed(nameplate: str) -> bool:
    """Whether a normalized nameplate has the shape number-word (the word not checked)."""
    parts = nameplate.split("-")
    return (
        len(parts) == 2
        and _decimal(parts[0])
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
