"""kill -9 at random points, then rerun: every transfer still ends verified, nothing stray.

Each round starts a real `ferry send` and `ferry receive` against a real broker, kills one
of the three processes (sender, receiver or broker) with SIGKILL at a random moment, starts
the same command again (same arguments, same local state), and waits for both sides to
report a verified completion. The destination must then hold exactly the source bytes and
no temporary file or journal.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BrokerFactory
from tests.support.files import sha256
from tests.support.processes import BrokerProcess, FerryProcess

pytestmark = [pytest.mark.timeout(240)]

SIZE = 96 << 20
CHUNK = "256K"


class Round:
    """One sender and one receiver, each with its own local state folder."""

    def __init__(self, root: Path, broker: BrokerProcess, source: Path) -> None:
        self.root = root
        self.broker = broker
        self.source = source
        self.dest = root / "dest"
        self.code = ""

    def _env(self, who: str) -> dict[str, str]:
        return {
            **os.environ,
            "FERRY_BROKER": self.broker.address,
            "XDG_STATE_HOME": str(self.root / f"state-{who}"),
            "PYTHONUNBUFFERED": "1",
        }

    def send(self) -> FerryProcess:
        return FerryProcess(
            ["send", str(self.source), "--json", "--chunk-size", CHUNK],
            self._env("sender"),
            self.root,
        ).start()

    def receive(self) -> FerryProcess:
        return FerryProcess(
            ["receive", self.code, "--dest", str(self.dest), "--yes", "--json"],
            self._env("receiver"),
            self.root,
        ).start()


def _kill(proc: FerryProcess | BrokerProcess) -> None:
    assert proc.proc is not None
    if proc.proc.poll() is None:
        proc.proc.send_signal(signal.SIGKILL)
    proc.proc.wait(timeout=10)


Outcome = tuple[int, list[dict[str, Any]], str]


def _kill_unfinished(proc: FerryProcess) -> Outcome | None:
    """SIGKILL a CLI run; its outcome if it had printed its completion line already."""
    _kill(proc)
    _, lines, err = proc.finish(10)
    if lines and lines[-1].get("event") == "completed":
        return 0, lines, err  # it was only tidying up: the transfer is done
    return None


def _last(lines: list[dict[str, Any]], err: str) -> dict[str, Any]:
    assert lines, err
    return lines[-1]


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["receiver", "sender", "broker"])
def test_kill_at_random_points_and_rerun(
    victim: str, tmp_path: Path, broker_factory: BrokerFactory
) -> None:
    rng = random.Random(f"{victim}-{os.getpid()}-{time.time_ns()}")
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(SIZE))
    want = sha256(source)
    for round_no in range(3):
        broker = broker_factory(name=f"broker-{round_no}")
        r = Round(tmp_path / f"round-{round_no}", broker, source)
        r.root.mkdir()
        started: list[FerryProcess] = []
        try:
            sender = r.send()
            started.append(sender)
            first = sender.line()
            assert first["event"] == "offered"
            r.code = first["code"]
            receiver = r.receive()
            started.append(receiver)
            delay = rng.uniform(0.0, 1.5)
            time.sleep(delay)
            received: Outcome | None = None
            sent: Outcome | None = None
            if victim == "receiver":
                received = _kill_unfinished(receiver)
                if received is None:
                    receiver = r.receive()
                    started.append(receiver)
            elif victim == "sender":
                sent = _kill_unfinished(sender)
                if sent is None:
                    sender = r.send()
                    started.append(sender)
                    assert sender.line()["event"] == "resumed"
            else:
                _kill(broker)
                broker.start()  # same port, same data directory
            rc, lines, err = received or receiver.finish(180)
            note = f"victim {victim}, round {round_no}, killed after {delay:.2f} s: {err}"
            assert rc == 0, note
            done = _last(lines, note)
            assert done["event"] == "completed", note
            assert done["bytes"] == SIZE
            assert done["bytes_transferred"] + done["bytes_resumed"] == SIZE, note
            src_rc, src_lines, src_err = sent or sender.finish(60)
            assert src_rc == 0, f"{note}\nsender: {src_err}"
            assert _last(src_lines, src_err)["event"] == "completed"
            assert sha256(r.dest / "source.bin") == want, note
            assert sorted(p.name for p in r.dest.iterdir()) == ["source.bin"], note
        finally:
            for proc in started:
                proc.kill()
            broker.kill()


def _offered(
    tmp_path: Path, broker_factory: BrokerFactory, size: int
) -> tuple[BrokerProcess, Path, Round, FerryProcess]:
    """A broker, a random source file of ``size`` bytes, and a sender that offered it."""
    broker = broker_factory()
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(size))
    r = Round(tmp_path / "round", broker, source)
    r.root.mkdir()
    sender = r.send()
    r.code = sender.line()["code"]
    return broker, source, r, sender


def _wait_for_journal(dest: Path, fraction: int) -> Path:
    """The receiver's journal once it records 1/``fraction`` of the file's chunks (it holds
    one 49-byte record per verified chunk; the .ferry-part file is allocated whole up front)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = list(dest.glob(".ferry-*.journal")) if dest.exists() else []
        if found and found[0].stat().st_size >= 49 * (SIZE // fraction // (256 << 10)):
            return found[0]
        time.sleep(0.01)
    raise AssertionError("the receiver never wrote a chunk")


@pytest.mark.parametrize("mtime", ["new", "put back"])
def test_source_changed_while_interrupted_fails_instead_of_mixing(
    mtime: str, tmp_path: Path, broker_factory: BrokerFactory
) -> None:
    _, source, r, sender = _offered(tmp_path, broker_factory, SIZE)
    receiver = r.receive()
    _wait_for_journal(r.dest, 8)
    receiver.kill()
    sender.kill()
    before = source.stat()
    with source.open("r+b") as f:  # the same size, other bytes
        f.write(b"changed!")
    if mtime == "new":
        os.utime(source, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
    else:  # `touch -r`: the mtime as it was; only the ctime tells
        os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert source.stat().st_mtime_ns == before.st_mtime_ns
    rc, lines, err = r.send().finish(60)
    assert rc == 1
    assert "changed since they were offered" in lines[-1]["error"], err
    # The receiver learns the session failed and drops its partial data: no mixed file.
    rc, lines, err = r.receive().finish(60)
    assert rc == 1
    assert "changed since they were offered" in lines[-1]["error"], err
    assert sorted(p.name for p in r.dest.iterdir()) == []


@pytest.mark.slow
def test_broker_outage_while_the_sender_restarts_keeps_the_receivers_data(
    tmp_path: Path, broker_factory: BrokerFactory
) -> None:
    """Unreachable is not final: a receiver that cannot reach the broker keeps what it has."""
    broker, source, r, sender = _offered(tmp_path, broker_factory, SIZE)
    receiver = FerryProcess(
        [
            *["receive", r.code, "--dest", str(r.dest), "--yes", "--json"],
            *["--stall-timeout", "3", "--broker-wait", "2"],
        ],
        r._env("receiver"),
        r.root,
    ).start()
    journal = _wait_for_journal(r.dest, 8)
    sender.kill()
    broker.kill()
    rc, lines, err = receiver.finish(60)
    assert rc == 1, err
    assert "kept" in _last(lines, err)["error"], err
    held = journal.stat().st_size
    assert held >= 49 * (SIZE // 8 // (256 << 10)), "the verified chunks were thrown away"
    assert list(r.dest.glob(".source.bin.*.ferry-part")), "the partial file was deleted"
    broker.start()  # it comes back (same port, same data)
    sender = r.send()
    assert sender.line()["event"] == "resumed"
    rc, lines, err = r.receive().finish(120)
    assert rc == 0, err
    done = _last(lines, err)
    assert done["event"] == "completed"
    assert done["bytes_resumed"] >= (held // 49 - 1) * (256 << 10) // 2, done
    assert done["bytes_resumed"] + done["bytes_transferred"] == SIZE
    src_rc, src_lines, src_err = sender.finish(60)
    assert src_rc == 0, src_err
    assert _last(src_lines, src_err)["event"] == "completed"
    assert sha256(r.dest / "source.bin") == sha256(source)
    assert sorted(p.name for p in r.dest.iterdir()) == ["source.bin"]


def test_stall_timeout_bounds_the_wait_for_a_vanished_sender(
    tmp_path: Path, broker_factory: BrokerFactory
) -> None:
    """--stall-timeout is the whole wait, not that plus the broker's connect deadline (30 s)."""
    _, _, r, sender = _offered(tmp_path, broker_factory, 1 << 20)
    sender.kill()  # gone before the receiver even accepts
    started = time.monotonic()
    receiver = FerryProcess(
        [
            *["receive", r.code, "--dest", str(r.dest), "--yes", "--json"],
            *["--stall-timeout", "2", "--via", "direct"],
        ],
        r._env("receiver"),
        r.root,
    ).start()
    rc, lines, err = receiver.finish(60)
    elapsed = time.monotonic() - started
    assert rc == 1, err
    assert "run the same command again" in _last(lines, err)["error"], err
    assert elapsed < 15, f"gave up after {elapsed:.1f} s with --stall-timeout 2"
