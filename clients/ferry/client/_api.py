"""The async client library: offer files, claim a code, accept or decline, transfer.

This is the whole flow of one transfer, written once for programs and the CLI alike::

    sender                      broker                      receiver
    offer() ---CreateOffer--->  code                        claim(code) ---ClaimOffer-->
    transfer(): WatchSession    <---AcceptOffer(plan)---    accept(dest)
      listen on leased port     <----------- TLS, pinned certificates ----------- dial
      serve chunk requests      <------ ReportProgress (CONNECTING..COMPLETED) -- verify, write

The data path itself runs in threads (`_send`, `_receive`); this module runs the broker
conversation around it on asyncio and turns the progress into events.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import grpc
import psutil
from google.protobuf.duration_pb2 import Duration

from ferry.client._broker import BrokerError, BrokerLink
from ferry.client._receive import ReceivePeer
from ferry.client._send import SendPeer
from ferry.client._sink import FileSink, SinkFile
from ferry.client._tls import Identity, client_context, server_context
from ferry.files import build_manifest, check_manifest_paths, free_space_ok
from ferry.protocol import FILE_DIGEST_ALGORITHM
from ferry.v1 import broker_pb2

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_PORTS",
    "Client",
    "Completed",
    "Connected",
    "Event",
    "FileResult",
    "Incoming",
    "Outgoing",
    "Progress",
    "TransferError",
    "TransferResult",
]

DEFAULT_CHUNK_SIZE = 1 << 20
DEFAULT_PORTS = (47100, 47999)
DEFAULT_STALL_TIMEOUT = 30.0
_PROGRESS_INTERVAL = 0.1
_REPORT_INTERVAL = 1.0
State = broker_pb2.Session.State
_RESUBSCRIBE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL}
)
_FINAL = frozenset(
    {
        State.STATE_COMPLETED,
        State.STATE_DECLINED,
        State.STATE_CANCELLED,
        State.STATE_FAILED,
        State.STATE_EXPIRED,
    }
)


class TransferError(Exception):
    """The transfer did not complete; the message says why, for people."""


@dataclass(frozen=True)
class FileResult:
    """One verified file."""

    path: str
    size: int
    digest: str
    algorithm: str = FILE_DIGEST_ALGORITHM


@dataclass(frozen=True)
class TransferResult:
    """A completed transfer, as either side saw it."""

    session: str
    files: list[FileResult]
    bytes: int
    bytes_transferred: int
    seconds: float
    path: str = "direct"


@dataclass(frozen=True)
class Connected:
    """The data connection is up."""

    address: str
    streams: int


@dataclass(frozen=True)
class Progress:
    """Bytes moved so far out of the total."""

    bytes_done: int
    total: int


@dataclass(frozen=True)
class Completed:
    """The transfer completed and was verified."""

    result: TransferResult


Event = Connected | Progress | Completed
EventHandler = Callable[[Event], None]


@dataclass(frozen=True)
class OfferedFile:
    """A file as the offer describes it."""

    path: str
    size: int
    mode: int


def _files_of(manifest: broker_pb2.Manifest) -> list[OfferedFile]:
    return [OfferedFile(f.path, f.size_bytes, f.mode) for f in manifest.files]


def local_candidates() -> list[broker_pb2.Candidate]:
    """Every address of every interface of this host (IPv4 and IPv6, no link-local)."""
    seen: list[broker_pb2.Candidate] = []
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            try:
                ip = ipaddress.ip_address(a.address.split("%", 1)[0])
            except ValueError:
                continue  # MAC addresses and the like
            if ip.is_link_local or ip.is_multicast or ip.is_unspecified:
                continue
            seen.append(broker_pb2.Candidate(ip=str(ip), kind=broker_pb2.Candidate.KIND_HOST))
    seen.sort(key=lambda c: (not ipaddress.ip_address(c.ip).is_loopback, c.ip))
    return seen


@dataclass
class _Pump:
    """Polls a thread's byte counter and feeds events and broker reports."""

    total: int
    handler: EventHandler | None
    read: Callable[[], int]
    report: Callable[[int], object] | None = None
    _last_report: float = field(default=0.0)

    async def run(self) -> None:
        last = -1
        while True:
            done = self.read()
            if done != last and self.handler is not None:
                self.handler(Progress(done, self.total))
            last = done
            now = time.monotonic()
            if self.report is not None and now - self._last_report >= _REPORT_INTERVAL:
                self._last_report = now
                with contextlib.suppress(BrokerError):
                    await self.report(done)  # type: ignore[misc]
            await asyncio.sleep(_PROGRESS_INTERVAL)


