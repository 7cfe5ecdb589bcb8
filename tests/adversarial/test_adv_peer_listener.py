"""Finding 8: a stranger's connections to the sender's listener must not cost it a transfer.

Before the fix, the sender started a thread per TCP connection and kept it up to 60 s
before the TLS handshake, without a cap, and failed the transfer on EMFILE: about 1,000
idle connections made a real `ferry send` fail with "Too many open files". Now the
listener's `Gate` spends a thread and TLS only on a connection that opened with the
session's knock, holds at most a bounded number of connections that have not knocked yet
(oldest dropped first, each for at most the knock timeout), closes a wrong knock at once,
and handles EMFILE by holding fewer of them.

The first tests drive the `Gate` alone on a loopback listener (real sockets, a knocker of a
made-up session); the last ones run a real `ferry send` / `ferry receive` pair while a
stranger in this process floods the sender's ports with idle connections, garbage and
wrong knocks (the receiver held still with SIGSTOP once the sender listens, until the
stranger has made its thousand connections), the sender's descriptors limited or not, and
measure its threads and descriptors meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from ferry.client._gate import Gate, GateLimits
from ferry.protocol.knock import KNOCK_MAGIC, KNOCK_SIZE, Knocker
from tests.conftest import FerryFactory
from tests.support.files import random_file, sha256
from tests.support.processes import BrokerProcess, FerryProcess

pytestmark = [pytest.mark.timeout(120)]

NAME = "sessions/test-gate"
KEY = bytes(range(32))
#: Connections the stranger holds open at once in the flood tests.
STRANGER_CONNECTIONS = 1000


# -- the gate alone ---------------------------------------------------------------------------


class _GateRun:
    """A Gate on a loopback listener, in a thread; what it admitted, in order."""

    def __init__(self, limits: GateLimits, attempt: int = 1) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.listener.getsockname()[1]
        self.admitted: list[int] = []
        self.sockets: list[socket.socket] = []
        self.got_one = threading.Event()
        self.gate = Gate(self.listener, Knocker(KEY, NAME, attempt), self._admit, limits)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.gate.run, args=(self._stop.is_set, 0.05))

    def _admit(self, sock: socket.socket, stream: int) -> None:
        self.admitted.append(stream)
        self.sockets.append(sock)
        self.got_one.set()

    def __enter__(self) -> _GateRun:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        assert not self._thread.is_alive()
        self.listener.close()
        for sock in self.sockets:
            sock.close()

    def dial(self, first_bytes: bytes = b"") -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        if first_bytes:
            sock.sendall(first_bytes)
        return sock


def _closed_by_peer(sock: socket.socket, within: float = 5.0) -> bool:
    """True if the other end closed ``sock`` (EOF or reset) within ``within`` seconds."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_gate_admits_a_right_knock_once_and_closes_wrong_ones_at_once() -> None:
    knocker = Knocker(KEY, NAME, 1)
    right = knocker.knock(3, os.urandom(16))
    # The knock timeout is long: whatever closes below was closed for what it sent.
    with _GateRun(GateLimits(knock_timeout=30.0)) as run:
        tls_hello = run.dial(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        garbage = run.dial(os.urandom(KNOCK_SIZE))
        wrong_mac = run.dial(KNOCK_MAGIC + os.urandom(KNOCK_SIZE - len(KNOCK_MAGIC)))
        old_attempt = run.dial(Knocker(KEY, NAME, 2).knock(3, os.urandom(16)))
        other_key = run.dial(Knocker(bytes(32), NAME, 1).knock(3, os.urandom(16)))
        good = run.dial(right)
        assert run.got_one.wait(5)
        replayed = run.dial(right)
        for sock in (tls_hello, garbage, wrong_mac, old_attempt, other_key, replayed):
            assert _closed_by_peer(sock), "a connection without the right knock stayed open"
            sock.close()
        assert run.admitted == [3]
        # The admitted socket is the very connection, its knock consumed.
        good.sendall(b"after the knock")
        run.sockets[0].settimeout(5)
        assert run.sockets[0].recv(100) == b"after the knock"
        good.close()
        assert run.gate.stats.refused == 6
        assert run.gate.stats.admitted == 1


def test_gate_holds_few_silent_connections_briefly() -> None:
    limits = GateLimits(knock_timeout=1.0, max_pending=8)
    silent: list[socket.socket] = []
    with _GateRun(limits) as run:
        try:
            most = 0
            for _ in range(60):
                silent.append(run.dial())
                most = max(most, run.gate.pending)
            # Dropped oldest first: the first ones are closed, the last ones may wait.
            assert _closed_by_peer(silent[0], within=5)
            # A half knock then silence: closed at the knock timeout like any silent one.
            half = run.dial(Knocker(KEY, NAME, 1).knock(0, os.urandom(16))[:20])
            assert _closed_by_peer(half, within=10)
            half.close()
            for sock in silent[-8:]:
                assert _closed_by_peer(sock, within=10)
            # A right knock still gets through after all that.
            good = run.dial(Knocker(KEY, NAME, 1).knock(1, os.urandom(16)))
            assert run.got_one.wait(5)
            good.close()
        finally:
            for sock in silent:
                sock.close()
        assert most <= 8
        assert run.gate.stats.dropped >= 60 - 8
        assert run.admitted == [1]


# -- a real transfer under a flood ------------------------------------------------------------


class Stranger:
    """Floods ``ports`` of 127.0.0.1 from a thread: keeps up to ``hold`` connections open
    (the oldest closed when more are made), a third of them silent, a third sending
    garbage, a third a knock with the right magic and a wrong MAC."""

    def __init__(self, ports: range, hold: int = STRANGER_CONNECTIONS) -> None:
        self.ports = ports
        self.hold = hold
        self.connected = 0
        self.stop = threading.Event()
        self._open: deque[socket.socket] = deque()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Stranger:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join(timeout=10)
        assert not self._thread.is_alive()
        while self._open:
            self._open.popleft().close()

    def _run(self) -> None:
        payloads = [
            b"",
            os.urandom(KNOCK_SIZE),
            KNOCK_MAGIC + os.urandom(KNOCK_SIZE - len(KNOCK_MAGIC)),
        ]
        deadline = time.monotonic() + 100
        live: list[int] = []  # the ports something listens on
        n = 0
        while not self.stop.is_set() and time.monotonic() < deadline:
            if not live:
                live = [p for p in self.ports if _open(p)]
                if not live:
                    self.stop.wait(0.005)  # nobody listens yet
                    continue
            port = live[n % len(live)]
            n += 1
            sock = socket.socket()
            sock.settimeout(0.5)
            try:
                sock.connect(("127.0.0.1", port))
                first = payloads[self.connected % 3]
                if first:
                    sock.sendall(first)
            except OSError as exc:
                sock.close()
                if exc.errno == errno.ECONNREFUSED:
                    live.remove(port)
                continue
            self.connected += 1
            self._open.append(sock)
            if len(self._open) > self.hold:
                self._open.popleft().close()


def _open(port: int) -> bool:
    """Whether something listens on ``port`` of 127.0.0.1 (a connection that is dropped)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


@pytest.fixture
def many_fds() -> Iterator[None]:
    """This process may hold the stranger's connections (and the tests' own files)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, max(soft, 4 * STRANGER_CONNECTIONS))
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _sender(
    tmp_path: Path, env: dict[str, str], args: list[str], nofile: int | None
) -> FerryProcess:
    """`ferry send` with at most ``nofile`` descriptors (None: this process's limit)."""

    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    proc = FerryProcess(["send", *args], env, tmp_path)
    proc.stderr_path = tmp_path / "sender.err"
    with proc.stderr_path.open("wb") as err:
        proc.proc = subprocess.Popen(
            [sys.executable, "-m", "ferry.cli", "send", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=tmp_path,
            env=env,
            preexec_fn=limit,  # only setrlimit, before exec
        )
    return proc


def _listening(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return any(c.status == psutil.CONN_LISTEN for c in proc.net_connections("tcp"))
    return False


@pytest.mark.parametrize("nofile", [None, 64], ids=["default-limit", "64-descriptors"])
def test_transfer_completes_while_a_stranger_floods_the_listener(
    ferry: FerryFactory,
    broker: BrokerProcess,
    tmp_path: Path,
    many_fds: None,
    nofile: int | None,
) -> None:
    first = random.randrange(40000, 46000)
    ports = range(first, first + 8)
    env = {
        **os.environ,
        "FERRY_BROKER": broker.address,
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "FERRY_PORTS": f"{ports[0]}-{ports[-1]}",
        "PYTHONUNBUFFERED": "1",
    }
    source = random_file(tmp_path / "src" / "data.bin", 24 << 20)
    sender = _sender(tmp_path, env, [str(source), "--json"], nofile)
    try:
        offered = sender.line()
        assert offered["event"] == "offered"
        assert sender.proc is not None
        proc = psutil.Process(sender.proc.pid)
        idle_threads, idle_fds = proc.num_threads(), proc.num_fds()
        most_threads, most_fds = idle_threads, idle_fds
        dest = tmp_path / "dest"

        def sample() -> None:
            nonlocal most_threads, most_fds
            with contextlib.suppress(psutil.NoSuchProcess):
                most_threads = max(most_threads, proc.num_threads())
                most_fds = max(most_fds, proc.num_fds())

        with Stranger(ports) as stranger:
            receiver = ferry("receive", offered["code"], "--dest", str(dest), "--yes", "--json")
            assert receiver.proc is not None
            # Once the sender listens, the receiver is held still (SIGSTOP) until the stranger
            # made its thousand connections: the flood is on while the transfer is.
            deadline = time.monotonic() + 30
            while not _listening(proc) and time.monotonic() < deadline:
                sample()
                stranger.stop.wait(0.01)
            receiver.proc.send_signal(signal.SIGSTOP)
            try:
                deadline = time.monotonic() + 15
                while stranger.connected < STRANGER_CONNECTIONS and time.monotonic() < deadline:
                    sample()
                    stranger.stop.wait(0.02)
            finally:
                receiver.proc.send_signal(signal.SIGCONT)
            deadline = time.monotonic() + 60
            while receiver.proc.poll() is None and time.monotonic() < deadline:
                sample()
                stranger.stop.wait(0.02)
            flood = stranger.connected
            rc, lines, err = receiver.finish(30)
        src_rc, _, src_err = sender.finish(30)
    finally:
        sender.kill()
    print(
        f"nofile {nofile}: stranger connections {flood}, sender threads {idle_threads} -> "
        f"at most {most_threads}, fds {idle_fds} -> at most {most_fds}; sender rc {src_rc}"
    )
    assert src_rc == 0, src_err
    assert rc == 0, err
    assert lines[-1]["event"] == "completed"
    assert lines[-1]["path"] == "direct"
    assert sha256(dest / "data.bin") == sha256(source)
    assert flood >= STRANGER_CONNECTIONS, "the stranger hardly got through: the test proves nothing"
    # A thread per stream, not per connection; descriptors bounded by the gate's cap.
    assert most_threads <= idle_threads + 16
    assert most_fds <= idle_fds + GateLimits().max_pending + 24
    assert "Traceback" not in src_err
