"""Finding 10: what a peer or the broker writes never acts on the other side's terminal.

Every string of the other side that `ferry` prints -- a decline, cancel or failure reason
(relayed by the broker, up to its 1,024 characters), a peer's Abort reason (up to a control
frame: 1 MiB), an offered file name -- goes through `ferry.files.shown` where it enters a
message, and every line `ferry` writes goes through `ferry.files.terminal_line`. Each test
plays the hostile side in this process against a real `ferry send` or `ferry receive` and
reads what that process wrote: no ESC, BEL, other C0 or C1 control, bidi override, or
line longer than the guard's bound; the hostile words appear escaped; the process stays
small while it handles them. Before the fix, the receiver printed the 1 MiB Abort reason
raw on one line (OSC 52 clipboard write, title change, screen clear included).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from ferry.client import Client
from ferry.client._broker import BrokerLink
from ferry.client._wire import PeerConnection
from ferry.files.display import LINE_CHARS, SHOWN_CHARS
from ferry.protocol import Control, check_hello, hello
from ferry.v1 import broker_pb2, peer_pb2
from tests.conftest import FerryFactory
from tests.support.files import random_file
from tests.support.hostile import HostileFile, HostileSender, Mode
from tests.support.processes import BrokerProcess, FerryProcess
from tests.support.sampling import Peak

pytestmark = [pytest.mark.timeout(90)]

State = broker_pb2.Session.State

#: Writes the clipboard (OSC 52), sets the window title, clears the screen, a C1 CSI, a
#: bidi override, and a newline that would start a forged line.
EVIL = "\x1b]52;c;cm0gLXJmIH4K\x07\x1b]0;pwned\x07\x1b[2J\x1b[H\x9b31m\u202e\nferry: forged line"
#: The longest reason the broker relays (its limit) and the longest an Abort can carry.
BROKER_REASON = (EVIL * 64)[:1024]
ABORT_REASON = EVIL + "A" * ((1 << 20) - 4096)
#: How much a `ferry` process may grow, and how many descriptors it may hold, meanwhile.
RSS_BOUND = 200 << 20
FDS_BOUND = 64


def assert_terminal_safe(text: str) -> None:
    """No byte of ``text`` acts on a terminal, and no line is longer than the guard allows."""
    for number, line in enumerate(text.split("\n"), 1):
        assert len(line) <= LINE_CHARS, f"line {number} has {len(line)} characters"
        bad = sorted({f"U+{ord(c):04X}" for c in line if _unsafe(c)})
        assert not bad, f"line {number} holds {bad}: {line[:200]!r}"
    assert not any(line.startswith("ferry: forged") for line in text.split("\n"))


def _unsafe(ch: str) -> bool:
    cp = ord(ch)
    return cp < 0x20 or 0x7F <= cp <= 0x9F or cp in (0x202E, 0x2066, 0x200B)


class AbortingSender(HostileSender):
    """Answers the receiver's Hello, then gives up with a 1 MiB Abort reason full of escapes."""

    def _converse(self, conn: PeerConnection) -> None:
        event = conn.next_event()
        assert isinstance(event, Control)
        stream = check_hello(event.message, self.name)
        conn.send(hello(self.name, stream))
        message = peer_pb2.PeerMessage()
        message.abort.reason = ABORT_REASON
        conn.send(message)
        with self._lock:
            self.aborts.append("sent")
        self._stop.wait(10)  # let the receiver read it before the socket closes


def _receive(ferry: FerryFactory, code: str, dest: Path) -> tuple[int, str, Peak]:
    receiver = ferry("receive", code, "--dest", str(dest), "--yes")
    assert receiver.proc is not None
    peak = Peak(receiver.proc.pid)
    try:
        rc, _, err = receiver.finish(60)
    finally:
        peak.stop()
    return rc, err, peak


