"""A real `ferry receive` against a hostile sender: it must fail cleanly, or recover.

The sender is `tests.support.hostile.HostileSender`, in this process, with a real offer on
the test's real broker; the receiver is the real CLI (`--yes --json`) in a subprocess.
Every failure must be exit code 1, a last JSON line `{"event": "failed", "error": ...}`,
one `ferry: error:` line on stderr, the session FAILED on the broker, and nothing left on
disk: no file of the manifest, no `*.ferry-part`, nothing new outside the destination.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from ferry.client._broker import BrokerError, BrokerLink
from ferry.client._incoming import Incoming
from ferry.client._tls import Identity
from ferry.files import UnsafePathError
from ferry.protocol.pake import SessionKey
from ferry.v1 import broker_pb2
from tests.conftest import BrokerFactory, FerryFactory
from tests.support.hostile import (
    CHUNK_SIZE,
    HostileFile,
    HostileSender,
    Mode,
    offer_request,
    random_ports,
)
from tests.support.processes import BrokerProcess

pytestmark = [pytest.mark.timeout(90)]

State = broker_pb2.Session.State
# Four chunks, the last one short: small enough that bad-digest-once stays under the
# receiver's retry budget (8), large enough for several chunk requests.
SMALL = 3 * CHUNK_SIZE + 1000
# Sixteen chunks: more than one stream's window, so a hang-up lands mid-transfer.
LARGE = 16 * CHUNK_SIZE
RECEIVE_TIMEOUT = 45.0


@pytest.fixture
def broker_args() -> tuple[str, ...]:
    """Extra broker flags; a test overrides it with parametrize."""
    return ()


@pytest.fixture
def broker(broker_factory: BrokerFactory, broker_args: tuple[str, ...]) -> BrokerProcess:
    """This test's broker, started with ``broker_args``."""
    return broker_factory(*broker_args)


@dataclass
class Box:
    """A folder that holds only the destination, so stray writes are seen."""

    root: Path
    dest: Path
    before: set[Path]

    def new_outside_dest(self, tmp_path: Path) -> list[Path]:
        """Paths created under tmp_path outside dest, other than the harness's own."""
        ignored = (tmp_path / "state", tmp_path / "data", self.dest)
        out = []
        for path in _tree(tmp_path) - self.before:
            if any(path == d or d in path.parents for d in ignored):
                continue
            if path.parent == tmp_path and (
                (path.name.startswith("ferry-") and path.suffix == ".err")
                or (path.name.startswith("data-") and path.suffix == ".log")
            ):
                continue
            out.append(path)
        return sorted(out)


def _tree(root: Path) -> set[Path]:
    return {Path(d) / n for d, dirs, files in os.walk(root) for n in (*dirs, *files)}


@pytest.fixture
def box(tmp_path: Path) -> Box:
    """An empty destination inside an otherwise empty folder."""
    root = tmp_path / "box"
    dest = root / "dest"
    dest.mkdir(parents=True)
    return Box(root, dest, _tree(tmp_path))


@pytest.fixture
def hostile(broker: BrokerProcess, request: pytest.FixtureRequest) -> Iterator[HostileSender]:
    """A started hostile sender (mode and size from parametrize via ``request.param``)."""
    mode, size = request.param
    sender = HostileSender(broker.address, mode, [HostileFile("payload.bin", os.urandom(size))])
    try:
        yield sender.start()
    finally:
        sender.stop()


@dataclass
class Outcome:
    """How a `ferry receive` run ended."""

    code: int
    lines: list[dict[str, Any]]
    stderr: str
    seconds: float


def receive(ferry: FerryFactory, sender: HostileSender, dest: Path, *extra: str) -> Outcome:
    """Run `ferry receive CODE --dest DEST --yes --json [EXTRA...]` to its end."""
    started = time.monotonic()
    proc = ferry("receive", sender.code, "--dest", str(dest), "--yes", "--json", *extra)
    code, lines, stderr = proc.finish(timeout=RECEIVE_TIMEOUT)
    return Outcome(code, lines, stderr, time.monotonic() - started)


