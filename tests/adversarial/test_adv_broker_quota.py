"""Issue 10, finding 6: anonymous free storage in the object-store fallback.

Before: an anonymous store-and-forward offer got presigned PUT URLs for up to 1 TiB (3 TiB
for three offers from one address, and so on) before anyone claimed it, and claiming it
oneself gave GET URLs: free hosting. Now the broker reserves each file's sealed bytes when
its upload starts, against quotas per offer, per sender address (an IPv6 /64) and in all
(RESOURCE_EXHAUSTED, STORE_QUOTA_EXCEEDED), gives them back when the cleaner has deleted the
objects, can refuse uploads before consent altogether (``--store-forward off``:
PERMISSION_DENIED, STORE_FORWARD_DISABLED), and logs the bucket's use (the broker has no
metrics endpoint).

Against a real broker process and a real moto server on loopback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from ferry.v1 import broker_pb2, broker_pb2_grpc
from tests.support.broker_flow import (
    CLAIM_VERIFIER,
    SENDER_CERTIFICATE_MAC,
    SENDER_CONFIRMATION,
    auth,
    store_and_forward,
)
from tests.support.people import PersonDevice, enroll, offer_to, sqlite_directory
from tests.support.processes import FAST_BROKER, BrokerProcess
from tests.support.rpc import reason_of
from tests.support.s3 import S3Server

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
TiB = 1 << 40
T = 10.0
SEALED = 28
# Quotas of the broker under test: small, so that the test moves no real bytes.
PER_OFFER = 3 * MiB
PER_ADDRESS = 5 * MiB
TOTAL = 8 * MiB


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("moto") / "moto.log", kind="moto").start()
    yield server
    server.stop()


def _broker(
    tmp_path: Path, moto: S3Server, monkeypatch: pytest.MonkeyPatch, *args: str
) -> BrokerProcess:
    """A broker on 127.0.0.1 and ::1 (two sender addresses) with the moto bucket."""
    for key, value in moto.env.items():
        monkeypatch.setenv(key, value)
    broker = BrokerProcess(
        data_dir=tmp_path / "data",
        args=[
            *FAST_BROKER,
            *moto.broker_args(prefix=f"{tmp_path.name}/"),
            "--log-level", "INFO",
            "--offer-burst-per-address", "1000",
            "--store-max-bytes-per-offer", str(PER_OFFER),
            "--store-max-bytes-per-address", str(PER_ADDRESS),
            "--store-max-bytes", str(TOTAL),
            *args,
        ],
    )  # fmt: skip
    broker.listen = "localhost:0"
    try:
        broker.start()
    finally:
        for key in moto.env:
            monkeypatch.delenv(key)
    return broker


def _request(*sizes: int) -> broker_pb2.CreateOfferRequest:
    files = [
        broker_pb2.FileEntry(path=f"f{i}", size_bytes=size, mode=0o644)
        for i, size in enumerate(sizes)
    ]
    return store_and_forward(
        broker_pb2.CreateOfferRequest(
            manifest=broker_pb2.Manifest(files=files, chunk_size_bytes=MiB),
            sender=broker_pb2.PeerInfo(
                allowed_ports=broker_pb2.PortRange(first_port=47100, last_port=47999),
                certificate_der=b"sender-cert",
                key_confirmation=SENDER_CONFIRMATION,
                certificate_mac=SENDER_CERTIFICATE_MAC,
            ),
        )
    )


async def _presign_all(
    stub: broker_pb2_grpc.BrokerServiceAsyncStub, offer: broker_pb2.CreateOfferResponse
) -> tuple[int, list[str]]:
    """Start and presign every file of the offer: (bytes presigned, refusal reasons)."""
    meta = auth(offer.party_token)
    presigned, refused = 0, []
    for index in range(len(offer.session.manifest.files)):
        name = offer.session.name
        try:
            layout = await stub.StartStoreUpload(
                broker_pb2.StartStoreUploadRequest(name=name, file_index=index),
                metadata=meta,
                timeout=T,
            )
        except grpc.aio.AioRpcError as error:
            refused.append(reason_of(error))
            continue
        numbers = list(range(1, min(layout.part_count, 1000) + 1))
        urls = await stub.PresignStoreParts(
            broker_pb2.PresignStorePartsRequest(
                name=name, file_index=index, part_numbers=numbers, include_digests=True
            ),
            metadata=meta,
            timeout=T,
        )
        presigned += sum(p.size_bytes for p in urls.parts) + urls.digests.size_bytes
    return presigned, refused


@pytest.mark.asyncio
async def test_anonymous_storage_is_bounded_per_offer_address_and_in_all(
    tmp_path: Path, moto: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = _broker(tmp_path, moto, monkeypatch)
    try:
        process = psutil.Process(broker.proc.pid if broker.proc else 0)
        rss, fds = process.memory_info().rss, process.num_fds()
        port = broker.address.rpartition(":")[2]
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as v4,
            grpc.aio.insecure_channel(f"[::1]:{port}") as v6,
        ):
            one, other = (broker_pb2_grpc.BrokerServiceStub(c) for c in (v4, v6))
            # a 1 TiB offer: not a single URL (before: all 1 TiB presignable)
            huge = await one.CreateOffer(_request(*[TiB // 4] * 4), timeout=T)
            presigned, refused = await _presign_all(one, huge)
            assert presigned == 0
            assert refused == ["STORE_QUOTA_EXCEEDED"] * 4
            # one offer of 4 x 1 MiB: 2 files fit its 3 MiB (sealed sizes are a bit more)
            offer = await one.CreateOffer(_request(*[MiB] * 4), timeout=T)
            presigned, refused = await _presign_all(one, offer)
            assert presigned == 2 * (MiB + SEALED + 32 + SEALED)
            assert refused == ["STORE_QUOTA_EXCEEDED"] * 2
            # more offers from the same address: 5 MiB in all for it
            total_one = presigned
            for _ in range(4):
                more = await one.CreateOffer(_request(MiB), timeout=T)
                got, _ = await _presign_all(one, more)
                total_one += got
            print(f"presignable from one address: {total_one / MiB:.2f} MiB")
            assert total_one <= PER_ADDRESS
            assert total_one >= PER_ADDRESS - 2 * MiB
            # another address gets its own 5 MiB, up to the broker's 8 MiB in all
            total_other = 0
            for _ in range(6):
                more = await other.CreateOffer(_request(MiB), timeout=T)
                got, _ = await _presign_all(other, more)
                total_other += got
            print(f"presignable from the other: {total_other / MiB:.2f} MiB")
            assert total_one + total_other <= TOTAL
            assert total_other >= TOTAL - total_one - 2 * MiB
            # the refusal a sender sees says what and how much
            last = await other.CreateOffer(_request(MiB), timeout=T)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await other.StartStoreUpload(
                    broker_pb2.StartStoreUploadRequest(name=last.session.name, file_index=0),
                    metadata=auth(last.party_token),
                    timeout=T,
                )
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert reason_of(info.value) == "STORE_QUOTA_EXCEEDED"
            assert "over the broker's limit of" in (info.value.details() or "")
        grown = process.memory_info().rss - rss
        print(f"broker RSS +{grown / MiB:.1f} MiB, fds {fds} -> {process.num_fds()}")
        assert grown < 64 * MiB
        assert process.num_fds() <= fds + 16
        log = broker.log[-1].read_text()
        assert "object store use:" in log  # the bucket's use, for the operator
        assert "Traceback" not in log
    finally:
        broker.kill()


@pytest.mark.asyncio
async def test_ended_offers_give_their_bytes_back(
    tmp_path: Path, moto: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once an offer ends and the cleaner deleted its objects, its bytes count no more."""
    broker = _broker(tmp_path, moto, monkeypatch, "--s3-url-ttl", "1")
    try:
        async with grpc.aio.insecure_channel(broker.address.replace("localhost", "127.0.0.1")) as c:
            stub = broker_pb2_grpc.BrokerServiceStub(c)
            offers = []
            total = 0
            for _ in range(6):
                offer = await stub.CreateOffer(_request(MiB), timeout=T)
                got, _ = await _presign_all(stub, offer)
                total += got
                offers.append(offer)
            assert total <= PER_ADDRESS
            for offer in offers:
                await stub.CancelSession(
                    broker_pb2.CancelSessionRequest(name=offer.session.name),
                    metadata=auth(offer.party_token),
                    timeout=T,
                )
            fresh = await stub.CreateOffer(_request(MiB), timeout=T)
            for _ in range(100):  # the cleaner runs every 0.2 s, after the URLs expire (1 s)
                got, refused = await _presign_all(stub, fresh)
                if got:
                    break
                assert refused == ["STORE_QUOTA_EXCEEDED"]
                await asyncio.sleep(0.2)  # a cleanup that runs on a timer: nothing to await
            assert got == MiB + SEALED + 32 + SEALED
    finally:
        broker.kill()


