"""ObjectStore: the broker's only S3 adapter (boto3), for the object-store fallback.

The broker never moves file bytes through S3 itself: it creates, lists, completes and aborts
multipart uploads, deletes objects, and presigns URLs with which the clients move the bytes.
Every blocking boto3 call runs in a worker thread (asyncio.to_thread), so the event loop
never waits on S3. Credentials come the usual boto3 way (environment, shared files, instance
roles); AWS when no endpoint is set, else any S3 API (MinIO, Ceph, moto) with path-style
addressing.

Presigned URLs are bearer secrets. This module never logs them, and quiets botocore's own
loggers, whose DEBUG output includes signatures and canonical requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

log = logging.getLogger(__name__)

__all__ = ["ObjectStore", "ObjectStoreError", "Part", "StaleUpload", "Unsupported"]


class ObjectStoreError(Exception):
    """S3 failed or could not be reached; str() says which operation (never a URL)."""


class Unsupported(ObjectStoreError):
    """The S3-compatible server does not implement this operation (e.g. s3rver: ListParts,
    AbortMultipartUpload, ListMultipartUploads); callers fall back to what they can do."""


@dataclasses.dataclass(frozen=True, slots=True)
class Part:
    """One uploaded part of a multipart upload."""

    number: int
    size: int
    etag: str


@dataclasses.dataclass(frozen=True, slots=True)
class StaleUpload:
    """A multipart upload as S3 lists it."""

    key: str
    upload_id: str
    initiated_s: float


_NOT_FOUND = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchUpload"})
_UNSUPPORTED = frozenset({"405", "501", "MethodNotAllowed", "NotImplemented"})


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _quiet_botocore() -> None:
    """botocore logs signatures and signed requests at DEBUG: never let that through."""
    for name in ("botocore", "boto3", "s3transfer", "urllib3"):
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.INFO:
            logger.setLevel(logging.INFO)


class ObjectStore:
    """One bucket (and key prefix) of an S3-compatible store."""

    def __init__(
        self,
        bucket: str,
        *,
        endpoint: str | None = None,
        region: str | None = None,
        client: S3Client | None = None,
    ) -> None:
        _quiet_botocore()
        self.bucket = bucket
        if client is None:
            config = Config(
                signature_version="s3v4",
                s3={"addressing_style": "path" if endpoint else "auto"},
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=30,
            )
            client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint or None, region_name=region or None, config=config
            )
        self._s3 = client

    async def _run(self, what: str, fn: Any, /, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, **kwargs)
        except ClientError as exc:
            if _code(exc) in _UNSUPPORTED:
                raise Unsupported(f"S3 {what} is not supported by this server") from None
            raise ObjectStoreError(f"S3 {what} failed: {_code(exc) or 'error'}") from None
        except BotoCoreError as exc:
            raise ObjectStoreError(f"S3 {what} failed: {type(exc).__name__}") from None

    # -- multipart uploads ------------------------------------------------------------------

    async def create_upload(self, key: str) -> str:
        """Start a multipart upload of `key`; return its upload id."""
        reply = await self._run(
            "create_multipart_upload",
            self._s3.create_multipart_upload,
            Bucket=self.bucket,
            Key=key,
        )
        return str(reply["UploadId"])

    async def list_parts(self, key: str, upload_id: str) -> list[Part] | None:
        """The parts uploaded so far, by number; None if the upload is gone."""

        def run() -> list[Part] | None:
            parts: list[Part] = []
            paginator = self._s3.get_paginator("list_parts")
            try:
                for page in paginator.paginate(Bucket=self.bucket, Key=key, UploadId=upload_id):
                    parts.extend(
                        Part(int(p["PartNumber"]), int(p["Size"]), str(p["ETag"]))
                        for p in page.get("Parts", ())
                    )
            except ClientError as exc:
                if _code(exc) in _NOT_FOUND:
                    return None
                raise
            return sorted(parts, key=lambda p: p.number)

        result: list[Part] | None = await self._run("list_parts", run)
        return result

    async def complete_upload(self, key: str, upload_id: str, parts: Sequence[Part]) -> None:
        """Assemble `parts` into the object."""
        await self._run(
            "complete_multipart_upload",
            self._s3.complete_multipart_upload,
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": p.number, "ETag": p.etag} for p in parts]},
        )

    async def abort_upload(self, key: str, upload_id: str) -> None:
        """Abort the upload and drop its parts; an upload already gone is fine."""

        def run() -> None:
            try:
                self._s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except ClientError as exc:
                if _code(exc) not in _NOT_FOUND:
                    raise

        await self._run("abort_multipart_upload", run)

    async def list_uploads(self, prefix: str) -> list[StaleUpload]:
        """Every unfinished multipart upload under `prefix`."""

        def run() -> list[StaleUpload]:
            out: list[StaleUpload] = []
            paginator = self._s3.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for upload in page.get("Uploads", ()):
                    initiated = upload.get("Initiated")
                    out.append(
                        StaleUpload(
                            key=str(upload["Key"]),
                            upload_id=str(upload["UploadId"]),
                            initiated_s=initiated.timestamp()
                            if isinstance(initiated, datetime.datetime)
                            else 0.0,
                        )
                    )
            return out

        result: list[StaleUpload] = await self._run("list_multipart_uploads", run)
        return result

    # -- objects ----------------------------------------------------------------------------

    async def size(self, key: str) -> int | None:
        """The object's size, or None if there is no such object."""

        def run() -> int | None:
            try:
                reply = self._s3.head_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if _code(exc) in _NOT_FOUND:
                    return None
                raise
            return int(reply["ContentLength"])

        result: int | None = await self._run("head_object", run)
        return result

    async def delete(self, keys: Sequence[str]) -> None:
        """Delete the objects (missing ones are fine)."""
        if not keys:
            return
        reply = await self._run(
            "delete_objects",
            self._s3.delete_objects,
            Bucket=self.bucket,
            Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True},
        )
        errors = [e for e in reply.get("Errors", ()) if e.get("Code") not in _NOT_FOUND]
        if errors:
            raise ObjectStoreError(f"S3 delete_objects failed: {errors[0].get('Code')}")

    # -- presigning (no network; in a thread anyway: credentials may resolve lazily) ---------

    async def presign_parts(
        self, key: str, upload_id: str, sizes: Sequence[tuple[int, int]], expires_s: int
    ) -> list[str]:
        """PUT URLs for (part_number, exact size) pairs; Content-Length is signed."""

        def run() -> list[str]:
            return [
                self._s3.generate_presigned_url(
                    "upload_part",
                    Params={
                        "Bucket": self.bucket,
                        "Key": key,
                        "UploadId": upload_id,
                        "PartNumber": number,
                        "ContentLength": size,
                    },
                    ExpiresIn=expires_s,
                    HttpMethod="PUT",
                )
                for number, size in sizes
            ]

        result: list[str] = await self._run("presign upload_part", run)
        return result

    async def presign_put(self, key: str, size: int, expires_s: int) -> str:
        """A PUT URL for a whole object of exactly `size` bytes (Content-Length signed)."""
        result: str = await self._run(
            "presign put_object",
            self._s3.generate_presigned_url,
            ClientMethod="put_object",
            Params={"Bucket": self.bucket, "Key": key, "ContentLength": size},
            ExpiresIn=expires_s,
            HttpMethod="PUT",
        )
        return result

    async def presign_get(self, key: str, expires_s: int) -> str:
        """A GET URL for the object (any Range may be asked)."""
        result: str = await self._run(
            "presign get_object",
            self._s3.generate_presigned_url,
            ClientMethod="get_object",
            Params={"Bucket": self.bucket, "Key": key},
            ExpiresIn=expires_s,
            HttpMethod="GET",
        )
        return result
