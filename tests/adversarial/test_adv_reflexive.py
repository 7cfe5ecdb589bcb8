"""The reflexive responder under attack: anyone can connect to it, so nothing a connection
does may make the broker hold more than the responder's bounds.

Garbage is closed on its first bytes; a silent (or slow) connection at the first-request
timeout (2 s); every connection after ``--reflexive-hold``, or at its ninth request; more
than ``--reflexive-per-address`` from one source, or ``--reflexive-max-connections`` in all,
are closed as they come while the others are answered; and a flood leaves the broker's
descriptors and memory where its bounds say. Every test runs a real broker with small
limits, so that it is fast.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import struct
import time
from collections.abc import Iterator

import psutil
import pytest

from ferry.client._reflexive import ask
from ferry.protocol.stun import binding_request
from tests.conftest import BrokerFactory
from tests.support.processes import BrokerProcess
from tests.support.sampling import Peak, wait_for

pytestmark = pytest.mark.timeout(60)

T = 5.0  # socket deadline, seconds
FIRST_REQUEST_S = 2.0  # ferry.broker.reflexive.ReflexiveLimits.first_request_s
COOKIE = 0x2112A442


def _target(broker: BrokerProcess) -> tuple[str, int]:
    host, _, port = broker.reflexive_address.rpartition(":")
    return host, int(port)


def _connect(broker: BrokerProcess, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(_target(broker), timeout=T, source_address=(source, 0))


def _closed_after(sock: socket.socket, within: float = T) -> float:
    """Seconds until the responder closes the connection, having sent nothing."""
    started = time.monotonic()
    sock.settimeout(within)
    try:
        data = sock.recv(1)
    except ConnectionResetError:  # closed with our bytes unread: a reset
        data = b""
    assert data == b"", f"the responder answered {data!r} instead of closing"
    return time.monotonic() - started


def _answers(broker: BrokerProcess, source: str = "127.0.0.1") -> bool:
    """Whether a new connection from ``source`` is answered (not closed at once)."""
    with _connect(broker, source) as sock:
        try:
            answer = ask(sock)
        except ConnectionError:
            return False
        assert answer == sock.getsockname()
        return True


@contextlib.contextmanager
def _held(broker: BrokerProcess, source: str, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections from ``source``, each answered once (so each is held)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(_connect(broker, source))
            assert ask(socks[-1]) == socks[-1].getsockname()
        yield socks
    finally:
        for sock in socks:
            sock.close()


def _request(kind: int = 0x0001, length: int = 0, cookie: int = COOKIE) -> bytes:
    return struct.pack(">HHI", kind, length, cookie) + secrets.token_bytes(12)


GARBAGE = {
    "http": b"GET / HTTP/1.1\r\nHost: broker\r\n\r\n",
    "tls": bytes.fromhex("160301020001") + b"\x00" * 64,
    "a response": _request(kind=0x0101),
    "an indication": _request(kind=0x0011),
    "rfc 3489": _request(cookie=0),
    "over the cap": _request(length=1 << 14) + b"\x00" * 4096,
    "length not a multiple of 4": _request(length=6) + b"\x00" * 6,
    "attributes that overrun": _request(length=8) + bytes.fromhex("8022 0010 74657374"),
    "a request then garbage": binding_request(b"x" * 12) + b"\xff" * 100,
}


@pytest.mark.parametrize("payload", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_is_closed_at_once(broker: BrokerProcess, payload: bytes) -> None:
    with _connect(broker) as sock:
        sock.sendall(payload)
        if payload.startswith(binding_request(b"x" * 12)):
            assert len(sock.recv(32, socket.MSG_WAITALL)) == 32  # answered; garbage closes
        assert _closed_after(sock) < 1.0
    assert _answers(broker)  # and the responder answers on


def test_silent_and_slow_connections_go_at_the_first_request_timeout(
    broker: BrokerProcess,
) -> None:
    with _connect(broker) as silent, _connect(broker) as slow:
        slow.sendall(binding_request(b"s" * 12)[:10])  # half a header, then nothing
        took = _closed_after(silent)
        assert FIRST_REQUEST_S - 0.2 < took < FIRST_REQUEST_S + 1.5
        assert _closed_after(slow, 1.0) < 1.0  # accepted at the same time, gone too


def test_a_connection_is_closed_after_hold(broker_factory: BrokerFactory) -> None:
    broker = broker_factory("--reflexive-hold", "1")
    with _connect(broker) as sock:
        started = time.monotonic()
        assert ask(sock) == sock.getsockname()
        _closed_after(sock)
        assert 0.8 < time.monotonic() - started < 2.5


def test_at_most_eight_requests_on_one_connection(broker: BrokerProcess) -> None:
    with _connect(broker) as sock:
        for _ in range(8):
            assert ask(sock) == sock.getsockname()
        sock.sendall(binding_request(secrets.token_bytes(12)))
        assert _closed_after(sock) < 1.0  # the ninth: no answer


def test_per_address_and_total_limits(broker_factory: BrokerFactory) -> None:
    broker = broker_factory("--reflexive-per-address", "3", "--reflexive-max-connections", "6")
    with _held(broker, "127.0.0.1", 3) as first:
        assert not _answers(broker, "127.0.0.1")  # a fourth from the same address
        with _held(broker, "127.0.0.2", 3):  # another address is served
            assert not _answers(broker, "127.0.0.3")  # six in all: a seventh is not
            for sock in first:  # those held are answered on
                assert ask(sock) == sock.getsockname()
            first[0].close()  # one goes: there is room for someone else
            wait_for("a place freed", lambda: _answers(broker, "127.0.0.3"), 3)
    wait_for("every place freed", lambda: _answers(broker, "127.0.0.1"), 3)


def _one_of_a_flood(broker: BrokerProcess, n: int) -> socket.socket:
    """The n-th connection of a flood from 20 addresses: silent, asking, or most of a
    request that never ends, in turn."""
    sock = _connect(broker, f"127.0.0.{1 + n % 20}")
    with contextlib.suppress(OSError):  # refused: it may be closed already
        if n % 3 == 1:
            sock.sendall(binding_request(secrets.token_bytes(12)))
        elif n % 3 == 2:
            sock.sendall(_request(length=512) + b"\x01" * 300)
    return sock


def test_a_flood_holds_at_most_max_connections(broker_factory: BrokerFactory) -> None:
    """300 connections from 20 addresses, each asking and then kept open: the broker holds
    max_connections of them (a descriptor each), answered, and has closed the rest."""
    limit = 32
    broker = broker_factory(
        "--reflexive-max-connections", str(limit), "--reflexive-per-address", "1000"
    )
    assert broker.proc is not None
    process = psutil.Process(broker.proc.pid)
    base = process.num_fds()
    assert _answers(broker)
    wait_for("the probe's descriptor freed", lambda: process.num_fds() <= base, 5)
    socks: list[socket.socket] = []
    try:
        for n in range(300):
            socks.append(_connect(broker, f"127.0.0.{1 + n % 20}"))
            with contextlib.suppress(OSError):  # refused: it may be closed already
                socks[-1].sendall(binding_request(secrets.token_bytes(12)))
        wait_for("the refused closed", lambda: process.num_fds() <= base + limit, 5)
        time.sleep(0.2)
        assert base + limit // 2 < process.num_fds() <= base + limit  # and it stays there
        assert not _answers(broker, "127.0.0.99")  # full: a newcomer is closed at once
    finally:
        for sock in socks:
            sock.close()
    wait_for("every descriptor freed", lambda: process.num_fds() <= base, 5)
    assert _answers(broker)


def test_floods_do_not_grow_memory_or_descriptors(broker_factory: BrokerFactory) -> None:
    """Two floods of connections opened as fast as this test can: the broker's descriptors
    go back to where they were after each, and the second costs no more memory than the
    first (what a connection held or refused cost is given back)."""
    broker = broker_factory("--reflexive-max-connections", "32", "--reflexive-per-address", "8")
    assert broker.proc is not None
    process = psutil.Process(broker.proc.pid)
    for _ in range(20):  # warm up: the first connections' allocations are not the flood's
        assert _answers(broker)
    base = process.num_fds()
    peaks = []
    for _ in range(2):
        peak = Peak(broker.proc.pid)
        socks: list[socket.socket] = []
        try:
            socks = [_one_of_a_flood(broker, n) for n in range(300)]
        finally:
            for sock in socks:
                sock.close()
        wait_for("the flood's descriptors freed", lambda: process.num_fds() <= base, 5)
        peak.stop()
        peaks.append(peak)
    assert peaks[1].rss <= peaks[0].rss + (4 << 20), (peaks[0].rss, peaks[1].rss)
    # Descriptors: back to `base` after each flood (waited for above). Their sampled peaks
    # depend on how the flood and the broker's loop interleave (157 and 264 in one CI run),
    # so they are bounded only by the flood itself, not compared with each other.
    assert all(p.fds <= base + 300 + 32 for p in peaks), [p.fds for p in peaks]
    assert _answers(broker)
