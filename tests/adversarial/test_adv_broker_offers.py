"""Finding 2: offer floods, against a real broker process.

Before the fix each anonymous CreateOffer with a request_id pinned its whole response (the
manifest with it: about 5.5 MiB for a 3.9 MB manifest) in the idempotency cache for up to 24 h,
one address could make offers without limit, ended sessions were never deleted, and a full data
dir made every call INTERNAL (claims of valid codes too, and after a restart). Now the cache
keeps a few hundred bytes per offer, one address gets `offer_burst_per_address` offers and then
one per `1 / offer_refill_per_address_s` seconds (RESOURCE_EXHAUSTED, RATE_LIMITED), manifests
are bounded in bytes (INVALID_ARGUMENT), ended sessions are deleted after
`session_retention_s`, and new offers stop (RESOURCE_EXHAUSTED, STORAGE_FULL) while the data
dir has less than `min_free_disk_bytes` free, so the live sessions keep the rest.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import psutil
import pytest
import pytest_asyncio

from ferry.v1 import broker_pb2, broker_pb2_grpc
from tests.conftest import BrokerFactory
from tests.support.broker_flow import RECEIVER_PAKE, auth, confirm_keys_rpc, pake_sender
from tests.support.files import tmpfs
from tests.support.processes import FAST_BROKER, BrokerProcess
from tests.support.rpc import reason_of

if TYPE_CHECKING:
    from ferry.v1.broker_pb2_grpc import BrokerServiceAsyncStub as Stub

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio]

T = 10.0  # deadline of every call, seconds
S = broker_pb2.Session
#: A manifest just under the default max_manifest_bytes (1 MiB).
BIG = 1_000_000


def _peer() -> broker_pb2.PeerInfo:
    return pake_sender(
        broker_pb2.PeerInfo(
            candidates=[broker_pb2.Candidate(ip="127.0.0.1", kind=broker_pb2.Candidate.KIND_HOST)],
            allowed_ports=broker_pb2.PortRange(first_port=41000, last_port=41999),
            certificate_der=b"\x30\x82fake-der",
        )
    )


def _offer(manifest_bytes: int = 0, request_id: str = "") -> broker_pb2.CreateOfferRequest:
    """An offer with one small file, or with a manifest of about `manifest_bytes`."""
    if manifest_bytes:
        files = [
            broker_pb2.FileEntry(path=f"{i:06d}/" + "p" * 4080, size_bytes=1)
            for i in range(manifest_bytes // 4100)
        ]
    else:
        files = [broker_pb2.FileEntry(path="a.bin", size_bytes=5)]
    return broker_pb2.CreateOfferRequest(
        manifest=broker_pb2.Manifest(files=files, chunk_size_bytes=1 << 20),
        sender=_peer(),
        request_id=request_id,
    )


async def _outcome(call: asyncio.Future[object] | object) -> str:
    """'OK', or 'STATUS/REASON' of the refusal."""
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return f"{error.code().name}/{reason_of(error)}"
    return "OK"


def _rss(broker: BrokerProcess) -> int:
    assert broker.proc is not None
    return int(psutil.Process(broker.proc.pid).memory_info().rss)


def _log(broker: BrokerProcess) -> str:
    return "".join(path.read_text() for path in broker.log)


@pytest_asyncio.fixture
async def stub_for() -> AsyncIterator[object]:
    channels: list[grpc.aio.Channel] = []

    def make(broker: BrokerProcess) -> Stub:
        channel = grpc.aio.insecure_channel(broker.address)
        channels.append(channel)
        return broker_pb2_grpc.BrokerServiceStub(channel)

    yield make
    for channel in channels:
        await channel.close()


async def test_an_offer_flood_from_one_address_is_refused_after_its_allowance(
    broker: BrokerProcess, stub_for: object
) -> None:
    """The defaults: 60 offers in a burst, then one a second; a retry is not charged."""
    stub: Stub = stub_for(broker)  # type: ignore[operator]
    base = _rss(broker)
    first = await stub.CreateOffer(_offer(request_id="first"), timeout=T)
    started = time.monotonic()
    outcomes = Counter([await _outcome(stub.CreateOffer(_offer(), timeout=T)) for _ in range(99)])
    elapsed = time.monotonic() - started
    grown = _rss(broker) - base
    print(f"offer flood: {dict(outcomes)} in {elapsed:.1f} s, RSS +{grown >> 20} MiB")
    assert set(outcomes) == {"OK", "RESOURCE_EXHAUSTED/RATE_LIMITED"}
    assert outcomes["OK"] + 1 <= 60 + int(elapsed) + 1
    # The allowance is spent, but a retried CreateOffer still gets its first answer back.
    again = await stub.CreateOffer(_offer(request_id="first"), timeout=T)
    assert (again.code, again.party_token) == (first.code, first.party_token)
    assert grown < 32 << 20
    assert "Traceback" not in _log(broker)


async def test_remembered_offers_do_not_pin_their_manifests(
    broker: BrokerProcess, stub_for: object
) -> None:
    """50 offers with ~1 MB manifests and request ids: the idempotency cache stays small."""
    stub: Stub = stub_for(broker)  # type: ignore[operator]
    await stub.CreateOffer(_offer(BIG, request_id="warm-up"), timeout=T)
    base = _rss(broker)
    for _ in range(50):
        await stub.CreateOffer(_offer(BIG, request_id=uuid.uuid4().hex), timeout=T)
    grown = _rss(broker) - base
    print(f"50 offers of 1 MB remembered: RSS +{grown >> 20} MiB")
    assert grown < 24 << 20  # before the fix: about 1.4 MiB per offer, 70 MiB


async def test_a_manifest_over_the_byte_bound_is_invalid(
    broker: BrokerProcess, stub_for: object
) -> None:
    stub: Stub = stub_for(broker)  # type: ignore[operator]
    assert await _outcome(stub.CreateOffer(_offer(1_100_000), timeout=T)) == (
        "INVALID_ARGUMENT/INVALID_MANIFEST"
    )
    assert await _outcome(stub.CreateOffer(_offer(BIG), timeout=T)) == "OK"


def _session_ids(data_dir: Path) -> set[str]:
    """The ids of the sessions in the broker's store (read-only, beside the running broker)."""
    db = sqlite3.connect(f"file:{data_dir / 'broker.sqlite3'}?mode=ro", uri=True)
    try:
        return {str(row[0]) for row in db.execute("SELECT id FROM sessions")}
    finally:
        db.close()


