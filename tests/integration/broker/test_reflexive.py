"""The broker's reflexive responder on real broker processes: where it is (GetBrokerInfo and
the listening line), what it answers a data socket, IPv6, off, and a port that is taken;
and start_reflexive in this process on every kind of host.

A client asks from its *data socket*: a socket bound to a known local port with SO_REUSEADDR
and SO_REUSEPORT, which a listener shares. The answer must be that very port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from ferry.broker.reflexive import ReflexiveLimits, ReflexiveResponder, start_reflexive
from ferry.client._reflexive import ask
from ferry.protocol.stun import HEADER_SIZE, binding_request, message_size
from ferry.protocol.stun import parse_binding_response as parse
from ferry.v1 import broker_pb2, broker_pb2_grpc
from tests.conftest import BrokerFactory
from tests.support.processes import FAST_BROKER, BrokerProcess

pytestmark = pytest.mark.timeout(60)

T = 5.0  # deadline of every call and socket operation, seconds


def _info(broker: BrokerProcess) -> broker_pb2.GetBrokerInfoResponse:
    with grpc.insecure_channel(broker.address) as channel:
        stub = broker_pb2_grpc.BrokerServiceStub(channel)
        return stub.GetBrokerInfo(broker_pb2.GetBrokerInfoRequest(), timeout=T)


def _target(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _data_socket(host: str) -> socket.socket:
    """A socket on a free local port of ``host``, as a client's data socket is made."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.settimeout(T)
    sock.bind((host, 0))
    return sock


@contextlib.contextmanager
def _from_port(host: str, port: int, target: tuple[str, int]) -> Iterator[socket.socket]:
    """A connection to ``target`` from ``host:port`` (a port a listener holds too)."""
    sock = _data_socket(host) if port == 0 else _reusing(host, port)
    try:
        sock.connect(target)
        yield sock
    finally:
        sock.close()


def _reusing(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.settimeout(T)
    sock.bind((host, port))
    return sock


def _ipv6_loopback() -> str | None:
    """Why ::1 cannot be used here, or None if it can."""
    if not socket.has_ipv6:
        return "Python was built without IPv6"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        return f"cannot bind ::1: {exc}"
    return None


def test_the_responder_answers_the_data_sockets_port(broker: BrokerProcess) -> None:
    line = broker.listening["reflexive_address"]
    host, port = _target(line)
    assert host == "127.0.0.1"
    assert broker.reflexive_address == line
    # GetBrokerInfo: no host (the broker's, as the client dialed it) and the bound port.
    assert _info(broker).reflexive_address == f":{port}"
    with _data_socket("127.0.0.1") as listener:
        listener.listen()  # the data socket's port listens, as a sender's does
        local = listener.getsockname()[1]
        with _from_port("127.0.0.1", local, (host, port)) as sock:
            assert sock.getsockname()[1] == local
            assert ask(sock) == ("127.0.0.1", local)


def test_two_requests_on_one_connection_and_it_stays_open(broker: BrokerProcess) -> None:
    target = _target(broker.reflexive_address)
    with _from_port("127.0.0.1", 0, target) as sock:
        local = sock.getsockname()
        assert ask(sock) == local
        assert ask(sock) == local
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):  # held open (a client holds it while it punches)
            sock.recv(1)
        sock.settimeout(T)
        assert ask(sock) == local


def test_the_auto_port_is_the_grpc_port_plus_one(broker_factory: BrokerFactory) -> None:
    port = _free_pair()
    broker = broker_factory("--listen", f"127.0.0.1:{port}")
    assert broker.address == f"127.0.0.1:{port}"
    assert broker.reflexive_address == f"127.0.0.1:{port + 1}"
    assert _info(broker).reflexive_address == f":{port + 1}"
    with _from_port("127.0.0.1", 0, _target(broker.reflexive_address)) as sock:
        assert ask(sock) == sock.getsockname()


def _free_pair() -> int:
    """A port P such that P and P + 1 were both free just now."""
    for _ in range(50):
        with socket.socket() as one:
            one.bind(("127.0.0.1", 0))
            port = one.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as two:
                try:
                    two.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return int(port)
    pytest.fail("no two free ports in a row")


def test_a_restart_comes_back_on_the_same_responder_port(broker: BrokerProcess) -> None:
    before = broker.reflexive_address
    broker.restart()
    assert broker.reflexive_address == before
    with _from_port("127.0.0.1", 0, _target(before)) as sock:
        assert ask(sock) == sock.getsockname()


