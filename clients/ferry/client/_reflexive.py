"""Gathering: the candidates of one side's data ports, host and server-reflexive.

A side's *host* candidates are its interfaces' addresses (`local_candidates`) with its data
ports. Its *server-reflexive* candidate is how the broker's reflexive responder saw a
connection from a data port (a STUN Binding over TCP, `ferry.protocol.stun`): the public
address and port a NAT gave it. That probe connection is kept open while the checks run
(`Gathered.close` ends it): some NATs forget a mapping as soon as no connection uses it.

A probe that fails (no responder, a firewall, a timeout) only costs the reflexive candidate:
host candidates still work on a LAN, and the object store is there for the rest.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

from ferry.client._broker import BrokerError, BrokerLink
from ferry.client._candidates import local_candidates
from ferry.client._punch import data_socket, sock_address
from ferry.protocol import stun
from ferry.v1 import broker_pb2

__all__ = ["PROBE_TIMEOUT", "Gathered", "ask", "gather", "probe", "publish"]

#: Seconds one reflexive probe may take (connect, ask, answer).
PROBE_TIMEOUT = 2.0

HOST = broker_pb2.Candidate.KIND_HOST
REFLEXIVE = broker_pb2.Candidate.KIND_SERVER_REFLEXIVE


def probe(
    port: int, server: tuple[str, int], timeout: float = PROBE_TIMEOUT
) -> tuple[socket.socket, tuple[str, int]]:
    """Ask the responder at ``server`` how data port ``port`` looks from outside: the open
    probe connection (the caller closes it) and the ``(ip, port)`` it saw."""
    host, server_port = server
    infos = socket.getaddrinfo(host, server_port, type=socket.SOCK_STREAM)
    last: Exception | None = None
    for info in infos:
        address = sock_address(str(info[4][0]), server_port)
        if address is None:
            continue
        sock = data_socket(port)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
            mapped = ask(sock)
        except (OSError, stun.StunError) as exc:
            sock.close()
            last = exc
            continue
        return sock, mapped
    raise OSError(f"the reflexive responder at {host}:{server_port} did not answer: {last}")


def ask(sock: socket.socket) -> tuple[str, int]:
    """One Binding request on a connection to a responder: the ``(ip, port)`` it saw the
    connection come from (OSError, StunError)."""
    transaction = os.urandom(stun.TRANSACTION_ID_SIZE)
    sock.sendall(stun.binding_request(transaction))
    header = _read(sock, stun.HEADER_SIZE)
    body = _read(sock, stun.message_size(header) - stun.HEADER_SIZE)
    return stun.parse_binding_response(header + body, transaction)


def _read(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        got = sock.recv(n - len(data))
        if not got:
            raise OSError("the reflexive responder closed the connection")
        data += got
    return bytes(data)


@dataclass
class Gathered:
    """One side's candidates for one attempt, and the probe connections held open."""

    ports: list[int]
    candidates: list[broker_pb2.Candidate]
    probes: list[socket.socket] = field(default_factory=list)
    #: Why the reflexive candidate is missing, if it is.
    reflexive_error: str = ""

    def close(self) -> None:
        for sock in self.probes:
            with contextlib.suppress(OSError):
                sock.close()
        self.probes.clear()


def gather(ports: Sequence[int], server: tuple[str, int] | None) -> Gathered:
    """The candidates of data ports ``ports``: every host address with them all, and the
    public address the responder at ``server`` saw with the port it saw for each (one
    probe per port, at once). Without a server, or if a probe fails, host ones only."""
    hosts = local_candidates()
    out = Gathered(
        list(ports),
        [broker_pb2.Candidate(ip=c.ip, kind=HOST, ports=list(ports)) for c in hosts],
    )
    if server is None or not ports:
        out.reflexive_error = "the broker has no reflexive responder"
        return out
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(ports), 8)) as pool:
        futures = [pool.submit(probe, port, server) for port in ports]
        results: list[tuple[str, int] | None] = []
        for future in futures:
            try:
                sock, mapped = future.result()
            except OSError as exc:
                out.reflexive_error = str(exc)
                results.append(None)
                continue
            out.probes.append(sock)
            results.append(mapped)
    seen = [r for r in results if r is not None]
    if len(seen) != len(ports) or len({ip for ip, _ in seen}) != 1:
        # Every port needs its public twin, on one public address (else: host ones only).
        if not out.reflexive_error:
            out.reflexive_error = "the data ports showed different public addresses"
        return out
    public = str(ipaddress.ip_address(seen[0][0]))
    mapped_ports = [port for _, port in seen]
    same = any(c.ip == public and list(c.ports) == mapped_ports for c in out.candidates)
    if not same:  # not behind a NAT: the host candidate says it already
        out.candidates.append(broker_pb2.Candidate(ip=public, kind=REFLEXIVE, ports=mapped_ports))
    return out


async def publish(
    link: BrokerLink, name: str, attempt: int, ports: Sequence[int], gathered: list[Gathered]
) -> None:
    """Gather the candidates of data ports `ports` for `attempt` (host, and reflexive
    through the broker's responder), publish them for the peer to punch toward, and hold
    the probe connections until cancelled (the attempt's end; the caller closes what it
    finds in `gathered`). A broker that cannot take them only costs the peer those pairs."""
    server: tuple[str, int] | None = None
    with contextlib.suppress(BrokerError):
        server = await link.reflexive_target()
    found = await asyncio.to_thread(gather, ports, server)
    gathered.append(found)
    with contextlib.suppress(BrokerError):
        await link.publish_candidates(name, attempt, found.candidates)
    await asyncio.Event().wait()
