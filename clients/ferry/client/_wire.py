"""Blocking framed I/O on one TLS connection: moves bytes between a socket and the protocol.

`read_event` and `read_chunk` feed a sans-I/O connection object (`ReceiverConnection` or
`SenderConnection`) exactly the bytes it wants: small frame parts through a reused buffer,
a chunk payload straight into the caller's buffer. `send_bytes` writes what the connection
object produced. (`next_event`, `send` and `read_payload` are the bare frame layer, for
test peers that break the protocol on purpose.)

The data path runs in threads on blocking `ssl` sockets, because OpenSSL and BLAKE3 both
release the GIL there (asyncio TLS streams reach about a third of that rate on this kind
of machine, see DESIGN.md). This module only moves bytes; every decision is made by the
sans-I/O `ferry.protocol`.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import time
from contextlib import AbstractContextManager, nullcontext

from ferry.protocol import (
    ChunkPayload,
    ChunkStart,
    Control,
    FrameReader,
    LocalProtocolError,
    ReceiverConnection,
    SenderConnection,
    encode_control,
)
from ferry.protocol.events import NEED_DATA, ChunkData, Event
from ferry.v1 import peer_pb2

__all__ = ["PeerConnection", "PeerGone"]


class PeerGone(ConnectionError):
    """The connection to the peer closed or broke."""


class PeerConnection:
    """A TLS connection that reads and writes whole frames."""

    def __init__(self, sock: ssl.SSLSocket, *, max_payload: int) -> None:
        self.sock = sock
        self.reader = FrameReader(max_payload=max_payload)
        self._small = bytearray(64 * 1024)

    def close(self) -> None:
        """Close the connection; a thread blocked in it wakes with PeerGone."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def finish_sending(self) -> None:
        """Half-close: the peer reads what was sent, then end of stream; reading goes on.

        (The TCP socket's own shutdown: SSLSocket.shutdown would drop the TLS state that
        reading still needs.)
        """
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.sock, socket.SHUT_WR)

    def drain(self, seconds: float) -> None:
        """Read and drop whatever the peer still sends, until it hangs up or ``seconds`` pass,
        so that a close does not reset the connection before the peer read our last words."""
        deadline = time.monotonic() + seconds
        buffer = bytearray(64 * 1024)
        with contextlib.suppress(OSError, ValueError):
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                if self.sock.recv_into(buffer) == 0:
                    return

    def send(self, message: peer_pb2.PeerMessage) -> None:
        """Send one CONTROL frame."""
        self.send_bytes(encode_control(message))

    def send_bytes(self, data: bytes | memoryview) -> None:
        """Send raw, already framed bytes."""
        try:
            self.sock.sendall(data)
        except (OSError, ValueError) as exc:
            raise PeerGone(f"sending to the peer failed: {exc}") from exc

    def readable(self) -> bool:
        """True if a read would not block (decrypted bytes pending or socket readable)."""
        if self.sock.pending():
            return True
        ready, _, _ = select.select([self.sock], [], [], 0)
        return bool(ready)

    def _fill(self, view: memoryview) -> None:
        got = 0
        want = len(view)
        while got < want:
            try:
                n = self.sock.recv_into(view[got:], want - got)
            except (OSError, ValueError) as exc:
                raise PeerGone(f"reading from the peer failed: {exc}") from exc
            if n == 0:
                raise PeerGone("the peer closed the connection")
            got += n

    def read_event(
        self,
        conn: ReceiverConnection | SenderConnection,
        lock: AbstractContextManager[object] | None = None,
    ) -> Event:
        """Feed ``conn`` until it has an event; it is asked for it holding ``lock``."""
        guard = nullcontext() if lock is None else lock
        if conn.expecting_payload:
            raise LocalProtocolError("a chunk payload must be read first")
        while True:
            n = conn.wanted
            if n > len(self._small):
                self._small = bytearray(n)
            view = memoryview(self._small)[:n]
            self._fill(view)
            conn.receive_data(view)
            with guard:
                event = conn.next_event()
            if event is not NEED_DATA:
                return event

    def read_chunk(self, conn: ReceiverConnection, buffer: memoryview) -> memoryview:
        """Read the payload of the chunk ``conn`` just announced straight into ``buffer``."""
        if not conn.expecting_payload:
            raise LocalProtocolError("no chunk payload is due")
        view = buffer[: conn.wanted]
        self._fill(view)
        conn.receive_data(view)
        event = conn.next_event()  # a payload touches no session: no lock
        assert isinstance(event, ChunkData)
        return event.data

    def next_event(self) -> Control | ChunkStart:
        """Read until the next CONTROL message or CHUNK head."""
        reader = self.reader
        if reader.expecting_payload:
            raise LocalProtocolError("a chunk payload must be read first")
        while True:
            n = reader.wanted
            if n > len(self._small):
                self._small = bytearray(n)
            view = memoryview(self._small)[:n]
            self._fill(view)
            event = reader.feed(view)
            if isinstance(event, Control | ChunkStart):
                return event

    def read_payload(self, buffer: memoryview) -> memoryview:
        """Read the payload announced by the last ChunkStart into ``buffer``."""
        n = self.reader.wanted
        view = buffer[:n]
        self._fill(view)
        event = self.reader.feed(view)
        assert isinstance(event, ChunkPayload)
        return event.data

    def skip_payload(self) -> None:
        """Read and drop the payload announced by the last ChunkStart."""
        buffer = memoryview(bytearray(self.reader.wanted))
        self.read_payload(buffer)
