"""The object-store data path: upload to and download from S3 through presigned URLs.

When bytes cannot go peer to peer they go through an S3 bucket; the broker presigns every
request (the client holds no S3 credentials) and these classes only move bytes over plain
HTTP (urllib3, pooled, with timeouts and bounded retries). Both run in threads and call the
broker on the event loop that started them (``asyncio.run_coroutine_threadsafe``).

The bucket and the broker are untrusted: everything stored is sealed end to end under the
session's store key, which only the two peers have (``ferry.protocol.sealing``: every chunk
sealed alone, 28 bytes longer, so the object's offsets stay computable; the digests object
sealed as one). The chunk digests stay BLAKE3 of the plaintext.

Upload (sender), per file::

    StartStoreUpload -> ListStoreParts -> PresignStoreParts (batches) -> PUT parts
    (a bounded window; each part read from the source chunk by chunk, every chunk hashed
    and sealed into the part's buffer) -> PUT the sealed digests -> Complete

Parts S3 already holds with their exact size are not sent again, but are read and hashed:
the digests object needs every chunk's digest. Every byte is read from the `Source`, which
refuses a file that is no longer the version offered (`SourceChanged`), before the first
part and again before the digests object: old and new bytes are never mixed. The layout
the broker gives (part size, count, digests size) is checked against the manifest first.

Download (receiver): the same `Intake` as the direct path's, and its `ReceiveSession`
decides which chunks are still wanted (so nothing verified -- from the journal or the
direct path -- is fetched again). Each worker is one stream of that intake: it asks for a
window of chunks, fetches each run of them with one ranged GET, opens every sealed chunk
and hands the plaintext, with its digest from the (opened) digests object, to the intake
(verify, write, journal); a complete file is checked against the whole-file digest of the
digests object and moved into place. A chunk that does not open is refused like one that
fails its digest: not written, fetched again, and after the session's retries the transfer
fails (`TooManyCorruptChunks`). A digests object that does not open fails the transfer
(`SealError`).

Presigned URLs are bearer secrets: they are never logged, and never put in error messages.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

import grpc

if TYPE_CHECKING:  # imported where used: urllib3 costs ~25 ms, which direct transfers skip
    import urllib3

from ferry.client._broker import COMPLETE_TIMEOUT, BrokerError, BrokerLink
from ferry.client._intake import Intake
from ferry.client._source import Source
from ferry.protocol import (
    FILE_DIGEST_ALGORITHM,
    ChunkStart,
    RemoteProtocolError,
    TooManyCorruptChunks,
    chunk_digest,
    file_digest,
)
from ferry.protocol.sealing import OVERHEAD, Sealer, SealError, sealed_digests_size
from ferry.v1 import broker_pb2, peer_pb2

__all__ = [
    "StoreDownloader",
    "StoreError",
    "StoreNotReady",
    "StoreUnavailable",
    "StoreUploader",
]

WINDOW = 4
_PRESIGN_BATCH = 1000
_RETRIES = 6  # with the backoff below: about 7 s of patience per request
_RENEW_MARGIN = 60.0
_BRIDGE_POLL = 0.5
_CONNECT_TIMEOUT = 10.0
_READ_TIMEOUT = 60.0

T = TypeVar("T")


class StoreError(Exception):
    """The object store could not be used right now (HTTP failures after retries)."""


class StoreUnavailable(StoreError):
    """The broker has no object store configured (STORE_UNAVAILABLE): use the direct path."""


class StoreNotReady(StoreError):
    """The sender has not completed the upload of a needed file in the time allowed."""


def _pool(window: int) -> urllib3.PoolManager:
    import urllib3

    return urllib3.PoolManager(
        maxsize=window + 2,
        timeout=urllib3.Timeout(connect=_CONNECT_TIMEOUT, read=_READ_TIMEOUT),
        retries=False,
    )


def _request(
    http: urllib3.PoolManager,
    method: str,
    url: str,
    what: str,
    *,
    body: bytes | bytearray | None = None,
    headers: dict[str, str] | None = None,
    stream: bool = False,
) -> urllib3.BaseHTTPResponse:
    """One request with bounded retries on connection errors and 5xx (never logs the URL)."""
    import urllib3

    pause = 0.2
    for attempt in range(_RETRIES + 1):
        try:
            response = http.request(
                method,
                url,
                # urllib3 sends any buffer as it is (a part read into a bytearray: no
                # copy), though its type hints name only bytes.
                body=cast("bytes | None", body),
                headers=headers,
                preload_content=not stream,
                redirect=False,
            )
        except urllib3.exceptions.HTTPError as exc:
            problem = f"{type(exc).__name__}"
        else:
            if response.status < 300:
                return response
            response.drain_conn()
            response.release_conn()
            if response.status < 500:
                raise StoreError(f"{what}: the object store answered {response.status}")
            problem = f"HTTP {response.status}"
        if attempt == _RETRIES:
            raise StoreError(f"{what} failed after {_RETRIES + 1} tries ({problem})")
        time.sleep(pause)
        pause = min(pause * 2, 2.0)
    raise AssertionError("unreachable")


class _Bridge:
    """Runs broker calls on the event loop from the data-path threads.

    A call may wait as long as the link's patience (a restarting broker) plus its longest
    deadline; ``stop``, once set, abandons the wait at once.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, link: BrokerLink) -> None:
        self.loop = loop
        self.timeout = link.patience + max(link.timeout, COMPLETE_TIMEOUT) + 5
        self.stop: threading.Event | None = None

    def _result(self, future: concurrent.futures.Future[T]) -> T:
        give_up = time.monotonic() + self.timeout
        while True:
            try:
                return future.result(_BRIDGE_POLL)
            except concurrent.futures.TimeoutError:
                if self.stop is not None and self.stop.is_set():
                    future.cancel()
                    raise StoreError("cancelled") from None
                if time.monotonic() > give_up:
                    future.cancel()
                    raise StoreError("the broker did not answer in time") from None

    def call(self, make: Callable[[], Awaitable[T]]) -> T:
        async def run() -> T:
            return await make()

        future = asyncio.run_coroutine_threadsafe(run(), self.loop)
        try:
            return self._result(future)
        except BrokerError as exc:
            if exc.reason == "STORE_UNAVAILABLE":
                raise StoreUnavailable(str(exc)) from None
            if exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise StoreError(str(exc)) from None
            raise


