"""The broker's error tree (errors.py) and the servicer's one table from kind to status code.

What a client sees (status code and ErrorInfo reason) is the API: the expectations are
written out here, and the integration tests check them over the wire.
"""

from __future__ import annotations

import logging

import grpc
import pytest

from ferry.broker import errors, service, states
from ferry.broker.errors import BrokerRefusal, Reason

pytestmark = pytest.mark.timeout(30)

STATUS = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Internal: grpc.StatusCode.INTERNAL,
}

REASONS = [
    "INVALID_MANIFEST",
    "INVALID_PEER",
    "INVALID_ARGUMENT",
    "CODE_NOT_FOUND",
    "CODE_EXPIRED",
    "RATE_LIMITED",
    "TOKEN_MISSING",
    "TOKEN_INVALID",
    "WRONG_SESSION",
    "WRONG_PARTY",
    "SESSION_NOT_FOUND",
    "ILLEGAL_TRANSITION",
    "NO_PORTS",
    "REQUEST_ID_REUSED",
    "CONFLICT",
    "SHUTTING_DOWN",
    "WRONG_STATE",
    "STORE_UNAVAILABLE",
    "STORE_ERROR",
    "UPLOAD_NOT_STARTED",
    "UPLOAD_COMPLETED",
    "PARTS_MISSING",
    "KEY_NOT_CONFIRMED",
    "KEY_ALREADY_CONFIRMED",
    "NAMEPLATES_EXHAUSTED",
    "INTERNAL",
    "TOO_MANY_WATCHES",  # issue 10, finding 1
    "STORAGE_FULL",  # issue 10, finding 2
    "TOO_MANY_LEASES",  # issue 10, finding 5
    "STORE_QUOTA_EXCEEDED",  # issue 10, finding 6
    "STORE_FORWARD_DISABLED",  # issue 10, finding 6
    "ATTEMPT_MOVED",  # issue 11: candidates for an attempt that is over
    # Issue 13: people, devices, sign-in, policy.
    "ENROLLMENT_INVALID",
    "CHALLENGE_INVALID",
    "SIGNATURE_INVALID",
    "DEVICE_REVOKED",
    "ACCESS_TOKEN_MISSING",
    "ACCESS_TOKEN_INVALID",
    "ACCESS_TOKEN_EXPIRED",
    "USER_NOT_FOUND",
    "OFFER_NOT_FOUND",
    "OFFER_TAKEN",
    "ANONYMOUS_DISABLED",
    "OFFER_QUOTA_EXCEEDED",
    "OFFER_TOO_LARGE",
    "INBOX_FULL",
]


def _subclasses(cls: type[BrokerRefusal]) -> set[type[BrokerRefusal]]:
    found = set(cls.__subclasses__())
    for sub in list(found):
        found |= _subclasses(sub)
    return found


def test_the_table_is_the_one_written_here() -> None:
    assert dict(service.STATUS_CODES) == STATUS


def test_the_reasons_are_the_api() -> None:
    assert [r.value for r in Reason] == REASONS
    assert [r.name for r in Reason] == REASONS
    assert Reason.CODE_NOT_FOUND == "CODE_NOT_FOUND"  # a str: compares and serializes as one


@pytest.mark.parametrize(("kind", "code"), list(STATUS.items()))
def test_each_kind_has_its_code(kind: type[BrokerRefusal], code: grpc.StatusCode) -> None:
    refusal = kind(Reason.INTERNAL, "message for people")
    assert service.status_code(refusal) == code
    assert (str(refusal), refusal.message, refusal.reason) == (
        "message for people",
        "message for people",
        Reason.INTERNAL,
    )


def test_every_refusal_in_the_tree_has_a_code() -> None:
    for kind in _subclasses(BrokerRefusal) - {states.LifecycleError}:
        assert any(base in STATUS for base in kind.__mro__), kind


def test_the_lifecycle_errors_are_refusals() -> None:
    illegal = states.IllegalTransition("cannot accept a session that is declined")
    assert isinstance(illegal, states.LifecycleError)
    assert illegal.reason == Reason.ILLEGAL_TRANSITION
    assert service.status_code(illegal) == grpc.StatusCode.FAILED_PRECONDITION
    denied = states.NotPermitted("the sender may not accept a session")
    assert isinstance(denied, states.LifecycleError)
    assert denied.reason == Reason.WRONG_PARTY
    assert service.status_code(denied) == grpc.StatusCode.PERMISSION_DENIED


def test_a_refusal_of_no_kind_is_internal(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="ferry.broker.service"):
        assert service.status_code(BrokerRefusal(Reason.CONFLICT, "x")) == (
            grpc.StatusCode.INTERNAL
        )
    assert "no known kind" in caplog.text


def test_an_unexpected_exception_is_internal_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    refusal = errors.NotFound(Reason.CODE_NOT_FOUND, "no offer has this code")
    assert service.as_refusal(refusal) is refusal
    with caplog.at_level(logging.ERROR, logger="ferry.broker.service"):
        bug = service.as_refusal(KeyError("oops"))
    assert isinstance(bug, errors.Internal)
    assert (bug.reason, str(bug)) == (Reason.INTERNAL, "internal broker error")
    assert "unexpected error in the broker" in caplog.text
    assert "oops" not in str(bug)  # the details stay in the log