def assert_failed(
    outcome: Outcome, sender: HostileSender, box: Box, tmp_path: Path, *words: str
) -> str:
    """The receiver failed cleanly: exit 1, JSON and stderr, FAILED, nothing on disk."""
    assert outcome.code == 1, outcome
    assert outcome.lines, outcome
    assert outcome.lines[0]["event"] == "offer", outcome
    last = outcome.lines[-1]
    assert last["event"] == "failed", outcome
    error = str(last["error"])
    for word in words:
        assert word in error.lower(), f"{word!r} not in {error!r}"
    err_lines = outcome.stderr.splitlines()
    assert len(err_lines) == 1, outcome.stderr
    assert err_lines[0].startswith("ferry: error:"), outcome.stderr
    # Nothing of the manifest, no temporary file, nothing outside dest.
    assert sorted(p.name for p in box.dest.iterdir()) == [], list(box.dest.iterdir())
    assert list(box.root.rglob("*.ferry-part")) == []
    assert box.new_outside_dest(tmp_path) == []
    session = sender.session()
    assert session.state == State.STATE_FAILED, session
    assert session.failure_reason, session
    assert sender.error is None, sender.error
    return error


def assert_interrupted(
    outcome: Outcome, sender: HostileSender, box: Box, tmp_path: Path, *words: str
) -> str:
    """The receiver gave up for now: exit 1, nothing visible, the session left to resume."""
    assert outcome.code == 1, outcome
    last = outcome.lines[-1]
    assert last["event"] == "failed", outcome
    error = str(last["error"])
    for word in (*words, "run the same command again to resume"):
        assert word in error.lower(), f"{word!r} not in {error!r}"
    err_lines = outcome.stderr.splitlines()
    assert len(err_lines) == 1, outcome.stderr
    assert err_lines[0].startswith("ferry: error:"), outcome.stderr
    # Only hidden partial data (temporary files and the journal) is kept; nothing outside.
    kept = sorted(p.name for p in box.dest.iterdir())
    assert all(name.startswith(".") for name in kept), kept
    assert any(name.endswith(".journal") for name in kept), kept
    assert box.new_outside_dest(tmp_path) == []
    session = sender.session()
    live = (State.STATE_ACCEPTED, State.STATE_CONNECTING, State.STATE_TRANSFERRING)
    assert session.state in live, session
    return error


# -- chunks that fail their digest ---------------------------------------------------------


@pytest.mark.parametrize("hostile", [(Mode.BAD_DIGEST, SMALL)], indirect=True)
def test_bad_digest_on_every_chunk_fails_after_bounded_retries(
    ferry: FerryFactory, hostile: HostileSender, box: Box, tmp_path: Path
) -> None:
    outcome = receive(ferry, hostile, box.dest)
    assert_failed(outcome, hostile, box, tmp_path, "digest")
    # It did retry (some chunk was asked for again), but not without end: the receiver's
    # budget is 8 bad chunks, plus what was already in flight on its streams.
    assert max(hostile.attempts.values()) >= 2, hostile.attempts
    assert sum(hostile.attempts.values()) <= 9 + 8 * 4, hostile.attempts


@pytest.mark.parametrize("hostile", [(Mode.BAD_DIGEST_ONCE, SMALL)], indirect=True)
def test_bad_digest_once_is_retried_and_the_transfer_completes(
    ferry: FerryFactory, hostile: HostileSender, box: Box, tmp_path: Path
) -> None:
    outcome = receive(ferry, hostile, box.dest)
    assert outcome.code == 0, outcome
    assert outcome.lines[-1]["event"] == "completed", outcome
    assert (box.dest / "payload.bin").read_bytes() == hostile.files[0].data
    assert sorted(p.name for p in box.dest.iterdir()) == ["payload.bin"]
    assert box.new_outside_dest(tmp_path) == []
    # Every chunk came twice: once bad, once good.
    assert set(hostile.attempts) == {(0, i) for i in range(4)}
    assert all(n >= 2 for n in hostile.attempts.values()), hostile.attempts
    assert hostile.session().state == State.STATE_COMPLETED
    assert hostile.error is None, hostile.error


