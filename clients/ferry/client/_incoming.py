"""`Incoming`: an offer claimed by this side, received, verified and put in place."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from ferry.client._broker import BrokerError, BrokerLink
from ferry.client._candidates import peer_info
from ferry.client._errors import (
    PeerProtocolError,
    Stalled,
    StorageFull,
    TransferError,
    TransferOver,
    for_peer,
    told,
)
from ferry.client._events import (
    DEFAULT_PORTS,
    DEFAULT_STALL_TIMEOUT,
    Completed,
    EventHandler,
    FileResult,
    PathInfo,
    TransferResult,
    Via,
    check_via,
    files_of,
    path_of,
)
from ferry.client._intake import Intake
from ferry.client._journal import Journal, journal_path
from ferry.client._keys import check_certificate, over, sign
from ferry.client._punch import lease_targets, reserve_ports, targets_of
from ferry.client._receive import ReceivePeer
from ferry.client._reflexive import Gathered, publish
from ferry.client._resume import resume_from_journal
from ferry.client._session import (
    FINAL,
    LIVE,
    Pump,
    State,
    ended,
    follow,
    in_thread_while,
    until_final,
)
from ferry.client._sink import FileSink, SinkFile, StorageError, remove_parts
from ferry.client._source import digest_file
from ferry.client._store import (
    StoreDownloader,
    StoreError,
    StoreNotReady,
    StoreUnavailable,
)
from ferry.client._tls import Identity, client_context
from ferry.client._wire import PeerGone
from ferry.files import (
    escape_name,
    free_space_ok,
    local_paths,
    resolve_destination,
)
from ferry.protocol import (
    PeerAborted,
    ProtocolError,
    ReceiveSession,
    chunk_count,
    file_digest,
)
from ferry.protocol.journal import manifest_fingerprint
from ferry.protocol.knock import Knocker
from ferry.protocol.pake import PeerRole, SessionKey
from ferry.v1 import broker_pb2

__all__ = ["Incoming", "remove_partial"]


class Incoming:
    """An offer claimed by this side with a code."""

    def __init__(
        self,
        link: BrokerLink,
        session: broker_pb2.Session,
        *,
        key: SessionKey,
        ports: tuple[int, int] = DEFAULT_PORTS,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
    ) -> None:
        """``link`` carries this side's token for ``session``; ``key`` is the code's (the
        sender's proof and certificate were checked under it); ``ports`` are where this
        side may listen; ``stall_timeout`` is how long a silent sender is waited for."""
        self._link = link
        self.ports = ports
        self.stall_timeout = stall_timeout
        self.session = session
        self.name = session.name
        # Where each file is written: its name when safe, else a safe one (shown at consent).
        self.local_paths = local_paths([f.path for f in session.manifest.files])
        self.files = files_of(session.manifest, self.local_paths)
        self.total_size = sum(f.size for f in self.files)
        self._store_bytes = 0  # verified bytes the object store gave this run
        self._peer: ReceivePeer | None = None  # the current attempt's data path
        self._path: PathInfo | None = None  # why the current attempt went to the store
        self._path_reported: PathInfo | None = None
        #: The key the code gave (its ``secret``: keep it, mode 0600, for `resume_claim`).
        self.key = key

    @property
    def connection(self) -> PathInfo | None:
        """How the current (or last) attempt connected, or why it went to the store."""
        if self._peer is not None and self._peer.path is not None:
            return self._peer.path
        return self._path

    @property
    def store_key(self) -> bytes:
        """The key that seals this session's objects in the store; the broker never sees it."""
        return self.key.store_key

    @property
    def verification_words(self) -> str:
        """Words derived from the key: the sender's side shows the same ones (``--verify``)
        unless someone sat in between."""
        return self.key.verification_words()

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
                    local,
                    f.size_bytes,
                    f.mode,
                    f.modify_time.seconds * 1_000_000_000 + f.modify_time.nanos,
                )
                for f, local in zip(self.session.manifest.files, self.local_paths, strict=True)
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
        check_via(via)
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
        if self.session.state in FINAL:
            found = await asyncio.to_thread(self._finished_earlier, sink, journal, file_chunks)
            if found is not None:  # verified and in place before the session ended
                journal.remove()
                return self._emit_done(self._result_from(found, 0.0), on_event)
            # Over on the broker (failed, cancelled, expired...): drop what an earlier run kept.
            sink.discard_leftovers()
            journal.remove()
            raise TransferOver(f"that transfer is over ({ended(self.session)})")
        receive = ReceiveSession(sizes, chunk_size)
        # Refuses unsafe or clobbering names before consenting; restores an earlier run.
        try:
            resume_from_journal(sink, journal, receive, file_chunks)
        except StorageError as exc:
            raise self._storage_failed(exc, dest) from exc
        started = time.monotonic()
        first_chunk: float | None = None
        if not receive.done:
            await self._reserve(sink, receive, journal, dest)
            identity = Identity.generate()
            me = sign(peer_info(identity, self.ports), self.key, PeerRole.RECEIVER)
            try:
                session = await self._accept_or_resume(me, identity)
            except BrokerError:
                # Over on the broker meanwhile (the sender burned it, say): what was just
                # reserved goes, and the reason is the session's.
                with contextlib.suppress(BrokerError):
                    self.session = await self._link.get(self.name)
                if self.session.state not in FINAL:
                    raise
                journal.remove()
                sink.discard()
                raise over(self.session) from None
            # One intake for every path (direct, store) of this transfer.
            accepted_at = time.monotonic()
            intake = Intake(receive, sink, journal)
            await self._receive(session, identity, me, intake, via, on_event)
            if intake.first_chunk_at is not None:
                first_chunk = intake.first_chunk_at - accepted_at
        direct = receive.bytes_verified - receive.bytes_resumed - self._store_bytes
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
            connection=self.connection,
            first_chunk_seconds=first_chunk,
            path=path_of(direct, self._store_bytes, "store" if via == "store" else "direct"),
        )
        digests = [receive.digest(i) for i in range(len(self.files))]
        carried = (direct, self._store_bytes)
        await self._confirm(receive.bytes_verified, journal, dest, carried, digests)
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
        intake: Intake,
        via: Via,
        on_event: EventHandler | None,
    ) -> None:
        """Receive what is missing; on failure keep the data unless the session is over."""
        sink, journal = intake.sink, intake.journal

        async def report(done: int) -> None:
            path = self.connection
            fresh = path if path is not None and path != self._path_reported else None
            report = fresh.to_report() if fresh is not None else None
            await self._link.report(self.name, State.STATE_TRANSFERRING, done, path=report)
            self._path_reported = fresh or self._path_reported

        pump = Pump(self.total_size, on_event, lambda: intake.bytes_verified, report)
        pump_task = asyncio.create_task(pump.run())
        self._store_bytes = 0
        kept = "the partial transfer is kept: run the same command again to resume"
        try:
            if via == "store":
                await self._from_store_only(session, intake)
            else:
                await self._attempts(session, identity, me, intake, via)
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
            reason = f"receiving failed: {told(exc)}"
            peer = isinstance(exc, ProtocolError | PeerAborted)
            # The sender reads the reason too: without this side's folders in it.
            if await self._link.report_failed(self.name, f"receiving failed: {for_peer(exc)}"):
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

    async def _confirm(
        self,
        done: int,
        journal: Journal,
        dest: Path,
        carried: tuple[int, int] = (0, 0),
        digests: Sequence[bytes] = (),
    ) -> None:
        """Tell the broker that every file is verified and in place (and each file's digest,
        for the operator's audit log); then drop the journal.

        Waits for a restarting broker (the link's patience). A broker that never answers
        leaves the journal, so the next run reports it; a session that ended meanwhile
        (expired, cancelled) changes nothing here: the files are verified and in place.
        """
        try:
            path = self.connection
            await self._link.report(
                self.name,
                State.STATE_COMPLETED,
                done,
                path=path.to_report() if path is not None else None,
                bytes_direct=max(carried[0], 0),
                bytes_store=max(carried[1], 0),
                file_digests=digests,
            )
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
        for f, local in zip(self.files, self.local_paths, strict=True):
            path = resolve_destination(dest, local)
            if not path.is_file() or path.stat().st_size != f.size:
                raise TransferError(
                    f"this transfer completed earlier, but {escape_name(str(local))} is no "
                    f"longer in {escape_name(str(dest))}"
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
        intake: Intake,
        via: Via = "auto",
    ) -> None:
        """Connect and receive, negotiating new attempts while the sender may come back.

        With via="auto", an attempt whose direct connection is not up by the deadline
        switches to the object store (if the broker has one): it waits up to the stall
        timeout for the sender's upload and fetches what is still missing from it; if
        nothing is stored by then, the next direct attempt is negotiated, and so on.
        """
        held, since = intake.bytes_verified, time.monotonic()
        patience = self.stall_timeout
        store_ok = via == "auto"
        while not intake.done:
            stream_id = intake.next_stream
            latest = [session]
            cancel = threading.Event()
            der = await check_certificate(self._link, session, self.key, PeerRole.SENDER)
            peer = ReceivePeer(
                self.name,
                intake,
                client_context(identity, der),
                der,
                Knocker(self.key.knock_key, self.name, session.attempt),
                streams=session.plan.stream_count or 1,
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
                await self._link.report(self.name, State.STATE_CONNECTING, intake.bytes_verified)
            holders = reserve_ports(max(plan.stream_count, 1), avoid=ports)
            slots = [sock.getsockname()[1] for sock in holders]
            # At once: the addresses the sender offered from, on its leased ports (a LAN, a
            # sender reachable as it is); then what it publishes for this attempt.
            peer.add_targets(lease_targets(session.sender.candidates, ports, slots[0]))
            attempt = session.attempt

            trickle = functools.partial(_sender_candidates, peer, slots[0])
            trickle(session)
            self._peer, self._path = peer, None
            gathered: list[Gathered] = []
            try:
                await in_thread_while(
                    functools.partial(peer.run, slots, deadline, cancel),
                    cancel,
                    follow(self._link, self.name, attempt, cancel, latest, trickle),
                    publish(self._link, self.name, attempt, slots, gathered),
                )
                return
            except PeerGone as exc:
                lost: Exception = exc
            finally:
                for sock in holders:
                    sock.close()
                for each in gathered:
                    each.close()
            current = latest[0]
            if current.state in FINAL:
                raise over(current)
            never_connected = intake.next_stream == stream_id
            if store_ok and never_connected:
                self._path = PathInfo(
                    "store", setup_seconds=peer.elapsed(), tries=peer.tries, reason=str(lost)
                )
                try:
                    await self._from_store(intake, time.monotonic() + patience, session.attempt)
                    return
                except StoreUnavailable:
                    store_ok = False  # this broker has no object store: direct only
                except StoreError as exc:
                    lost = exc
                current = await self._link.get(self.name)
                if current.state in FINAL:
                    raise over(current)
            now = time.monotonic()
            if intake.bytes_verified != held:
                held, since = intake.bytes_verified, now
            if current.attempt != session.attempt and current.state in LIVE:
                session = current  # the sender came back (or moved): follow it
                continue
            if now - since > patience:
                raise Stalled(
                    f"{lost}; the partial transfer is kept: run the same command again to resume"
                )
            await asyncio.sleep(0.2)
            try:
                session = await self._link.resume(self.name, me)
            except BrokerError:
                # Ended meanwhile (the sender failed it, say): say how, not "nothing to resume".
                current = await self._link.get(self.name)
                if current.state in FINAL:
                    raise over(current) from None
                raise

    async def _from_store_only(
        self,
        session: broker_pb2.Session,
        intake: Intake,
    ) -> None:
        """via="store": fetch everything from the object store, waiting for the upload."""
        left = session.expire_time.ToDatetime().timestamp() - time.time()
        with contextlib.suppress(BrokerError):
            await self._link.report(self.name, State.STATE_TRANSFERRING, intake.bytes_verified)
        try:
            await self._from_store(intake, time.monotonic() + max(left, 1.0))
        except StoreUnavailable as exc:
            raise TransferError(str(exc)) from exc
        except StoreNotReady as exc:
            raise TransferError(f"{exc} before the transfer expired") from exc
        except StoreError:
            current = await self._link.get(self.name)
            if current.state in FINAL:
                raise over(current) from None
            raise

    async def _from_store(
        self,
        intake: Intake,
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
            intake,
            [f.size for f in self.files],
            key=self.store_key,
            wait_until=wait_until,
            stop_waiting=moved,
        )
        try:
            await in_thread_while(
                functools.partial(downloader.run, cancel),
                cancel,
                until_final(self._link, self.name, cancel, moved, attempt or None),
            )
        finally:
            self._store_bytes += downloader.bytes_downloaded


def _sender_candidates(peer: ReceivePeer, port: int, session: broker_pb2.Session) -> None:
    """Check the candidates the sender published for the attempt from data port ``port``."""
    peer.add_targets(targets_of(session.plan.sender_candidates, port))


def remove_partial(dest: Path | str, session: str, paths: Sequence[str]) -> None:
    """Delete what an unfinished receive of ``session`` into ``dest`` left there: its journal
    and its hidden partial copies of ``paths`` (relative paths as written in ``dest``: an
    offered file's ``local_path``). Paths that are unsafe, or lead outside ``dest``, are
    skipped; nothing else is touched."""
    dest = Path(dest)
    remove_parts(dest, [PurePosixPath(p) for p in paths], session.rsplit("/", 1)[-1])
    with contextlib.suppress(OSError):
        Journal(journal_path(dest, session), 1, b"").remove()
