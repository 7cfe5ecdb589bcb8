"""The Store contract, one suite for both stores: SqliteStore and RedisStore.

Every test runs twice, on a SqliteStore in tmp_path and on a RedisStore on a real
redis-server (one per module; each test under a key prefix of its own). `stores()` opens
another store over the same backing: a second replica. What is SQLite's alone (reopening a
file, migrating old files) is in test_broker_store.py; what is Redis's alone (its keys, its
errors, replicas racing) in test_redis_store.py.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ferry.broker import leases, states
from ferry.broker.core import timestamp
from ferry.broker.redis_store import DuplicateSession
from ferry.broker.store import (
    CodeTaken,
    QuotaExceeded,
    SessionRecord,
    StaleRecord,
    Store,
    StoreQuota,
    UploadRecord,
)
from tests.support.redis import StoreFactory, session_record, token_owner

pytestmark = pytest.mark.timeout(60)

Party = states.Party
LIVE = sorted(states.LIVE_STATES)
FINAL = sorted(states.FINAL_STATES)


def _ids(records: list[SessionRecord]) -> list[str]:
    return [r.session_id for r in records]


async def _get(store: Store, session_id: str) -> SessionRecord:
    got = await store.get_session(session_id)
    assert got is not None, session_id
    return got


# -- sessions ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_create_and_get(store: Store) -> None:
    rec = session_record("one", request_id="req-1", receiver="r-one", verifier=b"v" * 32)
    await store.create_session(rec)
    got = await _get(store, "one")
    assert got == rec  # the proto, every hash, the request id, the verifier, version 0
    assert await store.get_session("other") is None
    plain = session_record("plain")
    await store.create_session(plain)
    assert await _get(store, "plain") == plain  # no receiver, request id, verifier: None


@pytest.mark.asyncio
async def test_creating_an_existing_id_fails_and_keeps_the_first(store: Store) -> None:
    await store.create_session(session_record("x", expire=100.0))
    with pytest.raises((sqlite3.IntegrityError, DuplicateSession)):
        await store.create_session(session_record("x", expire=999.0, code_hash="other"))
    assert (await _get(store, "x")).expire_s == 100.0
    assert await store.find_by_code_hash("other") is None


@pytest.mark.asyncio
async def test_compare_and_set(store: Store) -> None:
    await store.create_session(session_record("x"))
    a = await _get(store, "x")
    b = await _get(store, "x")
    a.session.state = states.ACCEPTED
    stored = await store.update_session(a)
    assert stored.version == 1
    assert ((await _get(store, "x")).version, (await _get(store, "x")).session.state) == (
        1,
        states.ACCEPTED,
    )
    b.session.state = states.DECLINED
    with pytest.raises(StaleRecord):
        await store.update_session(b)  # read at version 0: loses, changes nothing
    assert (await _get(store, "x")).session.state == states.ACCEPTED
    b = await _get(store, "x")
    b.session.state = states.CANCELLED
    assert (await store.update_session(b)).version == 2
    with pytest.raises(StaleRecord):
        await store.update_session(session_record("missing"))  # nothing to update


@pytest.mark.asyncio
async def test_an_update_keeps_what_only_creation_sets(store: Store) -> None:
    await store.create_session(session_record("x", request_id="req", verifier=b"v" * 32))
    rec = await _get(store, "x")
    rec.claim_verifier = None
    rec.request_id = None
    rec.sender_token_hash = "s-other"
    await store.update_session(rec)
    got = await _get(store, "x")
    assert (got.claim_verifier, got.request_id, got.sender_token_hash) == (
        b"v" * 32,
        "req",
        "s-x",
    )
    assert await token_owner(store, "s-x") == ("x", Party.SENDER)
    assert await token_owner(store, "s-other") is None


@pytest.mark.asyncio
async def test_find_by_code_hash_is_the_newest_holder(store: Store) -> None:
    # "old" ended and expired before "new" took its nameplate (create_session: CodeTaken)
    ended = session_record("old", state=states.EXPIRED, create=1.0, expire=1.5, code_hash="same")
    await store.create_session(ended)
    await store.create_session(session_record("new", create=2.0, code_hash="same"))
    await store.create_session(session_record("other", create=3.0))
    assert _get_found(await store.find_by_code_hash("same")) == "new"
    # clearing a code (a claimed offer that ended) takes it out of the index
    new = await _get(store, "new")
    new.code_hash = None
    await store.update_session(new)
    assert _get_found(await store.find_by_code_hash("same")) == "old"
    old = await _get(store, "old")
    old.code_hash = None
    await store.update_session(old)
    assert await store.find_by_code_hash("same") is None
    # a code set again (or changed) by an update is found under its new hash only
    old = await _get(store, "old")
    old.code_hash = "again"
    await store.update_session(old)
    assert _get_found(await store.find_by_code_hash("again")) == "old"
    assert _get_found(await store.find_by_code_hash("c-other")) == "other"
    assert await store.find_by_code_hash("nope") is None


@pytest.mark.asyncio
async def test_a_nameplate_a_claim_could_still_find_is_not_given_twice(store: Store) -> None:
    await store.create_session(session_record("live", create=1.0, expire=100.0, code_hash="n"))
    with pytest.raises(CodeTaken):  # a live holder
        await store.create_session(session_record("second", create=2.0, code_hash="n"))
    await store.create_session(
        session_record("ended", state=states.CANCELLED, create=1.0, expire=50.0, code_hash="e")
    )
    with pytest.raises(CodeTaken):  # ended, not yet expired: its claimant is told so
        await store.create_session(session_record("early", create=49.0, code_hash="e"))
    await store.create_session(session_record("late", create=51.0, code_hash="e"))
    assert await store.get_session("second") is None
    assert await store.get_session("early") is None
    live = await _get(store, "live")
    live.code_hash = None  # claimed: the nameplate is free again
    await store.update_session(live)
    await store.create_session(session_record("after", create=3.0, code_hash="n"))


@pytest.mark.asyncio
async def test_replicas_creating_with_one_nameplate_one_wins(stores: StoreFactory) -> None:
    one, two = stores(), stores()
    for round_ in range(20):
        results = await asyncio.gather(
            one.create_session(session_record(f"a{round_}", code_hash=f"n{round_}")),
            two.create_session(session_record(f"b{round_}", code_hash=f"n{round_}")),
            return_exceptions=True,
        )
        assert sorted(type(r).__name__ for r in results) == ["CodeTaken", "NoneType"], results


def _get_found(found: SessionRecord | None) -> str:
    assert found is not None
    return found.session_id


@pytest.mark.asyncio
async def test_session_by_token_hash_for_both_parties(store: Store) -> None:
    await store.create_session(session_record("one"))
    assert await token_owner(store, "s-one") == ("one", Party.SENDER)
    assert await token_owner(store, "r-one") is None
    rec = await _get(store, "one")
    rec.receiver_token_hash = "r-one"  # the receiver's token comes with its claim
    await store.update_session(rec)
    assert await token_owner(store, "r-one") == ("one", Party.RECEIVER)
    assert await token_owner(store, "s-one") == ("one", Party.SENDER)
    rec = await _get(store, "one")
    rec.receiver_token_hash = "r-two"  # a new claim token: the old one finds nothing
    await store.update_session(rec)
    assert await token_owner(store, "r-one") is None
    assert await token_owner(store, "r-two") == ("one", Party.RECEIVER)
    await store.create_session(session_record("born-claimed", receiver="r-born"))
    assert await token_owner(store, "r-born") == ("born-claimed", Party.RECEIVER)
    assert await token_owner(store, "nope") is None


@pytest.mark.asyncio
async def test_find_by_request_id_is_the_newest(store: Store) -> None:
    await store.create_session(session_record("a", create=5.0, request_id="req"))
    await store.create_session(session_record("b", create=7.0, request_id="req"))
    await store.create_session(session_record("c", create=6.0, request_id="other"))
    assert _get_found(await store.find_by_request_id("req")) == "b"
    assert _get_found(await store.find_by_request_id("other")) == "c"
    assert await store.find_by_request_id("nope") is None


# -- expiry and deletion -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_due_for_expiry(store: Store) -> None:
    for i, state in enumerate(LIVE):
        await store.create_session(session_record(f"live{i}", state=state, expire=10.0 + i))
    await store.create_session(session_record("later", expire=50.0))
    for i, state in enumerate(FINAL):
        await store.create_session(session_record(f"final{i}", state=state, expire=1.0))
    due = await store.due_for_expiry(now=13.0, limit=10)
    assert _ids(due) == ["live0", "live1", "live2", "live3"]  # oldest first; 13.0 inclusive
    assert due[0] == await _get(store, "live0")
    assert _ids(await store.due_for_expiry(now=13.0, limit=2)) == ["live0", "live1"]
    assert await store.due_for_expiry(now=9.0, limit=10) == []
    # an update moves the expiry, or ends the session: no longer due
    rec = await _get(store, "live0")
    rec.session.expire_time.CopyFrom(timestamp(40.0))
    await store.update_session(rec)
    rec = await _get(store, "live1")
    rec.session.state = states.EXPIRED
    await store.update_session(rec)
    assert _ids(await store.due_for_expiry(now=45.0, limit=10)) == ["live2", "live3", "live0"]


@pytest.mark.asyncio
async def test_delete_ended(store: Store) -> None:
    for i, state in enumerate(FINAL):  # ended at 10, 11, 12, 13, 14
        await store.create_session(
            session_record(f"f{i}", state=state, update=10.0 + i, request_id=f"q{i}")
        )
    await store.create_session(session_record("live", expire=1.0, update=1.0))  # overdue, but live
    await store.create_session(session_record("recent", state=states.COMPLETED, update=100.0))
    await store.add_upload(UploadRecord("f0", 0, "up", 1.0))
    assert await store.lease_ports("h", (7000, 7009), 2, "f0", 500.0, now=0.0) == (7000, 7001)
    assert await store.delete_ended(before_s=9.0, limit=10) == 0
    assert await store.delete_ended(before_s=13.0, limit=3) == 3  # 13 inclusive, limit respected
    assert await store.delete_ended(before_s=13.0, limit=3) == 1
    assert await store.delete_ended(before_s=13.0, limit=3) == 0
    kept = [s for s in ("f0", "f1", "f2", "f3", "f4") if await store.get_session(s)]
    assert kept == ["f4"]
    for i in range(4):  # nothing finds them any more
        assert await store.find_by_code_hash(f"c-f{i}") is None
        assert await store.find_by_request_id(f"q{i}") is None
        assert await token_owner(store, f"s-f{i}") is None
    assert await store.get_session("live") is not None
    assert await store.get_session("recent") is not None
    # the lease went with its session (its ports are free), the upload stays for the cleaner
    assert await store.lease_ports("h", (7000, 7009), 2, "other", 500.0, now=0.0) == (7000, 7001)
    assert await store.get_upload("f0", 0) is not None
    assert [u.session_id for u in await store.uploads_to_clean(10.0, 10)] == ["f0"]


@pytest.mark.asyncio
async def test_a_session_ended_by_an_update_is_deleted_by_its_update_time(store: Store) -> None:
    await store.create_session(session_record("x", expire=1000.0))
    rec = await _get(store, "x")
    rec.session.state = states.CANCELLED
    rec.session.update_time.CopyFrom(timestamp(20.0))
    await store.update_session(rec)
    assert await store.delete_ended(before_s=19.0, limit=10) == 0
    assert await store.delete_ended(before_s=20.0, limit=10) == 1
    assert await store.get_session("x") is None


# -- leases --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_leases_overlap_hosts_and_expiry(store: Store) -> None:
    await store.create_session(session_record("old", expire=10.0))
    await store.create_session(session_record("new", expire=1000.0))
    assert await store.lease_ports("h", (7000, 7003), 4, "old", 10.0, now=0.0) == (7000, 7003)
    with pytest.raises(leases.NoPortsAvailable, match="no 1 free consecutive ports left"):
        await store.lease_ports("h", (7000, 7003), 1, "new", 100.0, now=5.0)
    # another host: independent
    assert await store.lease_ports("g", (7000, 7003), 1, "new", 100.0, now=5.0) == (7000, 7000)
    await store.release_lease("new")
    # once the old lease has expired (at 10.0 exactly) it no longer counts
    assert await store.lease_ports("h", (7000, 7003), 2, "new", 100.0, now=10.0) == (7000, 7001)
    await store.release_lease("old")
    assert await store.lease_ports("h", (7000, 7003), 2, "third", 100.0, now=0.0) == (7002, 7003)
    await store.release_lease("nobody")  # no lease: nothing happens


@pytest.mark.asyncio
async def test_first_fit_around_other_leases(store: Store) -> None:
    assert await store.lease_ports("h", (100, 199), 10, "a", 50.0, now=0.0) == (100, 109)
    assert await store.lease_ports("h", (100, 199), 10, "b", 50.0, now=0.0) == (110, 119)
    assert await store.lease_ports("h", (100, 199), 10, "c", 50.0, now=0.0) == (120, 129)
    await store.release_lease("b")
    assert await store.lease_ports("h", (100, 199), 5, "d", 50.0, now=0.0) == (110, 114)
    assert await store.lease_ports("h", (100, 199), 6, "e", 50.0, now=0.0) == (130, 135)  # not 115
    assert await store.lease_ports("h", (100, 199), 5, "f", 50.0, now=0.0) == (115, 119)
    # another allowed range on the same host still avoids every live lease
    assert await store.lease_ports("h", (105, 140), 4, "g", 50.0, now=0.0) == (136, 139)
    with pytest.raises(leases.NoPortsAvailable):
        await store.lease_ports("h", (100, 139), 1, "h", 50.0, now=0.0)
    with pytest.raises(ValueError, match="bad port range"):
        await store.lease_ports("h", (0, 10), 1, "x", 50.0, now=0.0)
    with pytest.raises(ValueError, match="count must be at least 1"):
        await store.lease_ports("h", (100, 199), 0, "x", 50.0, now=0.0)


@pytest.mark.asyncio
async def test_a_session_replaces_its_own_lease(stores: StoreFactory, store: Store) -> None:
    assert await store.lease_ports("h", (5000, 5009), 4, "s", 50.0, now=0.0) == (5000, 5003)
    assert await store.lease_ports("h", (5000, 5009), 4, "t", 50.0, now=0.0) == (5004, 5007)
    # its own lease is not in its way: the same ports again, or more of them
    assert await store.lease_ports("h", (5000, 5009), 4, "s", 60.0, now=0.0) == (5000, 5003)
    with pytest.raises(leases.NoPortsAvailable):
        await store.lease_ports("h", (5000, 5009), 5, "s", 60.0, now=0.0)
    assert stores.leases() == [("s", 5000, 5003), ("t", 5004, 5007)]  # the old lease stands
    # moved to another host: the first host's ports are free again
    assert await store.lease_ports("g", (5000, 5009), 2, "s", 60.0, now=0.0) == (5000, 5001)
    assert await store.lease_ports("h", (5000, 5009), 4, "u", 50.0, now=0.0) == (5000, 5003)
    assert stores.leases() == [("s", 5000, 5001), ("t", 5004, 5007), ("u", 5000, 5003)]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("state", "holds"),
    [
        (states.ACCEPTED, False),
        (states.CONNECTING, True),
        (states.TRANSFERRING, True),
        (states.COMPLETED, False),
        (None, False),  # no session at all
    ],
)
async def test_past_hold_until_a_lease_holds_while_connecting(
    store: Store, state: states.State | None, holds: bool
) -> None:
    if state is not None:
        await store.create_session(session_record("held", state=state, expire=1000.0))
    await store.lease_ports("h", (6000, 6003), 4, "held", 1000.0, now=0.0, hold_until=30.0)
    with pytest.raises(leases.NoPortsAvailable):  # before its hold_until, it holds
        await store.lease_ports("h", (6000, 6003), 1, "other", 1000.0, now=29.0)
    if holds:
        with pytest.raises(leases.NoPortsAvailable):
            await store.lease_ports("h", (6000, 6003), 1, "other", 1000.0, now=30.0)
    else:
        assert await store.lease_ports("h", (6000, 6003), 1, "other", 1000.0, now=30.0) == (
            6000,
            6000,
        )


@pytest.mark.asyncio
async def test_a_lease_holds_by_its_session_state_now(store: Store) -> None:
    await store.create_session(session_record("s", state=states.ACCEPTED, expire=1000.0))
    await store.lease_ports("h", (6000, 6001), 2, "s", 1000.0, now=0.0, hold_until=10.0)
    rec = await _get(store, "s")
    rec.session.state = states.CONNECTING  # a peer reported in: the lease holds on
    await store.update_session(rec)
    with pytest.raises(leases.NoPortsAvailable):
        await store.lease_ports("h", (6000, 6001), 1, "other", 1000.0, now=20.0)


@pytest.mark.asyncio
async def test_too_many_leases_per_owner(store: Store) -> None:
    async def lease(session_id: str, owner: str, now: float = 0.0) -> leases.Span:
        return await store.lease_ports(
            "h", (8000, 8099), 2, session_id, 100.0, now, owner=owner, max_per_owner=2
        )

    assert await lease("a1", "alice") == (8000, 8001)
    assert await lease("a2", "alice") == (8002, 8003)
    with pytest.raises(leases.TooManyLeases, match=r"holds 2 port leases .* \(at most 2\)"):
        await lease("a3", "alice")
    assert await lease("b1", "bob") == (8004, 8005)  # other owners are not counted
    assert await lease("a2", "alice") == (8002, 8003)  # replacing its own lease is not a new one
    # other hosts, and leases without a limit, are not counted against the owner
    assert await store.lease_ports("g", (8000, 8099), 2, "a3", 100.0, 0.0, owner="alice") == (
        8000,
        8001,
    )
    await store.release_lease("a1")
    assert await lease("a4", "alice") == (8000, 8001)
    # expired leases no longer count
    assert await lease("a5", "alice", now=100.0) == (8000, 8001)


# -- uploads -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_upload_records(store: Store) -> None:
    assert await store.get_upload("s1", 0) is None
    first = await store.add_upload(UploadRecord("s1", 0, "up-1", 10.0, size_bytes=7, owner="o"))
    assert first == UploadRecord("s1", 0, "up-1", 10.0, size_bytes=7, owner="o")
    # a second add of the file returns the stored one and records nothing
    assert await store.add_upload(UploadRecord("s1", 0, "up-2", 11.0, size_bytes=9)) == first
    assert await store.get_upload("s1", 0) == first
    assert await store.store_usage() == (7, 1)
    # a fresh upload replaces the old one only while the old one is the file's upload
    assert not await store.replace_upload("s1", 0, "up-other", "up-3")
    assert await store.replace_upload("s1", 0, "up-1", "up-3")
    assert not await store.replace_upload("s2", 0, "up-1", "up-3")  # no such upload
    await store.extend_upload_urls("s1", 0, 100.0)
    await store.extend_upload_urls("s1", 0, 50.0)  # never lowered
    await store.complete_upload("s1", 0)
    assert not await store.replace_upload("s1", 0, "up-3", "up-4")  # never once completed
    assert await store.get_upload("s1", 0) == UploadRecord(
        "s1", 0, "up-3", 10.0, completed=True, urls_expire_s=100.0, size_bytes=7, owner="o"
    )
    # an upload that is not there is not made by any of these
    await store.complete_upload("s9", 0)
    await store.extend_upload_urls("s9", 0, 100.0)
    await store.defer_upload_cleanup("s9", 0, 100.0)
    await store.delete_upload("s9", 0)
    assert await store.get_upload("s9", 0) is None
    assert await store.store_usage() == (7, 1)
    await store.delete_upload("s1", 0)
    assert await store.get_upload("s1", 0) is None
    assert await store.store_usage() == (0, 0)


@pytest.mark.asyncio
async def test_file_indexes_and_ids_with_colons_are_apart(store: Store) -> None:
    await store.add_upload(UploadRecord("a:1", 2, "x", 1.0))
    await store.add_upload(UploadRecord("a", 12, "y", 1.0))
    await store.add_upload(UploadRecord("a:1", 3, "z", 1.0))
    got = [(u.session_id, u.file_index, u.upload_id) for u in await store.uploads_to_clean(5.0, 10)]
    assert sorted(got) == [("a", 12, "y"), ("a:1", 2, "x"), ("a:1", 3, "z")]


@pytest.mark.asyncio
async def test_upload_quotas(store: Store) -> None:
    quota = StoreQuota(per_offer=100, per_owner=150, total=200)

    async def add(session_id: str, index: int, size: int, owner: str) -> UploadRecord:
        return await store.add_upload(
            UploadRecord(session_id, index, f"{session_id}-{index}", 1.0, size_bytes=size,
                         owner=owner),
            quota,
        )  # fmt: skip

    await add("o1", 0, 60, "alice")
    await add("o1", 1, 40, "alice")  # the offer's 100 exactly
    with pytest.raises(QuotaExceeded, match=r"101 bytes for this offer, over .* limit of 100"):
        await add("o1", 2, 1, "alice")
    await add("o2", 0, 50, "alice")  # alice's 150 exactly
    with pytest.raises(QuotaExceeded, match=r"151 bytes for this sender's address.* of 150"):
        await add("o3", 0, 1, "alice")
    await add("o4", 0, 50, "bob")  # 200 in all
    with pytest.raises(QuotaExceeded, match=r"201 bytes for the whole broker.* of 200"):
        await add("o5", 0, 1, "carol")
    assert await store.store_usage() == (200, 4)
    assert await store.get_upload("o5", 0) is None
    # a file that has its upload already is not counted again
    assert (await add("o1", 0, 60, "alice")).upload_id == "o1-0"
    # deleting frees the room, for the offer, the owner and the total
    await store.delete_upload("o1", 1)
    assert await store.store_usage() == (160, 3)
    await add("o3", 0, 0, "alice")
    assert (await add("o1", 2, 40, "carol")).size_bytes == 40
    # without a quota nothing is checked
    await store.add_upload(UploadRecord("o9", 0, "big", 1.0, size_bytes=10_000, owner="alice"))
    assert await store.store_usage() == (10_200, 6)


@pytest.mark.asyncio
async def test_uploads_to_clean(store: Store) -> None:
    await store.create_session(session_record("live", expire=1000.0))
    await store.create_session(session_record("done", state=states.COMPLETED))
    await store.add_upload(UploadRecord("live", 0, "l", 1.0, clean_after_s=1.0))
    await store.add_upload(UploadRecord("done", 0, "d0", 1.0, clean_after_s=30.0))
    await store.add_upload(UploadRecord("done", 1, "d1", 1.0, clean_after_s=10.0))
    await store.add_upload(UploadRecord("gone", 0, "g", 1.0, clean_after_s=20.0))  # no session
    # final or gone sessions only, clean_after <= now, the earliest first, up to the limit
    due = await store.uploads_to_clean(30.0, 10)
    assert [u.upload_id for u in due] == ["d1", "g", "d0"]
    assert due[0] == await store.get_upload("done", 1)
    assert [u.upload_id for u in await store.uploads_to_clean(29.0, 10)] == ["d1", "g"]
    assert [u.upload_id for u in await store.uploads_to_clean(30.0, 1)] == ["d1"]
    await store.defer_upload_cleanup("done", 1, 40.0)
    assert await store.get_upload("done", 1) == UploadRecord(
        "done", 1, "d1", 1.0, clean_after_s=40.0
    )
    assert [u.upload_id for u in await store.uploads_to_clean(30.0, 10)] == ["g", "d0"]
    assert [u.upload_id for u in await store.uploads_to_clean(40.0, 10)] == ["g", "d0", "d1"]
    # the live session's upload is due once its session ends
    rec = await _get(store, "live")
    rec.session.state = states.FAILED
    await store.update_session(rec)
    assert [u.upload_id for u in await store.uploads_to_clean(40.0, 10)] == ["l", "g", "d0", "d1"]
    await store.delete_upload("gone", 0)
    assert [u.upload_id for u in await store.uploads_to_clean(40.0, 2)] == ["l", "d0"]


@pytest.mark.asyncio
async def test_uploads_to_clean_looks_past_live_sessions(store: Store) -> None:
    """The limit counts what is due, not what was looked at on the way."""
    for i in range(300):
        await store.create_session(session_record(f"live{i}", expire=1000.0))
        await store.add_upload(UploadRecord(f"live{i}", 0, f"l{i}", 1.0, clean_after_s=1.0))
    await store.add_upload(UploadRecord("gone", 0, "g", 1.0, clean_after_s=5.0))
    assert [u.upload_id for u in await store.uploads_to_clean(10.0, 1)] == ["g"]


# -- the broker's id, the disk, and replicas -----------------------------------------------


@pytest.mark.asyncio
async def test_broker_id_is_made_once_per_store(stores: StoreFactory, tmp_path: Path) -> None:
    replica = stores()  # opened before the id exists, like a second replica
    store = stores()
    made = await store.broker_id()
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    assert await store.broker_id() == made
    assert await replica.broker_id() == made
    await store.close()
    assert await stores().broker_id() == made  # opened again: the same broker
    # another file, or another key prefix: another broker
    async with StoreFactory(stores.kind, tmp_path / "other", stores.url) as other:
        assert await other().broker_id() != made


@pytest.mark.asyncio
async def test_replicas_starting_together_agree_on_one_id(stores: StoreFactory) -> None:
    await stores().close()  # the backing exists, with no id yet
    count = 8
    barrier = threading.Barrier(count, timeout=10)

    async def first_call() -> str:
        replica = stores(close_at_end=False)  # one per thread, used from that thread only
        try:
            barrier.wait()
            return await replica.broker_id()
        finally:
            await replica.close()

    def in_a_thread(_: int) -> str:  # each replica a thread with its own loop, as processes
        return asyncio.run(first_call())

    with ThreadPoolExecutor(count) as pool:
        ids = list(pool.map(in_a_thread, range(count), timeout=20))
    assert len(set(ids)) == 1


@pytest.mark.asyncio
async def test_a_replica_sees_every_write(stores: StoreFactory) -> None:
    a, b = stores(), stores()
    await a.create_session(session_record("x", request_id="req"))
    got = await _get(b, "x")
    got.receiver_token_hash = "r-x"
    await b.update_session(got)
    assert await token_owner(a, "r-x") == ("x", Party.RECEIVER)
    assert _get_found(await a.find_by_request_id("req")) == "x"
    with pytest.raises(StaleRecord):
        await a.update_session(
            _get_foundsession_record(await a.find_by_code_hash("c-x"), version=0)
        )
    await a.lease_ports("h", (10, 19), 5, "x", 100.0, now=0.0)
    assert await b.lease_ports("h", (10, 19), 5, "y", 100.0, now=0.0) == (15, 19)


def _get_foundsession_record(found: SessionRecord | None, version: int) -> SessionRecord:
    assert found is not None
    found.version = version
    return found


@pytest.mark.asyncio
async def test_free_bytes(store: Store, stores: StoreFactory) -> None:
    free = await store.free_bytes()
    if stores.kind == "redis":
        assert free is None  # no local disk
    else:
        assert free is not None
        assert free > 0


# -- a person's inbox (issue 13) -----------------------------------------------------------


@pytest.mark.asyncio
async def test_a_persons_inbox_holds_its_offers_still_offered_oldest_first(store: Store) -> None:
    def to(user: str, session_id: str, create: float, **kwargs: object) -> SessionRecord:
        rec = session_record(session_id, create=create, code_hash=None, **kwargs)  # type: ignore[arg-type]
        rec.session.person.recipient_user = user
        return rec

    for rec in (
        to("alice", "a2", 2.0),
        to("alice", "a1", 1.0),
        to("alice", "a3", 3.0),
        to("alice", "old", 0.5, expire=10.0),
        to("alice", "done", 0.7, state=states.DECLINED),
        to("bob", "b1", 1.0),
        session_record("code", create=0.1),
    ):
        await store.create_session(rec)
    assert _ids(await store.offers_to("alice", 50.0, 10)) == ["a1", "a2", "a3"]
    assert _ids(await store.offers_to("alice", 50.0, 2)) == ["a1", "a2"]
    assert await store.count_offers_to("alice", 50.0) == 3
    assert await store.count_offers_to("alice", 5.0) == 4  # "old" not expired yet
    assert _ids(await store.offers_to("bob", 50.0, 10)) == ["b1"]
    assert await store.count_offers_to("carol", 50.0) == 0
    # an offer that ends leaves the inbox
    ended = await _get(store, "a2")
    ended.session.state = states.CANCELLED
    await store.update_session(ended)
    assert _ids(await store.offers_to("alice", 50.0, 10)) == ["a1", "a3"]
    assert await store.count_offers_to("alice", 50.0) == 2
