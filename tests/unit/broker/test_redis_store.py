"""RedisStore's own behaviour: its keys, its errors, and replicas racing on a real redis-server.

The Store contract itself (shared with SqliteStore) is test_store_contract.py. Here: the key
map leaves nothing behind, prefixes keep deployments apart, a Redis that is down, hangs or is
full answers StoreUnavailable or StorageFull, and two stores (two clients, like two broker
replicas, each with its own connection pool) racing on one event loop never both win a
compare-and-set, a code claim or a port.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import redis.asyncio

from ferry.broker import leases, states
from ferry.broker.config import BrokerConfig
from ferry.broker.core import Broker
from ferry.broker.errors import Aborted, NotFound
from ferry.broker.redis_store import RedisStore, StoreUnavailable, describe_url
from ferry.broker.server import start_server
from ferry.broker.store import StaleRecord, StorageFull, UploadRecord
from ferry.v1 import broker_pb2, broker_pb2_grpc
from tests.support.broker_flow import RECEIVER_PAKE, auth, offer_request
from tests.support.redis import RedisServer, StoreFactory, session_record, token_owner
from tests.support.rpc import reason_of
from tests.support.tls import TestPKI

pytestmark = pytest.mark.timeout(60)


@pytest_asyncio.fixture
async def stores(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    async with StoreFactory("redis", tmp_path, redis_server.url) as factory:
        yield factory


async def _checked(url: str, **options: object) -> RedisStore:
    """RedisStore.from_url(url) once its `check` passed (closed if it did not)."""
    store = RedisStore.from_url(url, **options)  # type: ignore[arg-type]
    try:
        await store.check()
    except BaseException:
        await store.close()
        raise
    return store


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test alone, to stop, restart or fill."""
    with RedisServer(tmp_path / "own", appendonly=True) as server:
        yield server


# -- keys ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_key_map(stores: StoreFactory) -> None:
    store = stores()
    await store.create_session(session_record("x", request_id="req", expire=50.0))
    await store.create_session(session_record("y", state=states.COMPLETED, code_hash=None))
    rec = await store.get_session("x")
    assert rec is not None
    rec.receiver_token_hash = "r-x"
    await store.update_session(rec)
    await store.lease_ports("host-1", (10, 20), 2, "x", 50.0, now=0.0, hold_until=5.0)
    await store.add_upload(UploadRecord("x", 3, "up", 1.0, size_bytes=9, owner="10.0.0.1"))
    await store.broker_id()
    assert stores.keys() == [
        "broker_id",
        "c:c-x",
        "ended",
        "h:host-1",
        "l:x",
        "live",
        "q:req",
        "s:x",
        "s:y",
        "t:r-x",
        "t:s-x",
        "t:s-y",
        "u:3:x",
        "ubytes",
        "ubytes:offer",
        "ubytes:owner",
        "uclean",
    ]
    raw = stores.raw
    lease = raw.hgetall(f"{stores.prefix}l:x")
    assert lease == {
        b"host": b"host-1",
        b"first": b"10",
        b"last": b"11",
        b"expire": b"50.0",
        b"owner": b"",
        b"hold": b"5.0",
    }
    assert raw.get(f"{stores.prefix}t:r-x") == b"r:x"
    session = raw.hgetall(f"{stores.prefix}s:x")
    assert sorted(session) == [
        b"code", b"create", b"data", b"expire", b"receiver", b"request", b"sender", b"state",
        b"update", b"version",
    ]  # fmt: skip
    assert (session[b"version"], session[b"state"]) == (b"1", str(states.OFFERED).encode())


@pytest.mark.asyncio
async def test_deleted_sessions_leave_only_their_uploads(stores: StoreFactory) -> None:
    store = stores()
    for i, final in enumerate(sorted(states.FINAL_STATES)):
        sid = f"s{i}"
        await store.create_session(session_record(sid, request_id=f"req{i}", receiver=f"r-{sid}"))
        await store.lease_ports(f"host{i % 2}", (10, 40), 3, sid, 50.0, now=0.0, owner="o")
        rec = await store.get_session(sid)
        assert rec is not None
        rec.session.state = final
        if final != states.EXPIRED:  # what the broker does: EXPIRED keeps its code
            rec.code_hash = None
        await store.update_session(rec)
    await store.add_upload(UploadRecord("s0", 0, "up", 1.0, size_bytes=5, owner="o"))
    assert await store.delete_ended(before_s=100.0, limit=100) == len(states.FINAL_STATES)
    assert stores.keys() == ["u:0:s0", "ubytes", "ubytes:offer", "ubytes:owner", "uclean"]
    await store.delete_upload("s0", 0)
    assert stores.keys() == ["ubytes"]  # the totals, at zero
    assert await store.store_usage() == (0, 0)


