"""Finding 1: WatchSession fan-out amplification, against a real broker process.

The attack: one anonymous offer with a big manifest, 20 WatchSession streams that never read,
and a loop of ResumeSession calls, each of which publishes the session to every watcher. Before
the fix every update was copied into each watcher's 64-deep queue: the broker grew by about
1.3 GiB in 3.6 s (89 MiB per call with a 3.9 MB manifest). Now a party of a session may hold
only a few watches (RESOURCE_EXHAUSTED, TOO_MANY_WATCHES beyond), so may one address, and a
watcher holds only the latest snapshot, one that all watchers share: what the broker holds no
longer grows with the number of updates. A legitimate watcher still sees the final state.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import grpc
import psutil
import pytest
import pytest_asyncio

from ferry.v1 import broker_pb2, broker_pb2_grpc
from tests.conftest import BrokerFactory
from tests.support.broker_flow import RECEIVER_PAKE, auth, pake_sender
from tests.support.processes import BrokerProcess
from tests.support.rpc import reason_of

pytestmark = [pytest.mark.timeout(90), pytest.mark.asyncio]

T = 10.0  # deadline of every unary call, seconds
#: A manifest just under the broker's default max_manifest_bytes (1 MiB).
MANIFEST_BYTES = 1_000_000
#: How much the broker may grow under each attack.
RSS_BOUND = 64 << 20
if TYPE_CHECKING:
    from ferry.v1.broker_pb2_grpc import BrokerServiceAsyncStub as Stub

S = broker_pb2.Session
StubFactory = Callable[[BrokerProcess], "Stub"]


def _peer() -> broker_pb2.PeerInfo:
    return pake_sender(
        broker_pb2.PeerInfo(
            candidates=[broker_pb2.Candidate(ip="127.0.0.1", kind=broker_pb2.Candidate.KIND_HOST)],
            allowed_ports=broker_pb2.PortRange(first_port=40000, last_port=40100),
            certificate_der=b"\x30\x82fake-der",
        )
    )


def _big_offer() -> broker_pb2.CreateOfferRequest:
    """An offer whose manifest weighs about MANIFEST_BYTES (243 files with 4 KB paths)."""
    files = [
        broker_pb2.FileEntry(path=f"{i:04d}/" + "p" * 4080, size_bytes=1)
        for i in range(MANIFEST_BYTES // 4100)
    ]
    manifest = broker_pb2.Manifest(files=files, chunk_size_bytes=1 << 20)
    assert 0.9 * MANIFEST_BYTES < manifest.ByteSize() <= MANIFEST_BYTES
    return broker_pb2.CreateOfferRequest(manifest=manifest, sender=_peer())


def _rss(broker: BrokerProcess) -> int:
    assert broker.proc is not None
    return int(psutil.Process(broker.proc.pid).memory_info().rss)


def _fds(broker: BrokerProcess) -> int:
    assert broker.proc is not None
    return int(psutil.Process(broker.proc.pid).num_fds())


def _tracebacks(broker: BrokerProcess) -> int:
    return sum(path.read_text().count("Traceback") for path in broker.log)


@pytest_asyncio.fixture
async def channel_for() -> AsyncIterator[StubFactory]:
    """Open channels to brokers (each test's own); all closed at the end."""
    channels: list[grpc.aio.Channel] = []

    def make(broker: BrokerProcess) -> Stub:
        channel = grpc.aio.insecure_channel(
            broker.address, options=[("grpc.max_receive_message_length", 8 << 20)]
        )
        channels.append(channel)
        return broker_pb2_grpc.BrokerServiceStub(channel)

    yield make
    for channel in channels:
        await channel.close()


async def _open_watch(
    stub: Stub, name: str, token: str
) -> tuple[
    grpc.aio.UnaryStreamCall[broker_pb2.WatchSessionRequest, broker_pb2.WatchSessionResponse], str
]:
    """Open a watch and wait for its first answer: ('', call) served, else the refusal reason."""
    call = stub.WatchSession(
        broker_pb2.WatchSessionRequest(name=name), metadata=auth(token), timeout=60
    )
    try:
        first = await call.read()
    except grpc.aio.AioRpcError as error:
        refused = error
    else:
        assert isinstance(first, broker_pb2.WatchSessionResponse)
        return call, ""
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
    return call, reason_of(refused)


async def _resume_loop(
    stub: Stub,
    offer: broker_pb2.CreateOfferResponse,
    calls: int,
    broker: BrokerProcess,
) -> int:
    """ResumeSession `calls` times (each publishes the session); the broker's peak RSS."""
    peak = 0
    for _ in range(calls):
        await stub.ResumeSession(
            broker_pb2.ResumeSessionRequest(name=offer.session.name, peer=_peer()),
            metadata=auth(offer.party_token),
            timeout=T,
        )
        peak = max(peak, _rss(broker))
        if peak > 1 << 30:  # the unfixed broker: stop before the machine suffers
            break
    return peak


async def test_the_watch_attack_is_refused_and_the_broker_stays_small(
    broker: BrokerProcess, channel_for: StubFactory
) -> None:
    """The attack of the issue against the defaults: 20 idle watchers, 60 resumes."""
    stub = channel_for(broker)
    offer = await stub.CreateOffer(_big_offer(), timeout=T)
    name, token = offer.session.name, offer.party_token
    base, base_fds = _rss(broker), _fds(broker)
    opened = [await _open_watch(stub, name, token) for _ in range(20)]
    served = [call for call, reason in opened if not reason]
    refused = [reason for _, reason in opened if reason]
    assert len(served) == 4  # watches_per_party
    assert refused == ["TOO_MANY_WATCHES"] * 16
    peak = await _resume_loop(stub, offer, 60, broker)
    fds = _fds(broker)
    print(f"watch attack (defaults): RSS +{(peak - base) >> 20} MiB, fds {base_fds} -> {fds}")
    assert peak - base < RSS_BOUND
    assert fds - base_fds < 32  # the refused streams hold nothing
    # A watcher that reads gets the final state: the sender cancels through one of its own
    # four (the idle ones are ended first, which frees their places).
    for call in served:
        call.cancel()
    legit, reason = await _open_watch(stub, name, token)
    assert reason == ""
    await stub.CancelSession(
        broker_pb2.CancelSessionRequest(name=name, reason="done"), metadata=auth(token), timeout=T
    )
    last = None
    while (update := await legit.read()) is not grpc.aio.EOF:
        assert isinstance(update, broker_pb2.WatchSessionResponse)
        last = update.session
    assert last is not None
    assert last.state == S.STATE_CANCELLED
    assert _tracebacks(broker) == 0


async def test_watchers_coalesce_so_updates_do_not_pile_up(
    broker_factory: BrokerFactory, channel_for: StubFactory
) -> None:
    """With room for all 20 idle watchers, what the broker holds stays flat however many
    updates there are: each watcher keeps only the latest snapshot, shared by all."""
    broker = broker_factory("--watches-per-party", "21")
    stub = channel_for(broker)
    offer = await stub.CreateOffer(_big_offer(), timeout=T)
    name, token = offer.session.name, offer.party_token
    base = _rss(broker)
    opened = [await _open_watch(stub, name, token) for _ in range(20)]
    assert all(reason == "" for _, reason in opened)
    # A legitimate watcher that reads everything, in the background.
    reader = stub.WatchSession(
        broker_pb2.WatchSessionRequest(name=name), metadata=auth(token), timeout=60
    )
    seen: list[broker_pb2.Session] = []

    async def read_all() -> None:
        async for update in reader:
            seen.append(update.session)

    task = asyncio.create_task(read_all())
    warm = await _resume_loop(stub, offer, 10, broker)
    peak = await _resume_loop(stub, offer, 90, broker)
    print(
        f"20 idle watchers: RSS +{(warm - base) >> 20} MiB after 10 updates,"
        f" +{(peak - base) >> 20} MiB after 100"
    )
    # Before the fix: about 20 MiB more per update (a copy per watcher, 64 kept each).
    assert peak - warm < 16 << 20
    assert peak - base < 2 * RSS_BOUND  # about 4 MiB of gRPC buffers per idle watcher
    await stub.CancelSession(
        broker_pb2.CancelSessionRequest(name=name, reason="done"), metadata=auth(token), timeout=T
    )
    await asyncio.wait_for(task, T)
    assert seen
    assert seen[-1].state == S.STATE_CANCELLED
    times = [s.update_time.ToNanoseconds() for s in seen]
    assert times == sorted(times)  # a later state each time, never an older one
    for call, _ in opened:
        call.cancel()
    assert _tracebacks(broker) == 0


async def test_watches_are_bounded_per_party_and_per_address(
    broker_factory: BrokerFactory, channel_for: StubFactory
) -> None:
    """One party cannot take the other's watches; one address cannot hold more than its
    allowance over many sessions."""
    broker = broker_factory("--watches-per-address", "6", "--watches-per-party", "4")
    stub = channel_for(broker)
    small = broker_pb2.CreateOfferRequest(
        manifest=broker_pb2.Manifest(
            files=[broker_pb2.FileEntry(path="a.bin", size_bytes=1)], chunk_size_bytes=1 << 20
        ),
        sender=_peer(),
    )
    first = await stub.CreateOffer(small, timeout=T)
    second = await stub.CreateOffer(small, timeout=T)
    claim = await stub.ClaimOffer(
        broker_pb2.ClaimOfferRequest(code=first.code, pake_message=RECEIVER_PAKE), timeout=T
    )
    calls = []
    for name, token, want in (
        (first.session.name, first.party_token, ["", "", "", "", "TOO_MANY_WATCHES"]),
        (first.session.name, claim.party_token, [""]),  # the receiver is not crowded out
        (second.session.name, second.party_token, [""]),  # the address's sixth
    ):
        for expected in want:
            call, reason = await _open_watch(stub, name, token)
            calls.append(call)
            assert reason == expected
    # The address holds 6 now: a seventh, on either session, is refused.
    _, reason = await _open_watch(stub, second.session.name, second.party_token)
    assert reason == "TOO_MANY_WATCHES"
    # Ending watches gives their places back.
    for call in calls:
        call.cancel()
    for _ in range(200):
        _, reason = await _open_watch(stub, second.session.name, second.party_token)
        if reason == "":
            break
        await asyncio.sleep(0.02)  # the broker sees the cancellations asynchronously
    assert reason == ""
    assert _tracebacks(broker) == 0


async def test_watched_bytes_are_bounded_in_all(
    broker_factory: BrokerFactory, channel_for: StubFactory
) -> None:
    """A watcher that does not read pins about its session's size in gRPC's buffers; many
    addresses with big sessions could pin watches_total x max_manifest_bytes (4 GiB). Each
    watch counts its session's bytes against --watch-bytes-total: big sessions' watches are
    refused first, small ones still fit, and an ended watch gives its bytes back."""
    budget = 3 * MANIFEST_BYTES
    broker = broker_factory("--watch-bytes-total", str(budget), "--watches-per-party", "8")
    stub = channel_for(broker)
    big = await stub.CreateOffer(_big_offer(), timeout=T)
    small = await stub.CreateOffer(
        broker_pb2.CreateOfferRequest(
            manifest=broker_pb2.Manifest(
                files=[broker_pb2.FileEntry(path="a.bin", size_bytes=1)], chunk_size_bytes=1 << 20
            ),
            sender=_peer(),
        ),
        timeout=T,
    )
    calls = []
    reasons = []
    for _ in range(4):
        call, reason = await _open_watch(stub, big.session.name, big.party_token)
        calls.append(call)
        reasons.append(reason)
    assert reasons == ["", "", "", "TOO_MANY_WATCHES"]  # before: all four served
    call, reason = await _open_watch(stub, small.session.name, small.party_token)
    calls.append(call)
    assert reason == ""  # a small session still fits in what is left
    calls[0].cancel()
    for _ in range(200):
        call, reason = await _open_watch(stub, big.session.name, big.party_token)
        calls.append(call)
        if reason == "":
            break
        await asyncio.sleep(0.02)  # the broker sees the cancellation asynchronously
    assert reason == ""
    for call in calls:
        call.cancel()
    assert _tracebacks(broker) == 0
