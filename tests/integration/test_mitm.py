"""Trust nobody in the middle: an attacker on the receiver's broker link (or a broker that
misbehaves on purpose) cannot make a peer trust another certificate, cannot run the PAKE in
the peers' place, and cannot use what it reads (the nameplate, a party token).

Real processes: `ferry serve`, `ferry send` straight to it, `ferry receive` through
`BrokerMitm`, a gRPC proxy that reads and rewrites every message on the receiver's link.
Every attack must end both sides with the one tampering message, exit 1, and leave nothing
under the receiver's destination.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from ferry.client._broker import BrokerLink
from ferry.client._candidates import peer_info
from ferry.client._tls import Identity
from ferry.protocol.pake import TAMPERED, Code, KeyExchange, PeerRole
from ferry.v1 import broker_pb2
from tests.conftest import FerryFactory
from tests.support.files import random_file, sha256
from tests.support.mitm import BrokerMitm
from tests.support.processes import BrokerProcess, FerryProcess

pytestmark = [pytest.mark.timeout(120)]


def _sessions(message: Any) -> list[broker_pb2.Session]:
    """The Session a broker response carries, if any."""
    if "session" in message.DESCRIPTOR.fields_by_name and message.HasField("session"):
        return [message.session]
    return []


def _files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def _offer(ferry: FerryFactory, source: Path, *extra: str) -> tuple[FerryProcess, str]:
    sender = ferry("send", str(source), "--json", *extra)
    first = sender.line()
    assert first["event"] == "offered"
    return sender, str(first["code"])


def _both_fail_tampered(sender: FerryProcess, receiver: FerryProcess, dest: Path) -> None:
    rc, lines, err = receiver.finish(60)
    assert rc == 1, err
    assert lines[-1]["event"] == "failed"
    assert TAMPERED in lines[-1]["error"], lines[-1]
    src_rc, src_lines, src_err = sender.finish(60)
    assert src_rc == 1, src_err
    assert TAMPERED in src_lines[-1]["error"], src_lines[-1]
    assert _files_under(dest) == []


def test_swapped_certificates_are_refused_before_anything_moves(
    ferry: FerryFactory, broker: BrokerProcess, tmp_path: Path
) -> None:
    """The attacker gives the receiver its own certificate as the sender's (and the sender
    its own as the receiver's): the MAC under the code's key does not check."""
    evil = Identity.generate()

    def swap_down(method: str, message: Any) -> None:
        for session in _sessions(message):
            if session.sender.certificate_der:
                session.sender.certificate_der = evil.cert_der

    def swap_up(method: str, message: Any) -> None:
        if method == "AcceptOffer":
            message.receiver.certificate_der = evil.cert_der

    source = random_file(tmp_path / "src" / "secret.bin", 256 << 10)
    dest = tmp_path / "dest"
    with BrokerMitm(broker.address, on_request=swap_up, on_response=swap_down) as mitm:
        sender, code = _offer(ferry, source)
        receiver = ferry(
            "receive", code, "--dest", str(dest), "--yes", "--json", "--broker", mitm.address
        )
        _both_fail_tampered(sender, receiver, dest)
        # The certificate was refused at once: the receiver never even accepted.
        assert mitm.messages("AcceptOffer") == []


def test_a_certificate_swapped_at_acceptance_is_refused_by_the_sender(
    ferry: FerryFactory, broker: BrokerProcess, tmp_path: Path
) -> None:
    """Only the receiver's certificate is replaced on its way up: the sender refuses to
    serve it, the session fails, and the receiver deletes what it had reserved."""
    evil = Identity.generate()

    def swap_up(method: str, message: Any) -> None:
        if method in ("AcceptOffer", "ResumeSession"):
            peer = message.receiver if method == "AcceptOffer" else message.peer
            peer.certificate_der = evil.cert_der

    source = random_file(tmp_path / "src" / "secret.bin", 256 << 10)
    dest = tmp_path / "dest"
    with BrokerMitm(broker.address, on_request=swap_up) as mitm:
        sender, code = _offer(ferry, source)
        receiver = ferry(
            "receive", code, "--dest", str(dest), "--yes", "--json", "--broker", mitm.address
        )
        _both_fail_tampered(sender, receiver, dest)
        assert len(mitm.messages("AcceptOffer")) >= 1  # it got that far, no further


def test_swapped_pake_messages_fail_both_sides(
    ferry: FerryFactory, broker: BrokerProcess, tmp_path: Path
) -> None:
    """The attacker runs SPAKE2 with each side itself, on its best guess of the password:
    the keys differ, the receiver's proof fails at the sender, the code is burned."""
    guess = Code.new_password()[0]
    as_sender = KeyExchange(PeerRole.SENDER, guess)
    as_receiver = KeyExchange(PeerRole.RECEIVER, guess)

    def swap_up(method: str, message: Any) -> None:
        if method == "ClaimOffer":
            message.pake_message = as_receiver.message

    def swap_down(method: str, message: Any) -> None:
        for session in _sessions(message):
            if session.sender.pake_message:
                session.sender.pake_message = as_sender.message

    source = random_file(tmp_path / "src" / "secret.bin", 256 << 10)
    dest = tmp_path / "dest"
    with BrokerMitm(broker.address, on_request=swap_up, on_response=swap_down) as mitm:
        sender, code = _offer(ferry, source)
        assert Code.parse(code).password != guess
        receiver = ferry(
            "receive", code, "--dest", str(dest), "--yes", "--json", "--broker", mitm.address
        )
        _both_fail_tampered(sender, receiver, dest)
        # All the attacker saw of the code was its nameplate.
        claims = [
            m for m in mitm.messages("ClaimOffer") if isinstance(m, broker_pb2.ClaimOfferRequest)
        ]
        assert [c.code for c in claims] == [Code.parse(code).nameplate]


