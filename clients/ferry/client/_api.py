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
import functools
import ipaddress
import os
import stat
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import grpc
import psutil
from google.protobuf.duration_pb2 import Duration

from ferry.client._broker import DEFAULT_PATIENCE, BrokerError, BrokerLink
from ferry.client._errors import (
    Declined,
    PeerProtocolError,
    SourceChangedError,
    Stalled,
    StorageFull,
    TransferError,
    TransferOver,
)
from ferry.client._journal import Journal, journal_path
from ferry.client._receive import ReceivePeer
from ferry.client._resume import resume_from_journal
from ferry.client._send import (
    SendCounter,
    SendPeer,
    SourceChanged,
    digest_file,
    fill_digests,
)
from ferry.client._sink import FileSink, SinkFile, StorageError, part_name
from ferry.client._store import (
    StoreDownloader,
    StoreError,
    StoreNotReady,
    StoreUnavailable,
    StoreUploader,
)
from ferry.client._tls import Identity, client_context, server_context
from ferry.client._wire import PeerGone
from ferry.files import (
    SourceStamp,
    check_manifest_paths,
    escape_name,
    free_space_ok,
    resolve_destination,
    scan_sources,
)
from ferry.protocol import (
    FILE_DIGEST_ALGORITHM,
    PeerAborted,
    ProtocolError,
    ReceiveSession,
    SendSession,
    chunk_count,
    file_digest,
)
from ferry.protocol.journal import manifest_fingerprint
from ferry.v1 import broker_pb2

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_PORTS",
    "Client",
    "Completed",
    "Connected",
    "Declined",
    "Event",
    "FileResult",
    "Incoming",
    "Outgoing",
    "Paused",
    "PeerProtocolError",
    "Progress",
    "SourceChangedError",
    "Stalled",
    "StorageFull",
    "TransferError",
    "TransferOver",
    "TransferResult",
    "Via",
    "remove_partial",
]

DEFAULT_CHUNK_SIZE = 1 << 20
DEFAULT_PORTS = (47100, 47999)
DEFAULT_STALL_TIMEOUT = 30.0
#: How bytes may travel: "direct" (peer to peer only), "store" (only through the object
#: store; the sender uploads at once and may then exit), "auto" (direct, falling back to the
#: store when no direct connection is up by the plan's deadline).
Via = Literal["auto", "direct", "store"]
VIAS: tuple[str, ...] = ("auto", "direct", "store")
_PROGRESS_INTERVAL = 0.1
_REPORT_INTERVAL = 1.0
State = broker_pb2.Session.State
_RESUBSCRIBE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL}
)
_LIVE = frozenset({State.STATE_ACCEPTED, State.STATE_CONNECTING, State.STATE_TRANSFERRING})
_FINAL = frozenset(
    {
        State.STATE_COMPLETED,
        State.STATE_DECLINED,
        State.STATE_CANCELLED,
        State.STATE_FAILED,
        State.STATE_EXPIRED,
    }
)


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
    bytes_resumed: int = 0
    chunks_retried: int = 0
    #: The sender's side of a store-and-forward: every file is in the object store, and the
    #: receiver may fetch it until the offer expires (nobody has received it yet).
    stored: bool = False


def _path_of(direct: int, store: int, default: str = "direct") -> str:
    """Which path moved this run's bytes: "direct", "store" or "mixed"."""
    if direct > 0 and store > 0:
        return "mixed"
    if store > 0:
        return "store"
    if direct > 0:
        return "direct"
    return default


def _check_via(via: str) -> None:
    if via not in VIAS:
        raise ValueError(f"via must be one of {', '.join(VIAS)}, not {via!r}")


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


@dataclass(frozen=True)
class Paused:
    """The peer stopped but keeps what it has and means to come back (its disk is full, say);
    this side waits for it."""

    reason: str


