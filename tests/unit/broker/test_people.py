"""The people Directory contract, one suite for both: SqliteDirectory and RedisDirectory.

Every contract test runs twice: on a SqliteDirectory in tmp_path and on a RedisDirectory on a
real redis-server (one per module, under a key prefix of its own per test). `People.other()`
opens a second directory over the same backing (another connection, another client): a
second broker replica, or `ferry admin` beside a running broker. What is one backend's alone
(SQLite sharing the store's connection and its full disk; Redis keys and failures) is at the
end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import pytest_asyncio
import redis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ferry.broker import people as people_module
from ferry.broker.people import (
    DeviceRecord,
    Directory,
    RedisDirectory,
    SqliteDirectory,
    UnknownUser,
    User,
    UserExists,
    check_org_name,
    check_user_name,
    enrollment_token_hash,
)
from ferry.broker.redis_store import StoreUnavailable
from ferry.broker.store import SqliteStore, StorageFull
from tests.support.processes import free_port
from tests.support.redis import STORE_KINDS, RedisServer

pytestmark = pytest.mark.timeout(60)

T0 = 1_700_000_000.0  # the broker's clock in these tests (FakeClock's epoch)


class People:
    """Directories of one kind over one backing: `first` is the test's, `other()` another."""

    def __init__(self, kind: str, path: Path, url: str | None) -> None:
        self.kind = kind
        self.path = path
        self.url = url
        self.prefix = f"t{uuid.uuid4().hex[:12]}:"
        self._sqlite: list[SqliteDirectory] = []
        self._clients: list[redis.asyncio.Redis] = []
        self.first = self.other()

    def other(self) -> Directory:
        if self.url is None:
            directory = SqliteDirectory.open(self.path)
            self._sqlite.append(directory)
            return directory
        client = redis.asyncio.Redis.from_url(
            self.url, socket_timeout=5, retry=Retry(NoBackoff(), 0)
        )
        self._clients.append(client)
        return RedisDirectory(client, self.prefix)

    def raw(self) -> redis.Redis:
        assert self.url is not None
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def presence_rows(self) -> int:
        """Streams the backing holds, expired or not."""
        if self.url is None:
            with contextlib.closing(sqlite3.connect(self.path)) as db:
                return int(db.execute("SELECT COUNT(*) FROM people_presence").fetchone()[0])
        with self.raw() as raw:
            return sum(int(raw.zcard(k)) for k in raw.scan_iter(match=f"{self.prefix}p:on:*"))

    async def aclose(self) -> None:
        for directory in self._sqlite:
            await directory.close()
        for client in self._clients:
            await client.aclose()


@pytest_asyncio.fixture(params=STORE_KINDS)
async def people(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[People]:
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else None
    backing = People(request.param, tmp_path / "broker.sqlite3", url)
    try:
        yield backing
    finally:
        await backing.aclose()


@pytest.fixture
def directory(people: People) -> Directory:
    return people.first


def _device(device_id: str, user: str = "alice", create: float = T0, **kw: object) -> DeviceRecord:
    return DeviceRecord(
        device_id=device_id,
        user=user,
        display_name=str(kw.get("name", f"{device_id}'s laptop")),
        signing_key=os.urandom(31) + b"\0",  # any bytes, a NUL included, come back
        encryption_key=b"\0" + os.urandom(31),
        create_s=create,
    )


async def _users(directory: Directory, *names: str, org: str = "default") -> None:
    for name in names:
        await directory.add_user(User(name, org, T0))


# -- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "alice", "bob.smith", "x_1-2", "0", "a" * 64])
def test_valid_names(name: str) -> None:
    assert check_user_name(name) == name
    assert check_org_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "Bad Name", "Alice", ".alice", "-a", "_a", "a" * 65, "alice\n", "al/ice", "é"]
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(ValueError, match="not a valid user name") as raised:
        check_user_name(name)
    assert "\n" not in str(raised.value)  # one line, whatever the name holds
    with pytest.raises(ValueError, match="not a valid organisation name"):
        check_org_name(name)