async def test_ended_sessions_are_deleted_after_the_retention(
    broker_factory: BrokerFactory, stub_for: object
) -> None:
    broker = broker_factory("--session-retention", "0.5")
    stub: Stub = stub_for(broker)  # type: ignore[operator]
    ended = await stub.CreateOffer(_offer(), timeout=T)
    live = await stub.CreateOffer(_offer(), timeout=T)
    await stub.CancelSession(
        broker_pb2.CancelSessionRequest(name=ended.session.name, reason="x"),
        metadata=auth(ended.party_token),
        timeout=T,
    )
    ended_id = ended.session.name.removeprefix("sessions/")
    live_id = live.session.name.removeprefix("sessions/")
    deadline = time.monotonic() + 15
    while ended_id in _session_ids(broker.data_dir) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)  # the sweeper runs every 0.2 s (FAST_BROKER)
    assert _session_ids(broker.data_dir) >= {live_id}
    assert ended_id not in _session_ids(broker.data_dir)
    gone = await _outcome(
        stub.GetSession(
            broker_pb2.GetSessionRequest(name=ended.session.name),
            metadata=auth(ended.party_token),
            timeout=T,
        )
    )
    assert gone == "UNAUTHENTICATED/TOKEN_INVALID"
    assert "Traceback" not in _log(broker)


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs for the broker's data dir (the tests run as root)."""
    with tmpfs(tmp_path / "volume") as disk:
        yield disk