def _expire_s(ts: Any) -> float:
    return float(ts.seconds) + float(ts.nanos) / 1e9


# -- upload ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Parts:
    """How one file is cut into parts of whole sealed chunks, as the broker said and checked.

    Sealed chunk i is ``chunk_size + OVERHEAD`` bytes (the last one shorter), so part n
    holds chunks ``(n-1)*per_part ..`` and its stored length follows from the manifest.
    """

    size: int
    chunk_size: int
    chunks: int
    per_part: int
    count: int
    part_size: int

    @classmethod
    def check(
        cls, index: int, size: int, chunk_size: int, start: broker_pb2.StartStoreUploadResponse
    ) -> _Parts:
        """The broker's layout of file ``index``; RemoteProtocolError unless it is one of
        whole sealed chunks for this manifest (a broker cannot make us misplace a chunk)."""
        chunks = -(-size // chunk_size)
        part_size, count = start.part_size_bytes, start.part_count
        per_part, rest = divmod(part_size, chunk_size + OVERHEAD)
        if (
            per_part < 1
            or rest
            or count != max(1, -(-chunks // per_part))
            or start.digests_size_bytes != sealed_digests_size(chunks)
        ):
            raise RemoteProtocolError(
                f"the broker's object layout of file {index} is not one of whole sealed chunks"
            )
        return cls(size, chunk_size, chunks, per_part, count, part_size)

    def chunks_of(self, number: int) -> range:
        """The chunks part ``number`` (from 1) holds (none for an empty file's one part)."""
        first = (number - 1) * self.per_part
        return range(first, min(first + self.per_part, self.chunks))

    def plain_length(self, number: int) -> int:
        """The file bytes part ``number`` holds."""
        chunks = self.chunks_of(number)
        return min(self.size, chunks.stop * self.chunk_size) - chunks.start * self.chunk_size

    def stored_length(self, number: int) -> int:
        """Part ``number``'s exact size in the store: its chunks, sealed."""
        return self.plain_length(number) + OVERHEAD * len(self.chunks_of(number))


class StoreUploader:
    """Uploads every file of an offer to the object store, sealed; resumable, bounded window."""

    def __init__(
        self,
        link: BrokerLink,
        name: str,
        source: Source,
        manifest: broker_pb2.Manifest,
        loop: asyncio.AbstractEventLoop,
        *,
        key: bytes,
        window: int = WINDOW,
    ) -> None:
        self.link = link
        self.name = name
        self.source = source
        self.entries = list(manifest.files)
        self.chunk_size = manifest.chunk_size_bytes
        self.window = max(1, window)
        self.bridge = _Bridge(loop, link)
        self.sealer = Sealer(key, name)
        self.bytes_uploaded = 0  # file bytes PUT (sealed) by this run
        self.bytes_stored = 0  # file bytes known to be in the store (PUT now or before)
        self.digests: list[bytes] = [b""] * len(self.entries)  # whole-file digests
        self._lock = threading.Lock()
        self._http = _pool(self.window)

    def run(self, cancel: threading.Event) -> None:
        """Upload every file not stored yet; return once all are completed."""
        self.bridge.stop = cancel
        try:
            for index in range(len(self.entries)):
                if cancel.is_set():
                    raise StoreError("cancelled")
                self._file(index, cancel)
        finally:
            self._http.clear()
            self.source.close()

    def _file(self, index: int, cancel: threading.Event) -> None:
        name, size = self.name, self.entries[index].size_bytes
        start = self.bridge.call(lambda: self.link.start_store_upload(name, index))
        listing = (
            None
            if start.completed
            else self.bridge.call(lambda: self.link.list_store_parts(name, index))
        )
        if listing is None or listing.completed:
            with self._lock:
                self.bytes_stored += size
            # Its digests are in the store; the whole-file digest is recomputed from the source.
            self.digests[index] = self.source.file_digest(index)
            return
        parts = _Parts.check(index, size, self.chunk_size, start)
        count = parts.count
        held = {
            p.part_number
            for p in listing.parts
            if 1 <= p.part_number <= count and p.size_bytes == parts.stored_length(p.part_number)
        }
        # What each part's PUT answered: the broker needs it where the store can't list parts.
        etags = {p.part_number: p.etag for p in listing.parts if p.part_number in held}
        todo = [n for n in range(1, count + 1) if n not in held]
        with self._lock:
            self.bytes_stored += sum(parts.plain_length(n) for n in held)
        chunk_digests: list[bytes] = [b""] * parts.chunks
        urls: dict[int, broker_pb2.PresignedUrl] = {}
        for i in range(0, len(todo), _PRESIGN_BATCH):
            batch = todo[i : i + _PRESIGN_BATCH]
            reply = self.bridge.call(
                lambda b=batch: self.link.presign_store_parts(name, index, b, False)  # type: ignore[misc]
            )
            urls.update({u.part_number: u for u in reply.parts})
        try:
            self.source.fd(index)  # opened, and refused unless still as offered
            with concurrent.futures.ThreadPoolExecutor(self.window) as pool:
                pending: set[concurrent.futures.Future[None]] = set()
                for number in range(1, count + 1):
                    if cancel.is_set():
                        break
                    if len(pending) >= self.window:
                        done, pending = concurrent.futures.wait(
                            pending, return_when=concurrent.futures.FIRST_COMPLETED
                        )
                        for f in done:
                            f.result()
                    pending.add(
                        pool.submit(
                            self._part,
                            index,
                            number,
                            parts,
                            chunk_digests,
                            urls if number not in held else None,
                            etags,
                        )
                    )
                for f in concurrent.futures.as_completed(pending):
                    f.result()
            if cancel.is_set():
                raise StoreError("cancelled")
            self.source.check_unchanged(index)  # changed while we read it?
        finally:
            self.source.release(index)
        body = self.sealer.seal_digests(index, parts.chunks, b"".join(chunk_digests))
        reply = self.bridge.call(lambda: self.link.presign_store_parts(name, index, [], True))
        if len(body) != reply.digests.size_bytes:
            raise RemoteProtocolError("the broker expects a digests object of another size")
        self._put(reply.digests.url, body, "digests upload")
        stored = [
            broker_pb2.StoredPart(
                part_number=n, size_bytes=parts.stored_length(n), etag=etags.get(n, "")
            )
            for n in range(1, count + 1)
        ]
        self.bridge.call(lambda: self.link.complete_store_upload(name, index, stored))
        self.digests[index] = file_digest(chunk_digests)

    def _part(
        self,
        index: int,
        number: int,
        parts: _Parts,
        chunk_digests: list[bytes],
        urls: dict[int, broker_pb2.PresignedUrl] | None,
        etags: dict[int, str],
    ) -> None:
        """Read one part chunk by chunk, hash every chunk, and -- unless the store has the
        part already -- seal each into the part's body and PUT it."""
        body = bytearray(parts.stored_length(number)) if urls is not None else None
        plain = bytearray(min(self.chunk_size, parts.size))
        at = 0
        for chunk in parts.chunks_of(number):
            offset = chunk * self.chunk_size
            view = memoryview(plain)[: min(self.chunk_size, parts.size - offset)]
            self.source.read(index, offset, view)
            chunk_digests[chunk] = chunk_digest(view)
            if body is not None:
                end = at + len(view) + OVERHEAD
                self.sealer.seal_chunk_into(
                    memoryview(body)[at:end], index, chunk, parts.chunks, view
                )
                at = end
        if urls is None or body is None:
            return
        url = urls[number]
        if _expire_s(url.expire_time) - time.time() < _RENEW_MARGIN:
            name = self.name
            reply = self.bridge.call(
                lambda: self.link.presign_store_parts(name, index, [number], False)
            )
            url = reply.parts[0]
            urls[number] = url
        etag = self._put(url.url, body, f"upload of part {number}")
        length = parts.plain_length(number)
        with self._lock:
            etags[number] = etag
            self.bytes_uploaded += length
            self.bytes_stored += length

    def _put(self, url: str, body: bytes | bytearray, what: str) -> str:
        """PUT ``body`` to a presigned URL; return the entity tag the store answered."""
        response = _request(
            self._http,
            "PUT",
            url,
            what,
            body=body,
            headers={"Content-Length": str(len(body))},
        )
        response.release_conn()
        return str(response.headers.get("ETag", ""))


# -- download -------------------------------------------------------------------------


@dataclass
class _Stored:
    """What the receiver knows of one stored file: its URL and its chunk digests."""

    url: str
    expire_s: float
    digests: list[bytes]
    lock: threading.Lock = field(default_factory=threading.Lock)


class StoreDownloader:
    """Fetches, from the object store, every chunk the intake's session still wants, and
    opens it."""

    def __init__(
        self,
        link: BrokerLink,
        name: str,
        loop: asyncio.AbstractEventLoop,
        intake: Intake,
        sizes: Sequence[int],
        *,
        key: bytes,
        wait_until: float,
        stop_waiting: threading.Event | None = None,
        window: int = WINDOW,
    ) -> None:
        self.link = link
        self.name = name
        self.intake = intake
        self.receive = intake.session  # called only holding intake.lock
        self.sizes = list(sizes)
        self.chunk_size = intake.chunk_size
        self.chunks = [-(-size // self.chunk_size) for size in self.sizes]
        self.sealer = Sealer(key, name)
        self.unopened = 0  # chunks this run fetched that did not open (guarded by _lock)
        self.window = max(1, window)
        self.wait_until = wait_until  # time.monotonic() by which a needed file must be stored
        self.stop_waiting = stop_waiting or threading.Event()  # set: stop waiting for uploads
        self.bridge = _Bridge(loop, link)
        self.bytes_downloaded = 0  # verified bytes this run took from the store
        self.error: BaseException | None = None
        self._lock = intake.lock
        self._wake = intake.wake
        self._stored: dict[int, _Stored] = {}
        self._stored_lock = threading.Lock()
        self._http = _pool(self.window)

    def run(self, cancel: threading.Event) -> None:
        """Download until every file is confirmed; raise on failure."""
        self.bridge.stop = cancel
        try:
            for index in self.receive.complete_unconfirmed():
                if cancel.is_set():
                    raise StoreError("cancelled")
                self._confirm(index, cancel)
            streams = [self.intake.open_stream() for _ in range(self.window)]
            threads = [
                threading.Thread(target=self._worker, args=(s, cancel), daemon=True)
                for s in streams
            ]
            for t in threads:
                t.start()
            while alive := [t for t in threads if t.is_alive()]:
                alive[0].join(timeout=0.2)
                if cancel.is_set():
                    self._fail(StoreError("cancelled"))
                self.intake.sync()
            if isinstance(self.error, TooManyCorruptChunks) and self.unopened:
                raise TooManyCorruptChunks(
                    f"{self.unopened} chunks from the object store did not open with this "
                    "transfer's key (damaged or replaced in the bucket) and were not accepted; "
                    f"giving up after {self.receive.retries} failed checks"
                ) from self.error
            if self.error is not None:
                raise self.error
            if not self.receive.done:
                raise StoreError("the store download stopped before every file was confirmed")
        finally:
            self._http.clear()

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = exc
            self._wake.notify_all()

    def _worker(self, stream: int, cancel: threading.Event) -> None:
        plain = bytearray(self.chunk_size)  # where this worker opens each chunk
        try:
            while True:
                with self._lock:
                    if self.error is not None or cancel.is_set() or self.receive.done:
                        return
                    request = self.receive.request(stream)
                    if request is None:
                        # Nothing to fetch now: wait for chunks given back, or the end.
                        self._wake.wait(timeout=0.2)
                        continue
                for r in request.request.ranges:
                    self._fetch(stream, r.file_index, r.first_chunk, r.chunk_count, plain, cancel)
        except BaseException as exc:
            self._fail(exc)
        finally:
            self.intake.close_stream(stream)

    def _file(self, index: int, cancel: threading.Event, renew: bool = False) -> _Stored:
        """The file's URL (renewed when it nears expiry) and digests; waits until stored."""
        with self._stored_lock:
            known = self._stored.get(index)
        if known is not None and not renew and known.expire_s - time.time() > _RENEW_MARGIN:
            return known
        lock = known.lock if known is not None else threading.Lock()
        with lock:
            name = self.name
            pause = 0.2
            while True:
                reply = self.bridge.call(lambda: self.link.presign_store_download(name, index))
                if reply.stored:
                    break
                if time.monotonic() + pause > self.wait_until or self.stop_waiting.is_set():
                    raise StoreNotReady("the sender has not put the files in the object store")
                if cancel.wait(pause):
                    raise StoreError("cancelled")
                pause = min(pause * 1.5, 2.0)
            if known is not None:
                digests = known.digests
            else:
                response = _request(self._http, "GET", reply.digests_url, "digests download")
                # SealError (the transfer fails) unless it is this file's, under our key.
                digests = self.sealer.open_digests(index, self.chunks[index], response.data)
            stored = _Stored(reply.url, _expire_s(reply.expire_time), digests, lock)
            with self._stored_lock:
                self._stored[index] = stored
            return stored

    def _fetch(
        self,
        stream: int,
        index: int,
        first: int,
        count: int,
        plain: bytearray,
        cancel: threading.Event,
    ) -> None:
        """One ranged GET for a run of sealed chunks; open, verify, write and journal each."""
        stored = self._file(index, cancel)
        chunks = self.chunks[index]
        stored_size = self.sizes[index] + OVERHEAD * chunks
        start = first * (self.chunk_size + OVERHEAD)
        end = min(stored_size, (first + count) * (self.chunk_size + OVERHEAD))
        headers = {"Range": f"bytes={start}-{end - 1}"}
        try:
            response = _request(
                self._http, "GET", stored.url, "chunk download", headers=headers, stream=True
            )
        except StoreError:
            stored = self._file(index, cancel, renew=True)  # an expired URL? once more
            response = _request(
                self._http, "GET", stored.url, "chunk download", headers=headers, stream=True
            )
        try:
            if response.status != 206 and not (response.status == 200 and start == 0):
                raise StoreError(f"chunk download: the object store answered {response.status}")
            if response.status == 200 and end != stored_size:
                raise StoreError("chunk download: the object store ignored the Range header")
            for chunk in range(first, first + count):
                length = self.receive.chunk_length(index, chunk)
                sealed = _read_exactly(response, length + OVERHEAD)
                ev = ChunkStart(index, chunk, stored.digests[chunk], length)
                with self._lock:
                    if self.error is not None or cancel.is_set():
                        return
                    target = self.receive.chunk_start(stream, ev)
                payload = memoryview(plain)[:length]
                try:
                    self.sealer.open_chunk_into(payload, index, chunk, chunks, sealed)
                except SealError:
                    self.intake.refuse(functools.partial(self._unopened, stream, ev))
                    continue
                finished = self.intake.chunk(
                    index,
                    chunk,
                    target.offset,
                    ev.digest,
                    payload,
                    functools.partial(self._verdict, stream, ev),
                )
                for done_index in finished:
                    self._confirm(done_index, cancel)
        finally:
            response.release_conn()

    def _verdict(self, stream: int, ev: ChunkStart, ok: bool) -> list[int]:
        """The session's verdict on a chunk (called holding the intake's lock)."""
        finished = self.receive.chunk_done(stream, ev, ok)
        if ok:
            self.bytes_downloaded += ev.length
        return finished

    def _unopened(self, stream: int, ev: ChunkStart, ok: bool) -> list[int]:
        """The verdict on a chunk that did not open: refused (called holding the lock)."""
        self.unopened += 1
        return self.receive.chunk_done(stream, ev, False)

    def _confirm(self, index: int, cancel: threading.Event) -> None:
        """Check a complete file against the store's whole-file digest; move it in place."""
        if self.sizes[index] == 0:
            expected = file_digest([])
        else:
            expected = file_digest(self._file(index, cancel).digests)
        end = peer_pb2.FileEnd(file_index=index, algorithm=FILE_DIGEST_ALGORITHM, digest=expected)
        self.intake.file_end(end)  # raises if the chunks held do not make that file


def _read_exactly(response: urllib3.BaseHTTPResponse, length: int) -> bytes:
    import urllib3

    parts: list[bytes] = []
    got = 0
    while got < length:
        try:
            data = response.read(length - got)
        except urllib3.exceptions.HTTPError as exc:
            raise StoreError(f"chunk download broke off ({type(exc).__name__})") from None
        if not data:
            raise StoreError("chunk download: the object store sent fewer bytes than asked")
        parts.append(data)
        got += len(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)
