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
from collections.abc import Sequence

from ferry.client._errors import for_peer
from ferry.client._intake import Intake
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
        self.events = 0  # frames received: the stall watchdog's measure of progress
        self._lock = intake.lock  # guards the session and the connections below
        self._wake = intake.wake
        self._conns: dict[int, tuple[PeerConnection, ReceiverConnection]] = {}
        self.error: BaseException | None = None

    # -- connecting -------------------------------------------------------------------

    def _dial(
        self, address: tuple[str, int], stream: int, timeout: float = _CONNECT_TIMEOUT
    ) -> tuple[PeerConnection, ReceiverConnection]:
        """Connect, knock, handshake and exchange Hello, each step within ``timeout``."""
        raw = socket.create_connection(address, timeout=timeout)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
                stream = self.intake.next_stream
                futures = {pool.submit(self._dial, t, stream, step): t for t in targets}
                winner: tuple[str, int] | None = None
                for future in concurrent.futures.as_completed(futures):
                    try:
                        pair = future.result()
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
                        self._adopt(pair)
                    else:
                        pair[0].close()
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
                self._adopt(self._dial(address, self.intake.next_stream))
            except (OSError, ssl.SSLError, PeerAuthError, ProtocolError):
                break  # fewer streams is still a transfer
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
