"""The receiver's data path: dial the sender, drive the streams, verify, write, journal.

The first stream is found by trying every candidate address on every leased port at once
(the sender listens on the first free one) until the plan's deadline; the other streams
dial the address that answered. Each stream thread asks for chunks (`ReceiveSession`
decides which), reads each payload into its own buffer, checks the digest outside the
lock, writes it at its offset, records it in the journal, and asks for a file's digest
once it holds the whole file. A stream that breaks gives its chunks back to the others.

One `ReceivePeer` is one connection attempt; the `ReceiveSession`, the sink and the
journal outlive it, so a new attempt (after a restart or a lost connection) asks only
for what is still missing. `PeerGone` means "try again later"; a `ProtocolError` or
`PeerAborted` is final; a `StorageError` (this side's disk) keeps what was verified and
tells the sender, with a retryable Abort, to wait for this side's rerun.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence

from ferry.client._journal import Journal
from ferry.client._sink import FileSink, StorageError
from ferry.client._tls import PeerAuthError, verify_peer
from ferry.client._wire import PeerConnection, PeerGone
from ferry.protocol import (
    ChunkStart,
    PeerAborted,
    ProtocolError,
    ReceiveSession,
    RemoteProtocolError,
    abort,
    aborted,
    check_hello,
    chunk_digest,
    done,
    hello,
)

__all__ = ["ReceivePeer"]

_CONNECT_TIMEOUT = 2.0
_IO_TIMEOUT = 60.0
_RETRY_PAUSE = 0.05
_SYNC_INTERVAL = 0.5
_LINGER = 2.0  # how long a paused receiver waits for the sender to read its Abort


class ReceivePeer:
    """One connection attempt: fetch what the session still lacks into the sink."""

    def __init__(
        self,
        name: str,
        session: ReceiveSession,
        sink: FileSink,
        journal: Journal | None,
        context: ssl.SSLContext,
        peer_der: bytes,
        *,
        streams: int,
        first_stream_id: int = 0,
        stall_timeout: float = 30.0,
        on_file: Callable[[int], None] | None = None,
    ) -> None:
        self.session_name = name
        self.session = session
        self.sink = sink
        self.journal = journal
        self.chunk_size = session.chunk_size
        self.context = context
        self.peer_der = peer_der
        self.streams = max(1, streams)
        self.on_file = on_file
        self.stall_timeout = stall_timeout
        self.events = 0  # frames received: the stall watchdog's measure of progress
        self._next_id = first_stream_id
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._conns: dict[int, PeerConnection] = {}
        self.error: BaseException | None = None

    @property
    def next_stream_id(self) -> int:
        """The first stream id a later attempt may use."""
        return self._next_id

    # -- connecting -------------------------------------------------------------------

    def _dial(
        self, address: tuple[str, int], stream: int, timeout: float = _CONNECT_TIMEOUT
    ) -> PeerConnection:
        """Connect, handshake and exchange Hello, each step within ``timeout``."""
        raw = socket.create_connection(address, timeout=timeout)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = self.context.wrap_socket(raw, server_side=False)
            try:
                verify_peer(sock, self.peer_der)
            except PeerAuthError:
                sock.close()
                raise
            conn = PeerConnection(sock, max_payload=self.chunk_size)
            conn.send(hello(self.session_name, stream))
            event = conn.next_event()
            if isinstance(event, ChunkStart):
                raise RemoteProtocolError("peer sent a chunk before hello")
            check_hello(event.message, self.session_name)
            sock.settimeout(_IO_TIMEOUT)
            return conn
        except BaseException:
            raw.close()
            raise

    def _adopt(self, conn: PeerConnection) -> None:
        with self._lock:
            stream = self._next_id
            self._next_id += 1
            self._conns[stream] = conn
            self.session.open_stream(stream)

    def connect(
        self, candidates: Sequence[str], ports: range, deadline: float, cancel: threading.Event
    ) -> tuple[str, int]:
        """Find the sender: try every (address, port) at once until one proves itself."""
        targets = [(ip, port) for ip in candidates for port in ports]
        if not targets:
            raise PeerGone("the sender has no candidate address")
        last: BaseException | None = None
        impostor = False  # something answered, but without the pinned certificate
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, len(targets))) as pool:
            while (remaining := deadline - time.monotonic()) > 0 and not cancel.is_set():
                step = min(_CONNECT_TIMEOUT, max(remaining, 0.1))
                stream = self._next_id
                futures = {pool.submit(self._dial, t, stream, step): t for t in targets}
                winner: tuple[str, int] | None = None
                for future in concurrent.futures.as_completed(futures):
                    try:
                        conn = future.result()
                    except PeerAborted:
                        raise
                    except (OSError, ssl.SSLError, PeerAuthError, ProtocolError) as exc:
                        last = exc
                        impostor = impostor or isinstance(
                            exc, PeerAuthError | ssl.SSLCertVerificationError
                        )
                        continue
                    if winner is None:
                        winner = futures[future]
                        self._adopt(conn)
                    else:
                        conn.close()
                if winner is not None:
                    return winner
                time.sleep(_RETRY_PAUSE)
        if impostor:
            raise PeerGone(
                "could not reach the sender before the deadline: the peer that answered did "
                "not present the certificate the broker introduced"
            )
        raise PeerGone(f"could not reach the sender directly before the deadline ({last})")

    # -- transferring -----------------------------------------------------------------

    def run(
        self, candidates: Sequence[str], ports: range, deadline: float, cancel: threading.Event
    ) -> None:
        """Connect, receive everything still missing, finish every file; raise on failure."""
        address = self.connect(candidates, ports, deadline, cancel)
        for _ in range(1, self.streams):
            try:
                self._adopt(self._dial(address, self._next_id))
            except (OSError, ssl.SSLError, PeerAuthError, ProtocolError):
                break  # fewer streams is still a transfer
        with self._lock:
            conns = dict(self._conns)
            waiting = self.session.complete_unconfirmed()
        first = min(conns)
        threads = [
            threading.Thread(
                target=self._stream,
                args=(stream, conn, cancel, waiting if stream == first else []),
                daemon=True,
            )
            for stream, conn in conns.items()
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
        seen, since, synced = self.events, time.monotonic(), time.monotonic()
        while alive := [t for t in threads if t.is_alive()]:
            alive[0].join(timeout=0.2)
            now = time.monotonic()
            if self.journal is not None and now - synced >= _SYNC_INTERVAL and self.error is None:
                try:
                    self.journal.sync(self.sink.open_fds())
                except StorageError as exc:
                    self._fail(exc)
                synced = now
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
        reason = f"the receiver's destination: {exc}" if retryable else str(exc)
        for conn in conns:
            if final:
                with contextlib.suppress(PeerGone, ProtocolError):
                    conn.send(abort(reason, retryable=retryable))
            if retryable:
                conn.finish_sending()
            else:
                conn.close()
        if retryable:  # a thread blocked on a silent sender is woken by the close at the end
            timer = threading.Timer(_LINGER + 1.0, _close_all, args=(conns,))
            timer.daemon = True
            timer.start()

    def _stream(
        self, stream: int, conn: PeerConnection, cancel: threading.Event, digests: list[int]
    ) -> None:
        try:
            self._converse(stream, conn, cancel, digests)
        except PeerGone as exc:
            with self._lock:
                self.session.stream_lost(stream)
                self._conns.pop(stream, None)
                alive = bool(self._conns)
                self._wake.notify_all()
            if not alive and not self.session.done and self.error is None:
                self._fail(exc)
        except (ProtocolError, PeerAborted, StorageError, OSError) as exc:
            self._fail(exc)
        finally:
            with self._lock:
                self.session.stream_lost(stream)
                self._conns.pop(stream, None)
            if isinstance(self.error, StorageError):
                conn.drain(_LINGER)
            conn.close()

    def _converse(
        self, stream: int, conn: PeerConnection, cancel: threading.Event, digests: list[int]
    ) -> None:
        buffer = memoryview(bytearray(self.chunk_size))
        my_digests: set[int] = set(digests)
        for index in sorted(my_digests):
            conn.send(self.session.digest_request(index))
        while True:
            with self._lock:
                if self.error is not None or cancel.is_set():
                    return
                request = self.session.request(stream)
                if self.session.done:
                    break
            if request is not None:
                conn.send(request)
            with self._lock:
                if not my_digests and not self.session.has_in_flight(stream):
                    # Nothing to read on this stream: wait for work to come back or the end.
                    self._wake.wait(timeout=0.5)
                    continue
            event = conn.next_event()
            self.events += 1
            if isinstance(event, ChunkStart):
                with self._lock:
                    target = self.session.chunk_start(stream, event)
                payload = conn.read_payload(buffer)
                ok = chunk_digest(payload) == event.digest
                if ok:
                    self.sink.write(target.file_index, target.offset, payload)
                    if self.journal is not None:
                        self.journal.chunk(target.file_index, target.chunk_index, event.digest)
                with self._lock:
                    finished = self.session.chunk_done(stream, event, ok)
                    self._wake.notify_all()
                for index in finished:
                    my_digests.add(index)
                    conn.send(self.session.digest_request(index))
                continue
            message = event.message
            kind = message.WhichOneof("kind")
            if kind == "file_end":
                index = message.file_end.file_index
                if index not in my_digests:
                    raise RemoteProtocolError(f"peer sent an unasked digest for file {index}")
                with self._lock:
                    self.session.file_end(message.file_end)
                my_digests.discard(index)
                self.sink.finish(index)
                if self.journal is not None:
                    self.journal.finished(index)
                if self.on_file is not None:
                    self.on_file(index)
                with self._lock:
                    self._wake.notify_all()
            elif kind == "abort":
                raise aborted(message.abort, "the sender gave up")
            else:
                raise RemoteProtocolError(f"unexpected {kind} from the sender")
        with contextlib.suppress(PeerGone):
            conn.send(done())


def _close_all(conns: Sequence[PeerConnection]) -> None:
    for conn in conns:
        conn.close()