class Client:
    """A connection to a Ferry broker, from which offers are made and codes claimed."""

    def __init__(
        self,
        broker: str,
        *,
        ports: tuple[int, int] = DEFAULT_PORTS,
        timeout: float = 10.0,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
    ) -> None:
        self.broker = broker
        self.ports = ports
        self.timeout = timeout
        self.stall_timeout = stall_timeout

    async def offer(
        self,
        paths: Sequence[Path | str],
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        ttl: float = 600.0,
    ) -> Outgoing:
        """Offer files and folders; the returned Outgoing carries the one-time code."""
        manifest, sources = build_manifest([Path(p) for p in paths], chunk_size)
        identity = Identity.generate()
        link = BrokerLink(self.broker, timeout=self.timeout)
        try:
            request = broker_pb2.CreateOfferRequest(
                manifest=manifest,
                sender=broker_pb2.PeerInfo(
                    candidates=local_candidates(),
                    allowed_ports=broker_pb2.PortRange(
                        first_port=self.ports[0], last_port=self.ports[1]
                    ),
                    certificate_der=identity.cert_der,
                ),
                ttl=Duration(seconds=int(ttl)),
                request_id=uuid.uuid4().hex,
            )
            response = await link.create_offer(request)
        except BaseException:
            await link.close()
            raise
        return Outgoing(link, response.session, response.code, sources, identity)

    async def claim(self, code: str) -> Incoming:
        """Redeem a one-time code: see what is offered, then accept or decline."""
        link = BrokerLink(self.broker, timeout=self.timeout)
        try:
            response = await link.claim_offer(code)
        except BaseException:
            await link.close()
            raise
        return Incoming(link, response.session, self.ports, self.stall_timeout)