def test_enrollment_token_hash_is_sha256_hex() -> None:
    # echo -n abc | sha256sum
    assert enrollment_token_hash("abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


# -- users ------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_add_and_get_user(directory: Directory) -> None:
    await directory.add_user(
        User("alice", "acme", T0 + 0.25, offers_per_hour=5, store_bytes=1 << 40)
    )
    await directory.add_user(User("bob", "default", T0))
    assert await directory.get_user("alice") == User("alice", "acme", T0 + 0.25, 5, 1 << 40)
    assert await directory.get_user("bob") == User("bob", "default", T0, None, None)
    assert await directory.get_user("carol") is None
    with pytest.raises(UserExists):
        await directory.add_user(User("alice", "other", T0 + 9))
    assert (await directory.get_user("alice")) == User("alice", "acme", T0 + 0.25, 5, 1 << 40)


@pytest.mark.asyncio
async def test_add_user_checks_names_and_quotas(directory: Directory) -> None:
    with pytest.raises(ValueError, match="user name"):
        await directory.add_user(User("Bad Name", "default", T0))
    with pytest.raises(ValueError, match="organisation name"):
        await directory.add_user(User("alice", "Acme Inc", T0))
    with pytest.raises(ValueError, match="offers_per_hour"):
        await directory.add_user(User("alice", "default", T0, offers_per_hour=-1))
    assert await directory.list_users() == []


@pytest.mark.asyncio
async def test_set_user_quotas(directory: Directory) -> None:
    await _users(directory, "alice")
    await directory.set_user_quotas("alice", 10, 5000)
    assert await directory.get_user("alice") == User("alice", "default", T0, 10, 5000)
    await directory.set_user_quotas("alice", None, 0)  # back to the default; zero is a quota
    assert await directory.get_user("alice") == User("alice", "default", T0, None, 0)
    with pytest.raises(UnknownUser):
        await directory.set_user_quotas("bob", 1, 1)
    with pytest.raises(ValueError, match="store_bytes"):
        await directory.set_user_quotas("alice", 1, -5)


@pytest.mark.asyncio
async def test_list_users_by_name_and_organisation(directory: Directory) -> None:
    await _users(directory, "carol", "alice", org="acme")
    await _users(directory, "bob", "dave")
    await directory.set_user_quotas("carol", 3, None)
    assert [u.name for u in await directory.list_users()] == ["alice", "bob", "carol", "dave"]
    acme = await directory.list_users("acme")
    assert acme == [User("alice", "acme", T0), User("carol", "acme", T0, offers_per_hour=3)]
    assert await directory.list_users("nobody") == []


@pytest.mark.asyncio
async def test_remove_user_revokes_devices_and_forgets_enrollments(directory: Directory) -> None:
    await _users(directory, "alice", "bob")
    await directory.add_device(_device("a1"))
    await directory.add_device(_device("a2", create=T0 + 1))
    await directory.revoke_device("a2", T0 + 5)
    await directory.add_device(_device("b1", user="bob"))
    await directory.add_enrollment("h-alice", "alice", T0 + 3600)
    await directory.add_enrollment("h-bob", "bob", T0 + 3600)
    await directory.set_online("a1", "s", T0 + 60)

    assert await directory.remove_user("alice", T0 + 10) is True
    assert await directory.get_user("alice") is None
    assert [u.name for u in await directory.list_users()] == ["bob"]
    assert await directory.devices_of("alice") == []
    revoked = {d.device_id: d.revoked_s for d in await directory.devices_of("alice", True)}
    assert revoked == {"a1": T0 + 10, "a2": T0 + 5}  # a revoked one keeps its time
    assert await directory.online(["a1"], T0) == set()
    assert await directory.take_enrollment("h-alice", T0) is None
    with pytest.raises(UnknownUser):
        await directory.add_device(_device("a3"))
    with pytest.raises(UnknownUser):
        await directory.add_enrollment("h-2", "alice", T0 + 3600)
    assert await directory.remove_user("alice", T0 + 11) is False
    # bob is untouched
    assert [d.device_id for d in await directory.devices_of("bob")] == ["b1"]
    assert await directory.take_enrollment("h-bob", T0) == "bob"


# -- enrollments ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_enrollment_is_taken_once(directory: Directory) -> None:
    await _users(directory, "alice")
    await directory.add_enrollment("h1", "alice", T0 + 100)
    assert await directory.take_enrollment("h1", T0 + 99) == "alice"
    assert await directory.take_enrollment("h1", T0 + 99) is None
    assert await directory.take_enrollment("unknown", T0) is None
    with pytest.raises(UnknownUser):
        await directory.add_enrollment("h2", "bob", T0 + 100)


@pytest.mark.asyncio
async def test_expired_enrollment_gives_nothing_and_is_gone(directory: Directory) -> None:
    await _users(directory, "alice")
    await directory.add_enrollment("h1", "alice", T0 + 100)
    assert await directory.take_enrollment("h1", T0 + 100) is None  # at expiry: expired
    assert await directory.take_enrollment("h1", T0) is None  # and used up
    # Taking any token sweeps the expired ones: h2 is gone even for a clock that went back.
    await directory.add_enrollment("h2", "alice", T0 + 100)
    await directory.add_enrollment("h3", "alice", T0 + 900)
    assert await directory.take_enrollment("other", T0 + 500) is None
    assert await directory.take_enrollment("h2", T0) is None
    assert await directory.take_enrollment("h3", T0 + 500) == "alice"


@pytest.mark.asyncio
async def test_concurrent_takes_of_one_token_give_one_user(people: People) -> None:
    await _users(people.first, "alice")
    replicas = [people.first, people.other(), people.other()]
    for round_ in range(5):
        token = f"h{round_}"
        await people.first.add_enrollment(token, "alice", T0 + 100)
        takes = [d.take_enrollment(token, T0) for d in replicas for _ in range(3)]
        got = await asyncio.wait_for(asyncio.gather(*takes), 20)
        assert (got.count("alice"), got.count(None)) == (1, 8)


def test_sqlite_takes_in_threads_give_one_user(tmp_path: Path) -> None:
    """Two processes on one SQLite file (broker and admin; here threads, each with its own
    connection and loop): BEGIN IMMEDIATE makes the take one step across them."""
    path = tmp_path / "broker.sqlite3"

    async def setup() -> None:
        directory = SqliteDirectory.open(path)
        await _users(directory, "alice")
        for i in range(20):
            await directory.add_enrollment(f"h{i}", "alice", T0 + 100)
        await directory.close()

    asyncio.run(setup())
    start = threading.Barrier(4)

    async def take_all() -> list[str | None]:
        directory = SqliteDirectory.open(path)
        try:
            return [await directory.take_enrollment(f"h{i}", T0) for i in range(20)]
        finally:
            await directory.close()

    def in_a_thread(_: int) -> list[str | None]:
        start.wait(timeout=10)
        return asyncio.run(take_all())

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(in_a_thread, range(4), timeout=30))
    for i in range(20):
        assert [r[i] for r in results].count("alice") == 1


