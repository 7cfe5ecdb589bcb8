"""The broker's reflexive responder: STUN Binding over TCP, answered with the caller's address.

A client behind a NAT connects *from its data socket* to this port and asks a STUN Binding
request (ferry.protocol.stun); the answer is the address and port the connection came
from, which is the public side of that socket as the NAT maps it. The client keeps the
connection open while it punches holes (closing it could let the NAT drop the mapping), so
the responder holds it until the client closes it, within bounds.

Anyone can connect, so everything a connection can make the responder hold is bounded
(`ReflexiveLimits`)::

    accepted --over max_connections, or per_address from its source--> closed, no answer
    accepted --no whole first request within first_request_s--------> closed
    accepted --anything not a Binding request------------------------> closed at once
    held     --request number requests_per_connection + 1------------> closed, no answer
    held     --hold_s after it was accepted---------------------------> closed
    held     --the client closes----------------------------------------> closed

The parser holds at most one message (20 + 512 bytes), and the stream stops reading from
the socket while more than twice that waits unparsed, so a connection pins at most that and
one socket read (asyncio's, given back as soon as it is parsed or the connection closed). A
source is a caller's network as every other per-address limit of the broker counts it
(ferry.broker.ratelimit.source_of: an IPv4 address, an IPv6 /64). Refusals are logged at
DEBUG only: a flood must not flood the log.

Connections over a limit are refused after asyncio accepted them (a descriptor and a task
each, for a moment): in a flood the broker holds at most max_connections plus the few
batches of connections accepted and not yet refused (asyncio accepts up to 100 per wake-up).
Measured with max_connections 64: 270-400 descriptors at the peak and RSS flat (66-67
MiB), for floods of 1,000, 3,000 and 6,000 connections alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket

from ferry.broker.ratelimit import source_of
from ferry.protocol.stun import (
    HEADER_SIZE,
    MAX_REQUEST_ATTRIBUTES,
    RequestReader,
    StunError,
    binding_success,
)

__all__ = ["ReflexiveLimits", "ReflexiveResponder", "start_reflexive"]

log = logging.getLogger(__name__)

#: The stream reader's buffer limit: it stops reading from the socket past twice this.
_STREAM_LIMIT = HEADER_SIZE + MAX_REQUEST_ATTRIBUTES


@dataclasses.dataclass(frozen=True, slots=True)
class ReflexiveLimits:
    """What one responder may hold. Durations in seconds."""

    #: Connections held at once in all; more are closed as they come.
    max_connections: int = 1024
    #: Connections held at once from one source (an IPv4 address, an IPv6 /64).
    per_address: int = 32
    #: A connection is closed this long after it was accepted, whatever it does.
    hold_s: float = 30.0
    #: Time a new connection has for its whole first request.
    first_request_s: float = 2.0
    #: Requests answered on one connection; one more closes it.
    requests_per_connection: int = 8
    #: How sources are counted (the broker's caller_ipv4_prefix and caller_ipv6_prefix).
    ipv4_prefix: int = 32
    ipv6_prefix: int = 64

    def __post_init__(self) -> None:
        if min(self.max_connections, self.per_address, self.requests_per_connection) < 1:
            raise ValueError(
                "max_connections, per_address and requests_per_connection must be >= 1"
            )
        if self.hold_s <= 0 or self.first_request_s <= 0:
            raise ValueError("hold_s and first_request_s must be > 0")


class ReflexiveResponder:
    """A responder bound to host:port (port 0 picks one); it answers once `start` ran.

    Binding happens in the constructor, so that a caller can bind every port it needs
    before it starts serving on any: OSError if it cannot (``errno.EADDRINUSE`` when
    another socket listens there). `port` is the port bound.
    """

    def __init__(self, host: str, port: int, limits: ReflexiveLimits | None = None) -> None:
        self.limits = limits or ReflexiveLimits()
        self._sock = _bind(host, port)
        self.port: int = self._sock.getsockname()[1]
        self._server: asyncio.Server | None = None
        self._held: dict[asyncio.Task[None], str] = {}  # connection task -> its source
        self._per_source: dict[str, int] = {}

    @property
    def connections(self) -> int:
        """Connections held now."""
        return len(self._held)

    async def start(self) -> None:
        """Start accepting on the bound socket."""
        try:
            self._server = await asyncio.start_server(
                self._connected, sock=self._sock, limit=_STREAM_LIMIT
            )
        except BaseException:
            self._sock.close()
            raise

    async def close(self) -> None:
        """Stop accepting and close every held connection (or the socket, if never started)."""
        if self._server is None:
            self._sock.close()
        else:
            self._server.close()
        tasks = list(self._held)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            await self._server.wait_closed()

    def _admit(self, source: str) -> str | None:
        """Why a new connection from ``source`` is refused, or None (and it is counted)."""
        if len(self._held) >= self.limits.max_connections:
            return "max_connections"
        if self._per_source.get(source, 0) >= self.limits.per_address:
            return "per_address"
        task = asyncio.current_task()
        assert task is not None
        self._held[task] = source
        self._per_source[source] = self._per_source.get(source, 0) + 1
        return None

    def _release(self) -> None:
        """Stop counting the current connection (if it was counted)."""
        task = asyncio.current_task()
        source = self._held.pop(task, None) if task is not None else None
        if source is None:
            return
        left = self._per_source[source] - 1
        if left:
            self._per_source[source] = left
        else:
            del self._per_source[source]

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if not peer:  # reset before it was ever looked at
            writer.close()
            return
        ip, port = str(peer[0]), int(peer[1])
        source = source_of(ip, self.limits.ipv4_prefix, self.limits.ipv6_prefix)
        refusal = self._admit(source)
        if refusal is not None:
            log.debug("reflexive: refused %s:%d (%s)", ip, port, refusal)
            writer.close()
            return
        try:
            await self._answer(reader, writer, ip, port)
        except TimeoutError:
            log.debug("reflexive: closed %s:%d (time is up)", ip, port)
        except StunError as exc:
            log.debug("reflexive: closed %s:%d (%s)", ip, port, exc)
        except OSError as exc:
            log.debug("reflexive: %s:%d went away (%s)", ip, port, exc)
        finally:
            self._release()
            writer.close()

    async def _answer(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ip: str, port: int
    ) -> None:
        """Answer the connection's requests until it closes or a bound is reached."""
        limits = self.limits
        loop = asyncio.get_running_loop()
        accepted = loop.time()
        first = accepted + min(limits.first_request_s, limits.hold_s)
        requests = RequestReader()
        answered = 0
        async with asyncio.timeout_at(first) as deadline:
            while True:
                data = await reader.read(requests.wanted)
                if not data:
                    return  # the client closed
                transaction_id = requests.feed(data)
                if transaction_id is None:
                    continue
                if answered >= limits.requests_per_connection:
                    raise StunError(f"more than {answered} requests on one connection")
                writer.write(binding_success(transaction_id, ip, port))
                await writer.drain()
                answered += 1
                deadline.reschedule(accepted + limits.hold_s)


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, without SO_REUSEPORT (a second broker must not
    share the port). "::" and "" are dual-stack (IPv4 too) where the machine can; without
    IPv6 "" is every IPv4 interface. A name binds its first address."""
    host = host.removeprefix("[").removesuffix("]")
    if host in ("", "::") and socket.has_dualstack_ipv6():
        return socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True)
    if not host:
        host = "0.0.0.0"  # noqa: S104 -- asked for every interface
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    return socket.create_server(address, family=family)


async def start_reflexive(
    host: str, port: int, limits: ReflexiveLimits | None = None
) -> ReflexiveResponder:
    """A responder bound to host:port (port 0 picks a free one) and answering.

    OSError if it cannot be bound (``errno.EADDRINUSE`` when another socket listens there).
    """
    responder = ReflexiveResponder(host, port, limits)
    await responder.start()
    return responder