class Outgoing:
    """An offer made by this side."""

    def __init__(
        self,
        link: BrokerLink,
        session: broker_pb2.Session,
        code: str,
        sources: list[Path],
        identity: Identity,
    ) -> None:
        self._link = link
        self.session = session
        self.code = code
        self.name = session.name
        self.files = _files_of(session.manifest)
        self.total_size = sum(f.size for f in self.files)
        self._sources = sources
        self._identity = identity

    @property
    def token(self) -> str:
        """The sender's bearer token for this session (for `ferry status`)."""
        return self._link.token

    async def close(self) -> None:
        """Release the broker connection."""
        await self._link.close()

    async def cancel(self, reason: str = "cancelled by the sender") -> None:
        """Cancel the offer or the transfer."""
        await self._link.cancel(self.name, reason)

    async def wait_accepted(self) -> broker_pb2.Session:
        """Wait until the receiver accepts; raise TransferError on decline or expiry."""
        remaining = self.session.expire_time.ToDatetime().timestamp() - time.time() + 5
        async for session in _watch(self._link, self.name, max(remaining, 5.0)):
            self.session = session
            state = session.state
            if state == State.STATE_OFFERED:
                continue
            if state in (State.STATE_DECLINED, State.STATE_CANCELLED, State.STATE_FAILED):
                raise TransferError(_ended(session))
            if state == State.STATE_EXPIRED:
                raise TransferError("the offer expired before it was accepted")
            return session
        raise TransferError("the offer expired before it was accepted")

    async def transfer(self, on_event: EventHandler | None = None) -> TransferResult:
        """Wait for acceptance, then serve the receiver until it has verified everything."""
        session = await self.wait_accepted()
        plan = session.plan
        peer = SendPeer(
            self.name,
            self._sources,
            [f.size for f in self.files],
            session.manifest.chunk_size_bytes,
            server_context(self._identity, session.receiver.certificate_der),
            session.receiver.certificate_der,
        )
        peer.bind(plan.listener_ports.first_port, plan.listener_ports.last_port)
        cancel = threading.Event()
        started = time.monotonic()
        deadline = plan.connect_deadline.ToDatetime().timestamp() - time.time()
        pump = _Pump(self.total_size, on_event, lambda: peer.bytes_sent)
        pump_task = asyncio.create_task(pump.run())
        watch_task = asyncio.create_task(self._watch_end(cancel))
        try:
            await asyncio.to_thread(peer.run, cancel, max(deadline, 5.0))
        except asyncio.CancelledError:
            cancel.set()
            raise
        except Exception as exc:
            reason = self._end_reason or f"sending failed: {exc}"
            with contextlib.suppress(BrokerError):
                await self._link.report(self.name, State.STATE_FAILED, peer.bytes_sent, reason)
            raise TransferError(reason) from exc
        finally:
            cancel.set()
            pump_task.cancel()
            watch_task.cancel()
            await asyncio.gather(pump_task, watch_task, return_exceptions=True)
        seconds = time.monotonic() - started
        final = await self._confirmed()
        result = TransferResult(
            session=self.name,
            files=[],
            bytes=self.total_size,
            bytes_transferred=peer.bytes_sent,
            seconds=seconds,
        )
        result = _with_digests(result, self.files, peer.session_digests())
        if final.state != State.STATE_COMPLETED:
            raise TransferError(f"the receiver did not confirm completion ({_ended(final)})")
        if on_event is not None:
            on_event(Completed(result))
        return result

    _end_reason = ""

    async def _confirmed(self) -> broker_pb2.Session:
        """The session once the receiver has reported its outcome (or after a grace time)."""
        last = self.session
        with contextlib.suppress(BrokerError):
            async for session in _watch(self._link, self.name, 15.0):
                last = session
                if session.state not in (
                    State.STATE_ACCEPTED,
                    State.STATE_CONNECTING,
                    State.STATE_TRANSFERRING,
                ):
                    break
        return last

    async def _watch_end(self, cancel: threading.Event) -> None:
        """Stop the data path if the session ends badly on the broker (cancel, expiry)."""
        with contextlib.suppress(BrokerError):
            async for session in _watch(self._link, self.name, 86400):
                if session.state in (
                    State.STATE_CANCELLED,
                    State.STATE_FAILED,
                    State.STATE_EXPIRED,
                    State.STATE_DECLINED,
                ):
                    self._end_reason = _ended(session)
                    cancel.set()
                    return


