"""Connectivity checks: data sockets on fixed ports, and a dialer that keeps dialing.

Getting through NATs (../DESIGN.md, flow step 5) the way ICE does it over TCP: each side has
*data sockets* on known local ports -- the sender one (its listening port, from the plan's
lease), the receiver one per stream -- and learns how they look from outside (the broker's
reflexive responder, `_reflexive`). Both publish those candidates, and both dial the other's
from their data ports, again and again, until the attempt's deadline. Through a NAT that
drops unsolicited packets, the first SYN each way opens the NAT for the other's next one,
and the SYNs that cross make one connection (TCP simultaneous open); a NAT that answers
with a reset only needs the SYNs to cross in time. A NAT that gives every destination a new
public port (symmetric) defeats it: the port the responder saw is not the one the peer
would have to aim at, and the object store carries the bytes.

Every socket on a data port sets SO_REUSEADDR and SO_REUSEPORT (the listener too), so that
one port can listen, hold the reflexive probe and dial many peers at once; dual-stack where
the host has IPv6, IPv4 peers then dialed as v4-mapped addresses.

`Dialer` runs all of one side's dials in one thread with non-blocking connects (no thread
per target: a hostile peer's long candidate list costs one selector entry each, and only
`MAX_TARGETS` of them). It only makes connections; what happens on them (the knock, TLS,
Hello) is the caller's, in ``on_connected``.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import random
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ferry.client._gate import GateSettingError
from ferry.v1 import broker_pb2

__all__ = [
    "MAX_TARGETS",
    "PATH_TIMEOUT",
    "DialStats",
    "Dialer",
    "Target",
    "data_socket",
    "dual_stack",
    "endpoint",
    "lease_targets",
    "path_timeout",
    "reserve_ports",
    "sock_address",
    "targets_of",
    "watch_path",
]

#: Targets one dialer keeps at most (the others are dropped, lowest priority first).
MAX_TARGETS = 64
#: How long one SYN is given before the socket is dropped and the target dialed again.
TRY_TIMEOUT = 0.5
#: Pause before a target that failed is dialed again (random within, so the two sides'
#: tries do not stay in lockstep).
RETRY_PAUSE = (0.02, 0.1)
#: The pause after a reflexive target answered with a reset: its NAT resets SYNs it has no
#: mapping for, and the two sides' SYNs must cross within about one trip between the NATs,
#: so tries are made as often as the trips allow (each is a round trip anyway).
RESET_PAUSE = (0.001, 0.003)
#: ICE's pacing: targets of the next priority start this much later.
PACING = 0.02
#: connect() calls one dialer makes per second at most, after a burst of `MAX_TARGETS`:
#: a peer's candidates may name anyone's address, and our SYNs must not become a flood.
MAX_TRIES_PER_SECOND = 1000


def dual_stack() -> bool:
    """Whether data sockets are IPv6 sockets that also speak IPv4 (v4-mapped)."""
    return socket.has_dualstack_ipv6()


def data_socket(port: int) -> socket.socket:
    """A TCP socket bound to local ``port`` (0: a free one) on every interface, with
    SO_REUSEADDR and SO_REUSEPORT, so that many sockets can share the port."""
    family = socket.AF_INET6 if dual_stack() else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", port))
        else:
            sock.bind(("0.0.0.0", port))  # noqa: S104 - data sockets take every interface
    except BaseException:
        sock.close()
        raise
    return sock


def sock_address(ip: str, port: int) -> tuple[str, int] | None:
    """``(ip, port)`` as a data socket dials it (IPv4 v4-mapped on a dual-stack socket);
    None if this host's data sockets cannot reach that family."""
    addr = ipaddress.ip_address(ip)
    if dual_stack():
        if addr.version == 4:
            return f"::ffff:{addr}", port
        return str(addr), port
    return (str(addr), port) if addr.version == 4 else None


