"""The sender's front door: accepts data connections without a thread and lets through only
those that open with the session's knock (`ferry.protocol.knock`).

A sender's listening port is open to anyone who can reach it. A thread, a TLS handshake or
a long timeout per connection would let a stranger's idle connections take the sender's
threads and descriptors and fail a real transfer. So, in the one thread that accepts::

    accept (non-blocking) --> pending: at most `max_pending`, the oldest dropped first
    pending --readable--> read what is there of the knock (at most KNOCK_SIZE bytes)
            --wrong first bytes or wrong knock--> closed at once
            --no whole knock within `knock_timeout`--> closed
            --right knock--> handed over (`admit`): only now a thread and TLS

A pending connection costs a descriptor and a few dozen bytes. When the process runs out of
descriptors (EMFILE/ENFILE on accept), the gate drops its oldest pending connections and
from then on keeps `SPARE_DESCRIPTORS` fewer pending than it held at that point, so that the
rest of the process (the receiver's streams, the source files, the broker link) still gets
descriptors; with nothing pending it pauses accepting for a moment. Either way it keeps
serving: running out of descriptors is not the transfer's failure.

The limits are settings with safe defaults (`GateLimits`, from the environment:
``FERRY_KNOCK_TIMEOUT`` seconds, ``FERRY_PENDING_CONNECTIONS``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ferry.client._errors import TransferError
from ferry.protocol.knock import KNOCK_SIZE, BadKnock, Knocker

__all__ = ["SPARE_DESCRIPTORS", "Gate", "GateLimits", "GateSettingError", "GateStats"]

#: Descriptors left to the rest of the process after the gate met EMFILE.
SPARE_DESCRIPTORS = 32
_MIN_PENDING = 4
_PAUSE = 0.1  # seconds without accepting when out of descriptors and nothing is pending
_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_TRANSIENT = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR})
_WAKE = object()  # the selector key of the wake-up socket (`adopt`)


class GateSettingError(TransferError):
    """A listener setting in the environment is not valid; the message names it."""


@dataclass(frozen=True)
class GateLimits:
    """How long a connection may take to knock, and how many may be waiting to."""

    #: Seconds from accept to a whole knock (a real receiver knocks at once).
    knock_timeout: float = 2.0
    #: Connections accepted and not yet knocked, at most (the oldest is dropped first).
    max_pending: int = 64

    def __post_init__(self) -> None:
        if not 0 < self.knock_timeout <= 60:
            raise GateSettingError(
                f"FERRY_KNOCK_TIMEOUT: {self.knock_timeout:g} s is not in 0-60 seconds"
            )
        if not 1 <= self.max_pending <= 65536:
            raise GateSettingError(
                f"FERRY_PENDING_CONNECTIONS: {self.max_pending} is not in 1-65536"
            )

    @classmethod
    def from_env(cls) -> GateLimits:
        """The defaults, as ``FERRY_KNOCK_TIMEOUT`` and ``FERRY_PENDING_CONNECTIONS`` change
        them."""
        default = cls()
        timeout = _env("FERRY_KNOCK_TIMEOUT", default.knock_timeout)
        pending = _env("FERRY_PENDING_CONNECTIONS", default.max_pending)
        return cls(knock_timeout=float(timeout), max_pending=int(pending))


def _env(name: str, default: float) -> float:
    """The number in environment variable ``name`` (``default`` if unset); whole numbers
    only where ``default`` is an int."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    kind = int if isinstance(default, int) else float
    try:
        return kind(text)
    except ValueError:
        raise GateSettingError(f"{name}: {text!r} is not a {kind.__name__}") from None


@dataclass
class _Pending:
    sock: socket.socket
    deadline: float
    knock: bytearray = field(default_factory=bytearray)


@dataclass
class GateStats:
    """What the gate did, for tests and logs."""

    admitted: int = 0
    refused: int = 0  # wrong first bytes or a wrong knock
    expired: int = 0  # no whole knock in time (or closed before it)
    dropped: int = 0  # pushed out by newer connections, or to free descriptors
    out_of_descriptors: int = 0