@pytest.mark.asyncio
async def test_prefixes_keep_deployments_apart(redis_server: RedisServer, tmp_path: Path) -> None:
    async with (
        StoreFactory("redis", tmp_path, redis_server.url) as one,
        StoreFactory("redis", tmp_path, redis_server.url) as two,
    ):
        a, b = one(), two()
        await a.create_session(session_record("x"))
        assert await b.get_session("x") is None
        assert await b.find_by_code_hash("c-x") is None
        assert await token_owner(b, "s-x") is None
        await a.lease_ports("h", (10, 11), 2, "x", 50.0, now=0.0)
        assert await b.lease_ports("h", (10, 11), 2, "y", 50.0, now=0.0) == (10, 11)
        assert await a.broker_id() != await b.broker_id()


def test_a_redis_url_only(redis_server: RedisServer) -> None:
    with pytest.raises(ValueError, match="not a Redis URL"):
        RedisStore.from_url(f"http://127.0.0.1:{redis_server.port}")
    with pytest.raises(ValueError, match="key prefix"):
        RedisStore(redis.asyncio.Redis.from_url(redis_server.url), prefix="")
    assert describe_url("redis://user:secret@redis.example:6380/2?ssl_cert_reqs=none") == (
        "redis://redis.example:6380/2"
    )
    assert describe_url("rediss://:secret@[::1]/0") == "rediss://[::1]/0"
    assert describe_url("unix:///run/redis.sock?db=1&password=secret") == "unix:///run/redis.sock"


@pytest.mark.asyncio
async def test_a_redis_over_tls(pki: TestPKI, tmp_path: Path) -> None:
    cert, key, _ = pki.server("127.0.0.1")
    with RedisServer(tmp_path / "tls", tls=(cert, key, pki.ca_file)) as server:
        assert server.url.startswith("rediss://")
        store = RedisStore.from_url(server.url)
        try:
            await store.create_session(session_record("x"))
            assert await token_owner(store, "s-x") == ("x", states.Party.SENDER)
        finally:
            await store.close()
        # a server this client does not trust is not reached
        untrusted = f"rediss://127.0.0.1:{server.port}/0"
        with pytest.raises(StoreUnavailable, match="certificate verify failed"):
            await _checked(untrusted)


# -- failures ------------------------------------------------------------------------------


async def _assert_unavailable(call: Callable[[], Awaitable[object]], within_s: float) -> None:
    start = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        await call()
    assert time.monotonic() - start < within_s
    assert info.value.reason == "STORE_ERROR"
    assert str(info.value) == "the broker's store is unavailable; try again later"


@pytest.mark.asyncio
async def test_a_redis_that_is_down(own_server: RedisServer) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        nobody = probe.getsockname()[1]
    # nothing listens there: the start-up says where (never the password), and why
    with pytest.raises(StoreUnavailable) as info:
        await _checked(f"redis://:s3cret@127.0.0.1:{nobody}/0")
    message = str(info.value)
    assert message.startswith(f"cannot reach the Redis store at redis://127.0.0.1:{nobody}/0: ")
    assert "refused" in message
    assert "s3cret" not in message
    store = RedisStore.from_url(own_server.url, prefix="p:")
    try:
        await store.create_session(session_record("x"))
        own_server.stop()
        # at once, not after redis-py's retries (a retried script may have run once already)
        await _assert_unavailable(lambda: store.get_session("x"), within_s=1.0)
        await _assert_unavailable(lambda: store.update_session(session_record("x")), within_s=1.0)
        own_server.start()  # same port, same files (appendonly): the session is back
        got = await store.get_session("x")
        assert got is not None
        assert got.session_id == "x"
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_a_read_only_replica_is_unavailable(own_server: RedisServer) -> None:
    """During a failover a client may reach a replica: retry later, not INTERNAL."""
    raw = own_server.client()
    store = RedisStore.from_url(own_server.url, prefix="p:")
    try:
        await store.create_session(session_record("x"))
        raw.replicaof("127.0.0.1", 1)  # a primary that is not there
        raw.config_set("replica-serve-stale-data", "yes")
        assert await store.get_session("x") is not None  # reads still answer
        await _assert_unavailable(lambda: store.create_session(session_record("y")), within_s=1.0)
    finally:
        raw.replicaof("NO", "ONE")
        await store.close()


