"""A hostile receiver for tests: it holds the right code, then floods the sender with requests.

`HostileReceiver` claims the offer of a real `ferry send` through the real broker (the real
PAKE, so the sender confirms the code and accepts its certificate), accepts it with its own
certificate, dials the sender's leased ports (knocking with the session's knock first, as a
real receiver does), completes pinned TLS and the Hello exchange, and then sends ChunkRequests
as fast as it can, each asking for `REQUEST_CHUNKS` chunks (the most one request may ask
for), while a second thread reads and drops every byte the sender sends: the queue of
requested chunks on the sender is all that can grow.

It runs in threads of the test process; `stop()` ends it. What it saw is kept for assertions:
``requests_sent`` (how many), ``bytes_received``, and ``abort`` (the reason of the sender's
Abort, if one came).
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import threading

from ferry.client import Client
from ferry.client._candidates import peer_info
from ferry.client._keys import sign
from ferry.client._tls import Identity, client_context, verify_peer
from ferry.client._wire import PeerConnection, PeerGone
from ferry.protocol import ProtocolError, check_hello, encode_control, hello
from ferry.protocol.frames import HEADER_SIZE, Control, FrameType
from ferry.protocol.knock import Knocker
from ferry.protocol.pake import PeerRole
from ferry.protocol.sender import MAX_REQUEST_CHUNKS
from ferry.v1 import peer_pb2

__all__ = ["REQUEST_CHUNKS", "HostileReceiver"]

REQUEST_CHUNKS = MAX_REQUEST_CHUNKS
_CONNECT_TIMEOUT = 5.0
_IO_TIMEOUT = 30.0


class HostileReceiver:
    """Claims ``code`` on ``broker``, connects to the sender and floods it with requests.

    ``file_chunks``: how many chunks file 0 of the offer has (each request repeats the run
    of all of them until it asks for `REQUEST_CHUNKS`).
    """

    def __init__(self, broker: str, code: str, *, file_chunks: int) -> None:
        self.broker = broker
        self.code = code
        self.file_chunks = file_chunks
        self.identity = Identity.generate()
        self.requests_sent = 0
        self.bytes_received = 0
        self.abort: str | None = None
        self.connected = threading.Event()
        self.ended = threading.Event()  # the sender closed the connection (or stop())
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._wire: PeerConnection | None = None

    def start(self, timeout: float = 30.0) -> HostileReceiver:
        """Claim, accept and connect (raising what went wrong), then start flooding."""
        wire = asyncio.run(asyncio.wait_for(self._connect(), timeout))
        self._wire = wire
        self.connected.set()
        for target in (self._flood, self._drain):
            t = threading.Thread(target=self._guard, args=(target, wire), daemon=True)
            self._threads.append(t)
            t.start()
        return self

    def stop(self) -> None:
        """Close the connection and join the threads."""
        self._stop.set()
        if self._wire is not None:
            self._wire.close()
        for t in self._threads:
            t.join(timeout=10)
            assert not t.is_alive(), "a hostile receiver thread did not end"

    def __enter__(self) -> HostileReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _connect(self) -> PeerConnection:
        client = Client(self.broker)
        incoming = await client.claim(self.code)
        try:
            me = sign(peer_info(self.identity, (40000, 40999)), incoming.key, PeerRole.RECEIVER)
            session = await incoming._link.accept(incoming.name, me)
        finally:
            await incoming.close()
        sender_der = session.sender.certificate_der
        ports = session.plan.listener_ports
        knocker = Knocker(incoming.key.knock_key, session.name, session.attempt)
        context = client_context(self.identity, sender_der)
        deadline = asyncio.get_running_loop().time() + 20
        while asyncio.get_running_loop().time() < deadline:
            for port in range(ports.first_port, ports.last_port + 1):
                try:
                    return await asyncio.to_thread(
                        self._dial, port, context, sender_der, knocker, session.name
                    )
                except (OSError, ssl.SSLError):
                    continue
            await asyncio.sleep(0.1)
        raise TimeoutError("the hostile receiver could not reach the sender")

    @staticmethod
    def _dial(
        port: int, context: ssl.SSLContext, sender_der: bytes, knocker: Knocker, name: str
    ) -> PeerConnection:
        raw = socket.create_connection(("127.0.0.1", port), timeout=_CONNECT_TIMEOUT)
        try:
            raw.sendall(knocker.knock(0, os.urandom(16)))
            sock = context.wrap_socket(raw, server_side=False)
            verify_peer(sock, sender_der)
            sock.settimeout(_IO_TIMEOUT)
            wire = PeerConnection(sock, max_payload=64 << 20)
            wire.send(hello(name, 0))
            event = wire.next_event()
            if not isinstance(event, Control):
                raise ProtocolError("the sender answered Hello with a chunk")
            check_hello(event.message, name)
            return wire
        except BaseException:
            raw.close()
            raise

    def _guard(self, target: object, wire: PeerConnection) -> None:
        try:
            target(wire)  # type: ignore[operator]
        except (PeerGone, OSError, ssl.SSLError, ProtocolError):
            pass  # the sender hung up: that is what the tests look at
        except BaseException as exc:  # the test asserts on it
            self.error = exc
        finally:
            self.ended.set()

    def _request(self) -> bytes:
        message = peer_pb2.PeerMessage()
        left = REQUEST_CHUNKS
        while left:
            count = min(left, self.file_chunks)
            message.request.ranges.add(file_index=0, first_chunk=0, chunk_count=count)
            left -= count
        return encode_control(message)

    def _flood(self, wire: PeerConnection) -> None:
        frame = self._request()
        while not self._stop.is_set() and not self.ended.is_set():
            wire.send_bytes(frame)
            self.requests_sent += 1

    def _drain(self, wire: PeerConnection) -> None:
        """Read and drop chunks; keep the reason of an Abort."""
        sink = memoryview(bytearray(1 << 20))
        while not self._stop.is_set():
            head = sink[:HEADER_SIZE]
            wire._fill(head)
            self.bytes_received += HEADER_SIZE
            kind, length = int(head[0]), int.from_bytes(head[4:8], "big")
            if kind == FrameType.CONTROL:
                body = bytearray(length)
                wire._fill(memoryview(body))
                message = peer_pb2.PeerMessage.FromString(bytes(body))
                if message.WhichOneof("kind") == "abort":
                    self.abort = message.abort.reason
                    return
                continue
            while length:
                n = min(length, len(sink))
                wire._fill(sink[:n])
                self.bytes_received += n
                length -= n