@pytest.mark.asyncio
async def test_store_and_forward_can_be_turned_off(
    tmp_path: Path, moto: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--store-forward off: no upload before the receiver accepted; after, the fallback works."""
    broker = _broker(tmp_path, moto, monkeypatch, "--store-forward", "off")
    try:
        async with grpc.aio.insecure_channel(broker.address.replace("localhost", "127.0.0.1")) as c:
            stub = broker_pb2_grpc.BrokerServiceStub(c)
            offer = await stub.CreateOffer(_request(MiB), timeout=T)
            presigned, refused = await _presign_all(stub, offer)
            assert (presigned, refused) == (0, ["STORE_FORWARD_DISABLED"])
            claim = await stub.ClaimOffer(
                broker_pb2.ClaimOfferRequest(code=offer.code, claim_verifier=CLAIM_VERIFIER),
                timeout=T,
            )
            await stub.AcceptOffer(
                broker_pb2.AcceptOfferRequest(
                    name=offer.session.name,
                    receiver=broker_pb2.PeerInfo(
                        allowed_ports=broker_pb2.PortRange(first_port=1, last_port=2),
                        certificate_der=b"receiver-cert",
                        certificate_mac=b"R" * 32,
                    ),
                ),
                metadata=auth(claim.party_token),
                timeout=T,
            )
            presigned, refused = await _presign_all(stub, offer)
            assert presigned == MiB + SEALED + 32 + SEALED
            assert refused == []
    finally:
        broker.kill()


@pytest.mark.asyncio
async def test_a_persons_storage_counts_against_the_user_not_the_address(
    tmp_path: Path, moto: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13: a signed-in sender's offers to a person count against its user's quota
    (--user-store-bytes, or the user's own) instead of its address's; two users behind one
    address each have theirs; store-and-forward off does not stop a known sender."""
    broker = _broker(
        tmp_path,
        moto,
        monkeypatch,
        "--user-store-bytes", str(3 * MiB), "--store-forward", "off",
    )  # fmt: skip
    store, directory = sqlite_directory(broker.data_dir)
    try:
        async with grpc.aio.insecure_channel(broker.address) as channel:
            stub = broker_pb2_grpc.BrokerServiceStub(channel)
            bob = await enroll(stub, directory, "bob")
            dan = await enroll(stub, directory, "dan")
            await enroll(stub, directory, "alice")

            async def start(sender: PersonDevice, size: int) -> str:
                files = broker_pb2.Manifest(
                    files=[broker_pb2.FileEntry(path="f", size_bytes=size)], chunk_size_bytes=MiB
                )
                offer = await offer_to(stub, sender, "alice", files=files)
                request = broker_pb2.StartStoreUploadRequest(name=offer.name, file_index=0)
                try:
                    await stub.StartStoreUpload(request, metadata=auth(offer.party_token))
                except grpc.aio.AioRpcError as error:
                    return reason_of(error)
                return "OK"

            assert await start(bob, 2 * MiB) == "OK"  # store-forward off: bob is known
            assert await start(bob, 2 * MiB) == "STORE_QUOTA_EXCEEDED"  # bob's 3 MiB
            assert await start(dan, 2 * MiB) == "OK"  # same address, dan's own quota
            await directory.set_user_quotas("bob", None, 8 * MiB)  # the operator raises bob's
            assert await start(bob, 2 * MiB) == "OK"
            # ... which the address limit (5 MiB here) would have refused: bob and dan hold
            # 6 MiB from 127.0.0.1 now
    finally:
        await store.close()
        broker.kill()
