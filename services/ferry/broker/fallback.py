"""The object-store fallback, broker side: presigned multipart uploads and ranged downloads.

gRPC-free like core.py: methods take plain values, return protos, raise errors.py's refusals.
The bytes never pass through the broker; it only talks to S3 to create, list, complete and
abort uploads and to delete objects, and presigns URLs for the clients (see objectlayout for
how a file lies in the bucket). The sender seals every chunk and digests object end to end
before it uploads, under a key the broker never has: every size presigned, checked or
answered here is the sealed size the bucket holds, computed from the manifest.

Who may do what (the session's state is checked after its expiry is applied)::

    StartStoreUpload, PresignStoreParts,   sender     OFFERED (store-and-forward before
    ListStoreParts, CompleteStoreUpload               consent), ACCEPTED, CONNECTING,
                                                      TRANSFERRING
    PresignStoreDownload                   receiver   ACCEPTED, CONNECTING, TRANSFERRING

Errors: no bucket configured -> FailedPrecondition / STORE_UNAVAILABLE (a configuration
fact: retrying does not help); S3 failing -> Unavailable / STORE_ERROR (retry later).

Quotas (issue 10, finding 6: senders are anonymous, so the bucket must not be free hosting):
StartStoreUpload reserves the file's sealed object and digests bytes against
``store_max_bytes_per_offer``, ``store_max_bytes_per_address`` (the sender's address, an IPv6
/64) and ``store_max_bytes_total``, atomically in the store (uploads table) before the first
URL exists; beyond one -> ResourceExhausted / STORE_QUOTA_EXCEEDED. The bytes count until the
cleaner deleted the objects. ``store_forward = "off"`` refuses uploads before the receiver
accepted (PermissionDenied / STORE_FORWARD_DISABLED). The bucket's use is logged whenever it
changes ("object store use: ..."): the broker has no metrics endpoint. An offer to a person
(issue 13) has a known sender: its bytes count against the sending user's quota
(``user_store_bytes``, or the user's own) instead of its address's, and it may be stored
before consent whatever ``store_forward`` says, which is about anonymous senders.

Cleanup is driven by the store, so a restart loses none of it: every upload is recorded
(uploads table) before its URLs leave the broker, and the cleaner deletes the objects and
aborts the upload of every recorded file whose session is final. It runs once more after the
last upload URL handed out has expired, since until then a holder could still PUT. Separately,
multipart uploads under the prefix older than any session can live and unknown to the store
(a crash between creating one and recording it) are aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence

from ferry.broker import objectlayout as layout
from ferry.broker import states
from ferry.broker.core import Broker, reflexive_ip, timestamp
from ferry.broker.errors import (
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    Reason,
    ResourceExhausted,
    Unavailable,
)
from ferry.broker.objectstore import ObjectStore, ObjectStoreError, Part, Unsupported
from ferry.broker.states import Party
from ferry.broker.store import QuotaExceeded, SessionRecord, StoreQuota, UploadRecord
from ferry.v1 import broker_pb2

log = logging.getLogger(__name__)

UPLOAD_STATES = frozenset({states.OFFERED, states.ACCEPTED, states.CONNECTING, states.TRANSFERRING})
DOWNLOAD_STATES = frozenset({states.ACCEPTED, states.CONNECTING, states.TRANSFERRING})
MAX_PARTS_PER_CALL = 1000
_CLEAN_BATCH = 100


@contextlib.contextmanager
def _s3() -> Iterator[None]:
    try:
        yield
    except ObjectStoreError as exc:
        raise Unavailable(Reason.STORE_ERROR, str(exc)) from None


def _over_quota(exc: QuotaExceeded) -> ResourceExhausted:
    return ResourceExhausted(
        Reason.STORE_QUOTA_EXCEEDED,
        f"{exc}; send directly, or fewer bytes, or wait for stored transfers to end",
    )


class Fallback:
    """The Store* RPCs and the object cleaner of one broker."""

    def __init__(self, broker: Broker, objects: ObjectStore | None) -> None:
        self.broker = broker
        self.objects = objects
        self.prefix = broker.config.s3_prefix
        self._last_stale_sweep = float("-inf")
        self._no_stale_sweep = False  # the server can't list uploads (said once in the log)
        self._usage_logged: tuple[int, int] | None = None
        config = broker.config
        self.quota = StoreQuota(
            config.store_max_bytes_per_offer,
            config.store_max_bytes_per_address,
            config.store_max_bytes_total,
        )

    # -- checks -----------------------------------------------------------------------------

    async def _authorize(
        self,
        name: str,
        token: str | None,
        file_index: int,
        party: Party,
        allowed: frozenset[states.State],
    ) -> tuple[ObjectStore, SessionRecord, broker_pb2.FileEntry]:
        record, caller = await self.broker.authorize(name, token)
        if self.objects is None:
            raise FailedPrecondition(
                Reason.STORE_UNAVAILABLE,
                "the object-store fallback is not available: this broker has no S3 bucket"
                " configured (--s3-bucket / FERRY_S3_BUCKET)",
            )
        if caller is not party:
            verb = "upload to" if party is Party.SENDER else "download from"
            raise PermissionDenied(
                Reason.WRONG_PARTY,
                f"only the {party.value} may {verb} the object store",
            )
        state = record.session.state
        if state not in allowed:
            raise FailedPrecondition(
                Reason.WRONG_STATE,
                f"the session is {states.state_name(state)}; the object store is not open to it",
            )
        files = record.session.manifest.files
        if not 0 <= file_index < len(files):
            raise InvalidArgument(
                Reason.INVALID_ARGUMENT, f"file_index must be between 0 and {len(files) - 1}"
            )
        anonymous = not record.session.HasField("person")
        if state == states.OFFERED and self.broker.config.store_forward == "off" and anonymous:
            raise PermissionDenied(
                Reason.STORE_FORWARD_DISABLED,
                "this broker keeps no files for a receiver that has not accepted yet"
                " (store-and-forward is off): send directly, or through the store after the"
                " receiver accepts",
            )
        return self.objects, record, files[file_index]

    async def _upload(self, record: SessionRecord, file_index: int) -> UploadRecord:
        upload = await self.broker.store.get_upload(record.session_id, file_index)
        if upload is None:
            raise FailedPrecondition(
                Reason.UPLOAD_NOT_STARTED, "call StartStoreUpload for this file first"
            )
        return upload

    def _url_ttl(self, record: SessionRecord, now: float) -> int:
        """Seconds a URL lives: the configured TTL, never past the session's expiry."""
        return max(1, int(min(self.broker.config.s3_url_ttl_s, record.expire_s - now)))

    def _keys(self, record: SessionRecord, file_index: int) -> tuple[str, str]:
        return (
            layout.object_key(self.prefix, record.session_id, file_index),
            layout.digests_key(self.prefix, record.session_id, file_index),
        )

    # -- sender -----------------------------------------------------------------------------

    async def start_upload(
        self, name: str, token: str | None, file_index: int
    ) -> broker_pb2.StartStoreUploadResponse:
        """Create the file's multipart upload once; return its layout."""
        objects, record, entry = await self._authorize(
            name, token, file_index, Party.SENDER, UPLOAD_STATES
        )
        size, chunk = entry.size_bytes, record.session.manifest.chunk_size_bytes
        upload = await self.broker.store.get_upload(record.session_id, file_index)
        if upload is None:
            key, _ = self._keys(record, file_index)
            reserved = UploadRecord(
                record.session_id,
                file_index,
                "",
                self.broker.clock(),
                size_bytes=layout.object_size(size, chunk) + layout.digests_size(size, chunk),
                owner=self.broker.limiter.source(reflexive_ip(record.session.sender)),
            )
            quota = self.quota
            if record.session.HasField("person"):  # a person's bytes count per user
                user = record.session.person.sender_user
                reserved.owner = f"user:{user}"
                per_user = await self.broker.accounts.store_bytes_of(user)
                quota = dataclasses.replace(quota, per_owner=per_user)
            await self._check_quota(reserved, quota)  # before S3 is asked for anything
            with _s3():
                reserved.upload_id = await objects.create_upload(key)
            try:
                upload = await self.broker.store.add_upload(reserved, quota)
            except QuotaExceeded as exc:  # concurrent uploads took the room meanwhile
                with _s3(), contextlib.suppress(Unsupported):
                    await objects.abort_upload(key, reserved.upload_id)
                raise _over_quota(exc) from None
            if upload.upload_id != reserved.upload_id:  # a concurrent call recorded it first
                with _s3():
                    await objects.abort_upload(key, reserved.upload_id)
        return broker_pb2.StartStoreUploadResponse(
            part_size_bytes=layout.part_size(size, chunk),
            part_count=layout.part_count(size, chunk),
            digests_size_bytes=layout.digests_size(size, chunk),
            completed=upload.completed,
        )

    async def _check_quota(self, upload: UploadRecord, quota: StoreQuota) -> None:
        """RESOURCE_EXHAUSTED (STORE_QUOTA_EXCEEDED) if the upload's bytes would not fit.

        A first check, before S3 makes an upload; add_upload checks again atomically.
        """
        store = self.broker.store
        used, _ = await store.store_usage()
        if used + upload.size_bytes > quota.total:
            raise _over_quota(
                QuotaExceeded(
                    f"the object store would hold {used + upload.size_bytes} bytes for the"
                    f" whole broker, over the broker's limit of {quota.total}"
                )
            )
        if upload.size_bytes > min(quota.per_offer, quota.per_owner):
            raise _over_quota(
                QuotaExceeded(
                    f"this file takes {upload.size_bytes} bytes in the object store, over the"
                    f" broker's limit of {min(quota.per_offer, quota.per_owner)}"
                )
            )

    async def usage(self) -> tuple[int, int]:
        """(bytes, uploads) the object store holds or has reserved for recorded uploads."""
        return await self.broker.store.store_usage()

    async def presign_parts(
        self,
        name: str,
        token: str | None,
        file_index: int,
        part_numbers: Sequence[int],
        include_digests: bool,
    ) -> broker_pb2.PresignStorePartsResponse:
        """Upload URLs, each bound to its part and exact size."""
        objects, record, entry = await self._authorize(
            name, token, file_index, Party.SENDER, UPLOAD_STATES
        )
        size, chunk = entry.size_bytes, record.session.manifest.chunk_size_bytes
        count = layout.part_count(size, chunk)
        if len(part_numbers) > MAX_PARTS_PER_CALL:
            raise InvalidArgument(
                Reason.INVALID_ARGUMENT, f"at most {MAX_PARTS_PER_CALL} parts per call"
            )
        if any(not 1 <= n <= count for n in part_numbers):
            raise InvalidArgument(
                Reason.INVALID_ARGUMENT, f"part numbers must be between 1 and {count}"
            )
        upload = await self._upload(record, file_index)
        if upload.completed:
            raise FailedPrecondition(
                Reason.UPLOAD_COMPLETED, "this file's upload is already completed"
            )
        now = self.broker.clock()
        ttl = self._url_ttl(record, now)
        expire = timestamp(now + ttl)
        # Recorded before any URL leaves: cleanup must outlive every URL.
        await self.broker.store.extend_upload_urls(record.session_id, file_index, now + ttl)
        key, digests_key = self._keys(record, file_index)
        sizes = [(n, layout.part_length(size, chunk, n)) for n in part_numbers]
        reply = broker_pb2.PresignStorePartsResponse()
        with _s3():
            urls = await objects.presign_parts(key, upload.upload_id, sizes, ttl)
            for (number, length), url in zip(sizes, urls, strict=True):
                reply.parts.add(part_number=number, url=url, size_bytes=length, expire_time=expire)
            if include_digests:
                digests_size = layout.digests_size(size, chunk)
                url = await objects.presign_put(digests_key, digests_size, ttl)
                reply.digests.CopyFrom(
                    broker_pb2.PresignedUrl(
                        part_number=0, url=url, size_bytes=digests_size, expire_time=expire
                    )
                )
        return reply

    async def list_parts(
        self, name: str, token: str | None, file_index: int
    ) -> broker_pb2.ListStorePartsResponse:
        """The parts S3 already holds, and whether the digests object is there."""
        objects, record, entry = await self._authorize(
            name, token, file_index, Party.SENDER, UPLOAD_STATES
        )
        upload = await self._upload(record, file_index)
        key, digests_key = self._keys(record, file_index)
        expected = layout.digests_size(entry.size_bytes, record.session.manifest.chunk_size_bytes)
        with _s3():
            try:
                parts = [] if upload.completed else await objects.list_parts(key, upload.upload_id)
            except Unsupported:
                parts = None  # the server can't say which parts it has
            stored_size = layout.object_size(
                entry.size_bytes, record.session.manifest.chunk_size_bytes
            )
            if parts is None and await objects.size(key) == stored_size:
                # Joined by a CompleteStoreUpload whose caller hung up before it was recorded.
                await self.broker.store.complete_upload(record.session_id, file_index)
                upload = await self._upload(record, file_index)
            elif parts is None:
                # Gone (aborted) or unlistable: the sender uploads every part again, into a
                # fresh upload, so that PUTs of an earlier (killed) sender still in flight
                # land in the old one, not among the new parts.
                fresh = await objects.create_upload(key)
                if not await self.broker.store.replace_upload(
                    record.session_id, file_index, upload.upload_id, fresh
                ):
                    with contextlib.suppress(Unsupported):
                        await objects.abort_upload(key, fresh)
            digests_stored = await objects.size(digests_key) == expected
        return broker_pb2.ListStorePartsResponse(
            parts=[
                broker_pb2.StoredPart(part_number=p.number, size_bytes=p.size, etag=p.etag)
                for p in parts or ()
            ],
            digests_stored=digests_stored,
            completed=upload.completed,
        )

    async def complete_upload(
        self,
        name: str,
        token: str | None,
        file_index: int,
        reported: Sequence[broker_pb2.StoredPart] = (),
    ) -> broker_pb2.CompleteStoreUploadResponse:
        """Check that every part and the digests are stored, then assemble the object.

        The parts come from the object store's own list; only a server that cannot list
        them makes the broker take the sender's ``reported`` parts (number, size, ETag).
        """
        objects, record, entry = await self._authorize(
            name, token, file_index, Party.SENDER, UPLOAD_STATES
        )
        size, chunk = entry.size_bytes, record.session.manifest.chunk_size_bytes
        upload = await self._upload(record, file_index)
        stored_size = layout.object_size(size, chunk)
        reply = broker_pb2.CompleteStoreUploadResponse(size_bytes=stored_size)
        if upload.completed:
            return reply
        key, digests_key = self._keys(record, file_index)
        with _s3():
            try:
                parts = await objects.list_parts(key, upload.upload_id)
            except Unsupported:
                parts = [Part(p.part_number, p.size_bytes, p.etag) for p in reported if p.etag]
            if parts is None:  # completed by a call that died before recording it?
                if await objects.size(key) == stored_size:
                    await self.broker.store.complete_upload(record.session_id, file_index)
                    return reply
                raise FailedPrecondition(
                    Reason.PARTS_MISSING, "the upload is gone from the object store; start again"
                )
            by_number = {p.number: p for p in parts}
            problems = []
            for number in range(1, layout.part_count(size, chunk) + 1):
                want = layout.part_length(size, chunk, number)
                part = by_number.get(number)
                if part is None:
                    problems.append(f"part {number} is missing")
                elif part.size != want:
                    problems.append(f"part {number} has {part.size} bytes, not {want}")
            if await objects.size(digests_key) != layout.digests_size(size, chunk):
                problems.append("the digests object is missing or has the wrong size")
            if problems:
                more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
                raise FailedPrecondition(Reason.PARTS_MISSING, "; ".join(problems[:5]) + more)
            # Shielded: once S3 has joined the parts the upload id is gone, so the store must
            # learn it even if the sender hangs up (and its call is cancelled) meanwhile.
            await asyncio.shield(self._complete(objects, record, file_index, key, parts))
        log.info("stored file completed", extra={"session": record.session.name})
        return reply

    async def _complete(
        self,
        objects: ObjectStore,
        record: SessionRecord,
        file_index: int,
        key: str,
        parts: Sequence[Part],
    ) -> None:
        upload = await self._upload(record, file_index)
        await objects.complete_upload(key, upload.upload_id, parts)
        await self.broker.store.complete_upload(record.session_id, file_index)

    # -- receiver ---------------------------------------------------------------------------

    async def presign_download(
        self, name: str, token: str | None, file_index: int
    ) -> broker_pb2.PresignStoreDownloadResponse:
        """GET URLs for the stored file and its digests, once the upload is completed."""
        objects, record, entry = await self._authorize(
            name, token, file_index, Party.RECEIVER, DOWNLOAD_STATES
        )
        upload = await self.broker.store.get_upload(record.session_id, file_index)
        if upload is None or not upload.completed:
            return broker_pb2.PresignStoreDownloadResponse(stored=False)
        now = self.broker.clock()
        ttl = self._url_ttl(record, now)
        key, digests_key = self._keys(record, file_index)
        with _s3():
            url = await objects.presign_get(key, ttl)
            digests_url = await objects.presign_get(digests_key, ttl)
        return broker_pb2.PresignStoreDownloadResponse(
            stored=True,
            url=url,
            digests_url=digests_url,
            expire_time=timestamp(now + ttl),
            size_bytes=layout.object_size(
                entry.size_bytes, record.session.manifest.chunk_size_bytes
            ),
        )

    # -- cleanup ----------------------------------------------------------------------------

    async def clean(self) -> int:
        """Delete the objects and abort the uploads of final sessions; return how many."""
        if self.objects is None:
            return 0
        store = self.broker.store
        cleaned = 0
        while True:
            now = self.broker.clock()
            due = await store.uploads_to_clean(now, _CLEAN_BATCH)
            for upload in due:
                key = layout.object_key(self.prefix, upload.session_id, upload.file_index)
                try:
                    with contextlib.suppress(Unsupported):  # then deleting is all we can do
                        await self.objects.abort_upload(key, upload.upload_id)
                    await self.objects.delete([key, key + layout.DIGESTS_SUFFIX])
                except ObjectStoreError as exc:
                    log.warning("object cleanup failed, will retry: %s", exc)
                    retry = now + self.broker.config.sweep_interval_s
                    await store.defer_upload_cleanup(upload.session_id, upload.file_index, retry)
                    continue
                if upload.urls_expire_s > now:  # a URL holder could still PUT: once more later
                    await store.defer_upload_cleanup(
                        upload.session_id, upload.file_index, upload.urls_expire_s + 1
                    )
                else:
                    await store.delete_upload(upload.session_id, upload.file_index)
                cleaned += 1
            if len(due) < _CLEAN_BATCH:
                return cleaned

    async def abort_stale(self) -> int:
        """Abort multipart uploads under the prefix that outlived any session, unknown here."""
        if self.objects is None:
            return 0
        config = self.broker.config
        cutoff = self.broker.clock() - (config.offer_ttl_max_s + config.session_ttl_s)
        aborted = 0
        try:
            uploads = await self.objects.list_uploads(self.prefix)
        except Unsupported:
            if not self._no_stale_sweep:
                self._no_stale_sweep = True
                log.warning(
                    "the object store cannot list multipart uploads: stale uploads are left "
                    "to the bucket's lifecycle rule"
                )
            return 0
        for upload in uploads:
            if upload.initiated_s > cutoff:
                continue
            parsed = layout.parse_key(self.prefix, upload.key)
            known = parsed and await self.broker.store.get_upload(*parsed)
            if known and known.upload_id == upload.upload_id:
                continue  # its session's cleanup owns it
            owner = parsed and await self.broker.store.get_session(parsed[0])
            if owner and owner.session.state not in states.FINAL_STATES:
                # A live session's: perhaps just created and not recorded yet (StartStoreUpload
                # awaits S3 in between), and some servers (moto) report no true initiation
                # time. Once the session is over, a later sweep takes it.
                continue
            try:
                await self.objects.abort_upload(upload.key, upload.upload_id)
            except Unsupported:
                return aborted
            aborted += 1
        if aborted:
            log.info("aborted %d stale multipart uploads", aborted)
        return aborted

    async def _log_usage(self) -> None:
        """Log the bucket's use when it changed: the broker has no metrics endpoint yet."""
        usage = await self.usage()
        if usage != self._usage_logged:
            self._usage_logged = usage
            log.info(
                "object store use: %d bytes in %d uploads (limit %d)",
                usage[0],
                usage[1],
                self.quota.total,
                extra={"store_bytes": usage[0], "store_uploads": usage[1]},
            )

    async def run_cleaner(self) -> None:
        """Clean every sweep interval and abort stale uploads every stale-sweep interval."""
        if self.objects is None:
            return
        config = self.broker.config
        while True:
            try:
                await self.clean()
                await self._log_usage()
                now = self.broker.clock()
                if now - self._last_stale_sweep >= config.s3_stale_sweep_interval_s:
                    self._last_stale_sweep = now
                    await self.abort_stale()
            except Exception:
                log.exception("object-store cleanup failed")
            await asyncio.sleep(config.sweep_interval_s)