# -- devices ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_add_and_get_device(directory: Directory) -> None:
    await _users(directory, "alice")
    device = _device("d1", name="Alice\u2019s phone \u202e")
    await directory.add_device(device)
    assert await directory.get_device("d1") == device
    assert await directory.get_device("d2") is None
    with pytest.raises(UnknownUser):
        await directory.add_device(_device("d2", user="bob"))
    with pytest.raises(ValueError, match="exists"):
        await directory.add_device(_device("d1"))
    assert await directory.get_device("d1") == device  # the first one stays


@pytest.mark.asyncio
async def test_devices_of_by_creation(directory: Directory) -> None:
    await _users(directory, "alice", "bob")
    await directory.add_device(_device("late", create=T0 + 30))
    await directory.add_device(_device("early", create=T0 + 10))
    await directory.add_device(_device("middle", create=T0 + 20))
    await directory.add_device(_device("bobs", user="bob"))
    assert [d.device_id for d in await directory.devices_of("alice")] == [
        "early",
        "middle",
        "late",
    ]
    await directory.revoke_device("middle", T0 + 40)
    assert [d.device_id for d in await directory.devices_of("alice")] == ["early", "late"]
    every = await directory.devices_of("alice", include_revoked=True)
    assert [(d.device_id, d.revoked_s) for d in every] == [
        ("early", None),
        ("middle", T0 + 40),
        ("late", None),
    ]
    assert await directory.devices_of("nobody") == []


@pytest.mark.asyncio
async def test_devices_in_an_organisation_only(directory: Directory) -> None:
    await _users(directory, "bob", "alice", org="acme")
    await _users(directory, "mallory", org="other")
    await _users(directory, "carol")  # the default organisation
    await directory.add_device(_device("b1", user="bob"))
    await directory.add_device(_device("a2", create=T0 + 2))
    await directory.add_device(_device("a1", create=T0 + 1))
    await directory.add_device(_device("a3", create=T0 + 3))
    await directory.add_device(_device("m1", user="mallory"))
    await directory.add_device(_device("c1", user="carol"))
    await directory.revoke_device("a3", T0 + 9)
    found = await directory.devices_in("acme")
    assert [(d.user, d.device_id) for d in found] == [
        ("alice", "a1"),
        ("alice", "a2"),
        ("bob", "b1"),
    ]
    assert found[0] == await directory.get_device("a1")
    assert [d.device_id for d in await directory.devices_in("other")] == ["m1"]
    assert [d.device_id for d in await directory.devices_in("default")] == ["c1"]
    assert await directory.devices_in("nobody") == []


