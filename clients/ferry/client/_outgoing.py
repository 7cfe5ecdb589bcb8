"""`Outgoing`: an offer made by this side, served until the receiver confirms."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from ferry.client._broker import BrokerError, BrokerLink
from ferry.client._errors import (
    Declined,
    PeerProtocolError,
    SourceChangedError,
    TamperedError,
    TransferError,
    TransferOver,
    for_peer,
    told,
)
from ferry.client._events import (
    Completed,
    EventHandler,
    FileResult,
    PathInfo,
    Paused,
    TransferResult,
    Via,
    check_via,
    files_of,
    path_of,
)
from ferry.client._keys import (
    VerifyWords,
    burn,
    check_certificate,
    confirm_as_sender,
    over,
    receiver_key,
    tampered,
)
from ferry.client._punch import targets_of
from ferry.client._reflexive import Gathered, publish
from ferry.client._send import (
    SendCounter,
    SendPeer,
)
from ferry.client._session import (
    FINAL,
    LIVE,
    Pump,
    State,
    ended,
    follow,
    in_thread_while,
    watch,
)
from ferry.client._source import Source, SourceChanged
from ferry.client._store import (
    StoreError,
    StoreUnavailable,
    StoreUploader,
)
from ferry.client._tls import Identity, server_context
from ferry.client._wire import PeerGone
from ferry.errors import FerryError
from ferry.files import (
    SourceStamp,
    shown,
)
from ferry.protocol import (
    PeerAborted,
    ProtocolError,
    SendSession,
)
from ferry.protocol.knock import Knocker
from ferry.protocol.pake import TAMPERED, KeyExchange, KeyMismatch, PeerRole, SessionKey
from ferry.v1 import broker_pb2

__all__ = ["Outgoing"]


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
        *,
        exchange: KeyExchange | None = None,
        key: SessionKey | None = None,
        verify: VerifyWords | None = None,
    ) -> None:
        """``stamps``: each source as it was offered (see `SourceStamp`); keep them (as
        ``stamp.to_text()``) to pass to `Client.resume_offer` after a crash. ``exchange``:
        this side's PAKE, until the receiver proves the code (then ``key``); a
        store-and-forward offer has its ``key`` from the start."""
        check_via(via)
        self.via = via
        self._link = link
        self.session = session
        self.code = code
        self.name = session.name
        self.files = files_of(session.manifest)
        self.total_size = sum(f.size for f in self.files)
        self._sources = sources
        self.stamps = list(stamps)
        if len(self.stamps) != len(sources):
            raise ValueError("one stamp per source file is needed")
        self._identity = identity
        self._uploader: StoreUploader | None = None
        self._upload: asyncio.Task[None] | None = None
        self._upload_cancel = threading.Event()
        self._exchange = exchange
        self._key = key
        self._verify = verify
        if exchange is None and key is None:
            raise ValueError("an offer needs its key exchange or its key")
        self._confirming = asyncio.Lock()
        self._confirmed = key is not None  # a given key was confirmed by whoever made it
        self._refused: TamperedError | None = None  # why the receiver's proof was refused
        # Answers the receiver's proof as soon as it comes, whether or not transfer() runs
        # yet: the receiver's claim() returns only once this side has proved the code too.
        self._responder: asyncio.Task[None] | None = None
        if key is None and session.state == State.STATE_OFFERED:
            self._responder = asyncio.get_running_loop().create_task(
                self._answer_claim(), name=f"answer the claim of {self.name}"
            )

    @property
    def pake_state(self) -> bytes:
        """This side's secret PAKE state (b"" for a store-and-forward offer): keep it, mode
        0600, to pass to `Client.resume_offer` after a crash."""
        return self._exchange.state() if self._exchange is not None else b""

    @property
    def key(self) -> SessionKey | None:
        """The key the code's PAKE gave, once the receiver proved the code (else None)."""
        return self._key

    @property
    def store_key(self) -> bytes:
        """The key that seals this session's objects in the store; the broker never sees it."""
        if self._key is None:
            raise RuntimeError("the receiver has not proved the code yet")
        return self._key.store_key

    @property
    def token(self) -> str:
        """The sender's bearer token for this session (for `ferry status`)."""
        return self._link.token

    async def close(self) -> None:
        """Release the broker connection."""
        if self._responder is not None:
            self._responder.cancel()
            await asyncio.gather(self._responder, return_exceptions=True)
        await self._link.close()

    async def _answer_claim(self) -> None:
        """Wait for the receiver's proof of the code and answer it (see `_confirm_claim`).

        What goes wrong here is left for transfer() to meet and raise: a burned session, a
        broker that stays away."""
        remaining = self.session.expire_time.ToDatetime().timestamp() - time.time() + 5
        with contextlib.suppress(FerryError):
            async for session in watch(self._link, self.name, max(remaining, 5.0)):
                if session.state != State.STATE_OFFERED or session.sender.key_confirmation:
                    return
                if session.receiver.key_confirmation:
                    await self._confirm_claim(session)
                    return

    async def cancel(self, reason: str = "cancelled by the sender") -> None:
        """Cancel the offer or the transfer."""
        await self._link.cancel(self.name, reason)

    async def _failed(
        self, kind: type[TransferError], what: str, exc: BaseException
    ) -> TransferError:
        """Tell the broker this side failed (best effort); the error to raise.

        The error says what went wrong here, paths of this machine included; the report,
        which the receiver reads, says only what `for_peer` lets through."""
        await self._link.report_failed(self.name, f"{what}: {for_peer(exc)}")
        return kind(f"{what}: {told(exc)}")

    async def _next_attempt(self, served: int) -> broker_pb2.Session:
        """The session once it has a connection attempt newer than ``served`` (or is over)."""
        remaining = self.session.expire_time.ToDatetime().timestamp() - time.time() + 5
        async for session in watch(self._link, self.name, max(remaining, 5.0)):
            self.session = session
            if (
                session.state == State.STATE_OFFERED
                and session.receiver.key_confirmation
                and not session.sender.key_confirmation
            ):
                await self._confirm_claim(session)
                continue
            if session.state in LIVE and session.attempt > served:
                return session
            if session.state == State.STATE_COMPLETED:
                return session
            if session.state == State.STATE_EXPIRED:
                if session.failure_reason:  # the broker gave the offer up, and says why
                    raise TransferOver(f"the offer ended: {shown(session.failure_reason)}")
                if served == 0 and not session.receiver.certificate_der:
                    raise TransferOver("the offer expired before it was accepted")
                raise TransferOver("the transfer expired before it completed")
            if session.state == State.STATE_DECLINED:
                raise Declined(ended(session))
            if session.state in FINAL:
                raise over(session)
        raise TransferOver("the offer expired before it was accepted")

    async def _confirm_claim(self, session: broker_pb2.Session) -> None:
        """The receiver proved the code: check its proof, then prove ours (and vouch for the
        manifest and our certificate), which shows it the offer. A wrong proof burns it.

        The responder and transfer() may both get here: the lock makes it happen once, and
        a refusal is raised again to whichever comes second."""
        async with self._confirming:
            if self._confirmed:
                return
            if self._refused is not None:
                raise self._refused
            if self._key is None:
                assert self._exchange is not None  # an offer has one or the other
                try:
                    key = receiver_key(self._exchange, session)
                except KeyMismatch:
                    self._refused = await tampered(self._link, session)
                    raise self._refused from None
                if self._verify is not None and not await self._verify(key.verification_words()):
                    reason = "the verification words did not match"
                    self._refused = TamperedError(f"{reason}: {TAMPERED}")
                    await burn(self._link, session, reason)
                    raise self._refused
                self._key = key
            self.session = await confirm_as_sender(
                self._link, self.session, self._key, self._identity.cert_der
            )
            self._confirmed = True

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
            self._source(),
            self.session.manifest,
            asyncio.get_running_loop(),
            key=self.store_key,
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
        if self.session.state in FINAL and self.session.state != State.STATE_COMPLETED:
            raise over(self.session)
        uploader = StoreUploader(
            self._link,
            self.name,
            self._source(),
            self.session.manifest,
            asyncio.get_running_loop(),
            key=self.store_key,
        )
        cancel = threading.Event()
        pump = Pump(self.total_size, on_event, lambda: uploader.bytes_stored)
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
            raise await self._failed(SourceChangedError, "uploading failed", exc) from exc
        except (ProtocolError, OSError) as exc:
            raise await self._failed(TransferError, "uploading failed", exc) from exc
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

    def _source(self) -> Source:
        """The offered files, for one sending path (each path opens and closes its own)."""
        return Source(self._sources, self.stamps, self.session.manifest.chunk_size_bytes)

    def _hash_all(self, uploader: StoreUploader) -> None:
        """Only the digests are left to show (the receiver completed already)."""
        session = SendSession([f.size for f in self.files], self.session.manifest.chunk_size_bytes)
        with contextlib.suppress(SourceChanged, OSError):  # as at the end of `send`
            self._source().fill_digests(session, stamped=False)
        uploader.digests = [session.digest(i) or b"" for i in range(len(self.files))]

    async def _transfer(self, on_event: EventHandler | None) -> TransferResult:
        sizes = [f.size for f in self.files]
        loop = asyncio.get_running_loop()

        def paused(reason: str) -> None:  # called from a connection thread
            if on_event is not None:
                loop.call_soon_threadsafe(on_event, Paused(shown(reason)))  # the peer's words

        send_session = SendSession(sizes, self.session.manifest.chunk_size_bytes)
        source = self._source()  # read by every attempt of the direct path in turn
        counter = SendCounter()
        started = time.monotonic()

        def moved() -> int:
            uploaded = self._uploader.bytes_uploaded if self._uploader is not None else 0
            return counter.bytes_sent + uploaded

        pump = Pump(self.total_size, on_event, moved)
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
                if self._key is None:  # accepted, yet nobody proved the code: not our receiver
                    raise await tampered(self._link, session)
                der = await check_certificate(self._link, session, self._key, PeerRole.RECEIVER)
                peer = SendPeer(
                    self.name,
                    source,
                    send_session,
                    counter,
                    server_context(self._identity, der),
                    der,
                    Knocker(self._key.knock_key, self.name, served),
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
            raise await self._failed(SourceChangedError, "sending failed", exc) from exc
        except (ProtocolError, PeerAborted) as exc:
            raise await self._failed(PeerProtocolError, "sending failed", exc) from exc
        except OSError as exc:
            raise await self._failed(TransferError, "sending failed", exc) from exc
        finally:
            pump_task.cancel()
            await asyncio.gather(pump_task, return_exceptions=True)
        seconds = time.monotonic() - started
        # Chunks the receiver had from an earlier run were not read here: hash them now. The
        # receiver checked every chunk already: a file changed since then only leaves its
        # digest out of what is shown here, it does not undo the transfer.
        with contextlib.suppress(SourceChanged, OSError):
            await asyncio.to_thread(
                functools.partial(source.fill_digests, send_session, stamped=False)
            )
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
            path=path_of(counter.bytes_sent, uploaded),
            connection=PathInfo.from_report(self.session.path),  # as the receiver reported
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
        left = session.plan.connect_deadline.ToDatetime().timestamp() - time.time()
        punch_until = time.monotonic() + max(left, 1.0)
        trickle = functools.partial(_receiver_candidates, peer)
        trickle(session)
        gathered: list[Gathered] = []
        try:
            with contextlib.suppress(PeerGone):
                await in_thread_while(
                    functools.partial(peer.run, cancel, punch_until),
                    cancel,
                    follow(self._link, self.name, attempt, cancel, [], trickle),
                    self._fallback_at_deadline(peer, session),
                    publish(self._link, self.name, attempt, [peer.port], gathered),
                )
        finally:
            for each in gathered:
                each.close()

    async def _fallback_at_deadline(self, peer: SendPeer, session: broker_pb2.Session) -> None:
        if self.via != "auto" or self._upload is not None:
            return
        deadline = session.plan.connect_deadline.ToDatetime().timestamp()
        await asyncio.sleep(max(deadline - time.time(), 0.0))
        if not peer.connected.is_set():
            self._start_upload("no direct connection by the deadline")


def _receiver_candidates(peer: SendPeer, session: broker_pb2.Session) -> None:
    """Punch toward every port of every candidate the receiver published for the attempt."""
    peer.add_punch_targets(targets_of(session.plan.receiver_candidates, peer.port, every_port=True))
