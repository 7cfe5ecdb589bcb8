"""The object-store data path: upload to and download from S3 through presigned URLs.

When bytes cannot go peer to peer they go through an S3 bucket; the broker presigns every
request (the client holds no S3 credentials) and these classes only move bytes over plain
HTTP (urllib3, pooled, with timeouts and bounded retries). Both run in threads and call the
broker on the event loop that started them (``asyncio.run_coroutine_threadsafe``).

Upload (sender), per file::

    StartStoreUpload -> ListStoreParts -> PresignStoreParts (batches) -> PUT parts
    (a bounded window, each read from the source, its chunks hashed) -> PUT digests -> Complete

Parts S3 already holds with their exact size are not sent again, but are read and hashed:
the digests object needs every chunk's digest. Every byte is read from the `Source`, which
refuses a file that is no longer the version offered (`SourceChanged`), before the first
part and again before the digests object: old and new bytes are never mixed.

Download (receiver): the same `Intake` as the direct path's, and its `ReceiveSession`
decides which chunks are still wanted (so nothing verified -- from the journal or the
direct path -- is fetched again). Each worker is one stream of that intake: it asks for a
window of chunks, fetches each run of them with one ranged GET and hands every chunk, with
its digest from the digests object, to the intake (verify, write, journal); a complete
file is checked against the whole-file digest of the digests object and moved into place.

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
    chunk_digest,
    file_digest,
)
from ferry.v1 import broker_pb2, peer_pb2

__all__ = [
    "StoreDownloader",
    "StoreError",
    "StoreNotReady",
    "StoreUnavailable",
    "StoreUploader",
]

WINDOW = 4
DIGEST_BYTES = 32
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


class StoreUploader:
    """Uploads every file of an offer to the object store; resumable, bounded window."""

    def __init__(
        self,
        link: BrokerLink,
        name: str,
        source: Source,
        manifest: broker_pb2.Manifest,
        loop: asyncio.AbstractEventLoop,
        *,
        window: int = WINDOW,
    ) -> None:
        self.link = link
        self.name = name
        self.source = source
        self.entries = list(manifest.files)
        self.chunk_size = manifest.chunk_size_bytes
        self.window = max(1, window)
        self.bridge = _Bridge(loop, link)
        self.bytes_uploaded = 0  # part bytes PUT by this run
        self.bytes_stored = 0  # part bytes known to be in the store (PUT now or before)
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
        chunks = -(-size // self.chunk_size)
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
        part_size, count = start.part_size_bytes, start.part_count
        lengths = {n: min(part_size, size - (n - 1) * part_size) for n in range(1, count + 1)}
        held = {p.part_number for p in listing.parts if p.size_bytes == lengths[p.part_number]}
        # What each part's PUT answered: the broker needs it where the store can't list parts.
        etags = {p.part_number: p.etag for p in listing.parts if p.part_number in held}
        todo = [n for n in range(1, count + 1) if n not in held]
        with self._lock:
            self.bytes_stored += sum(lengths[n] for n in held)
        chunk_digests: list[bytes] = [b""] * chunks
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
                            part_size,
                            lengths[number],
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
        body = b"".join(chunk_digests)
        reply = self.bridge.call(lambda: self.link.presign_store_parts(name, index, [], True))
        if len(body) != reply.digests.size_bytes:
            raise RemoteProtocolError("the broker expects a digests object of another size")
        self._put(reply.digests.url, body, "digests upload")
        parts = [
            broker_pb2.StoredPart(part_number=n, size_bytes=lengths[n], etag=etags.get(n, ""))
            for n in range(1, count + 1)
        ]
        self.bridge.call(lambda: self.link.complete_store_upload(name, index, parts))
        self.digests[index] = file_digest(chunk_digests)

    def _part(
        self,
        index: int,
        number: int,
        part_size: int,
        length: int,
        chunk_digests: list[bytes],
        urls: dict[int, broker_pb2.PresignedUrl] | None,
        etags: dict[int, str],
    ) -> None:
        """Read one part, hash its chunks, and PUT it unless the store has it already."""
        offset = (number - 1) * part_size
        data = bytearray(length)
        self.source.read(index, offset, memoryview(data))
        first = offset // self.chunk_size
        view = memoryview(data)
        for i, at in enumerate(range(0, length, self.chunk_size)):
            chunk_digests[first + i] = chunk_digest(view[at : at + self.chunk_size])
        if urls is None:
            return
        url = urls[number]
        if _expire_s(url.expire_time) - time.time() < _RENEW_MARGIN:
            name = self.name
            reply = self.bridge.call(
                lambda: self.link.presign_store_parts(name, index, [number], False)
            )
            url = reply.parts[0]
            urls[number] = url
        etag = self._put(url.url, data, f"upload of part {number}")
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
    """Fetches, from the object store, every chunk the intake's session still wants."""

    def __init__(
        self,
        link: BrokerLink,
        name: str,
        loop: asyncio.AbstractEventLoop,
        intake: Intake,
        sizes: Sequence[int],
        *,
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
                    self._fetch(stream, r.file_index, r.first_chunk, r.chunk_count, cancel)
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
                chunks = -(-self.sizes[index] // self.chunk_size)
                response = _request(self._http, "GET", reply.digests_url, "digests download")
                body = response.data
                if len(body) != DIGEST_BYTES * chunks:
                    raise RemoteProtocolError(
                        f"the stored digests of file {index} have {len(body)} bytes, "
                        f"not {DIGEST_BYTES * chunks}"
                    )
                digests = [body[i : i + DIGEST_BYTES] for i in range(0, len(body), DIGEST_BYTES)]
            stored = _Stored(reply.url, _expire_s(reply.expire_time), digests, lock)
            with self._stored_lock:
                self._stored[index] = stored
            return stored

    def _fetch(
        self, stream: int, index: int, first: int, count: int, cancel: threading.Event
    ) -> None:
        """One ranged GET for a run of chunks; verify, write and journal each chunk."""
        stored = self._file(index, cancel)
        start = first * self.chunk_size
        end = min(self.sizes[index], (first + count) * self.chunk_size)
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
            if response.status == 200 and end != self.sizes[index]:
                raise StoreError("chunk download: the object store ignored the Range header")
            for chunk in range(first, first + count):
                length = self.receive.chunk_length(index, chunk)
                data = _read_exactly(response, length)
                ev = ChunkStart(index, chunk, stored.digests[chunk], length)
                with self._lock:
                    if self.error is not None or cancel.is_set():
                        return
                    target = self.receive.chunk_start(stream, ev)
                finished = self.intake.chunk(
                    index,
                    chunk,
                    target.offset,
                    ev.digest,
                    memoryview(data),
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