def endpoint(address: tuple[str, int] | tuple[str, int, int, int] | None) -> str:
    """``ip:port`` (``[ip]:port`` for IPv6) of a socket address, v4-mapped shown as IPv4."""
    if not address:
        return ""
    host, port = address[0], address[1]
    with contextlib.suppress(ValueError):
        addr = ipaddress.ip_address(host.split("%", 1)[0])
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            host = str(addr.ipv4_mapped)
        elif addr.version == 6:
            host = f"[{addr}]"
    return f"{host}:{port}"


@dataclass(frozen=True, order=True)
class Target:
    """One pair to check: dial ``(ip, port)`` from local port ``local_port``."""

    priority: int  # lower is tried first (host 0, server-reflexive 1)
    ip: str
    port: int
    local_port: int
    kind: str = field(default="host", compare=False)

    @property
    def remote(self) -> str:
        return endpoint((self.ip, self.port))

    @property
    def key(self) -> tuple[str, int, int]:
        """The pair itself, whatever its kind and priority."""
        return str(ipaddress.ip_address(self.ip)), self.port, self.local_port


@dataclass
class DialStats:
    """What a dialer did: every connect() made, and those that connected."""

    tries: int = 0
    connected: int = 0


@dataclass
class _Try:
    target: Target
    sock: socket.socket
    until: float