@pytest.mark.parametrize("hostile", [(Mode.DROP_STREAM, LARGE)], indirect=True)
def test_a_dropped_stream_gives_its_chunks_to_the_others(
    ferry: FerryFactory, hostile: HostileSender, box: Box, tmp_path: Path
) -> None:
    outcome = receive(ferry, hostile, box.dest)
    assert outcome.code == 0, outcome
    assert hostile.dropped
    assert (box.dest / "payload.bin").read_bytes() == hostile.files[0].data
    assert sorted(p.name for p in box.dest.iterdir()) == ["payload.bin"]
    # The dropped stream's chunks in flight were asked for again on another stream.
    assert any(n >= 2 for n in hostile.attempts.values()), hostile.attempts
    assert hostile.session().state == State.STATE_COMPLETED


@pytest.mark.parametrize("hostile", [(Mode.BAD_FILE_END, SMALL)], indirect=True)
def test_wrong_whole_file_digest_fails_and_discards_the_received_bytes(
    ferry: FerryFactory, hostile: HostileSender, box: Box, tmp_path: Path
) -> None:
    outcome = receive(ferry, hostile, box.dest)
    # Every chunk was verified and written to the temporary file; it must still go.
    assert set(hostile.attempts) == {(0, i) for i in range(4)}
    assert_failed(outcome, hostile, box, tmp_path, "whole-file digest")


# -- frames that break the protocol --------------------------------------------------------


@pytest.mark.parametrize("hostile", [(Mode.OVERSIZE, SMALL)], indirect=True)
def test_oversize_chunk_fails(
    ferry: FerryFactory, hostile: HostileSender, box: Box, tmp_path: Path
) -> None:
    outcome = receive(ferry, hostile, box.dest)
    error = assert_failed(outcome, hostile, box, tmp_path, "bytes")
    assert str(CHUNK_SIZE + 1) in error, error


@pytest.mark.parametrize("hostile", [(Mode.SHORT, SMALL)], indirect=True)
def test_short_chunk_fails(
    ferry: FerryFactory, hostile: HostileSender, box: Box, tmp_path: Path
) -> None:
    outcome = receive(ferry, hostile, box.dest)
    assert_failed(outcome, hostile, box, tmp_path, "bytes", "chunk")


@pytest.mark.parametrize("hostile", [(Mode.UNREQUESTED, SMALL)], indirect=True)
def test_unrequested_chunk_index_fails(
    ferry: FerryFactory, hostile: HostileSender, box: Box, tmp_path: Path
) -> None:
    outcome = receive(ferry, hostile, box.dest)
    assert_failed(outcome, hostile, box, tmp_path, "not asked for")


@pytest.mark.parametrize("hostile", [(Mode.GARBAGE, SMALL)], indirect=True)
def test_garbage_after_hello_fails(
    ferry: FerryFactory, hostile: HostileSender, box: Box, tmp_path: Path
) -> None:
    outcome = receive(ferry, hostile, box.dest)
    assert_failed(outcome, hostile, box, tmp_path, "frame")
    assert hostile.hellos >= 1


# -- a sender that goes away ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("broker_args", [("--connect-timeout", "2")])
@pytest.mark.parametrize("hostile", [(Mode.HANGUP, LARGE)], indirect=True)
def test_sender_hanging_up_mid_transfer_is_kept_for_resume(
    ferry: FerryFactory, hostile: HostileSender, box: Box, tmp_path: Path
) -> None:
    outcome = receive(ferry, hostile, box.dest, "--stall-timeout", "3")
    assert hostile.hung_up.is_set()
    assert 1 <= hostile.chunks_sent <= hostile.hangup_after  # some data moved first
    assert_interrupted(outcome, hostile, box, tmp_path, "could not reach the sender")
    assert outcome.seconds < 20, outcome