Event = Connected | Progress | Completed | Paused
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
    """The addresses this host offers its peer: every interface's (IPv4 and IPv6, no
    link-local), or exactly those listed in FERRY_ADDRESSES (comma-separated), which keeps a
    multi-homed host (or a test) to the networks it means."""
    chosen = os.environ.get("FERRY_ADDRESSES", "").strip()
    if chosen:
        texts = [t.strip() for t in chosen.split(",") if t.strip()]
    else:
        texts = [a.address for v in psutil.net_if_addrs().values() for a in v]
    seen: list[broker_pb2.Candidate] = []
    for text in texts:
        try:
            ip = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            if chosen:
                raise ValueError(f"FERRY_ADDRESSES: {text!r} is not an IP address") from None
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
        broker_wait: float = DEFAULT_PATIENCE,
        on_broker_wait: Callable[[BrokerError], None] | None = None,
    ) -> None:
        """``timeout`` bounds each broker call; ``broker_wait`` is how long, in all, a call
        keeps trying a broker that is down, restarting or too slow (``on_broker_wait`` hears
        when one starts waiting)."""
        self.broker = broker
        self.ports = ports
        self.timeout = timeout
        self.stall_timeout = stall_timeout
        self.broker_wait = broker_wait
        self.on_broker_wait = on_broker_wait

    def _link(self) -> BrokerLink:
        return BrokerLink(
            self.broker,
            timeout=self.timeout,
            patience=self.broker_wait,
            on_wait=self.on_broker_wait,
        )

    async def broker_id(self) -> str:
        """The broker's id: the same wherever it listens, new if it lost its state."""
        link = self._link()
        try:
            return await link.broker_id()
        finally:
            await link.close()

    async def session(self, name: str, token: str) -> broker_pb2.Session:
        """A session as the broker has it now, seen with a party's ``token``."""
        link = self._link()
        link.token = token
        try:
            return await link.get(name)
        finally:
            await link.close()

    def _peer_info(self, identity: Identity) -> broker_pb2.PeerInfo:
        return broker_pb2.PeerInfo(
            candidates=local_candidates(),
            allowed_ports=broker_pb2.PortRange(first_port=self.ports[0], last_port=self.ports[1]),
            certificate_der=identity.cert_der,
        )

    async def offer(
        self,
        paths: Sequence[Path | str],
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        ttl: float = 600.0,
        via: Via = "auto",
    ) -> Outgoing:
        """Offer files and folders; the returned Outgoing carries the one-time code.

        ``via``: see `Via`. With "store", `Outgoing.transfer` uploads right away (before the
        receiver even claims the code) and returns once every file is stored.
        """
        _check_via(via)
        scan = scan_sources([Path(p) for p in paths], chunk_size)
        identity = Identity.generate()
        link = self._link()
        try:
            request = broker_pb2.CreateOfferRequest(
                manifest=scan.manifest,
                sender=self._peer_info(identity),
                ttl=Duration(seconds=int(ttl)),
                request_id=uuid.uuid4().hex,
            )
            try:
                response = await link.create_offer(request)
            except BrokerError as exc:
                # A broker that restarted after recording our first try cannot show that
                # offer's code again: nobody knows it, so it simply expires. Offer anew.
                if not (exc.retried and exc.reason == "REQUEST_ID_REUSED"):
                    raise
                request.request_id = uuid.uuid4().hex
                response = await link.create_offer(request)
        except BaseException:
            await link.close()
            raise
        return Outgoing(
            link, response.session, response.code, scan.sources, identity, via, scan.stamps
        )

    async def resume_offer(
        self,
        name: str,
        token: str,
        paths: Sequence[Path | str],
        code: str = "",
        via: Via = "auto",
        stamps: Sequence[SourceStamp] | None = None,
    ) -> Outgoing:
        """Come back to an offer this side made earlier (after a crash or a kill).

        ``stamps`` are `Outgoing.stamps` of the first run: with them, a file edited in place
        with its mtime put back (``touch -r``), or replaced by another, is caught too.
        Raises SourceChangedError if the files changed since they were offered (the session
        is then failed, so the receiver never mixes old and new bytes), TransferOver if the
        session ended meanwhile.
        """
        link = self._link()
        link.token = token
        try:
            session = await link.get(name)
            if session.state in _FINAL and session.state != State.STATE_COMPLETED:
                raise TransferOver(f"that transfer is over ({_ended(session)})")
            scan = scan_sources([Path(p) for p in paths], session.manifest.chunk_size_bytes)
            same = scan.manifest.SerializeToString(
                deterministic=True
            ) == session.manifest.SerializeToString(deterministic=True)
            if stamps is not None and list(stamps) != scan.stamps:
                same = False
            if not same:
                reason = "the files changed since they were offered"
                if session.state == State.STATE_OFFERED:  # not accepted yet: withdraw it
                    with contextlib.suppress(BrokerError):
                        await link.cancel(name, reason)
                elif session.state != State.STATE_COMPLETED:
                    await link.report_failed(name, reason)
                raise SourceChangedError(f"{reason}; send them again for a new code")
            identity = Identity.generate()
            if session.state != State.STATE_COMPLETED:  # else: only the result is left to show
                session = await link.resume(name, self._peer_info(identity))
        except BaseException:
            await link.close()
            raise
        return Outgoing(
            link, session, code, scan.sources, identity, via, list(stamps or scan.stamps)
        )

    async def claim(self, code: str, request_id: str = "") -> Incoming:
        """Redeem a one-time code: see what is offered, then accept or decline.

        Keep ``request_id`` (a random secret) before calling: if this process dies before it
        sees the answer, claiming again with the same id gets the same session and token.
        Without one, a random one still covers this call's own retries.
        """
        request_id = request_id or uuid.uuid4().hex
        link = self._link()
        try:
            response = await link.claim_offer(code, request_id)
        except BaseException:
            await link.close()
            raise
        return Incoming(self, link, response.session)

    async def resume_claim(self, name: str, token: str) -> Incoming:
        """Come back to an offer this side claimed earlier, to finish receiving it."""
        link = self._link()
        link.token = token
        try:
            session = await link.get(name)
        except BaseException:
            await link.close()
            raise
        return Incoming(self, link, session)