@pytest.mark.asyncio
async def test_revoke_device(directory: Directory) -> None:
    await _users(directory, "alice")
    device = _device("d1")
    await directory.add_device(device)
    await directory.set_online("d1", "s1", T0 + 60)
    revoked = await directory.revoke_device("d1", T0 + 5)
    assert revoked is not None
    assert revoked.revoked_s == T0 + 5
    assert (revoked.device_id, revoked.user, revoked.signing_key) == (
        "d1",
        "alice",
        device.signing_key,
    )
    assert await directory.get_device("d1") == revoked
    again = await directory.revoke_device("d1", T0 + 50)
    assert again is not None
    assert again.revoked_s == T0 + 5  # revoked once, at the first time
    assert await directory.revoke_device("unknown", T0) is None
    # Its presence ended with it, and a late refresh from a stream being torn down does not
    # bring it back.
    assert await directory.online(["d1"], T0) == set()
    await directory.set_online("d1", "s1", T0 + 60)
    assert await directory.online(["d1"], T0) == set()


# -- presence ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_presence_of_two_streams(directory: Directory) -> None:
    await _users(directory, "alice")
    for name in ("d1", "d2", "d3"):
        await directory.add_device(_device(name))
    assert await directory.online(["d1", "d2", "d3"], T0) == set()
    await directory.set_online("d1", "old", T0 + 30)
    await directory.set_online("d1", "new", T0 + 60)  # reconnecting: two streams for a moment
    await directory.set_online("d2", "s", T0 + 30)
    assert await directory.online(["d1", "d2", "d3"], T0) == {"d1", "d2"}
    await directory.set_offline("d1", "old")
    assert await directory.online(["d1", "d3"], T0) == {"d1"}
    await directory.set_offline("d1", "new")
    await directory.set_offline("d1", "never-opened")  # closing an unknown stream is harmless
    assert await directory.online(["d1", "d2", "d2"], T0) == {"d2"}
    assert await directory.online([], T0) == set()


@pytest.mark.asyncio
async def test_presence_expires_and_refreshes(people: People, directory: Directory) -> None:
    await _users(directory, "alice")
    await directory.add_device(_device("d1"))
    await directory.add_device(_device("d2"))
    await directory.set_online("d1", "a", T0 + 30)
    await directory.set_online("d1", "b", T0 + 10)
    await directory.set_online("d2", "c", T0 + 10)
    assert await directory.online(["d1", "d2"], T0 + 9.5) == {"d1", "d2"}
    assert await directory.online(["d1", "d2"], T0 + 10) == {"d1"}  # until_s > now only
    await directory.set_online("d2", "c", T0 + 40)  # a refresh of stream c
    assert await directory.online(["d1", "d2"], T0 + 35) == {"d2"}
    # Expired streams do not pile up: asking about them swept them.
    await directory.online(["d1", "d2"], T0 + 100)
    assert people.presence_rows() == 0


@pytest.mark.asyncio
async def test_unknown_device_is_never_online(directory: Directory) -> None:
    await directory.set_online("ghost", "s", T0 + 60)
    assert await directory.online(["ghost"], T0) == set()


@pytest.mark.asyncio
async def test_presence_is_shared_by_replicas(people: People) -> None:
    a, b = people.first, people.other()
    await _users(a, "alice")
    await a.add_device(_device("d1"))
    await a.set_online("d1", "on-a", T0 + 60)
    await b.set_online("d1", "on-b", T0 + 60)
    await a.set_offline("d1", "on-a")  # the replica that lost the stream
    assert await b.online(["d1"], T0) == {"d1"}
    assert await a.online(["d1"], T0) == {"d1"}


