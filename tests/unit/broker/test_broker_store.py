"""SqliteStore: round trip, lookups, compare-and-set, leases, broker id, and reopening."""

from __future__ import annotations

import re
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ferry.broker import leases, states
from ferry.broker.core import timestamp
from ferry.broker.store import SessionRecord, SqliteStore, StaleRecord
from ferry.v1 import broker_pb2

pytestmark = pytest.mark.timeout(30)


def _record(session_id: str, expire: float = 100.0, **kw: str | None) -> SessionRecord:
    session = broker_pb2.Session(
        name=f"sessions/{session_id}",
        state=states.OFFERED,
        manifest=broker_pb2.Manifest(
            files=[broker_pb2.FileEntry(path="a/b.txt", size_bytes=5)], chunk_size_bytes=1 << 20
        ),
        create_time=timestamp(1.0),
        expire_time=timestamp(expire),
    )
    return SessionRecord(
        session=session,
        sender_token_hash=f"s-{session_id}",
        code_hash=kw.get("code_hash", f"c-{session_id}"),
        request_id=kw.get("request_id"),
    )


def test_round_trip_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "broker.sqlite3"
    store = SqliteStore(path)
    rec = _record("one", request_id="req-1")
    store.create_session(rec)
    rec.session.state = states.ACCEPTED
    rec.receiver_token_hash = "r-one"
    rec.code_hash = None
    rec = store.update_session(rec)
    assert rec.version == 1
    assert store.lease_ports("h", (5000, 5010), 6, "one", 50.0, now=0.0) == (5000, 5005)
    store.close()

    store = SqliteStore(path)
    try:
        got = store.get_session("one")
        assert got is not None
        assert got.session == rec.session
        assert got.version == 1
        assert store.find_by_code_hash("c-one") is None
        assert store.find_by_token_hash("s-one") == ("one", states.Party.SENDER)
        assert store.find_by_token_hash("r-one") == ("one", states.Party.RECEIVER)
        assert store.find_by_token_hash("nope") is None
        found = store.find_by_request_id("req-1")
        assert found is not None
        assert found.session_id == "one"
        # the lease survived the reopen: the next session gets the following ports
        assert store.lease_ports("h", (5000, 5010), 5, "two", 50.0, now=0.0) == (5006, 5010)
    finally:
        store.close()


def test_compare_and_set(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db.sqlite3")
    try:
        store.create_session(_record("x"))
        a = store.get_session("x")
        b = store.get_session("x")
        assert a is not None
        assert b is not None
        store.update_session(a)
        with pytest.raises(StaleRecord):
            store.update_session(b)
    finally:
        store.close()


def test_leases_and_expiry(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db.sqlite3")
    try:
        store.create_session(_record("old", expire=10.0))
        store.create_session(_record("new", expire=1000.0))
        due = store.due_for_expiry(now=20.0, limit=10)
        assert [r.session_id for r in due] == ["old"]
        assert store.lease_ports("h", (7000, 7003), 4, "old", 10.0, now=0.0) == (7000, 7003)
        with pytest.raises(leases.NoPortsAvailable):
            store.lease_ports("h", (7000, 7003), 1, "new", 100.0, now=5.0)
        # other host: independent
        assert store.lease_ports("g", (7000, 7003), 1, "new", 100.0, now=5.0) == (7000, 7000)
        store.release_lease("new")
        # once the old lease has expired it no longer counts
        assert store.lease_ports("h", (7000, 7003), 2, "new", 100.0, now=11.0) == (7000, 7001)
        store.release_lease("old")
        assert store.lease_ports("h", (7000, 7003), 2, "third", 100.0, now=0.0) == (7002, 7003)
    finally:
        store.close()


def test_broker_id_is_made_once_per_store(tmp_path: Path) -> None:
    path = tmp_path / "broker.sqlite3"
    replica = SqliteStore(path)  # opened before the id exists, like a second replica
    store = SqliteStore(path)
    try:
        made = store.broker_id()
        assert re.fullmatch(r"[0-9a-f]{32}", made)
        assert store.broker_id() == made
        assert replica.broker_id() == made
    finally:
        store.close()
        replica.close()
    reopened = SqliteStore(path)
    other = SqliteStore(tmp_path / "other" / "broker.sqlite3")
    try:
        assert reopened.broker_id() == made
        assert other.broker_id() != made
    finally:
        reopened.close()
        other.close()


def test_replicas_starting_together_agree_on_one_id(tmp_path: Path) -> None:
    path = tmp_path / "broker.sqlite3"
    SqliteStore(path).close()  # the schema, but no id yet
    count = 8
    barrier = threading.Barrier(count, timeout=10)

    def first_call(_: int) -> str:
        store = SqliteStore(path)  # one per thread: a store is used from one thread
        try:
            barrier.wait()
            return store.broker_id()
        finally:
            store.close()

    with ThreadPoolExecutor(count) as pool:
        ids = list(pool.map(first_call, range(count), timeout=20))
    assert len(set(ids)) == 1


def test_claim_verifier_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "broker.sqlite3"
    store = SqliteStore(path)
    forwarded = _record("fwd")
    forwarded.claim_verifier = b"v" * 32
    store.create_session(forwarded)
    store.create_session(_record("pake"))
    stored = store.get_session("fwd")
    assert stored is not None
    stored.receiver_token_hash = "r-fwd"
    store.update_session(stored)  # an update keeps it
    store.close()
    store = SqliteStore(path)
    try:
        got = store.find_by_code_hash("c-fwd")
        assert got is not None
        assert (got.claim_verifier, got.version) == (b"v" * 32, 1)
        pake = store.get_session("pake")
        assert pake is not None
        assert pake.claim_verifier is None
    finally:
        store.close()


def test_a_file_from_before_claim_verifiers_opens(tmp_path: Path) -> None:
    """A database written before the claim_verifier column: it is added on open."""
    path = tmp_path / "broker.sqlite3"
    old = _record("old")
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE sessions (id TEXT PRIMARY KEY, state INTEGER NOT NULL, code_hash TEXT,"
            " expire_time REAL NOT NULL, create_time REAL NOT NULL,"
            " sender_token_hash TEXT NOT NULL, receiver_token_hash TEXT, request_id TEXT,"
            " version INTEGER NOT NULL, data BLOB NOT NULL)"
        )
        db.execute(
            "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, NULL, NULL, 0, ?)",
            (
                "old",
                int(old.session.state),
                old.code_hash,
                old.expire_s,
                1.0,
                old.sender_token_hash,
                old.session.SerializeToString(deterministic=True),
            ),
        )
    db.close()
    store = SqliteStore(path)
    try:
        got = store.get_session("old")
        assert got is not None
        assert (got.session, got.claim_verifier) == (old.session, None)
        new = _record("new")
        new.claim_verifier = b"v" * 32
        store.create_session(new)
        found = store.find_by_code_hash("c-new")
        assert found is not None
        assert found.claim_verifier == b"v" * 32
    finally:
        store.close()
    store = SqliteStore(path)  # and opens again (the column is not added twice)
    store.close()