class Outgoing:
    """An offer made by this side."""

    def __init__(
        self,
        link: BrokerLink,
        session: broker_pb2.Session,
        code: str,
        sources: list[Path],
        identity: Identity,
        via: Via = "auto",
        stamps: Sequence[SourceStamp] = (),
    ) -> None:
        """``stamps``: each source as it was offered (see `SourceStamp`); keep them (as
        ``stamp.to_text()``) to pass to `Client.resume_offer` after a crash."""
        _check_via(via)
        self.via = via
        self._link = link
        self.session = session
        self.code = code
        self.name = session.name
        self.files = _files_of(session.manifest)
        self.total_size = sum(f.size for f in self.files)
        self._sources = sources
        self.stamps = list(stamps)
        if len(self.stamps) != len(sources):
            raise ValueError("one stamp per source file is needed")
        self._identity = identity
        self._uploader: StoreUploader | None = None
        self._upload: asyncio.Task[None] | None = None
        self._upload_cancel = threading.Event()

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

    async def _next_attempt(self, served: int) -> broker_pb2.Session:
        """The session once it has a connection attempt newer than ``served`` (or is over)."""
        remaining = self.session.expire_time.ToDatetime().timestamp() - time.time() + 5
        async for session in _watch(self._link, self.name, max(remaining, 5.0)):
            self.session = session
            if session.state in _LIVE and session.attempt > served:
                return session
            if session.state == State.STATE_COMPLETED:
                return session
            if session.state == State.STATE_EXPIRED:
                if served == 0 and not session.receiver.certificate_der:
                    raise TransferOver("the offer expired before it was accepted")
                raise TransferOver("the transfer expired before it completed")
            if session.state == State.STATE_DECLINED:
                raise Declined(_ended(session))
            if session.state in _FINAL:
                raise TransferOver(_ended(session))
        raise TransferOver("the offer expired before it was accepted")

    async def wait_accepted(self) -> broker_pb2.Session:
        """Wait until the receiver accepts; raise TransferError on decline or expiry."""
        return await self._next_attempt(0)

    async def transfer(self, on_event: EventHandler | None = None) -> TransferResult:
        """Serve the receiver, over as many connection attempts as it takes, until done.

        With via="store" this uploads every file to the object store and returns once they
        are stored (``result.stored``): the receiver fetches them later, without us.
        """
        if self.via == "store":
            return await self._store_and_forward(on_event)
        try:
            return await self._transfer(on_event)
        finally:
            await self._stop_upload()

    def _start_upload(self, why: str) -> None:
        """Start uploading to the object store in the background (once), still serving."""
        if self._upload is not None or self.via != "auto":
            return
        self._uploader = StoreUploader(
            self._link,
            self.name,
            self._sources,
            self.stamps,
            self.session.manifest,
            asyncio.get_running_loop(),
        )
        self._upload = asyncio.create_task(
            asyncio.to_thread(self._uploader.run, self._upload_cancel), name=f"upload: {why}"
        )

    async def _stop_upload(self) -> None:
        self._upload_cancel.set()
        if self._upload is not None:
            await asyncio.gather(self._upload, return_exceptions=True)

    def _upload_failed(self) -> BaseException | None:
        task = self._upload
        if task is None or not task.done() or task.cancelled():
            return None
        return task.exception()

    async def _store_and_forward(self, on_event: EventHandler | None) -> TransferResult:
        """Upload every file now; return once the object store holds them all."""
        started = time.monotonic()
        if self.session.state in _FINAL and self.session.state != State.STATE_COMPLETED:
            raise TransferOver(_ended(self.session))
        uploader = StoreUploader(
            self._link,
            self.name,
            self._sources,
            self.stamps,
            self.session.manifest,
            asyncio.get_running_loop(),
        )
        cancel = threading.Event()
        pump = _Pump(self.total_size, on_event, lambda: uploader.bytes_stored)
        pump_task = asyncio.create_task(pump.run())
        try:
            if self.session.state == State.STATE_COMPLETED:
                await asyncio.to_thread(self._hash_all, uploader)
            else:
                await asyncio.to_thread(uploader.run, cancel)
        except asyncio.CancelledError:
            cancel.set()
            raise
        except StoreUnavailable as exc:
            raise TransferError(str(exc)) from exc
        except (StoreError, BrokerError) as exc:
            raise TransferError(
                f"uploading to the object store failed: {exc}; run the same command again "
                "to resume the upload"
            ) from exc
        except SourceChanged as exc:
            reason = f"uploading failed: {exc}"
            await self._link.report_failed(self.name, reason)
            raise SourceChangedError(reason) from exc
        except (ProtocolError, OSError) as exc:
            reason = f"uploading failed: {exc}"
            await self._link.report_failed(self.name, reason)
            raise TransferError(reason) from exc
        finally:
            cancel.set()
            pump_task.cancel()
            await asyncio.gather(pump_task, return_exceptions=True)
        result = TransferResult(
            session=self.name,
            files=[
                FileResult(f.path, f.size, d.hex())
                for f, d in zip(self.files, uploader.digests, strict=True)
            ],
            bytes=self.total_size,
            bytes_transferred=uploader.bytes_uploaded,
            bytes_resumed=self.total_size - uploader.bytes_uploaded,
            seconds=time.monotonic() - started,
            path="store",
            stored=True,
        )
        if on_event is not None:
            on_event(Completed(result))
        return result

    def _hash_all(self, uploader: StoreUploader) -> None:
        """Only the digests are left to show (the receiver completed already)."""
        session = SendSession([f.size for f in self.files], self.session.manifest.chunk_size_bytes)
        fill_digests(session, self._sources)
        uploader.digests = [session.digest(i) or b"" for i in range(len(self.files))]

    async def _transfer(self, on_event: EventHandler | None) -> TransferResult:
        sizes = [f.size for f in self.files]
        loop = asyncio.get_running_loop()

        def paused(reason: str) -> None:  # called from a connection thread
            if on_event is not None:
                loop.call_soon_threadsafe(on_event, Paused(reason))

        send_session = SendSession(sizes, self.session.manifest.chunk_size_bytes)
        counter = SendCounter()
        started = time.monotonic()

        def moved() -> int:
            uploaded = self._uploader.bytes_uploaded if self._uploader is not None else 0
            return counter.bytes_sent + uploaded

        pump = _Pump(self.total_size, on_event, moved)
        pump_task = asyncio.create_task(pump.run())
        served = 0
        try:
            # Until the receiver's completion is on the broker: a receiver that said Done but
            # died before reporting it reports it when it is run again (or asks for more).
            while True:
                session = await self._next_attempt(served)
                if session.state == State.STATE_COMPLETED:
                    break
                served = session.attempt
                der = session.receiver.certificate_der
                peer = SendPeer(
                    self.name,
                    self._sources,
                    send_session,
                    self.stamps,
                    counter,
                    server_context(self._identity, der),
                    der,
                    on_pause=paused,
                )
                ports = session.plan.listener_ports
                try:
                    peer.bind(ports.first_port, ports.last_port)
                except OSError:
                    failed = self._upload_failed()
                    if self.via != "auto" or failed is not None:
                        raise
                    # No port to listen on: the object store is the only way left.
                    self._start_upload("cannot listen")
                    continue
                await self._serve(peer, served, session)
        except SourceChanged as exc:
            reason = f"sending failed: {exc}"
            await self._link.report_failed(self.name, reason)
            raise SourceChangedError(reason) from exc
        except (ProtocolError, PeerAborted) as exc:
            reason = f"sending failed: {exc}"
            await self._link.report_failed(self.name, reason)
            raise PeerProtocolError(reason) from exc
        except OSError as exc:
            reason = f"sending failed: {exc}"
            await self._link.report_failed(self.name, reason)
            raise TransferError(reason) from exc
        finally:
            pump_task.cancel()
            await asyncio.gather(pump_task, return_exceptions=True)
        seconds = time.monotonic() - started
        # Chunks the receiver had from an earlier run were not read here: hash them now.
        await asyncio.to_thread(fill_digests, send_session, self._sources)
        digests = [send_session.digest(i) for i in range(len(self.files))]
        uploaded = self._uploader.bytes_uploaded if self._uploader is not None else 0
        result = TransferResult(
            session=self.name,
            files=[
                FileResult(f.path, f.size, d.hex() if d is not None else "")
                for f, d in zip(self.files, digests, strict=True)
            ],
            bytes=self.total_size,
            bytes_transferred=counter.bytes_sent + uploaded,
            bytes_resumed=max(0, self.total_size - counter.bytes_sent - uploaded),
            seconds=seconds,
            path=_path_of(counter.bytes_sent, uploaded),
        )
        if on_event is not None:
            on_event(Completed(result))
        return result

    async def _serve(self, peer: SendPeer, attempt: int, session: broker_pb2.Session) -> None:
        """Serve one attempt, until the receiver says Done or the session moves on.

        With via="auto", if no receiver has connected by the plan's connect deadline, the
        upload to the object store starts in the background (the receiver switches to the
        store at that same deadline); this attempt keeps listening meanwhile.
        """
        cancel = threading.Event()
        with contextlib.suppress(PeerGone):
            await _in_thread_while(
                functools.partial(peer.run, cancel),
                cancel,
                _follow(self._link, self.name, attempt, cancel, []),
                self._fallback_at_deadline(peer, session),
            )

    async def _fallback_at_deadline(self, peer: SendPeer, session: broker_pb2.Session) -> None:
        if self.via != "auto" or self._upload is not None:
            return
        deadline = session.plan.connect_deadline.ToDatetime().timestamp()
        await asyncio.sleep(max(deadline - time.time(), 0.0))
        if not peer.connected.is_set():
            self._start_upload("no direct connection by the deadline")