async def _claimed(stub: Stub, offer: broker_pb2.CreateOfferResponse) -> str:
    """Claim `offer` and confirm both keys; the receiver's token."""
    claim = await stub.ClaimOffer(
        broker_pb2.ClaimOfferRequest(code=offer.code, pake_message=RECEIVER_PAKE), timeout=T
    )
    await confirm_keys_rpc(stub, offer.session.name, offer.party_token, claim.party_token)
    return claim.party_token


async def _accept(stub: Stub, name: str, token: str) -> S:
    response = await stub.AcceptOffer(
        broker_pb2.AcceptOfferRequest(name=name, receiver=_peer()), metadata=auth(token), timeout=T
    )
    return response.session


async def _fill_with_offers(stub: Stub) -> Counter[str]:
    """Offer 1 MB manifests until one is refused (at most 60); the outcomes."""
    outcomes: Counter[str] = Counter()
    for _ in range(60):
        outcome = await _outcome(stub.CreateOffer(_offer(BIG), timeout=T))
        outcomes[outcome] += 1
        if outcome != "OK":
            break
    return outcomes


async def test_a_full_disk_refuses_new_offers_and_the_live_sessions_go_on(
    small_volume: Path, tmp_path: Path, stub_for: object
) -> None:
    data = small_volume / "data"
    limits = ["--min-free-disk", str(8 << 20), "--offer-burst-per-address", "1000"]
    broker = BrokerProcess(data_dir=data, args=[*FAST_BROKER, *limits])
    broker.start()
    try:
        stub: Stub = stub_for(broker)  # type: ignore[operator]
        waiting = [await stub.CreateOffer(_offer(), timeout=T) for _ in range(2)]
        base = _rss(broker)
        outcomes = await _fill_with_offers(stub)
        grown = (_rss(broker) - base) >> 20
        print(f"offers of 1 MB on a 32 MiB volume: {dict(outcomes)}, RSS +{grown} MiB")
        assert outcomes["RESOURCE_EXHAUSTED/STORAGE_FULL"] == 1
        assert 5 < outcomes["OK"] < 30
        # The offers made before the disk filled are claimed and accepted as usual.
        token = await _claimed(stub, waiting[0])
        assert (await _accept(stub, waiting[0].session.name, token)).state == S.STATE_ACCEPTED
        # ... also after a restart, when new offers are still refused.
        broker.restart()
        stub = stub_for(broker)  # type: ignore[operator]
        again = await _fill_with_offers(stub)  # the restart gave back the log's space only
        assert again["RESOURCE_EXHAUSTED/STORAGE_FULL"] == 1
        assert again["OK"] < 10
        token = await _claimed(stub, waiting[1])
        assert (await _accept(stub, waiting[1].session.name, token)).state == S.STATE_ACCEPTED
        report = broker_pb2.ReportProgressRequest(
            name=waiting[1].session.name, state=S.STATE_CONNECTING
        )
        assert await _outcome(stub.ReportProgress(report, metadata=auth(token), timeout=T)) == "OK"
        # Someone else takes the rest of the volume: still clear answers, never INTERNAL.
        filler = small_volume / "filler"
        subprocess.run(
            ["dd", "if=/dev/zero", f"of={filler}", "bs=1M"], capture_output=True, check=False
        )
        assert await _outcome(stub.CreateOffer(_offer(), timeout=T)) == (
            "RESOURCE_EXHAUSTED/STORAGE_FULL"
        )
        report.state = S.STATE_TRANSFERRING
        full = await _outcome(stub.ReportProgress(report, metadata=auth(token), timeout=T))
        assert full in ("OK", "RESOURCE_EXHAUSTED/STORAGE_FULL")
        filler.unlink()
        assert await _outcome(stub.ReportProgress(report, metadata=auth(token), timeout=T)) == "OK"
        log = _log(broker)
        assert "Traceback" not in log, log[-2000:]
    finally:
        broker.kill()
