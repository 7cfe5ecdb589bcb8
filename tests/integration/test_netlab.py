"""The network lab itself (tests/support/netlab.py): the NATs behave as the NAT tests of
issue 11 will need them to, and a lab leaves nothing behind.

What is checked, with real TCP between namespaces: a host behind a NAT reaches the broker's
segment and is seen there as its NAT's public address (with its own port, except behind the
symmetric NAT); what the public side sends unasked is dropped, or reset by the "reset" NAT;
an unNATed host is seen as itself; no lab route leads out of the machine.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tests.support.netlab import BROKER_IP, Lab, NatKind, lab, lab_namespaces

pytestmark = [pytest.mark.timeout(60)]

PORT = 7000
CLIENT_PORT = 40001

_SERVER = f"""
import socket, sys
s = socket.create_server(("0.0.0.0", {PORT}))
print("ready", flush=True)
conn, (ip, port) = s.accept()
conn.recv(1)
print(ip, port, flush=True)
"""

_CLIENT = f"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {CLIENT_PORT}))
s.settimeout(5)
s.connect(("{BROKER_IP}", {PORT}))
s.sendall(b"x")
s.close()
"""


def _seen_from(net: Lab, host: str) -> tuple[str, int]:
    """Connect from ``host`` (local port CLIENT_PORT) to the broker's segment: the address
    and port the broker's side sees."""
    with subprocess.Popen(
        net.python("broker", _SERVER), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    ) as server:
        try:
            assert server.stdout is not None
            assert server.stdout.readline().strip() == "ready"
            subprocess.run(net.python(host, _CLIENT), check=True, timeout=20, capture_output=True)
            ip, port = server.stdout.readline().split()
            return ip, int(port)
        finally:
            server.kill()


def _knock_from_public(net: Lab, target: str) -> str:
    """Connect from the broker's segment to ``target``:CLIENT_PORT, unasked: what happens."""
    code = f"""
import socket
s = socket.socket()
s.settimeout(1.5)
try:
    s.connect(("{target}", {CLIENT_PORT}))
    print("connected")
except socket.timeout:
    print("timeout")
except ConnectionRefusedError:
    print("reset")
except OSError as exc:
    print(type(exc).__name__)
"""
    done = subprocess.run(
        net.python("broker", code), capture_output=True, text=True, timeout=20, check=True
    )
    return done.stdout.strip()


@pytest.mark.parametrize("kind", ["cone", "reset", "symmetric"])
def test_a_host_behind_a_nat_is_seen_as_its_nat(kind: NatKind) -> None:
    with lab(nat_a=kind) as net:
        ip, port = _seen_from(net, "a")
        assert ip == net.public_ip("a") != net.ip("a")
        if kind == "symmetric":
            # masquerade random: a random public port (equal by chance once in ~28,000).
            assert port != CLIENT_PORT
        else:
            assert port == CLIENT_PORT  # Linux masquerade keeps the port when it can


@pytest.mark.parametrize(
    ("kind", "outcome"), [("cone", "timeout"), ("symmetric", "timeout"), ("reset", "reset")]
)
def test_what_the_public_side_sends_unasked_does_not_get_in(kind: NatKind, outcome: str) -> None:
    with lab(nat_a=kind) as net:
        assert _knock_from_public(net, net.public_ip("a")) == outcome
        assert _knock_from_public(net, net.ip("a")) in {"timeout", "OSError", outcome}


def test_an_unnatted_host_is_seen_as_itself() -> None:
    with lab(nat_a="open") as net:
        ip, port = _seen_from(net, "a")
        assert (ip, port) == (net.ip("a"), CLIENT_PORT)


def test_no_lab_route_leads_out_of_the_machine() -> None:
    with lab() as net:
        for role in ("public", "broker", "nat_a", "nat_b"):
            routes = subprocess.run(
                ["ip", "-n", net.ns(role), "route", "show", "default"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            assert routes.strip() == "", (role, routes)


def _fail_inside_a_lab(tags: list[str]) -> None:
    with lab() as net:
        tags.append(net.tag)
        assert len(lab_namespaces(net.tag)) == 6
        raise RuntimeError("the test failed")


def test_a_lab_is_torn_down_also_when_the_test_fails() -> None:
    tags: list[str] = []
    with pytest.raises(RuntimeError, match="the test failed"):
        _fail_inside_a_lab(tags)
    assert len(tags) == 1
    assert lab_namespaces(tags[0]) == []


def test_the_host_loopback_is_not_the_labs() -> None:
    """A lab host reaches nothing of the machine's own: no listener on the host's loopback
    is visible from inside (each namespace has its own loopback)."""
    with socket.create_server(("127.0.0.1", 0)) as outside, lab() as net:
        port = outside.getsockname()[1]
        code = f"""
import socket
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=1).close()
    print("reached")
except OSError:
    print("refused")
"""
        done = subprocess.run(
            net.python("a", code), capture_output=True, text=True, timeout=20, check=True
        )
        assert done.stdout.strip() == "refused"


def test_the_lab_script_builds_holds_and_tears_down() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.netlab", "--nat-b", "reset"],
        input="\n",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    tag = done.stdout.split()[1].rstrip(":")
    assert f"ip netns exec fl{tag}-a" in done.stdout
    assert lab_namespaces(tag) == []