# -- audit ------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_audit_round_trip(directory: Directory) -> None:
    fields = {
        "sender": "bob",
        "recipient": "alice",
        "files": [{"path": "a/\u202eb.txt\x1b[2J", "size": 5, "digest": "00ff"}],
        "ok": True,
        "ratio": 0.5,
        "none": None,
    }
    await directory.audit("offer.created", T0 + 0.123, fields)
    await directory.audit("offer.accepted", T0 + 1, {"sender": "bob", "device": "d1"})
    entries = await directory.read_audit()
    assert [(e.event, e.time_s, e.fields) for e in entries] == [
        ("offer.created", T0 + 0.123, fields),
        ("offer.accepted", T0 + 1, {"sender": "bob", "device": "d1"}),
    ]
    assert entries[0].id != entries[1].id
    with pytest.raises(ValueError, match="JSON"):
        await directory.audit("bad", T0, {"key": b"bytes"})


@pytest.mark.asyncio
async def test_audit_filters(directory: Directory) -> None:
    events = [
        ("user.added", {"user": "alice"}),
        ("offer.created", {"sender": "bob", "recipient": "alice"}),
        ("offer.created", {"sender": "alice", "recipient": "carol"}),
        ("device.revoked", {"user": "bob", "device": "b1"}),
        ("offer.created", {"sender": "carol", "recipient": "bob", "note": "alice"}),
        ("enrollment.issued", {"user": "alice"}),
    ]
    for i, (event, fields) in enumerate(events):
        await directory.audit(event, T0 + i, fields)
    alice = await directory.read_audit(user="alice")
    assert [e.time_s - T0 for e in alice] == [0, 1, 2, 5]  # "note" is not a user field
    assert [e.event for e in await directory.read_audit(user="alice", limit=2)] == [
        "offer.created",
        "enrollment.issued",
    ]  # the last two, oldest first
    assert [e.time_s - T0 for e in await directory.read_audit(since_s=T0 + 3)] == [3, 4, 5]
    assert [e.time_s - T0 for e in await directory.read_audit(since_s=T0 + 2.5)] == [3, 4, 5]
    since = await directory.read_audit(since_s=T0 + 1, user="bob", limit=2)
    assert [e.time_s - T0 for e in since] == [3, 4]
    assert [e.time_s - T0 for e in await directory.read_audit(limit=1)] == [5]
    assert await directory.read_audit(user="nobody") == []
    assert await directory.read_audit(since_s=T0 + 6) == []


@pytest.mark.asyncio
async def test_audit_filter_reads_far_back(directory: Directory) -> None:
    """A user filter that matches rarely reads back past many entries (Redis: batches)."""
    for i in range(2500):
        await directory.audit("offer.created", T0 + i, {"sender": "alice" if i % 5 else "bob"})
    bob = await directory.read_audit(user="bob", limit=300)
    assert [e.time_s - T0 for e in bob] == list(range(1000, 2500, 5))
    assert len(await directory.read_audit(user="bob", limit=10_000)) == 500


@pytest.mark.asyncio
async def test_audit_trim(directory: Directory) -> None:
    for i in range(10):
        await directory.audit("e", T0 + i, {"user": "alice", "i": i})
    assert await directory.trim_audit(T0 + 4) == 4
    assert [e.fields["i"] for e in await directory.read_audit()] == [4, 5, 6, 7, 8, 9]
    assert await directory.trim_audit(T0 + 4) == 0
    assert await directory.trim_audit(T0 + 100) == 6
    assert await directory.read_audit() == []
    await directory.audit("after", T0 + 200, {})
    assert [e.event for e in await directory.read_audit()] == ["after"]


@pytest.mark.asyncio
async def test_audit_survives_a_clock_that_goes_back(people: People) -> None:
    a, b = people.first, people.other()  # two replicas, the second one's clock behind
    await a.audit("first", T0 + 10, {})
    await b.audit("second", T0 + 5, {})
    await a.audit("third", T0 + 10, {})
    entries = await b.read_audit()
    assert [(e.event, e.time_s) for e in entries] == [
        ("first", T0 + 10),
        ("second", T0 + 5),
        ("third", T0 + 10),
    ]


# -- SQLite only ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_sqlite_shares_the_store_connection(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "broker.sqlite3")
    try:
        directory = SqliteDirectory(store._db)
        await _users(directory, "alice")
        assert await store.broker_id()  # the store's tables and the directory's, one file
        await directory.close()  # not its connection: the store's still works
        assert await directory.get_user("alice") is not None
    finally:
        await store.close()
    reopened = SqliteDirectory.open(tmp_path / "broker.sqlite3")
    try:
        assert [u.name for u in await reopened.list_users()] == ["alice"]
    finally:
        await reopened.close()
    assert (tmp_path / "broker.sqlite3").stat().st_mode & 0o777 == 0o600