@pytest.mark.slow
@pytest.mark.parametrize("hostile", [(Mode.STALL, 16 * CHUNK_SIZE)], indirect=True)
def test_sender_going_silent_is_given_up_after_the_stall_timeout(
    ferry: FerryFactory, hostile: HostileSender, box: Box, tmp_path: Path
) -> None:
    outcome = receive(ferry, hostile, box.dest, "--stall-timeout", "3")
    assert hostile.chunks_sent >= 1
    assert_interrupted(outcome, hostile, box, tmp_path, "sent nothing for 3 s")
    # One watchdog for the whole transfer: not one timeout per stream in turn.
    assert outcome.seconds < 15, outcome


@pytest.mark.slow
@pytest.mark.parametrize("broker_args", [("--connect-timeout", "3")])
@pytest.mark.parametrize("hostile", [(Mode.NO_HELLO, SMALL)], indirect=True)
def test_sender_that_never_answers_hello_is_given_up(
    ferry: FerryFactory, hostile: HostileSender, box: Box, tmp_path: Path
) -> None:
    outcome = receive(ferry, hostile, box.dest, "--stall-timeout", "3")
    assert hostile.hellos >= 1
    assert_interrupted(outcome, hostile, box, tmp_path, "could not reach the sender")
    assert outcome.seconds < 15, outcome


# -- a sender with another certificate -----------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("broker_args", [("--connect-timeout", "3")])
@pytest.mark.parametrize("hostile", [(Mode.WRONG_CERT, SMALL)], indirect=True)
def test_sender_with_another_certificate_is_refused(
    ferry: FerryFactory, hostile: HostileSender, box: Box, tmp_path: Path
) -> None:
    outcome = receive(ferry, hostile, box.dest, "--stall-timeout", "3")
    assert_interrupted(outcome, hostile, box, tmp_path, "did not present the certificate")
    # The receiver did dial, but no TLS handshake ever completed, so nothing was said.
    assert hostile.tcp_connections >= 1
    assert hostile.tls_failures >= 1
    assert hostile.handshakes == 0
    assert hostile.hellos == 0
    assert hostile.attempts == {}
    assert outcome.seconds < 20, outcome


# -- unsafe paths --------------------------------------------------------------------------

UNSAFE_PATHS = ["../evil.txt", "/abs", "/etc/evil", "a/../../evil.txt", "a/./b", "a//b"]


@pytest.mark.asyncio
@pytest.mark.parametrize("path", UNSAFE_PATHS)
async def test_broker_rejects_an_offer_with_an_unsafe_path(
    broker: BrokerProcess, path: str
) -> None:
    files = [HostileFile("ok.txt", b"fine"), HostileFile(path, b"evil")]
    link = BrokerLink(broker.address)
    try:
        with pytest.raises(BrokerError) as info:
            await link.create_offer(offer_request(files, Identity.generate(), random_ports()))
    finally:
        await link.close()
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.reason == "INVALID_MANIFEST"
    assert link.token == ""


@pytest.mark.asyncio
@pytest.mark.parametrize("path", UNSAFE_PATHS)
async def test_incoming_refuses_a_session_with_an_unsafe_path(
    broker: BrokerProcess, path: str
) -> None:
    session = broker_pb2.Session(
        name="sessions/hostile",
        state=State.STATE_OFFERED,
        manifest=broker_pb2.Manifest(
            chunk_size_bytes=CHUNK_SIZE,
            files=[
                broker_pb2.FileEntry(path="ok.txt", size_bytes=4, mode=0o644),
                broker_pb2.FileEntry(
                    path=path, size_bytes=4, mode=0o644, modify_time=Timestamp(seconds=1)
                ),
            ],
        ),
    )
    link = BrokerLink(broker.address)
    try:
        with pytest.raises(UnsafePathError) as info:
            Incoming(link, session, key=SessionKey(bytes(32)))
    finally:
        await link.close()
    assert info.value.path == path
