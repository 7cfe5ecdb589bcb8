"""The broker's refusals: one error tree, a kind per class and a machine-readable reason.

The domain (core, fallback, validation, states) raises these and knows nothing of gRPC. Each
error carries a :class:`Reason` and a message for people (``str(error)``); its class says what
kind of refusal it is, in the vocabulary of the canonical error codes (google.rpc.Code). The
servicer (service.py) is the only place that maps a class to a gRPC status code, and it
attaches a google.rpc.ErrorInfo (domain ``ferry.v1``) carrying the reason, so any gRPC client
reads ``reason`` without parsing text. A later transport maps the same classes its own way.

The tree (class: status code the servicer sends; the reasons raised with it)::

    BrokerRefusal
    ├── InvalidArgument        INVALID_ARGUMENT     INVALID_MANIFEST, INVALID_PEER, INVALID_ARGUMENT
    ├── NotFound               NOT_FOUND            CODE_NOT_FOUND, SESSION_NOT_FOUND
    ├── AlreadyExists          ALREADY_EXISTS       REQUEST_ID_REUSED
    ├── Unauthenticated        UNAUTHENTICATED      TOKEN_MISSING, TOKEN_INVALID
    ├── PermissionDenied       PERMISSION_DENIED    WRONG_SESSION, WRONG_PARTY,
    │   │                                           STORE_FORWARD_DISABLED
    │   └── states.NotPermitted                     WRONG_PARTY
    ├── FailedPrecondition     FAILED_PRECONDITION  STORE_UNAVAILABLE, WRONG_STATE,
    │   │                                           UPLOAD_NOT_STARTED, UPLOAD_COMPLETED,
    │   │                                           PARTS_MISSING, KEY_NOT_CONFIRMED,
    │   │                                           KEY_ALREADY_CONFIRMED
    │   └── states.IllegalTransition                ILLEGAL_TRANSITION
    ├── ResourceExhausted      RESOURCE_EXHAUSTED   RATE_LIMITED, NO_PORTS,
    │                                               NAMEPLATES_EXHAUSTED, TOO_MANY_WATCHES,
    │                                               STORAGE_FULL, TOO_MANY_LEASES,
    │                                               STORE_QUOTA_EXCEEDED
    ├── Aborted                ABORTED              CONFLICT
    ├── Unavailable            UNAVAILABLE          STORE_ERROR
    └── Internal               INTERNAL             INTERNAL

``states.LifecycleError`` is the common base of the two lifecycle errors (it derives from
BrokerRefusal), so ``except states.LifecycleError`` still catches exactly those. The reason
SHUTTING_DOWN is part of the API but not raised by the broker today, nor is CODE_EXPIRED:
an expired code answers exactly as a wrong one (CODE_NOT_FOUND), so that a guesser cannot
tell a nameplate that was in use from one that never was.
"""

from __future__ import annotations

import enum

DOMAIN = "ferry.v1"


