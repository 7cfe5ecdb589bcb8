"""The receiver's data path: dial the sender, drive the streams, verify and write.

The first stream is found by trying every candidate address on every leased port at once
(the sender listens on the first free one) until the plan's deadline; the other streams
dial the address that answered. Each stream thread asks for chunks (`ReceiveSession`
decides which), reads each payload into its own buffer, checks the digest outside the
lock, writes it at its offset, and asks for a file's digest once it holds the whole file.
A stream that breaks gives its chunks back to the others; the transfer fails only when no
stream is left, or on a protocol violation, which is never retried.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence

from ferry.client._sink import FileSink
from ferry.client._tls import PeerAuthError, verify_peer
from ferry.client._wire import PeerConnection, PeerGone
from ferry.protocol import (
    ChunkStart,
    PeerAborted,
    ProtocolError,
    ReceiveSession,
    RemoteProtocolError,
    abort,
    check_hello,
    chunk_digest,
    done,
    hello,
)

__all__ = ["ReceivePeer"]

_CONNECT_TIMEOUT = 2.0
_IO_TIMEOUT = 60.0
_RETRY_PAUSE = 0.05


class ReceivePeer:
    """Fetches one transfer from the sender into a FileSink."""

    def __init__(
        self,
        session: str,
        sizes: Sequence[int],
        chunk_size: int,
        sink: FileSink,
        context: ssl.SSLContext,
        peer_der: bytes,
        *,
        streams: int,
        window: int = 8,
        stall_timeout: float = 30.0,
        on_file: Callable[[int], None] | None = None,
    ) -> None:
        self.session_name = session
        self.sink = sink
        self.chunk_size = chunk_size
        self.context = context
        self.peer_der = peer_der
        self.streams = max(1, streams)
        self.session = ReceiveSession(sizes, chunk_size, window=window)
        self.on_file = on_file
        self.stall_timeout = stall_timeout
        self.events = 0  # frames received: the stall watchdog's measure of progress
        self.connected_streams = 0
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._conns: set[PeerConnection] = set()
        self._awaiting_digest: set[int] = set()
        self._pending_conn: dict[int, PeerConnection] = {}
        self.error: BaseException | None = None

    @property
    def bytes_verified(self) -> int:
        """Bytes verified and written so far."""
        return self.session.bytes_verified

    # -- connecting -------------------------------------------------------------------

    def _dial(
        self, address: tuple[str, int], stream: int, timeout: float = _CONNECT_TIMEOUT
    ) -> PeerConnection:
        """Connect, handshake and exchange Hello, all within ``timeout`` per step."""
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

    def connect(
        self, candidates: Sequence[str], ports: range, deadline: float, cancel: threading.Event
    ) -> tuple[str, int]:
        """Find the sender: try every (address, port) at once until one proves itself."""
        targets = [(ip, port) for ip in candidates for port in ports]
        if not targets:
            raise PeerGone("the sender has no candidate address")
        last: BaseException | None = None
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, len(targets))) as pool:
            while (remaining := deadline - time.monotonic()) > 0 and not cancel.is_set():
                step = min(_CONNECT_TIMEOUT, max(remaining, 0.1))
                futures = {pool.submit(self._dial, t, 0, step): t for t in targets}
                winner: tuple[str, int] | None = None
                for future in concurrent.futures.as_completed(futures):
                    try:
                        conn = future.result()
                    except PeerAborted:
                        raise
                    except (OSError, ssl.SSLError, PeerAuthError, ProtocolError) as exc:
                        last = exc
                        continue
                    if winner is None:
                        winner = futures[future]
                        self._adopt(conn)
                    else:
                        conn.close()
                if winner is not None:
                    return winner
                time.sleep(_RETRY_PAUSE)
        raise PeerGone(f"could not reach the sender directly before the deadline ({last})")

    def _adopt(self, conn: PeerConnection) -> int:
        with self._lock:
            stream = self.connected_streams
            self.connected_streams += 1
            self._conns.add(conn)
            self.session.open_stream(stream)
        self._pending_conn[stream] = conn
        return stream

    # -- transferring -----------------------------------------------------------------

    def run(
        self, candidates: Sequence[str], ports: range, deadline: float, cancel: threading.Event
    ) -> None:
        """Connect, receive everything, finish every file; raise on failure."""
        self.sink.prepare()
        address = self.connect(candidates, ports, deadline, cancel)
        for stream in range(1, self.streams):
            try:
                self._adopt(self._dial(address, stream))
            except (OSError, ssl.SSLError, PeerAuthError, ProtocolError):
                break  # fewer streams is still a transfer
        with self._lock:
            for index in self.session.empty_files():
                self._awaiting_digest.add(index)
        threads = [
            threading.Thread(target=self._stream, args=(stream, conn, cancel), daemon=True)
            for stream, conn in self._pending_conn.items()
        ]
        for t in threads:
            t.start()
        self._watch(threads, cancel)
        if self.error is not None:
            raise self.error
        if cancel.is_set() and not self.session.done:
            raise PeerGone("cancelled")
        if not self.session.done:
            raise PeerGone("every connection to the sender broke")

    def _watch(self, threads: list[threading.Thread], cancel: threading.Event) -> None:
        """Wait for the streams; end them on cancel or when nothing arrives for too long."""
        seen, since = self.events, time.monotonic()
        while alive := [t for t in threads if t.is_alive()]:
            alive[0].join(timeout=0.2)
            if cancel.is_set():
                self._fail(PeerGone("cancelled"))
            elif self.events != seen:
                seen, since = self.events, time.monotonic()
            elif time.monotonic() - since > self.stall_timeout and self.error is None:
                self._fail(
                    PeerGone(f"the sender sent nothing for {self.stall_timeout:g} s; giving up")
                )

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = exc
            conns = list(self._conns)
            self._wake.notify_all()
        for conn in conns:
            with contextlib.suppress(PeerGone, ProtocolError):
                conn.send(abort(str(exc)))
            conn.close()

    def _stream(self, stream: int, conn: PeerConnection, cancel: threading.Event) -> None:
        try:
            self._converse(stream, conn, cancel)
        except PeerGone as exc:
            with self._lock:
                self.session.stream_lost(stream)
                self._conns.discard(conn)
                alive = bool(self._conns)
                self._wake.notify_all()
            if not alive and not self.session.done and self.error is None:
                self._fail(exc)
        except (ProtocolError, PeerAborted, OSError) as exc:
            self._fail(exc)
        finally:
            conn.close()

    def _converse(self, stream: int, conn: PeerConnection, cancel: threading.Event) -> None:
        buffer = memoryview(bytearray(self.chunk_size))
        my_digests: set[int] = set()
        if stream == 0:
            with self._lock:
                my_digests.update(self._awaiting_digest)
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
                idle = not my_digests and not self.session.has_in_flight(stream)
                if idle:
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
                if self.on_file is not None:
                    self.on_file(index)
                with self._lock:
                    self._wake.notify_all()
            elif kind == "abort":
                raise PeerAborted(message.abort.reason or "the sender gave up")
            else:
                raise RemoteProtocolError(f"unexpected {kind} from the sender")
        with contextlib.suppress(PeerGone):
            conn.send(done())