def test_ipv6_and_ipv4_on_a_dual_stack_responder(broker_factory: BrokerFactory) -> None:
    why = _ipv6_loopback()
    if why is not None:
        pytest.skip(f"no IPv6 loopback here: {why}")
    broker = broker_factory("--reflexive-listen", "[::]:0")
    host, port = _target(broker.reflexive_address)
    assert host == "::"
    assert _info(broker).reflexive_address == f":{port}"
    with _from_port("::1", 0, ("::1", port)) as sock:
        assert ask(sock) == ("::1", sock.getsockname()[1])
    with _from_port("127.0.0.1", 0, ("127.0.0.1", port)) as sock:  # a v4 peer: v4, not ::ffff:
        assert ask(sock) == ("127.0.0.1", sock.getsockname()[1])


def test_ipv6_loopback_only(broker_factory: BrokerFactory) -> None:
    why = _ipv6_loopback()
    if why is not None:
        pytest.skip(f"no IPv6 loopback here: {why}")
    broker = broker_factory("--reflexive-listen", "[::1]:0")
    assert broker.reflexive_address.startswith("[::1]:")
    with _from_port("::1", 0, _target(broker.reflexive_address)) as sock:
        assert ask(sock) == ("::1", sock.getsockname()[1])


def test_off(broker_factory: BrokerFactory) -> None:
    broker = broker_factory("--reflexive-listen", "")
    assert "reflexive_address" not in broker.listening
    assert broker.reflexive_address == ""
    assert _info(broker).reflexive_address == ""


def test_an_advertised_address_is_what_clients_are_told(broker_factory: BrokerFactory) -> None:
    broker = broker_factory("--reflexive-advertise", "stun.example.net:3478")
    assert _info(broker).reflexive_address == "stun.example.net:3478"
    with _from_port("127.0.0.1", 0, _target(broker.reflexive_address)) as sock:
        assert ask(sock) == sock.getsockname()  # it still listens where it was told to


def test_a_taken_responder_port_fails_the_start(
    broker_factory: BrokerFactory, tmp_path: Path
) -> None:
    first = broker_factory()
    taken = first.reflexive_address
    started = time.monotonic()
    done = subprocess.run(
        [
            *(sys.executable, "-m", "ferry.broker", "--listen", "127.0.0.1:0"),
            *("--data-dir", str(tmp_path / "second"), "--reflexive-listen", taken),
            *FAST_BROKER,
        ],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=20,  # a second broker that did start is killed here, failing the test
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""  # no listening line
    message = f"ferry-broker: error: cannot listen on {taken}: address already in use"
    assert done.stderr.splitlines()[-1] == message
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 20
    # the first broker answers on, both ways
    assert _info(first).reflexive_address == f":{_target(taken)[1]}"
    with _from_port("127.0.0.1", 0, _target(taken)) as sock:
        assert ask(sock) == sock.getsockname()


# -- start_reflexive in this process: every kind of host, and close ------------------------


async def _ask_from(host: str, port: int) -> tuple[asyncio.StreamWriter, asyncio.StreamReader]:
    """A connection from ``host`` to the responder, answered once (and so held)."""
    reader, writer = await asyncio.open_connection(host, port, local_addr=(host, 0))
    local = writer.get_extra_info("sockname")[:2]
    tid = secrets.token_bytes(12)
    writer.write(binding_request(tid))
    header = await asyncio.wait_for(reader.readexactly(HEADER_SIZE), T)
    rest = await reader.readexactly(message_size(header) - HEADER_SIZE)
    assert parse(header + rest, tid) == local
    return writer, reader


@pytest.mark.asyncio
@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "::", "[::]", ""])
async def test_start_reflexive_on_any_host(host: str) -> None:
    v6 = _ipv6_loopback() is None and socket.has_dualstack_ipv6()
    if host.strip("[]") == "::" and not v6:
        pytest.skip("no dual-stack IPv6 here: '::' is every IPv4 interface")
    clients = ["127.0.0.1"] + (["::1"] if v6 and host.strip("[]") in ("::", "") else [])
    responder = await start_reflexive(host, 0, ReflexiveLimits(hold_s=T))
    held = []
    try:
        for client in clients:
            held.append(await _ask_from(client, responder.port))
        assert responder.connections == len(clients)
    finally:
        await responder.close()  # closes the held connections too
    assert responder.connections == 0
    for writer, reader in held:
        assert await asyncio.wait_for(reader.read(1), T) == b""
        writer.close()
        await writer.wait_closed()


@pytest.mark.asyncio
async def test_a_responder_that_never_started_lets_go_of_its_port() -> None:
    responder = ReflexiveResponder("127.0.0.1", 0)
    port = responder.port
    with socket.socket() as other, pytest.raises(OSError, match="in use"):
        other.bind(("127.0.0.1", port))
    await responder.close()
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.bind(("127.0.0.1", port))
