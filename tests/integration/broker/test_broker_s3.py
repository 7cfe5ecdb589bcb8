"""The object-store fallback through a real broker process and a real S3 server (moto, loopback).

Bytes go over plain HTTP to the presigned URLs (http.client), as a client in any language
would send them; boto3 is used only by the test to look at the bucket, and is never patched.

moto 5 does not verify presigned URLs (signature, expiry, signed Content-Length: a PUT of the
wrong size is accepted, and so is a URL whose key was altered). What those URLs promise is
therefore checked with tests.support.s3.verify_presigned, an independent SigV4 verifier doing
what real S3 does on each request.

The bytes PUT are what Ferry's sender sends: every chunk sealed (28 bytes longer), and the
digests sealed as one object; the broker never has the key, and only checks sizes.
"""

from __future__ import annotations

import asyncio
import datetime
import random
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

import grpc
import pytest
import pytest_asyncio
from botocore.exceptions import ClientError
from google.protobuf.duration_pb2 import Duration

from ferry.protocol import chunk_digest
from ferry.protocol.sealing import Sealer
from ferry.v1 import broker_pb2, broker_pb2_grpc
from tests.conftest import BrokerFactory
from tests.integration.broker.test_broker_grpc import _auth, _peer, reason_of
from tests.support.broker_flow import (
    CLAIM_VERIFIER,
    SENDER_CERTIFICATE_MAC,
    SENDER_CONFIRMATION,
    store_and_forward,
)
from tests.support.processes import BrokerProcess
from tests.support.s3 import S3Server, http_request, verify_presigned

if TYPE_CHECKING:
    Stub = broker_pb2_grpc.BrokerServiceAsyncStub

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]

