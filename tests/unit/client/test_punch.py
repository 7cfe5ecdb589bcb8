"""The connectivity checks' parts on real loopback sockets: data sockets that share a port,
the dialer that keeps dialing (and is bounded), the gate's adopted connections, and the
gathering of host and reflexive candidates against a real reflexive responder."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from ferry.broker.reflexive import ReflexiveLimits, start_reflexive
from ferry.client._gate import Gate, GateLimits, GateSettingError
from ferry.client._punch import (
    MAX_TARGETS,
    MAX_TRIES_PER_SECOND,
    Dialer,
    Target,
    data_socket,
    endpoint,
    lease_targets,
    path_timeout,
    reserve_ports,
    targets_of,
)
from ferry.client._reflexive import REFLEXIVE, gather
from ferry.protocol.knock import NONCE_SIZE, Knocker
from ferry.v1 import broker_pb2
from tests.support.processes import free_port

pytestmark = pytest.mark.timeout(30)

HOST = broker_pb2.Candidate.KIND_HOST


def test_data_sockets_share_their_port() -> None:
    listener = data_socket(0)
    port = listener.getsockname()[1]
    listener.listen(8)
    elsewhere = socket.create_server(("127.0.0.1", 0))
    other = data_socket(port)  # SO_REUSEPORT on both: the probe and the punches share it
    try:
        v4 = other.family == socket.AF_INET
        other.connect(("127.0.0.1" if v4 else "::ffff:127.0.0.1", elsewhere.getsockname()[1]))
        accepted, peer = elsewhere.accept()
        assert peer[1] == port  # it dialed from the listener's port
        accepted.close()
    finally:
        for sock in (other, elsewhere, listener):
            sock.close()


def test_endpoints_show_v4_mapped_addresses_as_ipv4() -> None:
    assert endpoint(("::ffff:192.0.2.1", 5, 0, 0)) == "192.0.2.1:5"
    assert endpoint(("2001:db8::1", 7, 0, 0)) == "[2001:db8::1]:7"
    assert endpoint(("203.0.113.9", 9)) == "203.0.113.9:9"


def test_the_dialer_keeps_dialing_until_a_listener_appears() -> None:
    port = free_port()
    local = reserve_ports(1)
    got: list[tuple[socket.socket, Target]] = []
    dialer = Dialer(lambda sock, target: got.append((sock, target)))
    target = Target(0, "127.0.0.1", port, local[0].getsockname()[1])
    dialer.add([target])
    listener: list[socket.socket] = []

    def late_listener() -> None:
        time.sleep(0.5)  # refused until then: dialed again and again
        listener.append(socket.create_server(("127.0.0.1", port)))

    threading.Thread(target=late_listener).start()
    try:
        stats = dialer.run(lambda: bool(got), time.monotonic() + 10)
        assert [t for _, t in got] == [target]
        assert stats.tries > 2  # refused tries came first
        assert got[0][0].getsockname()[1] == target.local_port
    finally:
        for sock, _ in got:
            sock.close()
        for sock in listener + local:
            sock.close()


def test_the_dialer_stops_at_its_deadline_and_holds_nothing() -> None:
    dialer = Dialer(lambda sock, target: sock.close())
    # 192.0.2.0/24 is routed nowhere here: SYNs go unanswered (or fail at once).
    local = reserve_ports(1)
    dialer.add([Target(0, "192.0.2.1", 9, local[0].getsockname()[1])])
    fds = len(os.listdir("/proc/self/fd"))
    started = time.monotonic()
    dialer.run(lambda: False, time.monotonic() + 1.2)
    assert 1.0 < time.monotonic() - started < 3.0
    assert len(os.listdir("/proc/self/fd")) == fds  # no try left open, nor its wake-up pair
    local[0].close()


def test_a_dialer_keeps_at_most_max_targets_best_first() -> None:
    dialer = Dialer(lambda sock, target: sock.close())
    many = [Target(1, "192.0.2.1", p, 40000) for p in range(1, 200)]
    dialer.add(many)
    dialer.add([Target(0, "192.0.2.2", 1, 40000)])  # full: dropped
    assert len(dialer._targets) == MAX_TARGETS
    fresh = Dialer(lambda sock, target: sock.close())
    fresh.add([*many, Target(0, "192.0.2.2", 1, 40000)])
    assert Target(0, "192.0.2.2", 1, 40000) in fresh._targets  # host kind first
    # The same pair under two kinds is dialed once, as its better kind.
    once = Dialer(lambda sock, target: sock.close())
    once.add([Target(1, "192.0.2.3", 5, 40000, "reflexive"), Target(0, "192.0.2.3", 5, 40000)])
    assert [t.kind for t in once._targets] == ["host"]


def test_targets_from_published_candidates_and_from_the_lease() -> None:
    published = [
        broker_pb2.Candidate(ip="192.0.2.10", kind=HOST, ports=[47100]),
        broker_pb2.Candidate(ip="203.0.113.1", kind=REFLEXIVE, ports=[47100, 47101]),
        broker_pb2.Candidate(ip="203.0.113.1", kind=REFLEXIVE, ports=[0]),
    ]
    first = targets_of(published, 40000)
    assert [(t.ip, t.port, t.kind) for t in first] == [
        ("192.0.2.10", 47100, "host"),
        ("203.0.113.1", 47100, "reflexive"),
    ]
    every = targets_of(published, 47100, every_port=True)
    assert sorted(t.port for t in every) == [47100, 47100, 47101]
    lease = lease_targets(published[:1], range(47100, 47104), 40000)
    assert [t.port for t in lease] == [47100, 47101, 47102, 47103]


def test_reserved_ports_avoid_the_sender_s_range() -> None:
    held = reserve_ports(3)
    try:
        assert len({s.getsockname()[1] for s in held}) == 3
    finally:
        for sock in held:
            sock.close()
    low, high = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    avoid = range(low, (low + high) // 2)  # half of where the kernel picks free ports
    for _ in range(5):
        again = reserve_ports(2, avoid=avoid)
        try:
            assert not {s.getsockname()[1] for s in again} & set(avoid)
        finally:
            for sock in again:
                sock.close()


def test_the_path_timeout_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FERRY_PATH_TIMEOUT", raising=False)
    assert path_timeout() == 10.0
    monkeypatch.setenv("FERRY_PATH_TIMEOUT", "2.5")
    assert path_timeout() == 2.5
    for bad in ("0", "601", "soon"):
        monkeypatch.setenv("FERRY_PATH_TIMEOUT", bad)
        with pytest.raises(GateSettingError, match="FERRY_PATH_TIMEOUT"):
            path_timeout()


def test_the_gate_sorts_a_dialed_connection_like_an_accepted_one() -> None:
    key, name = bytes(range(32)), "sessions/punch"
    knocker = Knocker(key, name, 1)
    listener = socket.create_server(("127.0.0.1", 0))
    admitted: list[int] = []

    def admit(sock: socket.socket, stream: int) -> None:
        admitted.append(stream)
        sock.close()

    gate = Gate(listener, knocker, admit, GateLimits(knock_timeout=0.5))
    stop = threading.Event()
    thread = threading.Thread(target=gate.run, args=(stop.is_set, 0.05))
    thread.start()
    try:
        for stream, knock in ((7, True), (8, False)):
            ours, theirs = socket.socketpair()
            gate.adopt(ours)  # as a punched connection is
            if knock:
                theirs.sendall(knocker.knock(stream, os.urandom(NONCE_SIZE)))
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and gate.stats.admitted + gate.stats.expired < (
                1 if knock else 2
            ):
                time.sleep(0.02)
            theirs.close()
        assert admitted == [7]
        assert gate.stats.expired == 1  # the silent one, after the knock timeout
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()
    late, peer = socket.socketpair()
    gate.adopt(late)  # after the gate ended: closed at once
    assert late.fileno() == -1
    peer.close()


def test_gathering_finds_the_reflexive_twin_of_every_data_port() -> None:
    async def go() -> None:
        server = await start_reflexive("127.0.0.1", 0, ReflexiveLimits())
        port = server.port
        try:
            held = reserve_ports(2)
            ports = [s.getsockname()[1] for s in held]
            found = await asyncio.to_thread(gather, ports, ("127.0.0.1", port))
            try:
                # On loopback there is no NAT: the twin is the host candidate itself.
                assert found.reflexive_error == ""
                assert len(found.probes) == 2
                assert [list(c.ports) for c in found.candidates] == [ports]
                assert [c.kind for c in found.candidates] == [HOST]
            finally:
                found.close()
                for sock in held:
                    sock.close()
            none = await asyncio.to_thread(gather, ports, None)
            assert none.reflexive_error
            assert none.probes == []
            dead = await asyncio.to_thread(gather, ports, ("127.0.0.1", free_port()))
            assert "did not answer" in dead.reflexive_error
            assert [c.kind for c in dead.candidates] == [HOST]  # host ones still
        finally:
            await server.close()

    asyncio.run(go())


def test_a_peer_s_candidates_cannot_turn_the_dialer_into_a_syn_flood() -> None:
    """A hostile peer may publish anyone's address as its candidates, as reflexive ones
    whose resets make us retry within milliseconds: the dialer still makes at most
    MAX_TRIES_PER_SECOND connect() calls a second (after a burst of MAX_TARGETS)."""
    victim = "127.0.0.1"  # every port closed: every SYN answered by a reset at once
    closed = [free_port() for _ in range(MAX_TARGETS)]
    local = reserve_ports(1)
    dialer = Dialer(lambda sock, target: sock.close())
    dialer.add(Target(1, victim, port, local[0].getsockname()[1], "reflexive") for port in closed)
    seconds = 1.5
    try:
        stats = dialer.run(lambda: False, time.monotonic() + seconds)
    finally:
        local[0].close()
    assert stats.connected == 0
    assert stats.tries <= MAX_TARGETS + MAX_TRIES_PER_SECOND * (seconds + 0.1)
    assert stats.tries > MAX_TARGETS  # it did keep trying, as fast as allowed
