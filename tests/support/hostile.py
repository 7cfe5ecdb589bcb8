"""A hostile sender for tests: a real offer on the real broker, then a misbehaving data path.

`HostileSender` registers an offer of in-memory files through `BrokerLink` (its own
certificate, candidate 127.0.0.1, a port range chosen per test), waits on WatchSession for
the receiver's acceptance, listens with pinned TLS on the first free port of the leased
range, checks each connection's knock (it holds the code, so the session key), answers each
Hello properly, and then answers chunk requests according to its
`Mode`: honestly, or with bad digests, wrong lengths, unasked-for chunks, garbage bytes, a
hang-up, or (before any of that) another TLS certificate than the one it registered.

It runs in a thread of the test process with its own event loop; `stop()` ends it and
closes every socket. It prints nothing. What it saw is kept in counters for assertions.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import random
import socket
import ssl
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from ferry.client._broker import BrokerLink
from ferry.client._tls import Identity, PeerAuthError, server_context, verify_peer
from ferry.client._wire import PeerConnection, PeerGone
from ferry.protocol import (
    FILE_DIGEST_ALGORITHM,
    ChunkStart,
    ChunkWork,
    PeerAborted,
    ProtocolError,
    SendSession,
    check_hello,
    chunk_digest,
    encode_chunk_head,
    file_digest,
    hello,
)
from ferry.protocol.knock import KNOCK_SIZE, BadKnock, Knocker
from ferry.protocol.pake import Code, KeyExchange, PeerRole, SessionKey
from ferry.v1 import broker_pb2, peer_pb2

__all__ = [
    "CHUNK_SIZE",
    "HostileFile",
    "HostileSender",
    "Mode",
    "offer_request",
    "random_ports",
]

CHUNK_SIZE = 64 << 10  # the broker's minimum
_ACCEPT_POLL = 0.1
_IO_TIMEOUT = 120.0  # longer than the receiver's, so its timeouts are what tests see
_HANDSHAKE_TIMEOUT = 5.0
_STARTUP_TIMEOUT = 20.0
_ATTEMPTS = 8  # connection attempts whose knocks open its one listener
State = broker_pb2.Session.State


class Mode(enum.Enum):
    """How the hostile sender answers."""

    HONEST = "honest"
    #: Every chunk carries a wrong digest (the payload itself is right).
    BAD_DIGEST = "bad-digest"
    #: The first copy of each chunk carries a wrong digest; the next ones are right.
    BAD_DIGEST_ONCE = "bad-digest-once"
    #: Every chunk frame announces and carries chunk_size + 1 payload bytes.
    OVERSIZE = "oversize"
    #: Every chunk is one byte shorter than the chunk asked for.
    SHORT = "short"
    #: Each request is answered with a chunk index far beyond the file's end.
    UNREQUESTED = "unrequested"
    #: The first request is answered with random bytes instead of a frame.
    GARBAGE = "garbage"
    #: After `hangup_after` good chunks every connection and the listener close for good.
    HANGUP = "hangup"
    #: After `hangup_after` good chunks the connection of stream 1 closes; the others go on.
    DROP_STREAM = "drop-stream"
    #: After `hangup_after` good chunks it goes silent, keeping every connection open.
    STALL = "stall"
    #: TLS completes, the receiver's Hello is read, and no answer ever comes.
    NO_HELLO = "no-hello"
    #: Chunks are right, but FileEnd carries a wrong whole-file digest.
    BAD_FILE_END = "bad-file-end"
    #: TLS presents a fresh certificate, not the one registered with the broker.
    WRONG_CERT = "wrong-cert"


@dataclass(frozen=True)
class HostileFile:
    """One offered file: its manifest path and its bytes."""

    path: str
    data: bytes


class _HungUp(Exception):
    """This connection was closed on purpose (Mode.HANGUP)."""


def random_ports(span: int = 20) -> tuple[int, int]:
    """A random port range of ``span`` ports with a base in 40000-46000."""
    first = random.randrange(40000, 46000)
    return first, first + span - 1


def offer_request(
    files: Sequence[HostileFile],
    identity: Identity,
    ports: tuple[int, int],
    *,
    chunk_size: int = CHUNK_SIZE,
    pake_message: bytes = b"\x00" * 33,
) -> broker_pb2.CreateOfferRequest:
    """The CreateOfferRequest for ``files``, with candidate 127.0.0.1 and ``ports`` (and a
    PAKE message: a placeholder unless the caller runs a real exchange)."""
    manifest = broker_pb2.Manifest(chunk_size_bytes=chunk_size)
    for f in files:
        manifest.files.add(
            path=f.path,
            size_bytes=len(f.data),
            mode=0o644,
            modify_time=Timestamp(seconds=1_700_000_000),
        )
    return broker_pb2.CreateOfferRequest(
        manifest=manifest,
        sender=broker_pb2.PeerInfo(
            candidates=[broker_pb2.Candidate(ip="127.0.0.1", kind=broker_pb2.Candidate.KIND_HOST)],
            allowed_ports=broker_pb2.PortRange(first_port=ports[0], last_port=ports[1]),
            certificate_der=identity.cert_der,
            pake_message=pake_message,
        ),
        request_id=os.urandom(16).hex(),
    )


class HostileSender:
    """A sender that follows the protocol up to Hello, then misbehaves as ``mode`` says."""

    def __init__(
        self,
        broker: str,
        mode: Mode,
        files: Sequence[HostileFile],
        *,
        chunk_size: int = CHUNK_SIZE,
        ports: tuple[int, int] | None = None,
        hangup_after: int = 3,
    ) -> None:
        self.broker = broker
        self.mode = mode
        self.files = list(files)
        self.chunk_size = chunk_size
        self.ports = ports or random_ports()
        self.hangup_after = hangup_after
        self.dropped = False
        self.identity = Identity.generate()
        # It knows the code: it is the peer, hostile in the protocol, not in the middle.
        self._password = Code.new_password()[0]
        self._exchange = KeyExchange(PeerRole.SENDER, self._password)
        self._key: SessionKey | None = None
        # Filled in as it runs.
        self.code = ""
        self._manifest = broker_pb2.Manifest()
        self.name = ""
        self.token = ""
        self.port = 0
        self.accepted: broker_pb2.Session | None = None
        self.tcp_connections = 0
        self.knock_failures = 0
        self.tls_failures = 0
        self.handshakes = 0
        self.hellos = 0
        self.chunks_sent = 0
        self._served = 0
        self.attempts: Counter[tuple[int, int]] = Counter()
        self.aborts: list[str] = []
        self.done_received = False
        self.hung_up = threading.Event()
        self.error: BaseException | None = None  # the hostile sender's own failure
        self._digests = [
            [chunk_digest(f.data[i : i + chunk_size]) for i in range(0, len(f.data), chunk_size)]
            for f in self.files
        ]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._offered = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._listener: socket.socket | None = None
        self._conns: set[PeerConnection] = set()
        self._raws: set[socket.socket] = set()
        self._conn_threads: list[threading.Thread] = []

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> HostileSender:
        """Create the offer (raising what the broker says) and start waiting for acceptance."""
        self._thread = threading.Thread(target=self._main, name="hostile-sender", daemon=True)
        self._thread.start()
        if not self._offered.wait(_STARTUP_TIMEOUT):
            self.stop()
            raise TimeoutError("the hostile sender did not get an offer in time")
        if not self.code:
            self.stop()
            assert self.error is not None
            raise self.error
        return self

    def stop(self) -> None:
        """End everything: the broker watch, the listener, every connection and thread."""
        self._stop.set()
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(task.cancel)
        self._close_sockets()
        if self._thread is not None:
            self._thread.join(timeout=15)
            assert not self._thread.is_alive(), "the hostile sender's thread did not end"
        for t in self._conn_threads:
            t.join(timeout=10)
            assert not t.is_alive(), "a hostile connection thread did not end"

    def __enter__(self) -> HostileSender:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def session(self) -> broker_pb2.Session:
        """GetSession with the sender's token, on a fresh link (call from a thread without loop)."""

        async def get() -> broker_pb2.Session:
            link = BrokerLink(self.broker)
            link.token = self.token
            try:
                return await link.get(self.name)
            finally:
                await link.close()

        return asyncio.run(get())

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # the test asserts on it
            if not isinstance(exc, asyncio.CancelledError):
                self.error = exc
        finally:
            self._offered.set()

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        if self._stop.is_set():
            return
        link = BrokerLink(self.broker)
        try:
            response = await link.create_offer(
                offer_request(
                    self.files, self.identity, self.ports, pake_message=self._exchange.message
                )
            )
            self.name = response.session.name
            self.token = response.party_token
            self.code = str(Code(response.code, self._password))
            self._manifest = response.session.manifest
            self._offered.set()
            session = await self._wait_accepted(link)
            if session is None:
                return
            self.accepted = session
            await asyncio.to_thread(self._serve, session)
        finally:
            await link.close()

    async def _wait_accepted(self, link: BrokerLink) -> broker_pb2.Session | None:
        async for session in link.watch(self.name, 60):
            if session.state == State.STATE_OFFERED:
                if session.receiver.key_confirmation and not session.sender.key_confirmation:
                    key = self._exchange.finish(session.receiver.pake_message)
                    self._key = key
                    await link.confirm_key(
                        self.name,
                        key.confirmation(PeerRole.SENDER, self._manifest),
                        key.certificate_mac(PeerRole.SENDER, self.identity.cert_der),
                    )
                continue
            if session.state == State.STATE_ACCEPTED:
                return session
            return None
        return None

    # -- listening --------------------------------------------------------------------

    def _serve(self, session: broker_pb2.Session) -> None:
        receiver_der = session.receiver.certificate_der
        tls_identity = Identity.generate() if self.mode is Mode.WRONG_CERT else self.identity
        context = server_context(tls_identity, receiver_der)
        assert self._key is not None  # the receiver proved the code before accepting
        # It listens on for every attempt the receiver may negotiate (it never follows
        # them as a real sender does): the knock of any of the first few opens the door.
        knockers = [
            Knocker(self._key.knock_key, self.name, attempt)
            for attempt in range(session.attempt, session.attempt + _ATTEMPTS)
        ]
        ports = session.plan.listener_ports
        listener = None
        for port in range(ports.first_port, ports.last_port + 1):
            try:
                listener = socket.create_server(("127.0.0.1", port), backlog=64)
            except OSError:
                continue
            self.port = port
            break
        if listener is None:
            raise OSError(f"no free port in the leased range {ports.first_port}-{ports.last_port}")
        listener.settimeout(_ACCEPT_POLL)
        with self._lock:
            self._listener = listener
        try:
            while not self._stop.is_set() and not self.hung_up.is_set():
                try:
                    raw, _ = listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    break  # closed by a hang-up or stop()
                with self._lock:
                    self.tcp_connections += 1
                    self._raws.add(raw)
                t = threading.Thread(
                    target=self._connection,
                    args=(raw, context, receiver_der, knockers),
                    daemon=True,
                )
                self._conn_threads.append(t)
                t.start()
        finally:
            listener.close()

    def _close_sockets(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns = list(self._conns)
            raws = list(self._raws)
        if listener is not None:
            listener.close()
        for conn in conns:
            conn.close()
        for raw in raws:
            with contextlib.suppress(OSError):
                raw.shutdown(socket.SHUT_RDWR)
            raw.close()

    def _hang_up(self) -> None:
        self.hung_up.set()
        self._close_sockets()

    # -- one connection ---------------------------------------------------------------

    def _connection(
        self,
        raw: socket.socket,
        context: ssl.SSLContext,
        receiver_der: bytes,
        knockers: Sequence[Knocker],
    ) -> None:
        conn: PeerConnection | None = None
        try:
            raw.settimeout(_HANDSHAKE_TIMEOUT)
            try:
                _check_knock(_read_knock(raw), knockers)
            except (OSError, BadKnock):
                with self._lock:
                    self.knock_failures += 1
                return
            try:
                sock = context.wrap_socket(raw, server_side=True)
                verify_peer(sock, receiver_der)
            except (OSError, ssl.SSLError, PeerAuthError):
                with self._lock:
                    self.tls_failures += 1
                return
            sock.settimeout(_IO_TIMEOUT)
            conn = PeerConnection(sock, max_payload=self.chunk_size)
            with self._lock:
                self.handshakes += 1
                if self.hung_up.is_set() or self._stop.is_set():
                    return
                self._conns.add(conn)
            self._converse(conn)
        except (_HungUp, PeerGone, ProtocolError, PeerAborted, OSError, ssl.SSLError):
            pass  # the receiver gave up on us: that is what the tests look at
        finally:
            with self._lock:
                self._raws.discard(raw)
                if conn is not None:
                    self._conns.discard(conn)
            if conn is not None:
                conn.close()
            raw.close()

    def _converse(self, conn: PeerConnection) -> None:
        event = conn.next_event()
        if isinstance(event, ChunkStart):
            return
        stream = check_hello(event.message, self.name)
        with self._lock:
            self.hellos += 1
        if self.mode is Mode.NO_HELLO:
            self._stop.wait()  # silent until stop(), which closes the socket
            return
        conn.send(hello(self.name, stream))
        plan = SendSession([len(f.data) for f in self.files], self.chunk_size)
        while True:
            event = conn.next_event()
            if isinstance(event, ChunkStart):
                return
            message = event.message
            kind = message.WhichOneof("kind")
            if kind == "request":
                for work in plan.on_request(message.request):
                    self._send_chunk(conn, work, stream)
            elif kind == "digest_request":
                conn.send(self._file_end(message.digest_request.file_index))
            elif kind == "done":
                self.done_received = True
                return
            elif kind == "abort":
                with self._lock:
                    self.aborts.append(message.abort.reason)
                return
            else:
                return

    def _send_chunk(self, conn: PeerConnection, work: ChunkWork, stream: int) -> None:
        key = (work.file_index, work.chunk_index)
        with self._lock:
            attempt = self.attempts[key]
            self.attempts[key] += 1
        payload = self.files[work.file_index].data[work.offset : work.offset + work.length]
        digest = chunk_digest(payload)
        chunk_index = work.chunk_index
        mode = self.mode
        if mode is Mode.BAD_DIGEST or (mode is Mode.BAD_DIGEST_ONCE and attempt == 0):
            digest = bytes(b ^ 0xFF for b in digest)
        elif mode is Mode.OVERSIZE:
            payload = payload + os.urandom(self.chunk_size + 1 - len(payload))
            digest = chunk_digest(payload)
        elif mode is Mode.SHORT:
            payload = payload[:-1]
            digest = chunk_digest(payload)
        elif mode is Mode.UNREQUESTED:
            chunk_index = 1_000_000 + work.chunk_index
        elif mode is Mode.GARBAGE:
            # Type byte 0xEE is no frame type; the rest is noise.
            conn.send_bytes(b"\xee" + os.urandom(4095))
            with self._lock:
                self.chunks_sent += 1
            return
        elif mode is Mode.DROP_STREAM and stream == 1:
            with self._lock:
                drop = self._served >= self.hangup_after and not self.dropped
                self._served += 1
                self.dropped = self.dropped or drop
            if drop:
                conn.close()  # only this stream: the listener and the others stay
                raise _HungUp
        elif mode in (Mode.HANGUP, Mode.STALL):
            with self._lock:
                quit_now = self._served >= self.hangup_after
                self._served += 1
            if quit_now and mode is Mode.HANGUP:
                self._hang_up()
                raise _HungUp
            if quit_now:
                self._stop.wait()  # silent until stop(), which closes the socket
                raise _HungUp
        conn.send_bytes(
            encode_chunk_head(work.file_index, chunk_index, digest, len(payload)) + payload
        )
        with self._lock:
            self.chunks_sent += 1

    def _file_end(self, file_index: int) -> peer_pb2.PeerMessage:
        message = peer_pb2.PeerMessage()
        message.file_end.file_index = file_index
        message.file_end.algorithm = FILE_DIGEST_ALGORITHM
        digest = file_digest(self._digests[file_index])
        if self.mode is Mode.BAD_FILE_END:
            digest = bytes(b ^ 0xFF for b in digest)
        message.file_end.digest = digest
        return message


def _check_knock(knock: bytes, knockers: Sequence[Knocker]) -> None:
    """Pass if ``knock`` is right for one of the attempts of ``knockers``; BadKnock if not."""
    for knocker in knockers[:-1]:
        with contextlib.suppress(BadKnock):
            knocker.check(knock)
            return
    knockers[-1].check(knock)


def _read_knock(raw: socket.socket) -> bytes:
    """The knock a receiver opens its connection with (as the real sender's gate reads it,
    only blocking: this sender is no target)."""
    knock = b""
    while len(knock) < KNOCK_SIZE:
        data = raw.recv(KNOCK_SIZE - len(knock))
        if not data:
            raise ConnectionError("closed before the knock")
        knock += data
    return knock