class Dialer:
    """Dials every target from its local port until it connects, the deadline, or stop.

    A target that connects is handed to ``on_connected(sock, target)`` (a blocking socket,
    the caller's from then on) and not dialed again unless `retry` asks for it; one that
    fails or times out is dialed again after a short random pause. `add` and `retry` may be
    called from other threads while `run` goes on.
    """

    def __init__(
        self,
        on_connected: Callable[[socket.socket, Target], object],
        *,
        try_timeout: float = TRY_TIMEOUT,
        max_targets: int = MAX_TARGETS,
    ) -> None:
        self._on_connected = on_connected
        self._try_timeout = try_timeout
        self._max_targets = max_targets
        self._lock = threading.Lock()
        self._targets: set[Target] = set()
        self._due: dict[Target, float] = {}  # targets waiting to be dialed, and when
        self._wake_w: socket.socket | None = None  # wakes `run` (which owns the pair)
        self._tokens = float(max_targets)  # tries allowed now (MAX_TRIES_PER_SECOND)
        self._filled = time.monotonic()
        self.stats = DialStats()
        self.started = time.monotonic()

    def add(self, targets: Iterable[Target]) -> None:
        """Dial these too (those known already are left as they are)."""
        now = time.monotonic()
        with self._lock:
            known = {t.key for t in self._targets}
            fresh: list[Target] = []
            for target in sorted(set(targets)):  # the same pair twice: its best kind only
                if target.key not in known:
                    known.add(target.key)
                    fresh.append(target)
            room = self._max_targets - len(self._targets)
            for rank, target in enumerate(fresh[: max(room, 0)]):
                self._targets.add(target)
                self._due[target] = now + PACING * (target.priority + rank * 0.1)
        self._wake()

    def retry(self, target: Target, *, reset: bool = False) -> None:
        """Dial ``target`` again (its connection did not work out; ``reset``: it was
        refused with a reset, which for a reflexive target means a NAT that resets)."""
        pause = RESET_PAUSE if reset and target.kind == "reflexive" else RETRY_PAUSE
        with self._lock:
            if target in self._targets:
                self._due[target] = time.monotonic() + random.uniform(*pause)
        self._wake()

    def forget(self, keep: Callable[[Target], bool]) -> None:
        """Stop dialing the targets ``keep`` says no to (an attempt found its pair)."""
        with self._lock:
            for target in [t for t in self._targets if not keep(t)]:
                self._targets.discard(target)
                self._due.pop(target, None)
        self._wake()

    def _wake(self) -> None:
        wake = self._wake_w
        if wake is not None:
            with contextlib.suppress(OSError):
                wake.send(b"\0")

    def run(self, stop: Callable[[], bool], deadline: float) -> DialStats:
        """Dial until ``stop()`` or ``deadline`` (time.monotonic()); close what is left."""
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        self._wake_w = wake_w
        selector = selectors.DefaultSelector()
        selector.register(wake_r, selectors.EVENT_READ, None)
        trying: dict[socket.socket, _Try] = {}
        try:
            while not stop() and (now := time.monotonic()) < deadline:
                self._start_due(now, trying, selector)
                timeout = min(0.05, max(deadline - now, 0.0))
                with self._lock:
                    if self._due:
                        timeout = min(timeout, max(min(self._due.values()) - now, 0.0))
                if self._tokens < 1:  # out of tries for now: wait for the next one
                    timeout = max(timeout, (1 - self._tokens) / MAX_TRIES_PER_SECOND)
                for key, _ in selector.select(timeout):
                    if key.data is None:
                        with contextlib.suppress(OSError):
                            wake_r.recv(4096)
                        continue
                    self._finish(key.data, trying, selector)
                now = time.monotonic()
                for attempt in [a for a in trying.values() if a.until <= now]:
                    self._drop(attempt, trying, selector, again=True)
        finally:
            for attempt in list(trying.values()):
                self._drop(attempt, trying, selector, again=False)
            selector.close()
            self._wake_w = None
            wake_r.close()
            wake_w.close()
        return self.stats

    def _start_due(
        self, now: float, trying: dict[socket.socket, _Try], selector: selectors.BaseSelector
    ) -> None:
        self._tokens = min(
            float(self._max_targets),
            self._tokens + (now - self._filled) * MAX_TRIES_PER_SECOND,
        )
        self._filled = now
        with self._lock:
            due = sorted(t for t, at in self._due.items() if at <= now)[: int(self._tokens)]
            for target in due:
                del self._due[target]
        self._tokens -= len(due)
        for target in due:
            address = sock_address(target.ip, target.port)
            if address is None:
                continue  # a family this host cannot dial
            try:
                sock = data_socket(target.local_port)
            except OSError:
                self.retry(target)  # the port is busy for a moment (a closing socket)
                continue
            sock.setblocking(False)
            self.stats.tries += 1
            code = sock.connect_ex(address)
            if code not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
                sock.close()
                self.retry(target)
                continue
            attempt = _Try(target, sock, now + self._try_timeout)
            trying[sock] = attempt
            selector.register(sock, selectors.EVENT_WRITE, attempt)

    def _finish(
        self, attempt: _Try, trying: dict[socket.socket, _Try], selector: selectors.BaseSelector
    ) -> None:
        """A connect finished: connected, or failed (dial again)."""
        sock = attempt.sock
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self._drop(attempt, trying, selector, again=True, reset=error == errno.ECONNREFUSED)
            return
        selector.unregister(sock)
        del trying[sock]
        with self._lock:
            wanted = attempt.target in self._targets
        if not wanted:
            sock.close()
            return
        self.stats.connected += 1
        sock.setblocking(True)
        self._on_connected(sock, attempt.target)

    def _drop(
        self,
        attempt: _Try,
        trying: dict[socket.socket, _Try],
        selector: selectors.BaseSelector,
        *,
        again: bool,
        reset: bool = False,
    ) -> None:
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(attempt.sock)
        trying.pop(attempt.sock, None)
        attempt.sock.close()
        if again:
            self.retry(attempt.target, reset=reset)


def plain_bind(port: int = 0) -> int:
    """Bind a plain socket (no SO_REUSEPORT) to ``port`` of every interface, IPv6 and IPv4
    where possible, and let it go; return the port bound. OSError if ``port`` is taken: a
    data socket shares its port (SO_REUSEPORT), so this is how a port is first checked to be
    free the ordinary way. Port 0 finds a free one; then without SO_REUSEADDR, with which
    the kernel may hand out a port that sharing sockets already hold."""
    family = socket.AF_INET6 if dual_stack() else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        if port:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is free
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        probe.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))  # noqa: S104
        bound: int = probe.getsockname()[1]
        return bound