def test_a_stolen_party_token_cannot_take_the_transfer(
    ferry: FerryFactory, broker: BrokerProcess, tmp_path: Path
) -> None:
    """A passive observer of a plaintext broker link reads the receiver's party token and
    accepts the offer first, with its own certificate: the sender refuses to serve it."""
    source = random_file(tmp_path / "src" / "secret.bin", 256 << 10)
    dest = tmp_path / "dest"
    with BrokerMitm(broker.address) as mitm:
        sender, code = _offer(ferry, source)
        receiver = ferry("receive", code, "--dest", str(dest), "--json", "--broker", mitm.address)
        offer = receiver.line()
        assert offer["event"] == "offer"  # the real receiver is at its consent prompt
        claimed = [
            m for m in mitm.messages("ClaimOffer") if isinstance(m, broker_pb2.ClaimOfferResponse)
        ]
        stolen = claimed[0].party_token
        assert stolen

        async def take_over() -> None:
            link = BrokerLink(broker.address)
            link.token = stolen
            evil = peer_info(Identity.generate(), (40000, 40010))
            evil.certificate_mac = os.urandom(32)  # it cannot make the real one
            try:
                await link.accept(offer["session"], evil)
            finally:
                await link.close()

        asyncio.run(take_over())
        src_rc, src_lines, src_err = sender.finish(60)
        assert src_rc == 1, src_err
        assert TAMPERED in src_lines[-1]["error"]
        assert not any(line["event"] == "connected" for line in src_lines)
        receiver.answer("y")
        rc, _, err = receiver.finish(60)
        assert rc == 1, err
        assert _files_under(dest) == []


def test_a_wrong_code_fails_both_sides_and_burns_the_code(
    ferry: FerryFactory, tmp_path: Path
) -> None:
    source = random_file(tmp_path / "src" / "secret.bin", 64 << 10)
    dest = tmp_path / "dest"
    sender, code = _offer(ferry, source)
    parsed = Code.parse(code)
    wrong = Code(parsed.nameplate, Code.new_password()[0])
    assert wrong.password != parsed.password
    receiver = ferry("receive", str(wrong), "--dest", str(dest), "--yes", "--json")
    _both_fail_tampered(sender, receiver, dest)
    # One guess per code: the right code no longer finds the offer.
    again = ferry("receive", code, "--dest", str(dest), "--yes", "--json")
    rc, lines, err = again.finish(60)
    assert rc == 1, err
    assert "no offer has this code" in lines[-1]["error"]


def test_verification_words_match_on_both_sides(ferry: FerryFactory, tmp_path: Path) -> None:
    source = random_file(tmp_path / "src" / "a.bin", 64 << 10)
    dest = tmp_path / "dest"
    sender, code = _offer(ferry, source, "--verify")
    receiver = ferry("receive", code, "--dest", str(dest), "--yes", "--json", "--verify")
    shown = receiver.line()
    assert shown["event"] == "verify"
    asked = sender.line()
    assert asked["event"] == "verify"
    assert asked["words"] == shown["words"]
    assert len(shown["words"].split("-")) == 4
    sender.answer("y")
    rc, _, err = receiver.finish(60)
    assert rc == 0, err
    assert sha256(dest / "a.bin") == sha256(source)
    assert sender.finish(60)[0] == 0


def test_words_that_do_not_match_stop_the_sender(ferry: FerryFactory, tmp_path: Path) -> None:
    source = random_file(tmp_path / "src" / "a.bin", 64 << 10)
    dest = tmp_path / "dest"
    sender, code = _offer(ferry, source, "--verify")
    receiver = ferry("receive", code, "--dest", str(dest), "--yes", "--json")
    assert sender.line()["event"] == "verify"
    sender.answer("n")
    src_rc, src_lines, _ = sender.finish(60)
    assert src_rc == 1
    assert "verification words did not match" in src_lines[-1]["error"]
    rc, _, err = receiver.finish(60)
    assert rc == 1, err
    assert _files_under(dest) == []