class Reason(enum.StrEnum):
    """The ErrorInfo reasons of domain ``ferry.v1``: part of the API, never renamed."""

    INVALID_MANIFEST = "INVALID_MANIFEST"
    INVALID_PEER = "INVALID_PEER"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    CODE_NOT_FOUND = "CODE_NOT_FOUND"
    CODE_EXPIRED = "CODE_EXPIRED"
    RATE_LIMITED = "RATE_LIMITED"
    TOKEN_MISSING = "TOKEN_MISSING"  # noqa: S105 - a reason, not a secret
    TOKEN_INVALID = "TOKEN_INVALID"  # noqa: S105 - a reason, not a secret
    WRONG_SESSION = "WRONG_SESSION"
    WRONG_PARTY = "WRONG_PARTY"
    SESSION_NOT_FOUND = "SESSION_NOT_FOUND"
    ILLEGAL_TRANSITION = "ILLEGAL_TRANSITION"
    NO_PORTS = "NO_PORTS"
    REQUEST_ID_REUSED = "REQUEST_ID_REUSED"
    CONFLICT = "CONFLICT"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    WRONG_STATE = "WRONG_STATE"
    STORE_UNAVAILABLE = "STORE_UNAVAILABLE"
    STORE_ERROR = "STORE_ERROR"
    UPLOAD_NOT_STARTED = "UPLOAD_NOT_STARTED"
    UPLOAD_COMPLETED = "UPLOAD_COMPLETED"
    PARTS_MISSING = "PARTS_MISSING"
    KEY_NOT_CONFIRMED = "KEY_NOT_CONFIRMED"
    KEY_ALREADY_CONFIRMED = "KEY_ALREADY_CONFIRMED"
    NAMEPLATES_EXHAUSTED = "NAMEPLATES_EXHAUSTED"
    INTERNAL = "INTERNAL"
    # Issue 10, finding 1: a watch limit (per session and party, per address, broker-wide).
    TOO_MANY_WATCHES = "TOO_MANY_WATCHES"
    # Issue 10, finding 2: the broker's disk is (nearly) full; new offers wait for space.
    STORAGE_FULL = "STORAGE_FULL"
    # Issue 10, finding 5: one caller holds its share of a listener host's port leases.
    TOO_MANY_LEASES = "TOO_MANY_LEASES"
    # Issue 10, finding 6: an object-store quota (per offer, per address, in all) is used up.
    STORE_QUOTA_EXCEEDED = "STORE_QUOTA_EXCEEDED"
    # Issue 10, finding 6: the operator turned store-and-forward (upload before consent) off.
    STORE_FORWARD_DISABLED = "STORE_FORWARD_DISABLED"
    # Issue 11: candidates published for a connection attempt that is no longer the current one.
    ATTEMPT_MOVED = "ATTEMPT_MOVED"
    # Issue 13: people, devices, sign-in and the operator's policy.
    ENROLLMENT_INVALID = "ENROLLMENT_INVALID"  # unknown, used or expired enrollment token
    CHALLENGE_INVALID = "CHALLENGE_INVALID"  # a sign-in challenge not made here, or expired
    SIGNATURE_INVALID = "SIGNATURE_INVALID"  # a device's signature does not check
    DEVICE_REVOKED = "DEVICE_REVOKED"  # the operator revoked the device (or unknown)
    ACCESS_TOKEN_MISSING = "ACCESS_TOKEN_MISSING"  # noqa: S105 - a reason, not a secret
    ACCESS_TOKEN_INVALID = "ACCESS_TOKEN_INVALID"  # noqa: S105 - a reason, not a secret
    ACCESS_TOKEN_EXPIRED = "ACCESS_TOKEN_EXPIRED"  # noqa: S105 - a reason, not a secret
    USER_NOT_FOUND = "USER_NOT_FOUND"  # no such user in the caller's organisation
    OFFER_NOT_FOUND = "OFFER_NOT_FOUND"  # no offer to the caller's user by this name
    OFFER_TAKEN = "OFFER_TAKEN"  # another device of the recipient took the offer first
    ANONYMOUS_DISABLED = "ANONYMOUS_DISABLED"  # the operator allows no code without sign-in
    OFFER_QUOTA_EXCEEDED = "OFFER_QUOTA_EXCEEDED"  # the user's offers per hour are used up
    OFFER_TOO_LARGE = "OFFER_TOO_LARGE"  # over the operator's largest allowed offer
    INBOX_FULL = "INBOX_FULL"  # the recipient has too many offers waiting


class BrokerRefusal(Exception):
    """The root: the broker refuses a call; ``str(error)`` is the message the caller sees."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class InvalidArgument(BrokerRefusal):
    """The request itself is malformed; the same request will never succeed."""


class NotFound(BrokerRefusal):
    """What the request names (a code, a session) does not exist, or no longer does."""


class AlreadyExists(BrokerRefusal):
    """Something the request would create exists already (a reused request_id)."""


class Unauthenticated(BrokerRefusal):
    """The caller sent no valid credential."""


class PermissionDenied(BrokerRefusal):
    """The caller is known but may not do this (another session, the other party)."""


class FailedPrecondition(BrokerRefusal):
    """Not in the current state of the session or of the broker; retrying as is won't help."""


class ResourceExhausted(BrokerRefusal):
    """A limit is reached (claim rate, free ports); later, or elsewhere, it may work."""


class Aborted(BrokerRefusal):
    """Another call changed the session meanwhile; read it again and retry."""


class Unavailable(BrokerRefusal):
    """Something the broker depends on failed for now (the object store); retry later."""


class Internal(BrokerRefusal):
    """A broker bug: what the caller sees of an unexpected exception."""