class Incoming:
    """An offer claimed by this side with a code."""

    def __init__(
        self,
        link: BrokerLink,
        session: broker_pb2.Session,
        ports: tuple[int, int],
        stall_timeout: float = 30.0,
    ) -> None:
        self._link = link
        self._stall_timeout = stall_timeout
        self.session = session
        self.name = session.name
        self.files = _files_of(session.manifest)
        self.total_size = sum(f.size for f in self.files)
        self._ports = ports
        check_manifest_paths([f.path for f in self.files])

    @property
    def token(self) -> str:
        """The receiver's bearer token for this session (for `ferry status`)."""
        return self._link.token

    async def close(self) -> None:
        """Release the broker connection."""
        await self._link.close()

    def free_space(self, dest: Path) -> tuple[bool, int]:
        """Whether ``dest`` has room for the whole offer, and how much is free."""
        return free_space_ok(dest, self.total_size)

    async def decline(self, reason: str = "declined by the receiver") -> None:
        """Refuse the offer; the sender is told at once."""
        await self._link.decline(self.name, reason)

    async def accept(
        self,
        dest: Path | str,
        *,
        overwrite: bool = False,
        on_event: EventHandler | None = None,
    ) -> TransferResult:
        """Accept, receive every file into ``dest``, verify it, move it into place."""
        dest = Path(dest)
        sink = FileSink(
            dest,
            [
                SinkFile(
                    PurePosixPath(f.path),
                    f.size_bytes,
                    f.mode,
                    f.modify_time.seconds * 1_000_000_000 + f.modify_time.nanos,
                )
                for f in self.session.manifest.files
            ],
            self.name.rsplit("/", 1)[-1],
            overwrite=overwrite,
        )
        sink.prepare()  # refuse unsafe or clobbering names before consenting
        identity = Identity.generate()
        session = await self._link.accept(
            self.name,
            broker_pb2.PeerInfo(
                candidates=local_candidates(),
                allowed_ports=broker_pb2.PortRange(
                    first_port=self._ports[0], last_port=self._ports[1]
                ),
                certificate_der=identity.cert_der,
            ),
        )
        self.session = session
        plan = session.plan
        candidates = _dial_order(session.sender.candidates)
        ports = range(plan.listener_ports.first_port, plan.listener_ports.last_port + 1)
        peer = ReceivePeer(
            self.name,
            [f.size for f in self.files],
            session.manifest.chunk_size_bytes,
            sink,
            client_context(identity, session.sender.certificate_der),
            session.sender.certificate_der,
            streams=plan.stream_count or 1,
            stall_timeout=self._stall_timeout,
        )
        cancel = threading.Event()
        started = time.monotonic()
        deadline = time.monotonic() + max(
            plan.connect_deadline.ToDatetime().timestamp() - time.time(), 1.0
        )
        with contextlib.suppress(BrokerError):
            await self._link.report(self.name, State.STATE_CONNECTING, 0)

        async def report(done: int) -> None:
            await self._link.report(self.name, State.STATE_TRANSFERRING, done)

        pump = _Pump(self.total_size, on_event, lambda: peer.bytes_verified, report)
        pump_task = asyncio.create_task(pump.run())
        try:
            await asyncio.to_thread(peer.run, candidates, ports, deadline, cancel)
        except asyncio.CancelledError:
            cancel.set()
            sink.discard()
            raise
        except Exception as exc:
            sink.discard()
            reason = f"receiving failed: {exc}"
            with contextlib.suppress(BrokerError):
                await self._link.report(self.name, State.STATE_FAILED, 0, reason)
            raise TransferError(reason) from exc
        finally:
            cancel.set()
            pump_task.cancel()
            await asyncio.gather(pump_task, return_exceptions=True)
        seconds = time.monotonic() - started
        result = TransferResult(
            session=self.name,
            files=[
                FileResult(f.path, f.size, peer.session.digest(i).hex())
                for i, f in enumerate(self.files)
            ],
            bytes=self.total_size,
            bytes_transferred=peer.bytes_verified,
            seconds=seconds,
        )
        await self._link.report(self.name, State.STATE_COMPLETED, peer.bytes_verified)
        if on_event is not None:
            on_event(Completed(result))
        return result


async def _watch(link: BrokerLink, name: str, seconds: float) -> AsyncIterator[broker_pb2.Session]:
    """WatchSession for up to ``seconds``, re-subscribing while the broker is unreachable.

    A broker restart (or a lost connection) ends the stream with UNAVAILABLE; the session
    is durable on the broker, so the watch simply resumes once it answers again.
    """
    deadline = time.monotonic() + seconds
    pause = 0.1
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            async for session in link.watch(name, remaining):
                pause = 0.1
                yield session
                if session.state in _FINAL:
                    return
        except BrokerError as exc:
            if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return
            # A broker shutting down cancels its streams; a restarting one is unavailable.
            if exc.code not in _RESUBSCRIBE:
                raise
        # The stream ended before a final state: the broker restarted or went away.
        await asyncio.sleep(min(pause, max(deadline - time.monotonic(), 0)))
        pause = min(pause * 2, 2.0)


def _dial_order(candidates: Sequence[broker_pb2.Candidate]) -> list[str]:
    out: list[str] = []
    for c in candidates:
        if c.ip not in out:
            out.append(c.ip)
    return out


def _with_digests(
    result: TransferResult, files: Sequence[OfferedFile], digests: Sequence[bytes | None]
) -> TransferResult:
    return TransferResult(
        session=result.session,
        files=[
            FileResult(f.path, f.size, d.hex() if d is not None else "")
            for f, d in zip(files, digests, strict=True)
        ],
        bytes=result.bytes,
        bytes_transferred=result.bytes_transferred,
        seconds=result.seconds,
        path=result.path,
    )


def _ended(session: broker_pb2.Session) -> str:
    state = broker_pb2.Session.State.Name(session.state).removeprefix("STATE_").lower()
    reason = session.failure_reason
    return f"{state}: {reason}" if reason else state