S = broker_pb2.Session
T = 5.0
MiB = 1 << 20
CHUNK = 1 * MiB  # 8 chunks per part
SIZE = 16 * MiB + 300_000  # 17 chunks: parts of 8, 8 and 1 (300,000 bytes) chunks
DATA = random.Random(7).randbytes(SIZE)
SEALED_CHUNK = CHUNK + 28
PART = 8 * SEALED_CHUNK  # a part of 8 sealed chunks
STORED = SIZE + 17 * 28  # the object: 17 sealed chunks
# Sealed under a key of the test's own (the broker never sees one, and checks only sizes).
SEALER = Sealer(bytes(range(32)), "sessions/test")
SEALED = [SEALER.seal_chunk(0, i, 17, DATA[i * CHUNK : (i + 1) * CHUNK]) for i in range(17)]
DIGESTS = SEALER.seal_digests(
    0, 17, b"".join(chunk_digest(DATA[i : i + CHUNK]) for i in range(0, SIZE, CHUNK))
)


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1 with a bucket; killed after the module."""
    server = S3Server(tmp_path_factory.mktemp("moto") / "moto.log").start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Put moto's dummy credentials in the environment the broker processes inherit."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest_asyncio.fixture
async def channel_to() -> AsyncIterator[list[grpc.aio.Channel]]:
    channels: list[grpc.aio.Channel] = []
    yield channels
    for channel in channels:
        await channel.close()


def _stub(broker: BrokerProcess, channels: list[grpc.aio.Channel]) -> Stub:
    channel = grpc.aio.insecure_channel(broker.address)
    channels.append(channel)
    return broker_pb2_grpc.BrokerServiceStub(channel)


def _digests() -> bytes:
    """The sealed digests object (17 digests, 32 bytes each, sealed as one: + 28)."""
    return DIGESTS


async def _offer(stub: Stub, ttl_s: float | None = None) -> tuple[str, str]:
    """A two-file offer (a 3-part file and an empty one): (name, sender token)."""
    name, token, _ = await _offer_full(stub, ttl_s)
    return name, token


async def _offer_full(stub: Stub, ttl_s: float | None = None) -> tuple[str, str, str]:
    """The same, with its code: (name, sender token, code).

    A store-and-forward offer (a claim verifier, no PAKE) whose sender confirmed its key at
    once, as the sender's side does when it uploads before anyone claims.
    """
    request = broker_pb2.CreateOfferRequest(
        manifest=broker_pb2.Manifest(
            files=[
                broker_pb2.FileEntry(path="big.bin", size_bytes=SIZE, mode=0o644),
                broker_pb2.FileEntry(path="empty.txt", size_bytes=0, mode=0o644),
            ],
            chunk_size_bytes=CHUNK,
        ),
        sender=_peer(),
    )
    if ttl_s is not None:
        request.ttl.CopyFrom(Duration(seconds=int(ttl_s), nanos=int(ttl_s % 1 * 1e9)))
    offer = await stub.CreateOffer(store_and_forward(request), timeout=T)
    await stub.ConfirmKey(
        broker_pb2.ConfirmKeyRequest(
            name=offer.session.name,
            key_confirmation=SENDER_CONFIRMATION,
            certificate_mac=SENDER_CERTIFICATE_MAC,
        ),
        metadata=_auth(offer.party_token),
        timeout=T,
    )
    return offer.session.name, offer.party_token, offer.code


def _put(url: str, body: bytes) -> int:
    status, reply, _ = http_request("PUT", url, body, {"Content-Length": str(len(body))})
    assert status == 200 or status >= 400, reply
    return status


def _part(number: int) -> bytes:
    return b"".join(SEALED[(number - 1) * 8 : number * 8])


async def _expect(call: Awaitable[object], code: grpc.StatusCode, reason: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    assert reason_of(info.value) == reason


def _gone(s3: S3Server, key: str) -> bool:
    try:
        s3.client().head_object(Bucket=s3.bucket, Key=key)
    except ClientError as exc:
        return exc.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound")
    return False


def _uploads(s3: S3Server, prefix: str) -> list[str]:
    reply = s3.client().list_multipart_uploads(Bucket=s3.bucket, Prefix=prefix)
    return [u["Key"] for u in reply.get("Uploads", [])]


async def _until(predicate: Callable[[], bool], timeout: float = 8.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


async def test_store_and_forward_flow(
    s3_env: S3Server, broker_factory: BrokerFactory, channel_to: list[grpc.aio.Channel]
) -> None:
    prefix = "flow/"
    broker = broker_factory(*s3_env.broker_args(prefix), "--log-level", "DEBUG")
    stub = _stub(broker, channel_to)
    name, sender, code = await _offer_full(stub)
    session_id = name.removeprefix("sessions/")
    key = f"{prefix}{session_id}/0"
    sa = _auth(sender)

    # Store-and-forward: the sender uploads before anyone has accepted (OFFERED).
    start = await stub.StartStoreUpload(
        broker_pb2.StartStoreUploadRequest(name=name, file_index=0), metadata=sa, timeout=T
    )
    assert (start.part_size_bytes, start.part_count) == (PART, 3)
    assert start.digests_size_bytes == 17 * 32 + 28
    assert not start.completed
    again = await stub.StartStoreUpload(
        broker_pb2.StartStoreUploadRequest(name=name, file_index=0), metadata=sa, timeout=T
    )
    assert again == start
    assert _uploads(s3_env, prefix) == [key]  # idempotent: one multipart upload

    urls = await stub.PresignStoreParts(
        broker_pb2.PresignStorePartsRequest(name=name, file_index=0, part_numbers=[1, 2]),
        metadata=sa,
        timeout=T,
    )
    assert [(p.part_number, p.size_bytes) for p in urls.parts] == [(1, PART), (2, PART)]
    assert not urls.HasField("digests")
    for part in urls.parts:
        assert _put(part.url, _part(part.part_number)) == 200

    listed = await stub.ListStoreParts(
        broker_pb2.ListStorePartsRequest(name=name, file_index=0), metadata=sa, timeout=T
    )
    assert [(p.part_number, p.size_bytes) for p in listed.parts] == [(1, PART), (2, PART)]
    assert all(p.etag for p in listed.parts)
    assert not listed.digests_stored
    assert not listed.completed

    await _expect(
        stub.CompleteStoreUpload(
            broker_pb2.CompleteStoreUploadRequest(name=name, file_index=0), metadata=sa, timeout=T
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PARTS_MISSING",
    )

    rest = await stub.PresignStoreParts(
        broker_pb2.PresignStorePartsRequest(
            name=name, file_index=0, part_numbers=[3], include_digests=True
        ),
        metadata=sa,
        timeout=T,
    )
    assert rest.parts[0].size_bytes == 300_000 + 28
    assert rest.digests.part_number == 0
    assert rest.digests.size_bytes == 17 * 32 + 28
    assert _put(rest.parts[0].url, _part(3)) == 200
    assert _put(rest.digests.url, _digests()) == 200
    done = await stub.CompleteStoreUpload(
        broker_pb2.CompleteStoreUploadRequest(name=name, file_index=0), metadata=sa, timeout=T
    )
    assert done.size_bytes == STORED
    await stub.CompleteStoreUpload(  # completing again is fine
        broker_pb2.CompleteStoreUploadRequest(name=name, file_index=0), metadata=sa, timeout=T
    )
    assert _uploads(s3_env, prefix) == []

    # The receiver claims; before accepting it may not download.
    claim = await stub.ClaimOffer(
        broker_pb2.ClaimOfferRequest(code=code, claim_verifier=CLAIM_VERIFIER), timeout=T
    )
    ra = _auth(claim.party_token)
    download = broker_pb2.PresignStoreDownloadRequest(name=name, file_index=0)
    await _expect(
        stub.PresignStoreDownload(download, metadata=ra, timeout=T),
        grpc.StatusCode.FAILED_PRECONDITION,
        "WRONG_STATE",
    )
    await stub.AcceptOffer(
        broker_pb2.AcceptOfferRequest(name=name, receiver=_peer(50000, 50100)),
        metadata=ra,
        timeout=T,
    )

    # Each side only its own direction.
    await _expect(
        stub.PresignStoreDownload(download, metadata=sa, timeout=T),
        grpc.StatusCode.PERMISSION_DENIED,
        "WRONG_PARTY",
    )
    for call in (
        stub.StartStoreUpload(
            broker_pb2.StartStoreUploadRequest(name=name, file_index=1), metadata=ra, timeout=T
        ),
        stub.PresignStoreParts(
            broker_pb2.PresignStorePartsRequest(name=name, file_index=0, part_numbers=[1]),
            metadata=ra,
            timeout=T,
        ),
    ):
        await _expect(call, grpc.StatusCode.PERMISSION_DENIED, "WRONG_PARTY")

    # A file not uploaded yet is reported as not stored.
    empty = await stub.PresignStoreDownload(
        broker_pb2.PresignStoreDownloadRequest(name=name, file_index=1), metadata=ra, timeout=T
    )
    assert not empty.stored
    assert not empty.url

    got = await stub.PresignStoreDownload(download, metadata=ra, timeout=T)
    assert got.stored
    assert got.size_bytes == STORED
    first, last = 9 * SEALED_CHUNK, 10 * SEALED_CHUNK - 1  # sealed chunk 9, in part 2
    status, body, _ = http_request("GET", got.url, headers={"Range": f"bytes={first}-{last}"})
    assert status == 206
    assert body == SEALED[9]
    plain = SEALER.open_chunk(0, 9, 17, body)
    assert plain == DATA[9 * CHUNK : 10 * CHUNK]
    status, digests, _ = http_request("GET", got.digests_url)
    assert status == 200
    assert digests == _digests()
    assert SEALER.open_digests(0, 17, digests)[9] == chunk_digest(plain)

    # Verified completion: the broker deletes both objects.
    for state in (S.STATE_TRANSFERRING, S.STATE_COMPLETED):
        await stub.ReportProgress(
            broker_pb2.ReportProgressRequest(name=name, state=state, bytes_done=SIZE),
            metadata=ra,
            timeout=T,
        )
    await _until(lambda: _gone(s3_env, key) and _gone(s3_env, f"{key}.digests"))
    await _expect(
        stub.StartStoreUpload(
            broker_pb2.StartStoreUploadRequest(name=name, file_index=1), metadata=sa, timeout=T
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "WRONG_STATE",
    )

    # Presigned URLs are bearer secrets: the broker logged at DEBUG and never wrote one.
    broker.stop()
    log = "".join(path.read_text() for path in broker.log)
    assert "DEBUG" in log
    assert "X-Amz-Signature" not in log
    assert "Signature=" not in log
    for url in (*[p.url for p in urls.parts], rest.digests.url, got.url):
        assert urllib.parse.urlsplit(url).query not in log


async def test_presigned_urls_are_bound_to_key_and_size(
    s3_env: S3Server, broker_factory: BrokerFactory, channel_to: list[grpc.aio.Channel]
) -> None:
    broker = broker_factory(*s3_env.broker_args("bound/"), "--s3-url-ttl", "60")
    stub = _stub(broker, channel_to)
    (name_a, token_a), (name_b, _) = await _offer(stub), await _offer(stub)
    for name, token in ((name_a, token_a),):
        await stub.StartStoreUpload(
            broker_pb2.StartStoreUploadRequest(name=name, file_index=0),
            metadata=_auth(token),
            timeout=T,
        )
    urls = await stub.PresignStoreParts(
        broker_pb2.PresignStorePartsRequest(
            name=name_a, file_index=0, part_numbers=[3], include_digests=True
        ),
        metadata=_auth(token_a),
        timeout=T,
    )
    part, digests = urls.parts[0], urls.digests
    lifetime = part.expire_time.ToSeconds() - datetime.datetime.now(datetime.UTC).timestamp()
    assert 50 < lifetime <= 61

    for url, size in ((part.url, part.size_bytes), (digests.url, digests.size_bytes)):
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
        assert query["X-Amz-SignedHeaders"] == ["content-length;host"]
        assert query["X-Amz-Expires"] == ["60"]
        good = {"Content-Length": str(size)}
        assert verify_presigned("PUT", url, good) is None
        # Another size: the signature covers Content-Length.
        assert verify_presigned("PUT", url, {"Content-Length": str(size + 1)}) is not None
        # Another method (reading with an upload URL).
        assert verify_presigned("GET", url, good) is not None
        # Another transfer's object: the key is in the signature.
        other = url.replace(name_a.removeprefix("sessions/"), name_b.removeprefix("sessions/"))
        assert other != url
        assert verify_presigned("PUT", other, good) == "signature does not match"
        # After its expiry.
        later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=61)
        assert verify_presigned("PUT", url, good, now=later) == "expired"

    # Another part number of the same upload is another signature, too.
    other_part = part.url.replace("partNumber=3", "partNumber=1")
    assert verify_presigned("PUT", other_part, {"Content-Length": str(part.size_bytes)}) is not None

    # moto itself takes a wrong-size PUT (it checks no signature); real S3 answers 403.
    status, _, _ = http_request("PUT", part.url, b"x" * 10, {"Content-Length": "10"})
    assert status == 200  # documents moto's leniency; see the module docstring

    # Out-of-range requests are refused before anything is signed.
    await _expect(
        stub.PresignStoreParts(
            broker_pb2.PresignStorePartsRequest(name=name_a, file_index=0, part_numbers=[4]),
            metadata=_auth(token_a),
            timeout=T,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    await _expect(
        stub.StartStoreUpload(
            broker_pb2.StartStoreUploadRequest(name=name_a, file_index=2),
            metadata=_auth(token_a),
            timeout=T,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    await _expect(
        stub.PresignStoreParts(
            broker_pb2.PresignStorePartsRequest(name=name_a, file_index=1, part_numbers=[1]),
            metadata=_auth(token_a),
            timeout=T,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "UPLOAD_NOT_STARTED",
    )


@pytest.mark.slow
async def test_expiry_aborts_upload_and_deletes_objects(
    s3_env: S3Server, broker_factory: BrokerFactory, channel_to: list[grpc.aio.Channel]
) -> None:
    prefix = "expiry/"
    broker = broker_factory(*s3_env.broker_args(prefix))
    stub = _stub(broker, channel_to)
    name, token = await _offer(stub, ttl_s=2.0)
    key = f"{prefix}{name.removeprefix('sessions/')}/0"
    await stub.StartStoreUpload(
        broker_pb2.StartStoreUploadRequest(name=name, file_index=0),
        metadata=_auth(token),
        timeout=T,
    )
    urls = await stub.PresignStoreParts(
        broker_pb2.PresignStorePartsRequest(
            name=name, file_index=0, part_numbers=[3], include_digests=True
        ),
        metadata=_auth(token),
        timeout=T,
    )
    # URLs never outlive the session.
    assert urls.parts[0].expire_time.ToSeconds() <= (
        datetime.datetime.now(datetime.UTC).timestamp() + 3
    )
    assert _put(urls.parts[0].url, _part(3)) == 200
    assert _put(urls.digests.url, _digests()) == 200
    assert _uploads(s3_env, prefix) == [key]
    assert not _gone(s3_env, f"{key}.digests")

    await _until(lambda: not _uploads(s3_env, prefix) and _gone(s3_env, f"{key}.digests"))
    session = await stub.GetSession(
        broker_pb2.GetSessionRequest(name=name), metadata=_auth(token), timeout=T
    )
    assert session.session.state == S.STATE_EXPIRED


async def test_stale_uploads_are_aborted(
    s3_env: S3Server, broker_factory: BrokerFactory, channel_to: list[grpc.aio.Channel]
) -> None:
    """Uploads under the prefix that no session knows are aborted; known and foreign ones kept.

    moto lists every multipart upload as initiated on 2010-11-10, so the age condition
    (older than any session can live) always holds here; tests/unit covers the cutoff.
    """
    prefix = "stale/"
    client = s3_env.client()
    client.create_multipart_upload(Bucket=s3_env.bucket, Key=f"{prefix}gone/0")
    outside = client.create_multipart_upload(Bucket=s3_env.bucket, Key="elsewhere/0")
    broker = broker_factory(*s3_env.broker_args(prefix), "--s3-stale-sweep-interval", "0.2")
    stub = _stub(broker, channel_to)
    name, token = await _offer(stub)
    await stub.StartStoreUpload(
        broker_pb2.StartStoreUploadRequest(name=name, file_index=0),
        metadata=_auth(token),
        timeout=T,
    )
    live = f"{prefix}{name.removeprefix('sessions/')}/0"
    await _until(lambda: _uploads(s3_env, prefix) == [live], timeout=10)
    await asyncio.sleep(0.6)  # a few more stale sweeps: the live session's upload stays
    assert _uploads(s3_env, prefix) == [live]
    assert _uploads(s3_env, "elsewhere/") == ["elsewhere/0"]
    client.abort_multipart_upload(
        Bucket=s3_env.bucket, Key="elsewhere/0", UploadId=outside["UploadId"]
    )


async def test_a_live_sessions_unrecorded_upload_waits_for_its_end(
    s3_env: S3Server, broker_factory: BrokerFactory, channel_to: list[grpc.aio.Channel]
) -> None:
    """An upload under a live session that the store has not recorded (StartStoreUpload
    between S3's answer and its record, or a crash there) is left while the session lives,
    and aborted by a sweep once it is over."""
    prefix = "unrecorded/"
    broker = broker_factory(*s3_env.broker_args(prefix), "--s3-stale-sweep-interval", "0.2")
    stub = _stub(broker, channel_to)
    name, token = await _offer(stub)
    key = f"{prefix}{name.removeprefix('sessions/')}/0"
    s3_env.client().create_multipart_upload(Bucket=s3_env.bucket, Key=key)
    await asyncio.sleep(0.8)  # several sweeps
    assert _uploads(s3_env, prefix) == [key]
    await stub.CancelSession(
        broker_pb2.CancelSessionRequest(name=name, reason="test"), metadata=_auth(token), timeout=T
    )
    await _until(lambda: _uploads(s3_env, prefix) == [], timeout=10)


async def test_without_s3_the_fallback_is_unavailable(
    broker: BrokerProcess, channel_to: list[grpc.aio.Channel]
) -> None:
    stub = _stub(broker, channel_to)
    name, token = await _offer(stub)
    md = _auth(token)
    calls: list[Awaitable[object]] = [
        stub.StartStoreUpload(
            broker_pb2.StartStoreUploadRequest(name=name), metadata=md, timeout=T
        ),
        stub.PresignStoreParts(
            broker_pb2.PresignStorePartsRequest(name=name), metadata=md, timeout=T
        ),
        stub.ListStoreParts(broker_pb2.ListStorePartsRequest(name=name), metadata=md, timeout=T),
        stub.CompleteStoreUpload(
            broker_pb2.CompleteStoreUploadRequest(name=name), metadata=md, timeout=T
        ),
        stub.PresignStoreDownload(
            broker_pb2.PresignStoreDownloadRequest(name=name), metadata=md, timeout=T
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert reason_of(info.value) == "STORE_UNAVAILABLE"
        assert "no S3 bucket configured" in (info.value.details() or "")
    # Without a token it is still an authentication error first.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.StartStoreUpload(broker_pb2.StartStoreUploadRequest(name=name), timeout=T)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture(scope="module")
def s3rver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """s3rver on 127.0.0.1 with a bucket (installed on first use; see tests/support/s3.py)."""
    server = S3Server(tmp_path_factory.mktemp("s3rver") / "s3rver.log", kind="s3rver").start()
    yield server
    server.stop()


async def test_s3rver_refuses_expired_presigned_urls(
    s3rver: S3Server,
    broker_factory: BrokerFactory,
    channel_to: list[grpc.aio.Channel],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What a real server enforces on the broker's URLs: s3rver 3.7.1 refuses an expired one.

    It does not verify SigV4 signatures (only the access key id and X-Amz-Date + X-Amz-Expires;
    see tests/support/s3.py), so a part URL of transfer A pointed at transfer B's object is
    accepted by s3rver as by moto: that binding is shown by verify_presigned in
    test_presigned_urls_are_bound_to_key_and_size, and is enforced by real S3, MinIO and Ceph.
    """
    for key, value in s3rver.env.items():
        monkeypatch.setenv(key, value)
    broker = broker_factory(*s3rver.broker_args("s3rver/"), "--s3-url-ttl", "2")
    stub = _stub(broker, channel_to)
    (name_a, token_a), (name_b, _) = await _offer(stub), await _offer(stub)
    await stub.StartStoreUpload(
        broker_pb2.StartStoreUploadRequest(name=name_a, file_index=0),
        metadata=_auth(token_a),
        timeout=T,
    )
    urls = await stub.PresignStoreParts(
        broker_pb2.PresignStorePartsRequest(name=name_a, file_index=0, part_numbers=[3]),
        metadata=_auth(token_a),
        timeout=T,
    )
    url = urls.parts[0].url
    other = url.replace(name_a.removeprefix("sessions/"), name_b.removeprefix("sessions/"))
    length = str(urls.parts[0].size_bytes)
    bad = verify_presigned("PUT", other, {"Content-Length": length}, s3rver.secret_key)
    assert bad == "signature does not match"
    # s3rver's leniency, pinned: it takes the altered URL (real S3 answers 403).
    assert _put(other, _part(3)) == 200
    assert _put(url, _part(3)) == 200
    await asyncio.sleep(2.2)  # X-Amz-Expires=2 from X-Amz-Date (whole seconds)
    status, reply, _ = http_request("PUT", url, _part(3), {"Content-Length": length})
    assert status == 403
    assert b"AccessDenied" in reply
    assert b"expired" in reply
