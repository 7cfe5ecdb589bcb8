"""Every (state, event, party) against the transition table, written out here on its own.

Nothing here is derived from states.py: the states, the final ones, the table, who may fire
what and which states a report may name are all spelled out, so a change to the module shows
up as a difference from what is written here.
"""

from __future__ import annotations

import itertools

import pytest

from ferry.broker import states
from ferry.broker.states import (
    ACCEPTED,
    CANCELLED,
    COMPLETED,
    CONNECTING,
    DECLINED,
    EXPIRED,
    FAILED,
    OFFERED,
    TRANSFERRING,
    Event,
    Party,
)
from ferry.v1 import broker_pb2

pytestmark = pytest.mark.timeout(30)

STATES = (
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
FINAL = (COMPLETED, DECLINED, CANCELLED, FAILED, EXPIRED)

# The lifecycle as the module docstring draws it, spelled out pair by pair (not derived from
# states.TRANSITIONS): every (state, event) not listed must be refused.
EXPECTED: dict[tuple[states.State, Event], states.State] = {
    (OFFERED, Event.CLAIM): OFFERED,
    (OFFERED, Event.ACCEPT): ACCEPTED,
    (OFFERED, Event.DECLINE): DECLINED,
    (OFFERED, Event.CANCEL): CANCELLED,
    (OFFERED, Event.EXPIRE): EXPIRED,
    (OFFERED, Event.RESUME): OFFERED,
    (ACCEPTED, Event.CONNECTING): CONNECTING,
    (ACCEPTED, Event.TRANSFERRING): TRANSFERRING,
    (ACCEPTED, Event.COMPLETE): COMPLETED,
    (ACCEPTED, Event.FAIL): FAILED,
    (ACCEPTED, Event.CANCEL): CANCELLED,
    (ACCEPTED, Event.EXPIRE): EXPIRED,
    (ACCEPTED, Event.RESUME): ACCEPTED,
    (CONNECTING, Event.TRANSFERRING): TRANSFERRING,
    (CONNECTING, Event.COMPLETE): COMPLETED,
    (CONNECTING, Event.FAIL): FAILED,
    (CONNECTING, Event.CANCEL): CANCELLED,
    (CONNECTING, Event.EXPIRE): EXPIRED,
    (CONNECTING, Event.RESUME): ACCEPTED,
    (TRANSFERRING, Event.COMPLETE): COMPLETED,
    (TRANSFERRING, Event.FAIL): FAILED,
    (TRANSFERRING, Event.CANCEL): CANCELLED,
    (TRANSFERRING, Event.EXPIRE): EXPIRED,
    (TRANSFERRING, Event.RESUME): ACCEPTED,
}

# Who may fire each event, likewise written out.
ALLOWED: dict[Event, set[Party]] = {
    Event.CLAIM: {Party.RECEIVER},
    Event.ACCEPT: {Party.RECEIVER},
    Event.DECLINE: {Party.RECEIVER},
    Event.COMPLETE: {Party.RECEIVER},
    Event.CANCEL: {Party.SENDER, Party.RECEIVER},
    Event.FAIL: {Party.SENDER, Party.RECEIVER},
    Event.CONNECTING: {Party.SENDER, Party.RECEIVER},
    Event.TRANSFERRING: {Party.SENDER, Party.RECEIVER},
    Event.RESUME: {Party.SENDER, Party.RECEIVER},
    Event.EXPIRE: {Party.BROKER},
}


# The states a progress report may name, and the event each fires.
REPORTABLE = {
    CONNECTING: Event.CONNECTING,
    TRANSFERRING: Event.TRANSFERRING,
    COMPLETED: Event.COMPLETE,
    FAILED: Event.FAIL,
}


def test_the_states_are_the_ones_written_here() -> None:
    assert states.ALL_STATES == STATES
    assert frozenset(FINAL) == states.FINAL_STATES
    assert frozenset({OFFERED, ACCEPTED, CONNECTING, TRANSFERRING}) == states.LIVE_STATES
    assert [broker_pb2.Session.State.Name(s) for s in STATES] == [
        "STATE_OFFERED",
        "STATE_ACCEPTED",
        "STATE_CONNECTING",
        "STATE_TRANSFERRING",
        "STATE_COMPLETED",
        "STATE_DECLINED",
        "STATE_CANCELLED",
        "STATE_FAILED",
        "STATE_EXPIRED",
    ]
    # ... and they are every state of the API but the unspecified one
    assert set(broker_pb2.Session.State.values()) - set(STATES) == {
        broker_pb2.Session.STATE_UNSPECIFIED
    }


def test_the_table_is_the_one_written_here() -> None:
    assert dict(states.TRANSITIONS) == EXPECTED
    assert {e: set(p) for e, p in states.PERMITTED.items()} == ALLOWED
    assert dict(states.REPORTABLE) == REPORTABLE


@pytest.mark.parametrize(("state", "event", "party"), list(itertools.product(STATES, Event, Party)))
def test_every_triple_moves_or_raises(state: states.State, event: Event, party: Party) -> None:
    claimed = event is not Event.CLAIM  # accept needs a claim; claim needs none yet
    expected = EXPECTED.get((state, event))
    if party not in ALLOWED[event]:
        with pytest.raises(states.NotPermitted):
            states.apply(state, claimed, event, party)
    elif expected is None:
        with pytest.raises(states.IllegalTransition):
            states.apply(state, claimed, event, party)
    else:
        assert states.apply(state, claimed, event, party) == states.Outcome(expected, True)


# Reporting the current state again is no transition: these (state, reported) pairs succeed
# unchanged for a party that may fire the event (COMPLETED again: the receiver only).
SAME_AGAIN = {(CONNECTING, CONNECTING), (TRANSFERRING, TRANSFERRING), (COMPLETED, COMPLETED)}


@pytest.mark.parametrize(
    ("state", "reported", "party"),
    list(itertools.product(STATES, STATES, (Party.SENDER, Party.RECEIVER))),
)
def test_every_report(state: states.State, reported: states.State, party: Party) -> None:
    event = REPORTABLE.get(reported)
    if event is None:
        with pytest.raises(states.IllegalTransition, match="cannot name the state"):
            states.report(state, True, reported, party)
    elif party not in ALLOWED[event]:
        with pytest.raises(states.NotPermitted):
            states.report(state, True, reported, party)
    elif (state, reported) in SAME_AGAIN:
        assert states.report(state, True, reported, party) == states.Outcome(state, True)
    elif (state, event) not in EXPECTED:
        with pytest.raises(states.IllegalTransition):
            states.report(state, True, reported, party)
    else:
        expected = states.Outcome(EXPECTED[(state, event)], True)
        assert states.report(state, True, reported, party) == expected


def test_final_states_accept_nothing() -> None:
    for state, event, party in itertools.product(FINAL, Event, Party):
        with pytest.raises(states.LifecycleError):
            states.apply(state, True, event, party)


def test_claim_once() -> None:
    out = states.apply(states.OFFERED, False, Event.CLAIM, Party.RECEIVER)
    assert out == states.Outcome(states.OFFERED, True)
    with pytest.raises(states.IllegalTransition, match="already been claimed"):
        states.apply(states.OFFERED, True, Event.CLAIM, Party.RECEIVER)


def test_accept_needs_claim() -> None:
    with pytest.raises(states.IllegalTransition):
        states.apply(states.OFFERED, False, Event.ACCEPT, Party.RECEIVER)


@pytest.mark.parametrize("event", [Event.ACCEPT, Event.DECLINE, Event.COMPLETE, Event.CLAIM])
def test_only_receiver(event: Event) -> None:
    with pytest.raises(states.NotPermitted):
        states.apply(states.OFFERED, True, event, Party.SENDER)


@pytest.mark.parametrize(
    "event", [Event.CANCEL, Event.FAIL, Event.CONNECTING, Event.TRANSFERRING, Event.RESUME]
)
def test_either_side(event: Event) -> None:
    for party in (Party.SENDER, Party.RECEIVER):
        assert states.apply(ACCEPTED, True, event, party) == states.Outcome(
            EXPECTED[(ACCEPTED, event)], True
        )


def test_only_broker_expires() -> None:
    with pytest.raises(states.NotPermitted):
        states.apply(states.OFFERED, False, Event.EXPIRE, Party.SENDER)
    assert states.apply(states.OFFERED, False, Event.EXPIRE, Party.BROKER).state == states.EXPIRED


def test_report_same_state_is_noop() -> None:
    out = states.report(states.TRANSFERRING, True, states.TRANSFERRING, Party.SENDER)
    assert out.state == states.TRANSFERRING
    with pytest.raises(states.IllegalTransition):
        states.report(states.FAILED, True, states.FAILED, Party.RECEIVER)
    with pytest.raises(states.IllegalTransition):
        states.report(states.ACCEPTED, True, states.OFFERED, Party.RECEIVER)
    with pytest.raises(states.NotPermitted):
        states.report(states.TRANSFERRING, True, states.COMPLETED, Party.SENDER)


def test_messages_are_for_people() -> None:
    with pytest.raises(states.IllegalTransition) as info:
        states.apply(states.DECLINED, True, Event.ACCEPT, Party.RECEIVER)
    assert str(info.value) == "cannot accept a session that is declined"


def test_resume_table() -> None:
    for party in (Party.SENDER, Party.RECEIVER):
        out = states.apply(states.OFFERED, True, Event.RESUME, party)
        assert out == states.Outcome(states.OFFERED, True)
        for state in (states.ACCEPTED, states.CONNECTING, states.TRANSFERRING):
            assert states.apply(state, True, Event.RESUME, party).state == states.ACCEPTED
    with pytest.raises(states.NotPermitted):
        states.apply(states.ACCEPTED, True, Event.RESUME, Party.BROKER)


@pytest.mark.parametrize("state", FINAL)
def test_resume_final_is_refused(state: states.State) -> None:
    with pytest.raises(states.IllegalTransition) as info:
        states.apply(state, True, Event.RESUME, Party.SENDER)
    assert str(info.value) == f"the session is {states.state_name(state)}; nothing to resume"


def test_reports_after_resume_move_forward_again() -> None:
    state = states.TRANSFERRING
    with pytest.raises(states.IllegalTransition):  # backwards within an attempt
        states.report(state, True, states.CONNECTING, Party.SENDER)
    state = states.apply(state, True, Event.RESUME, Party.RECEIVER).state
    assert state == states.ACCEPTED
    state = states.report(state, True, states.CONNECTING, Party.SENDER).state
    assert state == states.CONNECTING
    state = states.report(state, True, states.TRANSFERRING, Party.RECEIVER).state
    assert state == states.TRANSFERRING
    assert states.report(state, True, states.COMPLETED, Party.RECEIVER).state == states.COMPLETED


# ReportProgress naming COMPLETED, from every state: the receiver's outcome, written out.
_RECEIVER_COMPLETES: list[tuple[states.State, states.State | None]] = [
    (OFFERED, None),
    (ACCEPTED, COMPLETED),  # after a resume, or at once with everything from an earlier run
    (CONNECTING, COMPLETED),
    (TRANSFERRING, COMPLETED),
    (COMPLETED, COMPLETED),  # again: a no-op success
    (DECLINED, None),
    (CANCELLED, None),
    (FAILED, None),
    (EXPIRED, None),
]


@pytest.mark.parametrize(("state", "expected"), _RECEIVER_COMPLETES)
def test_receiver_reports_completed(state: states.State, expected: states.State | None) -> None:
    if expected is None:
        with pytest.raises(states.IllegalTransition):
            states.report(state, True, COMPLETED, Party.RECEIVER)
    else:
        assert states.report(state, True, COMPLETED, Party.RECEIVER) == states.Outcome(
            expected, True
        )


@pytest.mark.parametrize("state", STATES)
def test_sender_never_reports_completed(state: states.State) -> None:
    with pytest.raises(states.NotPermitted) as info:
        states.report(state, True, COMPLETED, Party.SENDER)
    assert str(info.value) == "the sender may not complete a session"


def test_completed_again_is_the_same_outcome() -> None:
    state = states.apply(ACCEPTED, True, Event.RESUME, Party.SENDER).state
    first = states.report(state, True, COMPLETED, Party.RECEIVER)
    assert first == states.Outcome(COMPLETED, True)
    assert states.report(first.state, True, COMPLETED, Party.RECEIVER) == first
    with pytest.raises(states.IllegalTransition):  # apply itself still refuses a final state
        states.apply(COMPLETED, True, Event.COMPLETE, Party.RECEIVER)
