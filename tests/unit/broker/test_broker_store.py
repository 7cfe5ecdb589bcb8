"""SqliteStore's own behaviour: what survives reopening its file, and older files migrated.

What every store does (lookups, compare-and-set, expiry, leases, uploads, the broker's id)
is in test_store_contract.py, which runs against SqliteStore and RedisStore alike.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from ferry.broker import states
from ferry.broker.core import timestamp
from ferry.broker.store import SessionRecord, SqliteStore
from ferry.v1 import broker_pb2
from tests.support.redis import token_owner

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


@pytest.mark.asyncio
async def test_everything_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "broker.sqlite3"
    store = SqliteStore(path)
    rec = _record("one", request_id="req-1")
    rec.claim_verifier = b"v" * 32
    await store.create_session(rec)
    rec.session.state = states.ACCEPTED
    rec.receiver_token_hash = "r-one"
    rec.code_hash = None
    rec = await store.update_session(rec)
    assert rec.version == 1
    assert await store.lease_ports("h", (5000, 5010), 6, "one", 50.0, now=0.0) == (5000, 5005)
    await store.close()

    store = SqliteStore(path)
    try:
        got = await store.get_session("one")
        assert got is not None
        assert got.session == rec.session
        assert (got.version, got.claim_verifier) == (1, b"v" * 32)
        assert await store.find_by_code_hash("c-one") is None
        assert await token_owner(store, "s-one") == ("one", states.Party.SENDER)
        assert await token_owner(store, "r-one") == ("one", states.Party.RECEIVER)
        assert await token_owner(store, "nope") is None
        found = await store.find_by_request_id("req-1")
        assert found is not None
        assert found.session_id == "one"
        # the lease survived the reopen: the next session gets the following ports
        assert await store.lease_ports("h", (5000, 5010), 5, "two", 50.0, now=0.0) == (5006, 5010)
        made = await store.broker_id()
    finally:
        await store.close()
    reopened = SqliteStore(path)
    try:
        assert await reopened.broker_id() == made  # the same broker
    finally:
        await reopened.close()


@pytest.mark.asyncio
async def test_a_file_from_before_claim_verifiers_opens(tmp_path: Path) -> None:
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
        got = await store.get_session("old")
        assert got is not None
        assert (got.session, got.claim_verifier) == (old.session, None)
        new = _record("new")
        new.claim_verifier = b"v" * 32
        await store.create_session(new)
        found = await store.find_by_code_hash("c-new")
        assert found is not None
        assert found.claim_verifier == b"v" * 32
    finally:
        await store.close()
    store = SqliteStore(path)  # and opens again (the column is not added twice)
    await store.close()