class Incoming:
    """An offer claimed by this side with a code."""

    def __init__(self, client: Client, link: BrokerLink, session: broker_pb2.Session) -> None:
        self._client = client
        self._link = link
        self.session = session
        self.name = session.name
        self.files = _files_of(session.manifest)
        self.total_size = sum(f.size for f in self.files)
        check_manifest_paths([f.path for f in self.files])
        self._store_bytes = 0  # verified bytes the object store gave this run
        self._stream_id = 0  # the next ReceiveSession stream id (direct and store alike)

    @property
    def token(self) -> str:
        """The receiver's bearer token for this session (for `ferry status`)."""
        return self._link.token

    @property
    def accepted(self) -> bool:
        """Whether this offer was accepted already (a transfer to resume)."""
        return self.session.state != State.STATE_OFFERED

    async def close(self) -> None:
        """Release the broker connection."""
        await self._link.close()

    def _sink(self, dest: Path, *, overwrite: bool = False) -> FileSink:
        return FileSink(
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
            self._tag,
            overwrite=overwrite,
        )

    def _journal(self, dest: Path) -> Journal:
        manifest = self.session.manifest
        return Journal(
            journal_path(dest, self.name),
            manifest.chunk_size_bytes,
            manifest_fingerprint(self.name, manifest.SerializeToString(deterministic=True)),
        )

    def free_space(self, dest: Path) -> tuple[bool, int]:
        """Whether ``dest`` has room for what is still to come, and how much is free.

        What an earlier run of this transfer already holds in ``dest`` counts as had.
        """
        return free_space_ok(dest, self._sink(dest).space_needed())

    async def decline(self, reason: str = "declined by the receiver") -> None:
        """Refuse the offer; the sender is told at once."""
        try:
            await self._link.decline(self.name, reason)
        except BrokerError as exc:
            if not (exc.retried and await self._now_in(State.STATE_DECLINED)):
                raise

    async def _now_in(self, state: int) -> bool:
        """Whether the session is in ``state`` now (after a call whose answer was lost)."""
        self.session = await self._link.get(self.name)
        return self.session.state == state

    async def accept(
        self,
        dest: Path | str,
        *,
        overwrite: bool = False,
        on_event: EventHandler | None = None,
        via: Via = "auto",
    ) -> TransferResult:
        """Accept (or resume), receive every file into ``dest``, verify it, move it in place.

        ``via``: "direct" never touches the object store; "store" only downloads from it
        (waiting, until the session expires, for the sender to have uploaded); "auto" tries
        the direct connection first and, if it is not up by the plan's deadline, fetches
        from the store instead (unless the broker has none). Either way, chunks verified
        earlier, by either path, are not fetched again.

        Before anything moves, every file's full size is reserved in ``dest`` (StorageFull if
        it is not there; nothing is declined, so a rerun after freeing space continues).
        What an earlier run of this transfer verified into ``dest`` is kept (its journal),
        and so is everything verified here unless the session is over on the broker: a
        sender silent for longer than the client's stall timeout, an unreachable broker, a
        full disk all raise TransferError and keep the partial data hidden, so that running
        the same command again continues. Only a session that ended on the broker (failed,
        cancelled, expired) has its partial data deleted.

        Completion is recorded in the journal (every file FINISHED) before it is reported,
        and the journal is removed only once the broker has it: a receiver killed in
        between reports it when run again, whatever attempt the session is in by then.
        """
        _check_via(via)
        dest = Path(dest)
        if self.session.state == State.STATE_COMPLETED:
            return await self._completed_earlier(dest, on_event)
        manifest = self.session.manifest
        chunk_size = manifest.chunk_size_bytes
        sizes = [f.size for f in self.files]
        file_chunks = [chunk_count(size, chunk_size) for size in sizes]
        sink = self._sink(dest, overwrite=overwrite)
        dest.mkdir(parents=True, exist_ok=True)
        journal = self._journal(dest)
        if self.session.state in _FINAL:
            found = await asyncio.to_thread(self._finished_earlier, sink, journal, file_chunks)
            if found is not None:  # verified and in place before the session ended
                journal.remove()
                return self._emit_done(self._result_from(found, 0.0), on_event)
            # Over on the broker (failed, cancelled, expired...): drop what an earlier run kept.
            sink.discard_leftovers()
            journal.remove()
            raise TransferOver(f"that transfer is over ({_ended(self.session)})")
        receive = ReceiveSession(sizes, chunk_size)
        # Refuses unsafe or clobbering names before consenting; restores an earlier run.
        try:
            resume_from_journal(sink, journal, receive, file_chunks)
        except StorageError as exc:
            raise self._storage_failed(exc, dest) from exc
        started = time.monotonic()
        if not receive.done:
            await self._reserve(sink, receive, journal, dest)
            identity = Identity.generate()
            me = self._client._peer_info(identity)
            session = await self._accept_or_resume(me, identity)
            await self._receive(session, identity, me, receive, sink, journal, via, on_event)
        result = TransferResult(
            session=self.name,
            files=[
                FileResult(f.path, f.size, receive.digest(i).hex())
                for i, f in enumerate(self.files)
            ],
            bytes=self.total_size,
            bytes_transferred=receive.bytes_verified - receive.bytes_resumed,
            bytes_resumed=receive.bytes_resumed,
            seconds=time.monotonic() - started,
            chunks_retried=receive.retries,
            path=_path_of(
                receive.bytes_verified - receive.bytes_resumed - self._store_bytes,
                self._store_bytes,
                "store" if via == "store" else "direct",
            ),
        )
        await self._confirm(receive.bytes_verified, journal, dest)
        return self._emit_done(result, on_event)

    async def _reserve(
        self, sink: FileSink, receive: ReceiveSession, journal: Journal, dest: Path
    ) -> None:
        """Reserve the space still needed before consenting (or resuming)."""
        confirmed = [i for i in range(len(self.files)) if receive.file_confirmed(i)]
        try:
            await asyncio.to_thread(sink.reserve, confirmed)
        except StorageError as exc:
            held = {i for i in range(len(self.files)) if receive.held(i)}
            sink.release_reservations(held | set(confirmed))
            if held or confirmed:
                journal.close()
            else:
                journal.remove()  # nothing verified yet: leave nothing behind
            raise self._storage_failed(exc, dest) from exc

    async def _accept_or_resume(
        self, me: broker_pb2.PeerInfo, identity: Identity
    ) -> broker_pb2.Session:
        if self.accepted:
            return await self._link.resume(self.name, me)
        try:
            return await self._link.accept(self.name, me)
        except BrokerError as exc:
            # The broker may have taken our first try and died before answering it.
            if not exc.retried or exc.reason != "ILLEGAL_TRANSITION":
                raise
            current = await self._link.get(self.name)
            if current.receiver.certificate_der != identity.cert_der:
                raise
            return current

    async def _receive(
        self,
        session: broker_pb2.Session,
        identity: Identity,
        me: broker_pb2.PeerInfo,
        receive: ReceiveSession,
        sink: FileSink,
        journal: Journal,
        via: Via,
        on_event: EventHandler | None,
    ) -> None:
        """Receive what is missing; on failure keep the data unless the session is over."""

        async def report(done: int) -> None:
            await self._link.report(self.name, State.STATE_TRANSFERRING, done)

        pump = _Pump(self.total_size, on_event, lambda: receive.bytes_verified, report)
        pump_task = asyncio.create_task(pump.run())
        self._store_bytes = 0
        kept = "the partial transfer is kept: run the same command again to resume"
        try:
            if via == "store":
                await self._from_store_only(session, receive, sink, journal)
            else:
                await self._attempts(session, identity, me, receive, sink, journal, via)
        except StorageError as exc:  # this side's disk: nothing is wrong with the session
            journal.close()
            raise self._storage_failed(exc, sink.dest) from exc
        except (StoreError, BrokerError) as exc:  # transient: keep what was verified
            journal.close()
            raise TransferError(f"{exc}; {kept}") from exc
        except TransferOver:  # the session is over on the broker
            journal.remove()
            sink.discard()
            raise
        except (TransferError, asyncio.CancelledError):
            journal.close()
            raise
        except Exception as exc:
            reason = f"receiving failed: {exc}"
            peer = isinstance(exc, ProtocolError | PeerAborted)
            if await self._link.report_failed(self.name, reason):
                journal.remove()
                sink.discard()
                raise (PeerProtocolError if peer else TransferOver)(reason) from exc
            journal.close()  # the broker did not hear it: the session may yet continue
            raise (PeerProtocolError if peer else TransferError)(f"{reason}; {kept}") from exc
        finally:
            pump_task.cancel()
            await asyncio.gather(pump_task, return_exceptions=True)

    def _storage_failed(self, exc: StorageError, dest: Path) -> TransferError:
        where = escape_name(str(dest))
        if exc.full:
            return StorageFull(
                f"not enough space in {where} ({exc}); what was received is kept: free some "
                "space and run the same command again"
            )
        return TransferError(
            f"writing to {where} failed ({exc}); what was received is kept: run the same "
            "command again once it is fixed"
        )

    async def _confirm(self, done: int, journal: Journal, dest: Path) -> None:
        """Tell the broker that every file is verified and in place; then drop the journal.

        Waits for a restarting broker (the link's patience). A broker that never answers
        leaves the journal, so the next run reports it; a session that ended meanwhile
        (expired, cancelled) changes nothing here: the files are verified and in place.
        """
        try:
            await self._link.report(self.name, State.STATE_COMPLETED, done)
        except BrokerError as exc:
            if exc.reason != "ILLEGAL_TRANSITION":
                journal.close()
                raise TransferError(
                    f"every file is verified and in {escape_name(str(dest))}, but the broker "
                    f"was not told ({exc}): run the same command again to tell the sender"
                ) from exc
        journal.remove()

    def _emit_done(self, result: TransferResult, on_event: EventHandler | None) -> TransferResult:
        if on_event is not None:
            on_event(Completed(result))
        return result

    @property
    def _tag(self) -> str:
        return self.name.rsplit("/", 1)[-1]

    def _finished_earlier(
        self, sink: FileSink, journal: Journal, file_chunks: list[int]
    ) -> list[bytes] | None:
        """Each file's digest, if an earlier run's journal says every file is in place."""
        found = journal.read(file_chunks)
        if len(found.finished) != len(self.files) or not all(
            sink.final_ok(i) for i in range(len(self.files))
        ):
            return None
        digests: list[list[bytes]] = [[b""] * n for n in file_chunks]
        for (f, c), d in found.sure.items():
            digests[f][c] = d
        if any(b"" in chunks for chunks in digests):
            return None
        return [file_digest(chunks) for chunks in digests]

    def _result_from(self, digests: Sequence[bytes], seconds: float) -> TransferResult:
        return TransferResult(
            session=self.name,
            files=[
                FileResult(f.path, f.size, d.hex())
                for f, d in zip(self.files, digests, strict=True)
            ],
            bytes=self.total_size,
            bytes_transferred=0,
            bytes_resumed=self.total_size,
            seconds=seconds,
        )

    async def _completed_earlier(self, dest: Path, on_event: EventHandler | None) -> TransferResult:
        """This transfer completed in an earlier run (killed before it could say so)."""
        started = time.monotonic()
        chunk_size = self.session.manifest.chunk_size_bytes
        paths: list[Path] = []
        for f in self.files:
            path = resolve_destination(dest, PurePosixPath(f.path))
            if not path.is_file() or path.stat().st_size != f.size:
                raise TransferError(
                    f"this transfer completed earlier, but {escape_name(f.path)} is no longer "
                    f"in {escape_name(str(dest))}"
                )
            paths.append(path)
        digests = await asyncio.to_thread(lambda: [digest_file(p, chunk_size) for p in paths])
        self._journal(dest).remove()  # the broker has the completion: no longer needed
        return self._emit_done(self._result_from(digests, time.monotonic() - started), on_event)

    async def _attempts(
        self,
        session: broker_pb2.Session,
        identity: Identity,
        me: broker_pb2.PeerInfo,
        receive: ReceiveSession,
        sink: FileSink,
        journal: Journal,
        via: Via = "auto",
    ) -> None:
        """Connect and receive, negotiating new attempts while the sender may come back.

        With via="auto", an attempt whose direct connection is not up by the deadline
        switches to the object store (if the broker has one): it waits up to the stall
        timeout for the sender's upload and fetches what is still missing from it; if
        nothing is stored by then, the next direct attempt is negotiated, and so on.
        """
        self._stream_id = 0
        held, since = receive.bytes_verified, time.monotonic()
        patience = self._client.stall_timeout
        store_ok = via == "auto"
        while not receive.done:
            stream_id = self._stream_id
            latest = [session]
            cancel = threading.Event()
            der = session.sender.certificate_der
            peer = ReceivePeer(
                self.name,
                receive,
                sink,
                journal,
                client_context(identity, der),
                der,
                streams=session.plan.stream_count or 1,
                first_stream_id=stream_id,
                stall_timeout=patience,
            )
            plan = session.plan
            ports = range(plan.listener_ports.first_port, plan.listener_ports.last_port + 1)
            # Dial until the plan's deadline, but never past the stall timeout: a sender that
            # is gone is given up on after --stall-timeout, not that plus the connect time.
            deadline = min(
                time.monotonic()
                + max(plan.connect_deadline.ToDatetime().timestamp() - time.time(), 1.0),
                max(since + patience, time.monotonic() + 1.0),
            )
            with contextlib.suppress(BrokerError):
                await self._link.report(self.name, State.STATE_CONNECTING, receive.bytes_verified)
            candidates = _dial_order(session.sender.candidates)
            try:
                await _in_thread_while(
                    functools.partial(peer.run, candidates, ports, deadline, cancel),
                    cancel,
                    _follow(self._link, self.name, session.attempt, cancel, latest),
                )
                return
            except PeerGone as exc:
                lost: Exception = exc
            finally:
                self._stream_id = peer.next_stream_id
            current = latest[0]
            if current.state in _FINAL:
                raise TransferOver(_ended(current))
            never_connected = peer.next_stream_id == stream_id
            if store_ok and never_connected:
                try:
                    await self._from_store(
                        receive, sink, journal, time.monotonic() + patience, session.attempt
                    )
                    return
                except StoreUnavailable:
                    store_ok = False  # this broker has no object store: direct only
                except StoreError as exc:
                    lost = exc
                current = await self._link.get(self.name)
                if current.state in _FINAL:
                    raise TransferOver(_ended(current))
            now = time.monotonic()
            if receive.bytes_verified != held:
                held, since = receive.bytes_verified, now
            if current.attempt != session.attempt and current.state in _LIVE:
                session = current  # the sender came back (or moved): follow it
                continue
            if now - since > patience:
                raise Stalled(
                    f"{lost}; the partial transfer is kept: run the same command again to resume"
                )
            await asyncio.sleep(0.2)
            session = await self._link.resume(self.name, me)

    async def _from_store_only(
        self,
        session: broker_pb2.Session,
        receive: ReceiveSession,
        sink: FileSink,
        journal: Journal,
    ) -> None:
        """via="store": fetch everything from the object store, waiting for the upload."""
        self._stream_id = 0
        left = session.expire_time.ToDatetime().timestamp() - time.time()
        with contextlib.suppress(BrokerError):
            await self._link.report(self.name, State.STATE_TRANSFERRING, receive.bytes_verified)
        try:
            await self._from_store(receive, sink, journal, time.monotonic() + max(left, 1.0))
        except StoreUnavailable as exc:
            raise TransferError(str(exc)) from exc
        except StoreNotReady as exc:
            raise TransferError(f"{exc} before the transfer expired") from exc
        except StoreError:
            current = await self._link.get(self.name)
            if current.state in _FINAL:
                raise TransferOver(_ended(current)) from None
            raise

    async def _from_store(
        self,
        receive: ReceiveSession,
        sink: FileSink,
        journal: Journal,
        wait_until: float,
        attempt: int = 0,
    ) -> None:
        """One run of the store download; stops if the session ends.

        A needed file not stored by ``wait_until`` raises StoreNotReady, and so does one not
        stored yet when the session moves past ``attempt`` (the sender came back: try direct).
        """
        cancel, moved = threading.Event(), threading.Event()
        downloader = StoreDownloader(
            self._link,
            self.name,
            asyncio.get_running_loop(),
            receive,
            sink,
            journal,
            [f.size for f in self.files],
            first_stream_id=self._stream_id,
            wait_until=wait_until,
            stop_waiting=moved,
        )
        try:
            await _in_thread_while(
                functools.partial(downloader.run, cancel),
                cancel,
                _until_final(self._link, self.name, cancel, moved, attempt or None),
            )
        finally:
            self._stream_id = downloader.next_stream_id
            self._store_bytes += downloader.bytes_downloaded


