"""The conversation's table, written out by hand: every legal move, and that nothing else is.

The expected moves below are literals, not derived from `MOVES`: changing the table means
changing this file too.
"""

from __future__ import annotations

import itertools

import pytest

from ferry.protocol import (
    MOVES,
    Conversation,
    Kind,
    LocalProtocolError,
    RemoteProtocolError,
    Role,
    State,
    Way,
)

R, S = Role.RECEIVER, Role.SENDER
SEND, RECV = Way.SEND, Way.RECEIVE

# (role, state, way, kind) -> next state, every legal move of both sides.
LEGAL: dict[tuple[Role, State, Way, Kind], State] = {
    # The receiver dials and speaks first.
    (R, State.SEND_HELLO, SEND, Kind.HELLO): State.AWAITING_HELLO,
    (R, State.SEND_HELLO, SEND, Kind.ABORT): State.ABORTED,
    (R, State.AWAITING_HELLO, RECV, Kind.HELLO): State.OPEN,
    (R, State.AWAITING_HELLO, RECV, Kind.ABORT): State.ABORTED,
    (R, State.AWAITING_HELLO, SEND, Kind.ABORT): State.ABORTED,
    (R, State.OPEN, SEND, Kind.REQUEST): State.OPEN,
    (R, State.OPEN, SEND, Kind.DIGEST_REQUEST): State.OPEN,
    (R, State.OPEN, SEND, Kind.DONE): State.DONE,
    (R, State.OPEN, SEND, Kind.ABORT): State.ABORTED,
    (R, State.OPEN, RECV, Kind.CHUNK): State.OPEN,
    (R, State.OPEN, RECV, Kind.FILE_END): State.OPEN,
    (R, State.OPEN, RECV, Kind.ABORT): State.ABORTED,
    (R, State.ERROR, SEND, Kind.ABORT): State.ABORTED,
    # The sender listens and answers.
    (S, State.AWAITING_HELLO, RECV, Kind.HELLO): State.SEND_HELLO,
    (S, State.AWAITING_HELLO, RECV, Kind.ABORT): State.ABORTED,
    (S, State.AWAITING_HELLO, SEND, Kind.ABORT): State.ABORTED,
    (S, State.SEND_HELLO, SEND, Kind.HELLO): State.OPEN,
    (S, State.SEND_HELLO, SEND, Kind.ABORT): State.ABORTED,
    (S, State.OPEN, RECV, Kind.REQUEST): State.OPEN,
    (S, State.OPEN, RECV, Kind.DIGEST_REQUEST): State.OPEN,
    (S, State.OPEN, RECV, Kind.DONE): State.DONE,
    (S, State.OPEN, RECV, Kind.ABORT): State.ABORTED,
    (S, State.OPEN, SEND, Kind.CHUNK): State.OPEN,
    (S, State.OPEN, SEND, Kind.FILE_END): State.OPEN,
    (S, State.OPEN, SEND, Kind.ABORT): State.ABORTED,
    (S, State.ERROR, SEND, Kind.ABORT): State.ABORTED,
}

ALL = list(itertools.product(Role, State, Way, Kind))


def at(role: Role, state: State) -> Conversation:
    conversation = Conversation(role)
    conversation.state = state
    return conversation


def test_the_table_holds_exactly_the_legal_moves() -> None:
    table = {
        (role, state, way, kind): nxt
        for role, states in MOVES.items()
        for state, moves in states.items()
        for (way, kind), nxt in moves.items()
    }
    assert table == LEGAL


def test_every_state_of_both_roles_is_in_the_table() -> None:
    assert set(MOVES) == {R, S}
    for role in (R, S):
        assert set(MOVES[role]) == set(State)


def test_initial_states() -> None:
    assert Conversation(R).state is State.SEND_HELLO
    assert Conversation(S).state is State.AWAITING_HELLO


@pytest.mark.parametrize(("role", "state", "way", "kind"), sorted(LEGAL, key=str))
def test_legal_move(role: Role, state: State, way: Way, kind: Kind) -> None:
    conversation = at(role, state)
    assert conversation.move(way, kind) is LEGAL[role, state, way, kind]
    assert conversation.state is LEGAL[role, state, way, kind]


ILLEGAL = [move for move in ALL if move not in LEGAL]


@pytest.mark.parametrize(("role", "state", "way", "kind"), ILLEGAL)
def test_illegal_move_is_the_error_of_the_side_that_made_it(
    role: Role, state: State, way: Way, kind: Kind
) -> None:
    conversation = at(role, state)
    if way is RECV:
        with pytest.raises(RemoteProtocolError, match=f"unexpected {kind.value} from the"):
            conversation.move(way, kind)
        if state in (State.DONE, State.ABORTED):
            assert conversation.state is state  # final states stay final
        else:
            assert conversation.state is State.ERROR  # only Abort is left
    else:
        with pytest.raises(LocalProtocolError, match=f"may not send {kind.value}"):
            conversation.move(way, kind)
        assert conversation.state is state  # nothing was sent


def test_a_whole_receiver_conversation() -> None:
    conversation = Conversation(R)
    steps = [
        (SEND, Kind.HELLO, State.AWAITING_HELLO),
        (RECV, Kind.HELLO, State.OPEN),
        (SEND, Kind.REQUEST, State.OPEN),
        (RECV, Kind.CHUNK, State.OPEN),
        (SEND, Kind.DIGEST_REQUEST, State.OPEN),
        (RECV, Kind.FILE_END, State.OPEN),
        (SEND, Kind.DONE, State.DONE),
    ]
    for way, kind, expected in steps:
        assert conversation.move(way, kind) is expected


def test_a_whole_sender_conversation() -> None:
    conversation = Conversation(S)
    steps = [
        (RECV, Kind.HELLO, State.SEND_HELLO),
        (SEND, Kind.HELLO, State.OPEN),
        (RECV, Kind.REQUEST, State.OPEN),
        (SEND, Kind.CHUNK, State.OPEN),
        (RECV, Kind.DIGEST_REQUEST, State.OPEN),
        (SEND, Kind.FILE_END, State.OPEN),
        (RECV, Kind.DONE, State.DONE),
    ]
    for way, kind, expected in steps:
        assert conversation.move(way, kind) is expected


def test_the_receiver_may_not_send_a_chunk_nor_the_sender_a_request() -> None:
    with pytest.raises(LocalProtocolError, match="the receiver may not send chunk in OPEN"):
        at(R, State.OPEN).move(SEND, Kind.CHUNK)
    with pytest.raises(LocalProtocolError, match="the sender may not send request in OPEN"):
        at(S, State.OPEN).move(SEND, Kind.REQUEST)


def test_error_messages_name_the_peer() -> None:
    with pytest.raises(RemoteProtocolError, match="unexpected request from the receiver"):
        at(S, State.DONE).move(RECV, Kind.REQUEST)
    with pytest.raises(RemoteProtocolError, match="unexpected chunk from the sender"):
        at(R, State.AWAITING_HELLO).move(RECV, Kind.CHUNK)


@pytest.mark.parametrize("state", [State.DONE, State.ABORTED])
def test_fail_leaves_final_states_alone(state: State) -> None:
    conversation = at(R, state)
    conversation.fail()
    assert conversation.state is state


def test_fail_leaves_only_abort() -> None:
    conversation = Conversation(S)
    conversation.fail()
    assert conversation.state is State.ERROR
    assert conversation.move(SEND, Kind.ABORT) is State.ABORTED