@pytest.mark.asyncio
async def test_a_redis_that_hangs(own_server: RedisServer) -> None:
    store = RedisStore.from_url(own_server.url, prefix="p:", timeout_s=0.3)
    assert own_server.proc is not None
    try:
        await store.create_session(session_record("x"))
        os.kill(own_server.proc.pid, signal.SIGSTOP)
        try:
            await _assert_unavailable(lambda: store.get_session("x"), within_s=2.0)
        finally:
            os.kill(own_server.proc.pid, signal.SIGCONT)
        assert await store.get_session("x") is not None  # a new connection; the old one was dropped
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_a_full_redis_is_storage_full(own_server: RedisServer) -> None:
    raw = own_server.client()
    store = RedisStore.from_url(own_server.url, prefix="p:")
    try:
        await store.create_session(session_record("first"))
        await store.lease_ports("h", (10, 20), 2, "first", 100.0, now=0.0)
        await store.add_upload(UploadRecord("first", 0, "up", 1.0, size_bytes=5))
        used = int(raw.info("memory")["used_memory"])
        raw.config_set("maxmemory-policy", "noeviction")
        raw.config_set("maxmemory", used + (2 << 20))
        big = session_record("big", state=states.COMPLETED, update=1.0)  # ended: the sweeper's
        big.session.manifest.files[0].path = "x" * (64 << 10)
        full = None
        for i in range(200):  # 64 KiB each: 2 MiB fill up in about 32
            big.session.name = f"sessions/big{i}"
            big.code_hash = f"c-big{i}"
            big.sender_token_hash = f"s-big{i}"
            try:
                await store.create_session(big)
            except StorageFull:
                full = i
                break
        assert full is not None, "Redis never refused a write"
        # refused whole: nothing of the refused session was written
        assert await store.get_session(f"big{full}") is None
        assert await store.find_by_code_hash(f"c-big{full}") is None
        assert await token_owner(store, f"s-big{full}") is None
        # every read still answers, the scripted ones too; writes do not
        assert await store.find_by_code_hash("c-first") is not None
        assert await store.due_for_expiry(now=1000.0, limit=1000) != []
        assert [u.upload_id for u in await store.uploads_to_clean(now=1000.0, limit=10)] == []
        with pytest.raises(StorageFull):
            await store.add_upload(UploadRecord("first", 1, "up", 1.0, size_bytes=1))
        with pytest.raises(StorageFull):
            await store.lease_ports("h", (10, 20), 2, "other", 100.0, now=0.0)
        # what frees memory still runs, and gets the room back for the writes
        await store.release_lease("first")
        await store.delete_upload("first", 0)
        assert await store.store_usage() == (0, 0)
        assert await store.delete_ended(before_s=1000.0, limit=1000) == full
        await store.create_session(big)
        assert await store.lease_ports("h", (10, 20), 2, "other", 100.0, now=0.0) == (10, 11)
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_an_evicting_redis_is_warned_of(
    own_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    own_server.client().config_set("maxmemory-policy", "allkeys-lru")
    with caplog.at_level(logging.WARNING, logger="ferry.broker.redis_store"):
        await (await _checked(own_server.url)).close()
    assert "maxmemory-policy allkeys-lru: it may evict sessions" in caplog.text


@pytest.mark.asyncio
async def test_a_broker_on_redis_answers_unavailable_while_redis_is_down(
    own_server: RedisServer, tmp_path: Path
) -> None:
    config = BrokerConfig(
        listen="127.0.0.1:0",
        data_dir=tmp_path / "data",
        store_url=own_server.url,
        reflexive_listen="off",
        sweep_interval_s=3600,
    )
    running = await start_server(config)
    try:
        assert isinstance(running.store, RedisStore)
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub = broker_pb2_grpc.BrokerServiceStub(channel)
            offer = await stub.CreateOffer(offer_request(), timeout=5)
            session_id = offer.session.name.removeprefix("sessions/")
            assert own_server.client().exists(f"ferry:s:{session_id}")  # the default prefix
            request = broker_pb2.GetSessionRequest(name=offer.session.name)
            own_server.stop()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetSession(request, metadata=auth(offer.party_token), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert reason_of(info.value) == "STORE_ERROR"
            assert info.value.details() == "the broker's store is unavailable; try again later"
            own_server.start()  # back, with its data (appendonly): so is the broker
            got = await stub.GetSession(request, metadata=auth(offer.party_token), timeout=5)
            assert got.session.name == offer.session.name
    finally:
        await running.stop(grace=1)


# -- replicas racing -----------------------------------------------------------------------

ROUNDS = 150


@pytest.mark.asyncio
async def test_two_replicas_never_both_win_a_compare_and_set(stores: StoreFactory) -> None:
    replicas = [stores(), stores()]
    await replicas[0].create_session(session_record("x"))
    barrier = asyncio.Barrier(2)
    wins: list[list[int]] = [[], []]

    async def race(me: int) -> None:
        store = replicas[me]
        for round_ in range(ROUNDS):
            rec = await store.get_session("x")
            assert rec is not None
            await barrier.wait()  # both have read the same version
            rec.session.bytes_done = me
            with contextlib.suppress(StaleRecord):  # both writes are in flight together
                await store.update_session(rec)
                wins[me].append(round_)
            await barrier.wait()  # both have written before either reads again

    await asyncio.wait_for(asyncio.gather(race(0), race(1)), 40)
    assert sorted(wins[0] + wins[1]) == list(range(ROUNDS))  # one winner in every round
    final = await replicas[1].get_session("x")
    assert final is not None
    assert final.version == ROUNDS


@pytest.mark.asyncio
async def test_replicas_racing_for_ports_never_overlap(stores: StoreFactory) -> None:
    replicas = [stores(), stores()]
    racers, attempts, size = 4, 30, 3
    allowed = (20000, 20299)  # room for 100 leases of 3; 120 are asked for
    barrier = asyncio.Barrier(racers)

    async def race(me: int) -> tuple[list[tuple[str, int, int]], int]:
        store = replicas[me % 2]
        got, refused = [], 0
        await barrier.wait()
        for i in range(attempts):
            sid = f"t{me}-{i}"
            try:
                first, last = await store.lease_ports("host", allowed, size, sid, 100.0, now=0.0)
                got.append((sid, first, last))
            except leases.NoPortsAvailable:
                refused += 1
        return got, refused

    results = await asyncio.wait_for(asyncio.gather(*(race(i) for i in range(racers))), 40)
    spans = sorted((s for got, _ in results for s in got), key=lambda s: s[1])
    assert len(spans) == 100
    assert sum(refused for _, refused in results) == racers * attempts - 100
    for (_, _, last), (_, first, _) in itertools.pairwise(spans):
        assert first > last  # no two leases share a port
    assert spans[0][1] >= allowed[0]
    assert spans[-1][2] <= allowed[1]
    assert stores.leases() == sorted(spans)


@pytest.mark.asyncio
async def test_replicas_racing_never_pass_the_owner_limit(stores: StoreFactory) -> None:
    replicas = [stores(), stores()]
    racers = 4
    barrier = asyncio.Barrier(racers)

    async def race(me: int) -> int:
        store, won = replicas[me % 2], 0
        await barrier.wait()
        for i in range(10):
            try:
                await store.lease_ports(
                    "host", (1000, 9999), 2, f"t{me}-{i}", 100.0, 0.0, owner="o", max_per_owner=5
                )
                won += 1
            except leases.TooManyLeases:
                pass
        return won

    won = await asyncio.wait_for(asyncio.gather(*(race(i) for i in range(racers))), 40)
    assert sum(won) == 5


@pytest.mark.asyncio
async def test_two_brokers_claiming_one_code_one_wins(stores: StoreFactory) -> None:
    """Two Broker replicas (one token key, as replicas must share) claim each code at once."""
    key = os.urandom(32)
    config = BrokerConfig(claim_burst_per_ip=1000, claim_burst_global=1000)
    brokers = [Broker(config, stores(), token_key=key) for _ in range(2)]
    barrier = asyncio.Barrier(2)
    rounds = 40
    codes = [
        (await brokers[i % 2].create_offer(offer_request(), "10.0.0.1")).code for i in range(rounds)
    ]
    wins: list[list[str]] = [[], []]

    async def race(me: int) -> None:
        for i, code in enumerate(codes):
            await barrier.wait()
            try:
                claim = await brokers[me].claim_offer(
                    code, f"10.0.1.{me}", pake_message=RECEIVER_PAKE
                )
                wins[me].append(f"{i}:{claim.session.name}")
            except (NotFound, Aborted):
                pass

    await asyncio.wait_for(asyncio.gather(race(0), race(1)), 40)
    assert sorted(int(w.split(":")[0]) for w in wins[0] + wins[1]) == list(range(rounds))


# -- imports -------------------------------------------------------------------------------


def test_redis_is_imported_only_by_the_redis_store() -> None:
    """`ferry send` and a broker on SQLite never load redis-py; the store loads no gRPC."""
    code = (
        "import sys, ferry.broker.server, ferry.cli.main\n"
        "assert 'redis' not in sys.modules, 'redis loaded'\n"
        "import ferry.broker.redis_store\n"
        "assert 'redis' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    code = (
        "import sys, ferry.broker.redis_store\n"
        "assert not [m for m in sys.modules if m == 'grpc' or m.startswith('grpc.')]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