def test_sqlite_needs_autocommit(tmp_path: Path) -> None:
    with (
        sqlite3.connect(tmp_path / "x.sqlite3") as db,
        pytest.raises(ValueError, match="isolation"),
    ):
        SqliteDirectory(db)


@pytest.mark.asyncio
@pytest.mark.parametrize("shared", [False, True], ids=["own", "store's"])
async def test_sqlite_full_disk_is_storage_full(tmp_path: Path, shared: bool) -> None:
    store = SqliteStore(tmp_path / "broker.sqlite3") if shared else None
    directory = (
        SqliteDirectory(store._db) if store else SqliteDirectory.open(tmp_path / "broker.sqlite3")
    )
    db = store._db if store else directory._db
    try:
        await _users(directory, "alice")
        await directory.add_device(_device("d1"))
        (pages,) = db.execute("PRAGMA page_count").fetchone()
        db.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(StorageFull):
            await _until_full(lambda i: directory.audit("e", T0, {"n": "x" * 500 + str(i)}))
        with pytest.raises(StorageFull):
            await _until_full(lambda i: directory.add_device(_device(f"more-{i}")))
        assert not db.in_transaction  # the failed step was rolled back whole
        kept = {d.device_id for d in await directory.devices_of("alice")}
        assert kept == {"d1", *(f"more-{i}" for i in range(len(kept) - 1))}  # not the failed one
        assert await directory.get_user("alice") is not None  # reads still answer
    finally:
        await directory.close()
        if store:
            await store.close()


async def _until_full(step: Callable[[int], Awaitable[None]]) -> None:
    """Write until the store says it is full (StorageFull); fail if it never does."""
    for i in range(10_000):
        await step(i)
    raise AssertionError("10,000 writes fit in a full database")


# -- Redis only -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_redis_keys_stay_under_the_prefix(redis_server: RedisServer, tmp_path: Path) -> None:
    people = People("redis", tmp_path / "unused", redis_server.url)
    try:
        directory = people.first
        await _users(directory, "alice")
        await directory.add_device(_device("d1"))
        await directory.add_enrollment("h1", "alice", T0 + 10)
        await directory.set_online("d1", "s", T0 + 60)
        await directory.audit("e", T0, {"user": "alice"})
        with people.raw() as raw:
            keys = sorted(k.decode() for k in raw.scan_iter(match=f"{people.prefix}*"))
            assert all(k.startswith(f"{people.prefix}p:") for k in keys)
            assert 0 < raw.pttl(f"{people.prefix}p:on:d1") <= 24 * 3600 * 1000
            await directory.take_enrollment("h1", T0)
            await directory.remove_user("alice", T0)
            left = sorted(
                k.decode().removeprefix(f"{people.prefix}p:")
                for k in raw.scan_iter(match=f"{people.prefix}*")
            )
        # What stays: the revoked device and its index, the audit log.
        assert left == ["audit", "audit:ms", "d:d1", "ud:alice"]
    finally:
        await people.aclose()


@pytest.mark.asyncio
async def test_redis_unreachable_is_store_unavailable() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    client = redis.asyncio.Redis.from_url(
        url, socket_connect_timeout=2, socket_timeout=2, retry=Retry(NoBackoff(), 0)
    )
    try:
        directory = RedisDirectory(client)
        with pytest.raises(StoreUnavailable):
            await directory.get_user("alice")
        with pytest.raises(StoreUnavailable):
            await directory.take_enrollment("h", T0)
    finally:
        await client.aclose()


@pytest.mark.asyncio
async def test_audit_trim_keeps_at_most_the_newest_entries(
    directory: Directory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever their age, the log keeps at most AUDIT_MAX_ENTRIES (a flood of code offers
    within the retention cannot grow it without bound); Redis trims as it adds (~)."""
    monkeypatch.setattr(people_module, "AUDIT_MAX_ENTRIES", 5)
    for i in range(12):
        await directory.audit("e", T0 + i, {"i": i})
    await directory.trim_audit(T0 - 1)  # nothing is too old: only the count trims
    kept = [e.fields["i"] for e in await directory.read_audit()]
    if isinstance(directory, people_module.SqliteDirectory):
        assert kept == [7, 8, 9, 10, 11]
    else:  # XADD MAXLEN ~ trims whole nodes of the stream: roughly, never the newest
        assert kept[-5:] == [7, 8, 9, 10, 11]
