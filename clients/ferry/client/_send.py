"""The sender's data path: listen on a leased port, serve chunk requests on each stream.

One thread accepts, through the `Gate`: no thread and no TLS work for a connection until
it has knocked with the session's knock (a stranger's connections cost a descriptor for
a couple of seconds at most, and only so many at once). Each connection that knocked gets
a thread, up to `MAX_SERVED` at once, which moves bytes between its socket and a
`SenderConnection` (the conversation's rules, the queue of requested chunks); between
chunks it takes any new request that has arrived, so the receiver's window keeps the pipe
full. Each chunk is read from the `Source` (with `preadv`) into a reused buffer behind its
frame head, hashed, and sent in one `sendall`.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence

from ferry.client._errors import for_peer
from ferry.client._gate import Gate, GateLimits
from ferry.client._punch import (
    MAX_TARGETS,
    Dialer,
    Target,
    data_socket,
    endpoint,
    path_timeout,
    plain_bind,
    watch_path,
)
from ferry.client._source import Source, SourceChanged, digest_file
from ferry.client._tls import PeerAuthError, verify_peer
from ferry.client._wire import PeerConnection, PeerGone
from ferry.protocol import (
    DigestRequested,
    Finished,
    PeerAborted,
    ProtocolError,
    RemoteProtocolError,
    SenderConnection,
    SendSession,
    chunk_digest,
)
from ferry.protocol.frames import CHUNK_HEAD_SIZE, HEADER_SIZE
from ferry.protocol.knock import Knocker

__all__ = [
    "MAX_SERVED",
    "SendCounter",
    "SendPeer",
    "SourceChanged",
    "digest_file",
]

_HEAD = HEADER_SIZE + CHUNK_HEAD_SIZE
_ACCEPT_POLL = 0.2
_HANDSHAKE_TIMEOUT = 10.0  # TLS and Hello, once the connection knocked
_IO_TIMEOUT = 60.0
#: Connections that knocked, served at once (the receiver opens a few streams, and dials
#: each address it has for the sender: more is a misbehaving receiver).
MAX_SERVED = 64


class SendCounter:
    """Bytes sent over every attempt of one sender process."""

    def __init__(self) -> None:
        self.bytes_sent = 0


class SendPeer:
    """One connection attempt: serves chunks to the receiver that proves its certificate.

    The SendSession (digests of chunks read so far), the source and the counter outlive the
    attempt; the files the attempt opened are closed when it ends.
    """

    def __init__(
        self,
        name: str,
        source: Source,
        session: SendSession,
        counter: SendCounter,
        context: ssl.SSLContext,
        peer_der: bytes,
        knocker: Knocker,
        on_pause: Callable[[str], None] | None = None,
        limits: GateLimits | None = None,
    ) -> None:
        """``knocker``: the knocks of this attempt (under the session key): a connection
        that does not open with one is closed before any TLS. ``limits``: the gate's (from
        the environment by default, see `GateLimits.from_env`)."""
        self.session_name = name
        self.source = source
        self.sizes = source.sizes
        self.on_pause = on_pause
        self.chunk_size = session.chunk_size
        self.context = context
        self.peer_der = peer_der
        self.knocker = knocker
        self.limits = limits or GateLimits.from_env()
        self.path_timeout = path_timeout()
        self.session = session
        self.counter = counter
        self.finished = threading.Event()
        self.connected = threading.Event()  # a receiver proved its certificate
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._conns: set[PeerConnection] = set()
        self._listener: socket.socket | None = None
        self._gate: Gate | None = None
        self._threads: list[threading.Thread] = []
        self._dialer: Dialer | None = None  # the punches, while they run
        self._reached_from: set[str] = set()  # "ip:port" of every knocked connection
        self._punch_targets: set[Target] = set()  # at most MAX_TARGETS
        self.port = 0

    def session_digests(self) -> list[bytes | None]:
        """Each file's whole-file digest, where every chunk digest is known."""
        with self._lock:
            return [self.session.digest(i) for i in range(len(self.sizes))]

    # -- listening --------------------------------------------------------------------

    def bind(self, first_port: int, last_port: int) -> int:
        """Listen on the first free port of the leased range (all interfaces): the data
        port, which the reflexive probe and the punches share (`ferry.client._punch`)."""
        last_error: OSError | None = None
        for port in range(first_port, last_port + 1):
            try:
                self._listener = _listen(port)
            except OSError as exc:
                last_error = exc
                continue
            self.port = port
            self._gate = Gate(self._listener, self.knocker, self._admit, self.limits)
            return port
        raise OSError(f"no free port in the leased range {first_port}-{last_port}: {last_error}")

    def _over(self, cancel: threading.Event) -> bool:
        return self.finished.is_set() or cancel.is_set() or self.error is not None

    def _admit(self, raw: socket.socket, stream: int) -> None:
        """A connection knocked (the gate's thread): serve it in a thread of its own."""
        self._threads[:] = [t for t in self._threads if t.is_alive()]
        if len(self._threads) >= MAX_SERVED:
            raw.close()
            return
        with contextlib.suppress(OSError):
            self._reached(raw.getpeername())
        t = threading.Thread(target=self._serve, args=(raw, stream), daemon=True)
        try:
            t.start()
        except RuntimeError:  # no thread to be had now: the receiver dials again
            raw.close()
            return
        self._threads.append(t)

    # -- punching ---------------------------------------------------------------------

    def add_punch_targets(self, targets: Sequence[Target]) -> None:
        """The receiver's candidates (published for this attempt) to punch toward; any
        thread may call this, before `run` or while it punches."""
        with self._lock:
            room = MAX_TARGETS - len(self._punch_targets)
            self._punch_targets.update(list(targets)[: max(room, 0)])
            dialer = self._dialer
            reached = set(self._reached_from)
        if dialer is not None:
            dialer.add(targets)
            self._forget_reached(dialer, reached)

    def _punch(self, until: float, stop: Callable[[], bool]) -> None:
        """Dial the receiver's candidates from the data port until each of its streams has
        reached us, ``until`` (time.monotonic()) or the attempt ends: the SYNs that open our
        NAT for the receiver's, and that cross its own (TCP simultaneous open). What
        connects is sorted by the gate like an accepted connection: it must knock."""
        gate = self._gate
        assert gate is not None, "bind() first"
        dialer = Dialer(lambda sock, _target: gate.adopt(sock))
        with self._lock:
            self._dialer = dialer
            targets = list(self._punch_targets)
            reached = set(self._reached_from)
        dialer.add(targets)
        self._forget_reached(dialer, reached)
        try:
            dialer.run(stop, until)
        finally:
            with self._lock:
                self._dialer = None

    def _reached(self, address: tuple[str, int] | tuple[str, int, int, int]) -> None:
        """A knocked connection came from ``address``: its stream needs no more punches."""
        remote = endpoint(address)
        with self._lock:
            self._reached_from.add(remote)
            dialer = self._dialer
        if dialer is not None:
            self._forget_reached(dialer, {remote})

    @staticmethod
    def _forget_reached(dialer: Dialer, reached: set[str]) -> None:
        if not reached:
            return
        dialer.forget(lambda t: t.remote not in reached)

    def run(self, cancel: threading.Event, punch_until: float = 0.0) -> None:
        """Accept and serve until the receiver says Done, a final error, or ``cancel``.

        A receiver that goes away is not an error here: it may come back on this attempt
        or a later one; the caller ends the attempt (``cancel``) when the session moves on.
        """
        listener, gate = self._listener, self._gate
        assert listener is not None, "bind() first"
        assert gate is not None
        served = threading.Event()  # the gate is done: so are the punches
        puncher = threading.Thread(
            target=self._punch,
            args=(punch_until, lambda: served.is_set() or self._over(cancel)),
            name="ferry-punch",
            daemon=True,
        )
        try:
            if punch_until > time.monotonic():
                puncher.start()
            gate.run(lambda: self._over(cancel), _ACCEPT_POLL)
        finally:
            served.set()
            if puncher.is_alive():
                puncher.join(timeout=5)
            listener.close()
            with self._lock:
                conns = list(self._conns)
            for conn in conns:
                conn.close()
            for t in self._threads:
                t.join(timeout=5)
            self.source.close()
        if self.error is not None and not self.finished.is_set():
            raise self.error
        if cancel.is_set() and not self.finished.is_set():
            raise PeerGone("cancelled")

    # -- one connection ---------------------------------------------------------------

    def _serve(self, raw: socket.socket, stream: int) -> None:
        """Serve one connection that knocked for ``stream``."""
        try:
            raw.settimeout(_HANDSHAKE_TIMEOUT)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            watch_path(raw, self.path_timeout)
            sock = self.context.wrap_socket(raw, server_side=True)
            verify_peer(sock, self.peer_der)
        except (OSError, ssl.SSLError, PeerAuthError):
            # Not our receiver after all (a replayed knock): drop it without a word.
            raw.close()
            return
        wire = PeerConnection(sock, max_payload=self.chunk_size)
        conn = SenderConnection(self.session_name, self.session)
        with self._lock:
            self._conns.add(wire)
        try:
            self._converse(wire, conn, stream)
        except PeerGone:
            pass  # the receiver re-requests this stream's chunks on its other streams
        except PeerAborted as exc:
            if not exc.retryable:
                self._fail(exc)
            elif self.on_pause is not None:  # it keeps its data and comes back: wait for it
                self.on_pause(str(exc))
        except (ProtocolError, SourceChanged, OSError) as exc:
            if not self.finished.is_set():
                self._fail(exc)
                with contextlib.suppress(PeerGone, ProtocolError):
                    wire.send_bytes(conn.send_abort(for_peer(exc)))  # no local paths
        finally:
            with self._lock:
                self._conns.discard(wire)
            wire.close()

    def _fail(self, exc: BaseException) -> None:
        """Keep the attempt's first error: the receiver's Abort that answers ours on another
        stream says less about what went wrong."""
        with self._lock:
            if self.error is None:
                self.error = exc

    def _converse(self, wire: PeerConnection, conn: SenderConnection, stream: int) -> None:
        wire.read_event(conn)  # Greeted, or it raised
        if conn.stream != stream:
            raise RemoteProtocolError(
                f"the receiver knocked for stream {stream} and said Hello for {conn.stream}"
            )
        self.connected.set()
        wire.sock.settimeout(_IO_TIMEOUT)
        wire.send_bytes(conn.send_hello())
        buffer = memoryview(bytearray(_HEAD + self.chunk_size))
        while True:
            if not conn.work or wire.readable():
                event = wire.read_event(conn)  # ChunksRequested queues on conn.work
                if isinstance(event, DigestRequested):
                    wire.send_bytes(self._file_end(conn, event.file_index))
                elif isinstance(event, Finished):
                    self.finished.set()
                    return
                continue
            item = conn.work[0]
            payload = buffer[_HEAD : _HEAD + item.length]
            self.source.read(item.file_index, item.offset, payload)
            digest = chunk_digest(payload)
            with self._lock:
                buffer[:_HEAD] = conn.send_chunk(item, digest)
            wire.send_bytes(buffer[: _HEAD + item.length])
            with self._lock:
                self.counter.bytes_sent += item.length

    def _file_end(self, conn: SenderConnection, index: int) -> bytes:
        self.source.fill_digests(self.session, [index], lock=self._lock)
        # A file written to while it was read would give the receiver a mix of old and new
        # chunks whose digests all check out: vouch for it only if it is still as offered.
        self.source.check_unchanged(index)
        with self._lock:
            data = conn.send_file_end(index)
        self.source.release(index)
        return data


def _listen(port: int) -> socket.socket:
    """A listening data socket on ``port`` of every interface, IPv6 and IPv4 where possible.

    It shares the port (SO_REUSEPORT) with the reflexive probe and the punches, so a port
    is first checked to be free the ordinary way: another process's listener there (even
    one that allows sharing) makes it taken, as it would without SO_REUSEPORT."""
    plain_bind(port)
    sock = data_socket(port)
    try:
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    return sock
