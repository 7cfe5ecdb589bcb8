"""Every (state, event, party) against the transition table."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from ferry.broker import states
from ferry.broker.states import Event, Party

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("state", "event"), list(itertools.product(states.ALL_STATES, list(Event)))
)
def test_every_pair_moves_or_raises(state: states.State, event: Event) -> None:
    party = next(iter(sorted(states.PERMITTED[event], key=lambda p: p.value)))
    expected = states.TRANSITIONS.get((state, event))
    claimed = event is not Event.CLAIM  # accept needs a claim; claim needs none yet
    if expected is None:
        with pytest.raises(states.IllegalTransition):
            states.apply(state, claimed, event, party)
    else:
        outcome = states.apply(state, claimed, event, party)
        assert outcome.state == expected


def test_final_states_accept_nothing() -> None:
    for state, event, party in itertools.product(states.FINAL_STATES, Event, Party):
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
        assert states.apply(states.ACCEPTED, True, event, party).state in states.ALL_STATES


def test_only_broker_expires() -> None:
    with pytest.raises(states.NotPermitted):
        states.apply(states.OFFERED, False, Event.EXPIRE, Party.SENDER)
    assert states.apply(states.OFFERED, False, Event.EXPIRE, Party.BROKER).state == states.EXPIRED


def test_report_same_state_is_noop() -> None:
    out = states.report(states.TRANSFERRING, True, states.TRANSFERRING, Party.SENDER)
    assert out.state == states.TRANSFERRING
    with pytest.raises(states.IllegalTransition):
        states.report(states.COMPLETED, True, states.COMPLETED, Party.RECEIVER)
    with pytest.raises(states.IllegalTransition):
        states.report(states.ACCEPTED, True, states.OFFERED, Party.RECEIVER)
    with pytest.raises(states.NotPermitted):
        states.report(states.TRANSFERRING, True, states.COMPLETED, Party.SENDER)


def test_messages_are_for_people() -> None:
    with pytest.raises(states.IllegalTransition) as info:
        states.apply(states.DECLINED, True, Event.ACCEPT, Party.RECEIVER)
    assert str(info.value) == "cannot accept a session that is declined"


def test_sans_io() -> None:
    import ferry.broker.codes
    import ferry.broker.leases
    import ferry.broker.ratelimit

    for module in (states, ferry.broker.leases, ferry.broker.codes, ferry.broker.ratelimit):
        source = Path(module.__file__ or "").read_text(encoding="utf-8")
        for banned in ("import asyncio", "import socket", "import grpc", "import time"):
            assert banned not in source, (module.__name__, banned)


def test_resume_table() -> None:
    for party in (Party.SENDER, Party.RECEIVER):
        out = states.apply(states.OFFERED, True, Event.RESUME, party)
        assert out == states.Outcome(states.OFFERED, True)
        for state in (states.ACCEPTED, states.CONNECTING, states.TRANSFERRING):
            assert states.apply(state, True, Event.RESUME, party).state == states.ACCEPTED
    with pytest.raises(states.NotPermitted):
        states.apply(states.ACCEPTED, True, Event.RESUME, Party.BROKER)


@pytest.mark.parametrize("state", sorted(states.FINAL_STATES))
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