def reserve_ports(count: int, avoid: range = range(0)) -> list[socket.socket]:
    """``count`` data sockets on distinct free ports outside ``avoid`` (the sender's leased
    range, which on one machine must not meet ours: a port dialing itself connects to
    itself). They hold their ports for the attempt; the caller closes them.

    A port is found by binding a plain socket to port 0 (plain_bind), then taken by a data
    socket."""
    held: list[socket.socket] = []
    try:
        for _ in range(count * 8 + 8):
            if len(held) == count:
                break
            port = plain_bind()
            if port in avoid or any(s.getsockname()[1] == port for s in held):
                continue
            with contextlib.suppress(OSError):  # taken meanwhile: another one
                held.append(data_socket(port))
        if len(held) < count:
            raise OSError(f"no {count} free local ports outside {avoid.start}-{avoid.stop - 1}")
    except BaseException:
        for sock in held:
            sock.close()
        raise
    return held


def _kind(candidate: broker_pb2.Candidate) -> tuple[int, str]:
    if candidate.kind == broker_pb2.Candidate.KIND_SERVER_REFLEXIVE:
        return 1, "reflexive"
    return 0, "host"


def targets_of(
    candidates: Iterable[broker_pb2.Candidate], local_port: int, *, every_port: bool = False
) -> list[Target]:
    """The pairs to check from ``local_port`` to the published ``candidates``: each one's
    first port (the sender's one data port), or ``every_port`` (the receiver's, one per
    stream: the sender punches toward them all). Addresses that are not IPs are skipped."""
    out: list[Target] = []
    for candidate in candidates:
        priority, kind = _kind(candidate)
        ports = list(candidate.ports) if every_port else list(candidate.ports[:1])
        for port in ports:
            if _usable(candidate.ip) and 1 <= port <= 65535:
                out.append(Target(priority, candidate.ip, port, local_port, kind))
    return out


def lease_targets(
    candidates: Iterable[broker_pb2.Candidate], ports: range, local_port: int
) -> list[Target]:
    """The pairs to check before the sender publishes anything: each address the sender
    gave with its offer (and the one the broker saw it at) on every port of its lease, one
    of which it listens on. Good on a LAN, or for a sender that is reachable as it is."""
    out: list[Target] = []
    for candidate in candidates:
        priority, kind = _kind(candidate)
        if _usable(candidate.ip):
            out.extend(Target(priority, candidate.ip, port, local_port, kind) for port in ports)
    return out


def _usable(ip: str) -> bool:
    try:
        return sock_address(ip, 1) is not None
    except ValueError:
        return False


#: Seconds a data connection may go without an answer from the peer's kernel before it
#: counts as broken (its path died: an interface went down, a NAT forgot the mapping).
PATH_TIMEOUT = 10.0


def path_timeout() -> float:
    """PATH_TIMEOUT, or FERRY_PATH_TIMEOUT seconds (1-600; GateSettingError if not)."""
    text = os.environ.get("FERRY_PATH_TIMEOUT", "").strip()
    if not text:
        return PATH_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        raise GateSettingError(f"FERRY_PATH_TIMEOUT: {text!r} is not a number") from None
    if not 1 <= value <= 600:
        raise GateSettingError(f"FERRY_PATH_TIMEOUT: {value:g} s is not in 1-600 seconds")
    return value


def watch_path(sock: socket.socket, timeout: float) -> None:
    """Make a dead path fail ``sock`` within about ``timeout`` seconds, and only a dead one.

    TCP keepalive probes an idle connection every second after a second of silence, and
    TCP_USER_TIMEOUT ends it once what we sent (data or probe) stayed unacknowledged for
    ``timeout``: a peer busy hashing still acknowledges, a vanished path does not. The
    probes also keep a NAT's mapping alive. Best effort: a platform without the options
    keeps the stall watchdog only."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, max(int(timeout), 1))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(timeout * 1000))