class Gate:
    """Accepts on ``listener`` and calls ``admit(sock, stream)`` for each right knock.

    ``admit`` gets a blocking socket whose knock has been read, and the stream index it
    named; it owns the socket from then on.
    """

    def __init__(
        self,
        listener: socket.socket,
        knocker: Knocker,
        admit: Callable[[socket.socket, int], None],
        limits: GateLimits | None = None,
    ) -> None:
        self._listener = listener
        self._knocker = knocker
        self._admit = admit
        self.limits = limits or GateLimits()
        self.stats = GateStats()
        self._cap = self.limits.max_pending
        self._pending: dict[socket.socket, _Pending] = {}  # in accept order
        self._selector = selectors.DefaultSelector()
        self._paused_until = 0.0
        self._listening = False
        # Connections made by dialing out (hole punching, `adopt`), waiting to be sorted.
        self._inbox: list[socket.socket] = []
        self._inbox_lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._closed = False

    @property
    def pending(self) -> int:
        """Connections accepted and not yet knocked."""
        return len(self._pending)

    def adopt(self, sock: socket.socket) -> None:
        """Sort a connection this side dialed (a punched hole) like an accepted one: it too
        must knock within the timeout. Any thread may call this; after `run` ended the
        socket is closed."""
        with self._inbox_lock:
            if self._closed:
                sock.close()
                return
            self._inbox.append(sock)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def run(self, stop: Callable[[], bool], poll: float = 0.2) -> None:
        """Accept and sort connections until ``stop()`` is true (checked every ``poll`` s)."""
        self._listener.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        try:
            while not stop():
                self._listen_unless_paused(time.monotonic())
                timeout = poll
                if self._pending:
                    first = next(iter(self._pending.values()))
                    timeout = min(poll, max(first.deadline - time.monotonic(), 0.0))
                events = self._selector.select(timeout)
                # Knocks first: a burst of new connections must not push out one that knocked.
                for key, _ in sorted(events, key=lambda e: not isinstance(e[0].data, _Pending)):
                    if key.data is None:
                        self._accept_some()
                    elif key.data is _WAKE:
                        self._take_inbox()
                    else:
                        self._read_knock(key.data)
                self._expire(time.monotonic())
        finally:
            with self._inbox_lock:
                self._closed = True
                inbox, self._inbox = self._inbox, []
            for sock in inbox:
                sock.close()
            for pending in list(self._pending.values()):
                self._close(pending)
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def _take_inbox(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_r.recv(4096)
        with self._inbox_lock:
            inbox, self._inbox = self._inbox, []
        for sock in inbox:
            self._enqueue(sock)

    # -- accepting ----------------------------------------------------------------------

    def _listen_unless_paused(self, now: float) -> None:
        want = now >= self._paused_until
        if want and not self._listening:
            self._selector.register(self._listener, selectors.EVENT_READ, None)
        elif not want and self._listening:
            self._selector.unregister(self._listener)
        self._listening = want

    def _accept_some(self) -> None:
        """Accept what is waiting (a bounded number per round)."""
        for _ in range(max(self._cap, 1)):
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_DESCRIPTORS:
                    self._out_of_descriptors()
                    return
                if exc.errno in _ACCEPT_TRANSIENT:
                    continue
                raise
            self._enqueue(sock)

    def _enqueue(self, sock: socket.socket) -> None:
        """Wait for ``sock``'s knock (the oldest waiting connection makes room if needed)."""
        while len(self._pending) >= self._cap:
            self._drop_oldest()
        pending = _Pending(sock, time.monotonic() + self.limits.knock_timeout)
        try:
            sock.setblocking(False)
            self._selector.register(sock, selectors.EVENT_READ, pending)
        except (OSError, ValueError):
            sock.close()
            return
        self._pending[sock] = pending
        self._read_knock(pending)  # a real receiver's knock is usually there already

    def _out_of_descriptors(self) -> None:
        """EMFILE/ENFILE: hold fewer pending connections from now on, keep serving."""
        self.stats.out_of_descriptors += 1
        if not self._pending:
            self._paused_until = time.monotonic() + _PAUSE
            return
        self._cap = max(_MIN_PENDING, len(self._pending) - SPARE_DESCRIPTORS)
        self._drop_oldest()
        while len(self._pending) > self._cap:
            self._drop_oldest()

    # -- knocks -------------------------------------------------------------------------

    def _read_knock(self, pending: _Pending) -> None:
        try:
            data = pending.sock.recv(KNOCK_SIZE - len(pending.knock))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.stats.expired += 1
            self._close(pending)
            return
        if not data:
            self.stats.expired += 1
            self._close(pending)
            return
        pending.knock += data
        if Knocker.refuses_prefix(pending.knock):
            self.stats.refused += 1
            self._close(pending)
            return
        if len(pending.knock) < KNOCK_SIZE:
            return
        try:
            stream = self._knocker.check(pending.knock)
        except BadKnock:
            self.stats.refused += 1
            self._close(pending)
            return
        self._forget(pending)
        try:
            pending.sock.setblocking(True)
        except OSError:
            pending.sock.close()
            return
        self.stats.admitted += 1
        self._admit(pending.sock, stream)

    def _expire(self, now: float) -> None:
        while self._pending:
            first = next(iter(self._pending.values()))
            if first.deadline > now:
                return
            self.stats.expired += 1
            self._close(first)

    def _drop_oldest(self) -> None:
        self.stats.dropped += 1
        self._close(next(iter(self._pending.values())))

    def _forget(self, pending: _Pending) -> None:
        self._pending.pop(pending.sock, None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(pending.sock)

    def _close(self, pending: _Pending) -> None:
        self._forget(pending)
        pending.sock.close()