def remove_partial(dest: Path | str, session: str, paths: Sequence[str]) -> None:
    """Delete what an unfinished receive of ``session`` into ``dest`` left there: its journal
    and its hidden partial copies of ``paths`` (relative paths as in the manifest). Paths
    that are unsafe, or lead outside ``dest``, are skipped; nothing else is touched."""
    dest = Path(dest)
    for rel in paths:
        try:
            temp = part_name(
                resolve_destination(dest, PurePosixPath(rel)), session.rsplit("/", 1)[-1]
            )
            if stat.S_ISREG(os.lstat(temp).st_mode):
                os.unlink(temp)
        except (OSError, ValueError):
            continue
    with contextlib.suppress(OSError):
        Journal(journal_path(dest, session), 1, b"").remove()


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


async def _in_thread_while(
    work: Callable[[], object], cancel: threading.Event, *watchers: Coroutine[Any, Any, None]
) -> None:
    """Run blocking ``work`` in a thread beside ``watchers`` (which set ``cancel`` to stop it).

    However it ends (done, failed, or this task cancelled), ``cancel`` is set and the
    watchers are stopped, so no thread or task outlives the call.
    """
    tasks = [asyncio.create_task(w) for w in watchers]
    try:
        await asyncio.to_thread(work)
    finally:
        cancel.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _follow(
    link: BrokerLink,
    name: str,
    attempt: int,
    cancel: threading.Event,
    latest: list[broker_pb2.Session],
) -> None:
    """Set ``cancel`` once the session leaves ``attempt`` or ends; keep ``latest[0]`` current."""
    async for session in _watch(link, name, 86400.0):
        if latest:
            latest[0] = session
        if session.attempt != attempt or session.state in _FINAL:
            cancel.set()
            return


async def _until_final(
    link: BrokerLink,
    name: str,
    cancel: threading.Event,
    moved: threading.Event,
    attempt: int | None,
) -> None:
    """Set ``cancel`` once the session reaches a final state, ``moved`` once it leaves
    ``attempt`` (if given)."""
    async for session in _watch(link, name, 86400.0):
        if attempt is not None and session.attempt != attempt:
            moved.set()
        if session.state in _FINAL:
            cancel.set()
            return


def _dial_order(candidates: Sequence[broker_pb2.Candidate]) -> list[str]:
    out: list[str] = []
    for c in candidates:
        if c.ip not in out:
            out.append(c.ip)
    return out


def _ended(session: broker_pb2.Session) -> str:
    state = broker_pb2.Session.State.Name(session.state).removeprefix("STATE_").lower()
    reason = session.failure_reason
    return f"{state}: {reason}" if reason else state
