"""The receiver's data path: dial the sender, drive the streams, verify, write, journal.

The first stream is found by trying every candidate address on every leased port at once
(the sender listens on the first free one) until the plan's deadline; the other streams
dial the address that answered. Each stream thread moves bytes between its socket and a
`ReceiverConnection` (the conversation's rules; the `ReceiveSession` decides which chunks
and digests to ask for): it reads each payload into its own buffer and hands it to the
`Intake` (verify outside the lock, write at its offset, journal, verdict). A stream that
breaks gives its chunks, and the digests it had asked for, back to the others.

One `ReceivePeer` is one connection attempt; the `Intake` (session, sink, journal) outlives
it, so a new attempt (after a restart or a lost connection) asks only for what is still
missing. `PeerGone` means "try again later"; a `ProtocolError` or `PeerAborted` is final; a
`StorageError` (this side's disk) keeps what was verified and tells the sender, with a
retryable Abort, to wait for this side's rerun.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from ferry.client._errors import for_peer
from ferry.client._events import PathInfo
from ferry.client._intake import Intake
from ferry.client._punch import (
    MAX_TARGETS,
    Dialer,
    Target,
    endpoint,
    path_timeout,
    watch_path,
)
from ferry.client._sink import StorageError
from ferry.client._tls import PeerAuthError, verify_peer
from ferry.client._wire import PeerConnection, PeerGone
from ferry.protocol import (
    ChunkArrived,
    FileConfirmed,
    PeerAborted,
    ProtocolError,
    ReceiverConnection,
)
from ferry.protocol.knock import NONCE_SIZE, Knocker

__all__ = ["ReceivePeer"]

_CONNECT_TIMEOUT = 2.0
_HANDSHAKERS = 8  # connections made by the checks, knocked and handshaken at once
_MORE_STREAMS = 5.0  # seconds the other streams get to connect once the first pair won
_IO_TIMEOUT = 60.0
_RETRY_PAUSE = 0.05
_LINGER = 2.0  # how long a paused receiver waits for the sender to read its Abort


class ReceivePeer:
    """One connection attempt: fetch what the intake's session still lacks."""

    def __init__(
        self,
        name: str,
        intake: Intake,
        context: ssl.SSLContext,
        peer_der: bytes,
        knocker: Knocker,
        *,
        streams: int,
        stall_timeout: float = 30.0,
    ) -> None:
        """``knocker``: the knocks of this attempt; each connection opens with one, which
        the sender's listener checks before it spends anything on the connection."""
        self.session_name = name
        self.intake = intake
        self.session = intake.session  # called only holding intake.lock
        self.chunk_size = intake.chunk_size
        self.context = context
        self.peer_der = peer_der
        self.knocker = knocker
        self.streams = max(1, streams)
        self.stall_timeout = stall_timeout
        self.path_timeout = path_timeout()  # a dead path fails its streams this soon
        self.events = 0  # frames received: the stall watchdog's measure of progress
        self._lock = intake.lock  # guards the session and the connections below
        self._wake = intake.wake
        self._conns: dict[int, tuple[PeerConnection, ReceiverConnection]] = {}
        self.error: BaseException | None = None
        self._targets: set[Target] = set()  # the sender's candidates, as pairs to check
        self._targets_lock = threading.Lock()
        self._dialer: Dialer | None = None  # the first port's checks, while they run
        self._slot0 = 0
        self._last: BaseException | None = None  # why the last pair failed
        self._impostor = False  # something answered, but without the pinned certificate
        #: Connection attempts made, how long until the first pair won, and that pair.
        self.tries = 0
        self.started = 0.0
        self.setup_seconds = 0.0
        self.path: PathInfo | None = None

    # -- connecting -----------------------------------------------------------------

    def add_targets(self, targets: Iterable[Target]) -> None:
        """Candidates of the sender to check too (they trickle in while the checks run)."""
        targets = list(targets)
        with self._targets_lock:
            room = MAX_TARGETS - len(self._targets)  # a sender that keeps publishing new ones
            self._targets.update(targets[: max(room, 0)])
            dialer = self._dialer
        if dialer is not None:
            dialer.add(t for t in targets if t.local_port == self._slot0)

    def _handshake(
        self, raw: socket.socket, stream: int, timeout: float = _CONNECT_TIMEOUT
    ) -> tuple[PeerConnection, ReceiverConnection]:
        """Knock, handshake and exchange Hello on a connected socket, each within ``timeout``."""
        try:
            raw.settimeout(timeout)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            watch_path(raw, self.path_timeout)
            raw.sendall(self.knocker.knock(stream, os.urandom(NONCE_SIZE)))
            sock = self.context.wrap_socket(raw, server_side=False)
            try:
                verify_peer(sock, self.peer_der)
            except PeerAuthError:
                sock.close()
                raise
            wire = PeerConnection(sock, max_payload=self.chunk_size)
            conn = ReceiverConnection(self.session_name, stream, self.session)
            wire.send_bytes(conn.send_hello())
            wire.read_event(conn)  # Greeted, or it raised (the session is not consulted)
            sock.settimeout(_IO_TIMEOUT)
            return wire, conn
        except BaseException:
            raw.close()
            raise

    def _adopt(self, pair: tuple[PeerConnection, ReceiverConnection]) -> None:
        stream = self.intake.open_stream(pair[1].stream)
        with self._lock:
            self._conns[stream] = pair

    def _check(
        self,
        targets: Callable[[], Iterable[Target]],
        streams: dict[int, int],
        deadline: float,
        cancel: threading.Event,
        *,
        trickle: bool,
    ) -> dict[int, Target]:
        """Dial ``targets()`` until one per local port (``streams``: local port -> stream id)
        proves itself, ``deadline`` or ``cancel``: the pairs that won, by local port.

        Each connection made gets the knock, TLS and Hello of its port's stream in a worker;
        one that fails there is dialed again. ``trickle``: candidates that `add_targets`
        brings meanwhile are dialed too.
        """
        won: dict[int, Target] = {}
        lock = threading.Lock()
        over = threading.Event()
        fatal: list[BaseException] = []

        def handshake(raw: socket.socket, target: Target) -> None:
            if cancel.is_set() or target.local_port in won or fatal:
                raw.close()
                return
            try:
                pair = self._handshake(raw, streams[target.local_port])
            except PeerAborted as exc:
                fatal.append(exc)
                return
            except (OSError, ssl.SSLError, PeerAuthError, ProtocolError) as exc:
                self._last = exc
                self._impostor = self._impostor or isinstance(
                    exc, PeerAuthError | ssl.SSLCertVerificationError
                )
                dialer.retry(target)
                return
            with lock:
                first = target.local_port not in won and not over.is_set()
                if first:
                    won[target.local_port] = target
            if not first:
                pair[0].close()
                return
            self._adopt(pair)
            dialer.forget(lambda t: t.local_port not in won)

        # Not waited for at the end: a losing pair's handshake may still be under way; it
        # sees the pair that won and closes its connection.
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=_HANDSHAKERS)
        dialer = Dialer(lambda raw, target: pool.submit(handshake, raw, target))
        dialer.add(t for t in targets() if t.local_port in streams)
        if trickle:
            with self._targets_lock:
                self._dialer = dialer
            dialer.add(t for t in targets() if t.local_port in streams)
        try:
            stats = dialer.run(
                lambda: cancel.is_set() or bool(fatal) or len(won) == len(streams),
                deadline,
            )
        finally:
            with lock:
                over.set()  # a handshake that ends now closes its connection
            with self._targets_lock:
                self._dialer = None
            pool.shutdown(wait=False)
        self.tries += stats.tries
        if fatal:
            raise fatal[0]
        return won

    def elapsed(self) -> float:
        """Seconds since the checks started (0 before)."""
        return time.monotonic() - self.started if self.started else 0.0

    def connect(self, slots: Sequence[int], deadline: float, cancel: threading.Event) -> Target:
        """Find the sender: check every pair from the first data port at once (host
        candidates first) until one proves itself; the pair that won."""
        self.started = time.monotonic()
        self._slot0 = slots[0]

        def targets() -> list[Target]:
            with self._targets_lock:
                return [t for t in self._targets if t.local_port == slots[0]]

        won = self._check(
            targets, {slots[0]: self.intake.next_stream}, deadline, cancel, trickle=True
        )
        if not won:
            if self._impostor:
                raise PeerGone(
                    "could not reach the sender before the deadline: the peer that answered "
                    "did not present the certificate the broker introduced"
                )
            with self._targets_lock:
                where = _tried(self._targets) or "no candidate of the sender's arrived"
            raise PeerGone(
                f"could not reach the sender directly before the deadline (tried {where}; "
                f"{self._last or 'no answer'})"
            )
        target = won[slots[0]]
        self.setup_seconds = self.elapsed()
        with self._lock:
            local = next(iter(self._conns.values()))[0].sock.getsockname()
        self.path = PathInfo(
            route="host" if target.kind == "host" else "punched",
            local=endpoint(local),
            remote=target.remote,
            setup_seconds=self.setup_seconds,
            tries=self.tries,
        )
        return target

    # -- transferring -----------------------------------------------------------------

    def run(self, slots: Sequence[int], deadline: float, cancel: threading.Event) -> None:
        """Connect, receive everything still missing, finish every file; raise on failure.

        ``slots``: this side's data ports, one per stream; the first finds the sender, the
        others then dial the pair that won (the sender punches toward each of them)."""
        target = self.connect(slots, deadline, cancel)
        if len(slots) > 1:
            first = self.intake.next_stream
            streams = {port: first + k for k, port in enumerate(slots[1:])}
            more = [
                Target(target.priority, target.ip, target.port, port, target.kind)
                for port in slots[1:]
            ]
            budget = min(deadline, time.monotonic() + _MORE_STREAMS)
            with contextlib.suppress(OSError, ssl.SSLError, PeerAuthError, ProtocolError):
                self._check(lambda: more, streams, budget, cancel, trickle=False)
        with self._lock:
            conns = dict(self._conns)
        threads = [
            threading.Thread(target=self._stream, args=(wire, conn, cancel), daemon=True)
            for wire, conn in conns.values()
        ]
        for t in threads:
            t.start()
        self._watch(threads, cancel)
        if self.error is not None:
            raise self.error
        if not self.session.done:
            raise PeerGone("every connection to the sender broke")

    def _watch(self, threads: list[threading.Thread], cancel: threading.Event) -> None:
        """Wait for the streams; sync the journal; stop on cancel or a long silence."""
        seen, since = self.events, time.monotonic()
        while alive := [t for t in threads if t.is_alive()]:
            alive[0].join(timeout=0.2)
            now = time.monotonic()
            if self.error is None:
                try:
                    self.intake.sync()
                except StorageError as exc:
                    self._fail(exc)
            if cancel.is_set():
                self._fail(PeerGone("cancelled"))
            elif self.events != seen:
                seen, since = self.events, now
            elif now - since > self.stall_timeout and self.error is None:
                self._fail(PeerGone(f"the sender sent nothing for {self.stall_timeout:g} s"))

    def _fail(self, exc: BaseException) -> None:
        """End the attempt with ``exc`` (the first error wins; later calls do nothing).

        A final error sends the sender an Abort and closes every connection. A StorageError
        (this side's disk) sends a retryable Abort instead and only half-closes: each stream
        thread then reads and drops what the sender still sends until the sender, having
        read the Abort, hangs up (`_LINGER` at most), so that closing does not reset the
        connection before the sender has read why.
        """
        with self._lock:
            if self.error is not None:
                return
            self.error = exc
            conns = list(self._conns.values())
            self._wake.notify_all()
        final = not isinstance(exc, PeerGone)
        # A full disk is this side's trouble: the sender should wait for our rerun, not fail.
        retryable = isinstance(exc, StorageError)
        # What the sender reads: nothing about this side's folders (`for_peer`).
        reason = f"the receiver's destination: {for_peer(exc)}" if retryable else for_peer(exc)
        for wire, conn in conns:
            if final:
                with contextlib.suppress(PeerGone, ProtocolError):
                    wire.send_bytes(conn.send_abort(reason, retryable=retryable))
            if retryable:
                wire.finish_sending()
            else:
                wire.close()
        if retryable:  # a thread blocked on a silent sender is woken by the close at the end
            wires = [wire for wire, _ in conns]
            timer = threading.Timer(_LINGER + 1.0, _close_all, args=(wires,))
            timer.daemon = True
            timer.start()

    def _stream(
        self, wire: PeerConnection, conn: ReceiverConnection, cancel: threading.Event
    ) -> None:
        stream = conn.stream
        try:
            self._converse(wire, conn, cancel)
        except PeerGone as exc:
            self.intake.close_stream(stream)
            with self._lock:
                self._conns.pop(stream, None)
                alive = bool(self._conns)
            if not alive and not self.intake.done and self.error is None:
                self._fail(exc)
        except (ProtocolError, PeerAborted, StorageError, OSError) as exc:
            self._fail(exc)
        finally:
            # Its chunks and digest requests are due again, on the other streams.
            self.intake.close_stream(stream)
            with self._lock:
                self._conns.pop(stream, None)
            if isinstance(self.error, StorageError):
                wire.drain(_LINGER)
            wire.close()

    def _converse(
        self, wire: PeerConnection, conn: ReceiverConnection, cancel: threading.Event
    ) -> None:
        buffer = memoryview(bytearray(self.chunk_size))
        intake, lock = self.intake, self._lock
        while True:
            with lock:
                if self.error is not None or cancel.is_set():
                    return
                requests = conn.next_requests()
                if self.session.done:
                    break
            if requests:
                wire.send_bytes(requests)
            with lock:
                if not conn.awaiting:
                    # Nothing to read on this stream: wait for work to come back or the end.
                    self._wake.wait(timeout=0.5)
                    continue
            event = wire.read_event(conn, lock)
            self.events += 1
            if isinstance(event, ChunkArrived):
                payload = wire.read_chunk(conn, buffer)
                intake.chunk(
                    event.file_index,
                    event.chunk_index,
                    event.offset,
                    event.digest,
                    payload,
                    conn.chunk_checked,
                )
            elif isinstance(event, FileConfirmed):
                intake.file_confirmed(event.file_index)
        with contextlib.suppress(PeerGone):
            wire.send_bytes(conn.send_done())


def _close_all(wires: Sequence[PeerConnection]) -> None:
    for wire in wires:
        wire.close()


def _tried(targets: Iterable[Target]) -> str:
    """The pairs tried, for a message: each address of the sender's with its ports, host
    ones first, e.g. "192.0.2.10:47100-47103 (host), 203.0.113.1:47100 (reflexive)"."""
    ports: dict[tuple[int, str, str], set[int]] = {}
    for t in targets:
        ports.setdefault((t.priority, t.ip, t.kind), set()).add(t.port)
    parts = []
    for (_, ip, kind), found in sorted(ports.items())[:12]:
        low, high = min(found), max(found)
        span = str(low) if low == high else f"{low}-{high}"
        host = f"[{ip}]" if ":" in ip else ip
        parts.append(f"{host}:{span} ({kind})")
    return ", ".join(parts)
