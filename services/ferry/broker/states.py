"""The session lifecycle, sans-I/O: a transition table, who may fire which event, and nothing else.

No clock, no store, no network: :func:`apply` takes the current state, an event and the party
firing it, and returns the next state or raises. The service persists and publishes the result.

Transition table (``claim`` keeps the state and sets ``claimed``; it is legal once)::

    OFFERED      --claim-------> OFFERED (claimed)
    OFFERED      --resume------> OFFERED           (either party; new PeerInfo only)
    OFFERED      --accept------> ACCEPTED          (receiver; needs claimed)
    OFFERED      --decline-----> DECLINED          (receiver)
    ACCEPTED     --connecting--> CONNECTING        (either party)
    ACCEPTED     --transferring> TRANSFERRING      (either party)
    CONNECTING   --transferring> TRANSFERRING      (either party)
    ACCEPTED | CONNECTING | TRANSFERRING --complete--> COMPLETED (receiver)
    ACCEPTED | CONNECTING | TRANSFERRING --fail--> FAILED (either party)
    ACCEPTED | CONNECTING | TRANSFERRING --resume--> ACCEPTED (either party; next attempt)
    any non-final --cancel-----> CANCELLED         (either party)
    any non-final --expire-----> EXPIRED           (the broker)

COMPLETED, DECLINED, CANCELLED, FAILED and EXPIRED are final: they accept no event. Reporting
the current state again (CONNECTING or TRANSFERRING) is not a transition, and neither is the
receiver reporting COMPLETED on a completed session: see :func:`report`.

The receiver may complete from ACCEPTED: after a resume the session is ACCEPTED again while
the receiver may already hold every byte (the sender restarted just as it finished), and a
receiver that had everything from an earlier run completes right after accepting.

Attempts: ``accept`` starts connection attempt 1, and every ``resume`` after it starts the next
one (the caller bumps ``Session.attempt`` and negotiates a new plan; this module only knows the
states). Within one attempt the states only move forward, ACCEPTED -> CONNECTING ->
TRANSFERRING -> outcome, so a progress report that names an earlier state than the current one
is refused as an illegal transition. A resume puts the session back to ACCEPTED, so the next
attempt's CONNECTING and TRANSFERRING reports are forward moves again.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import TypeAlias

from ferry.broker.errors import BrokerRefusal, FailedPrecondition, PermissionDenied, Reason
from ferry.v1 import broker_pb2

State: TypeAlias = broker_pb2.Session.State.ValueType

OFFERED = broker_pb2.Session.STATE_OFFERED
ACCEPTED = broker_pb2.Session.STATE_ACCEPTED
CONNECTING = broker_pb2.Session.STATE_CONNECTING
TRANSFERRING = broker_pb2.Session.STATE_TRANSFERRING
COMPLETED = broker_pb2.Session.STATE_COMPLETED
DECLINED = broker_pb2.Session.STATE_DECLINED
CANCELLED = broker_pb2.Session.STATE_CANCELLED
FAILED = broker_pb2.Session.STATE_FAILED
EXPIRED = broker_pb2.Session.STATE_EXPIRED

ALL_STATES: tuple[State, ...] = (
    OFFERED,
    ACCEPTED,
    CONNECTING,
    TRANSFERRING,
    COMPLETED,
    DECLINED,
    CANCELLED,
    FAILED,
    EXPIRED,
)
FINAL_STATES: frozenset[State] = frozenset({COMPLETED, DECLINED, CANCELLED, FAILED, EXPIRED})
LIVE_STATES: frozenset[State] = frozenset(ALL_STATES) - FINAL_STATES


class Event(enum.Enum):
    """Something that happens to a session."""

    CLAIM = "claim"
    ACCEPT = "accept"
    DECLINE = "decline"
    CANCEL = "cancel"
    CONNECTING = "connecting"
    TRANSFERRING = "transferring"
    COMPLETE = "complete"
    FAIL = "fail"
    EXPIRE = "expire"
    RESUME = "resume"


class Party(enum.Enum):
    """Who fires an event."""

    SENDER = "sender"
    RECEIVER = "receiver"
    BROKER = "broker"


TRANSITIONS: Mapping[tuple[State, Event], State] = {
    (OFFERED, Event.CLAIM): OFFERED,
    (OFFERED, Event.ACCEPT): ACCEPTED,
    (OFFERED, Event.DECLINE): DECLINED,
    (ACCEPTED, Event.CONNECTING): CONNECTING,
    (ACCEPTED, Event.TRANSFERRING): TRANSFERRING,
    (CONNECTING, Event.TRANSFERRING): TRANSFERRING,
    (ACCEPTED, Event.COMPLETE): COMPLETED,
    (CONNECTING, Event.COMPLETE): COMPLETED,
    (TRANSFERRING, Event.COMPLETE): COMPLETED,
    (ACCEPTED, Event.FAIL): FAILED,
    (CONNECTING, Event.FAIL): FAILED,
    (TRANSFERRING, Event.FAIL): FAILED,
    **{(s, Event.CANCEL): CANCELLED for s in (OFFERED, ACCEPTED, CONNECTING, TRANSFERRING)},
    **{(s, Event.EXPIRE): EXPIRED for s in (OFFERED, ACCEPTED, CONNECTING, TRANSFERRING)},
    (OFFERED, Event.RESUME): OFFERED,
    **{(s, Event.RESUME): ACCEPTED for s in (ACCEPTED, CONNECTING, TRANSFERRING)},
}

_EITHER = frozenset({Party.SENDER, Party.RECEIVER})
PERMITTED: Mapping[Event, frozenset[Party]] = {
    Event.CLAIM: frozenset({Party.RECEIVER}),
    Event.ACCEPT: frozenset({Party.RECEIVER}),
    Event.DECLINE: frozenset({Party.RECEIVER}),
    Event.COMPLETE: frozenset({Party.RECEIVER}),
    Event.CANCEL: _EITHER,
    Event.FAIL: _EITHER,
    Event.CONNECTING: _EITHER,
    Event.TRANSFERRING: _EITHER,
    Event.EXPIRE: frozenset({Party.BROKER}),
    Event.RESUME: _EITHER,
}

#: The states a ReportProgress call may name, and the event each one fires.
REPORTABLE: Mapping[State, Event] = {
    CONNECTING: Event.CONNECTING,
    TRANSFERRING: Event.TRANSFERRING,
    COMPLETED: Event.COMPLETE,
    FAILED: Event.FAIL,
}


def state_name(state: State) -> str:
    """`STATE_OFFERED` -> `offered`, for messages people read."""
    return broker_pb2.Session.State.Name(state).removeprefix("STATE_").lower()


class LifecycleError(BrokerRefusal):
    """Base of the errors of this module; str(error) is meant for the user.

    Both are broker refusals (see errors.py for the whole tree), each with its fixed reason.
    """


class IllegalTransition(LifecycleError, FailedPrecondition):
    """The session cannot do that in its current state (reason ILLEGAL_TRANSITION)."""

    def __init__(self, message: str) -> None:
        super().__init__(Reason.ILLEGAL_TRANSITION, message)


class NotPermitted(LifecycleError, PermissionDenied):
    """This party may not do that to a session (reason WRONG_PARTY)."""

    def __init__(self, message: str) -> None:
        super().__init__(Reason.WRONG_PARTY, message)


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """The result of an event: the next state and whether the code is claimed."""

    state: State
    claimed: bool


def apply(state: State, claimed: bool, event: Event, party: Party) -> Outcome:
    """Fire `event` by `party` on a session in `state`; return the outcome or raise.

    Raises NotPermitted when the party may never fire the event, and IllegalTransition when the
    event is not legal in this state (including a second claim and an accept before any claim).
    """
    if party not in PERMITTED[event]:
        raise NotPermitted(f"the {party.value} may not {event.value} a session")
    new = TRANSITIONS.get((state, event))
    if new is None and event is Event.RESUME and state in FINAL_STATES:
        raise IllegalTransition(f"the session is {state_name(state)}; nothing to resume")
    if new is None:
        raise IllegalTransition(f"cannot {event.value} a session that is {state_name(state)}")
    if event is Event.CLAIM:
        if claimed:
            raise IllegalTransition("this offer has already been claimed")
        return Outcome(new, True)
    if event is Event.ACCEPT and not claimed:
        raise IllegalTransition("cannot accept an offer that nobody has claimed")
    return Outcome(new, claimed)


def report(state: State, claimed: bool, reported: State, party: Party) -> Outcome:
    """Apply a ReportProgress naming `reported`: the same state again may be a no-op.

    The same live state again returns the same Outcome (the caller still records bytes_done).
    So does COMPLETED reported again by the receiver on a completed session: completion is
    idempotent, since a receiver that lost the first answer reports it again; the caller
    changes nothing then. COMPLETED by the sender is NotPermitted, completed or not.

    Otherwise a report is refused (IllegalTransition) when it would move the session backwards
    within the current attempt, e.g. CONNECTING while TRANSFERRING, or when the state is final.
    After a resume the session is ACCEPTED again, so the new attempt's CONNECTING and
    TRANSFERRING are accepted. Reports carry no attempt number: a late report of the previous
    attempt is taken as one of the current attempt.
    """
    event = REPORTABLE.get(reported)
    if event is None:
        raise IllegalTransition(f"a progress report cannot name the state {state_name(reported)}")
    if reported == state and (state in LIVE_STATES or state == COMPLETED):
        if party not in PERMITTED[event]:
            raise NotPermitted(f"the {party.value} may not {event.value} a session")
        return Outcome(state, claimed)
    return apply(state, claimed, event, party)
