"""BrokerError: a status code, a user-facing message and a machine-readable reason.

The domain raises it; the servicer turns it into a gRPC status with a google.rpc.ErrorInfo
detail (domain ``ferry.v1``), so any gRPC client reads ``reason`` without parsing text.
"""

from __future__ import annotations

import grpc

DOMAIN = "ferry.v1"


class Reason:
    """The ErrorInfo reasons the broker uses."""

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
    INTERNAL = "INTERNAL"


class BrokerError(Exception):
    """An error the client should see as `code` with `reason`; str() is the message."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message


def invalid(reason: str, message: str) -> BrokerError:
    """An INVALID_ARGUMENT error."""
    return BrokerError(grpc.StatusCode.INVALID_ARGUMENT, reason, message)