def test_abort_reason_of_a_hostile_sender(
    ferry: FerryFactory, broker: BrokerProcess, tmp_path: Path
) -> None:
    files = [HostileFile("a.txt", b"x" * 1000)]
    with AbortingSender(broker.address, Mode.HONEST, files) as hostile:
        rc, err, peak = _receive(ferry, hostile.code, tmp_path / "dest")
        assert hostile.aborts, "the receiver never said Hello"
    print(f"receiver: rc {rc}, RSS peak {peak.rss >> 20} MiB, fds {peak.fds}, {len(err)} chars")
    assert rc == 1
    assert_terminal_safe(err)
    assert "Traceback" not in err
    # The peer's words are there, escaped, and cut.
    assert "\\x1b]52;c;cm0gLXJmIH4K\\x07" in err
    error = [line for line in err.splitlines() if line.startswith("ferry: error:")]
    assert len(error) == 1, error
    assert len(error[0]) < SHOWN_CHARS + 200, error
    assert peak.rss < RSS_BOUND
    assert peak.fds < FDS_BOUND


def _cancel_after_accept(hostile: HostileSender, reason: str) -> None:
    """The hostile sender ends the session through the broker once the receiver accepted."""

    async def cancel() -> None:
        link = BrokerLink(hostile.broker)
        link.token = hostile.token
        try:
            async for session in link.watch(hostile.name, 30):
                if session.state != State.STATE_OFFERED:
                    await link.cancel(hostile.name, reason)
                    return
        finally:
            await link.close()

    asyncio.run(cancel())


def test_cancel_reason_relayed_by_the_broker(
    ferry: FerryFactory, broker: BrokerProcess, tmp_path: Path
) -> None:
    files = [HostileFile("a.txt", b"x" * 1000)]
    # The sender never answers a Hello: its cancel, through the broker, is what comes.
    with HostileSender(broker.address, Mode.NO_HELLO, files) as hostile:
        canceller = threading.Thread(
            target=_cancel_after_accept, args=(hostile, BROKER_REASON), daemon=True
        )
        canceller.start()
        rc, err, peak = _receive(ferry, hostile.code, tmp_path / "dest")
        canceller.join(10)
    print(f"receiver: rc {rc}, RSS peak {peak.rss >> 20} MiB, fds {peak.fds}")
    assert rc == 1
    assert_terminal_safe(err)
    assert "Traceback" not in err
    assert "cancelled: \\x1b]52;c;" in err, err
    assert peak.rss < RSS_BOUND
    assert peak.fds < FDS_BOUND


def _decline(broker: str, code: str, reason: str) -> None:
    """A hostile receiver: claims the code with the real library, declines with ``reason``."""

    async def run() -> None:
        client = Client(broker)
        incoming = await client.claim(code)
        try:
            await incoming.decline(reason)
        finally:
            await incoming.close()

    asyncio.run(run())


def _sender(ferry: FerryFactory, tmp_path: Path) -> tuple[FerryProcess, str]:
    source = random_file(tmp_path / "src" / "f.bin", 1000)
    sender = ferry("send", str(source), "--json")
    offered = sender.line()
    assert offered["event"] == "offered"
    return sender, offered["code"]


def test_decline_reason_of_a_hostile_receiver(
    ferry: FerryFactory, broker: BrokerProcess, tmp_path: Path
) -> None:
    sender, code = _sender(ferry, tmp_path)
    assert sender.proc is not None
    peak = Peak(sender.proc.pid)
    _decline(broker.address, code, BROKER_REASON)
    rc, lines, err = sender.finish(30)
    peak.stop()
    print(f"sender: rc {rc}, RSS peak {peak.rss >> 20} MiB, fds {peak.fds}")
    assert rc == 1
    assert_terminal_safe(err)
    assert "Traceback" not in err
    assert "declined: \\x1b]52;c;" in err, err
    # The JSON line is ASCII (json escapes), and as bounded as the text line.
    failed = lines[-1]
    assert failed["event"] == "failed"
    assert "\x1b" not in failed["error"]
    assert len(failed["error"]) <= LINE_CHARS
    assert peak.rss < RSS_BOUND
    assert peak.fds < FDS_BOUND
    # `ferry status` on the sender's machine shows the same reason, escaped and cut.
    rc, lines, err = ferry("status").finish(30)
    assert rc == 0, err
    assert_terminal_safe(err)
    assert "declined (\\x1b]52;c;" in err, err
    assert max(map(len, err.splitlines())) < SHOWN_CHARS + 200
