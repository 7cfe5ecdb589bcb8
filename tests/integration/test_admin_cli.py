"""`ferry admin` as the operator runs it: a real process (``python -m ferry.broker.admin``, the
same code `ferry admin` runs) on a data dir in tmp_path, and once on a real redis-server.

The devices and the broker's own audit entries that a running broker would write (it enrolls
devices, marks them online and audits offers) are written here through the Directory on the
same store, as a second process on the file would.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from ferry.broker.people import DeviceRecord, SqliteDirectory
from ferry.broker.store import SqliteStore
from ferry.protocol.identity import DeviceKeys, fingerprint
from tests.support.processes import free_port
from tests.support.redis import RedisServer

pytestmark = pytest.mark.timeout(120)

#: A device name as a hostile client could pick it: a terminal title escape, a bidi override.
HOSTILE = "\x1b]0;pwned\x07lap\u202etop"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FERRY_DATA_DIR", "FERRY_STORE")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def admin(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`ferry admin ARGS...` as a process; its exit status and output."""
    return subprocess.run(
        [sys.executable, "-m", "ferry.broker.admin", *args],
        env=_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ok(*args: str, env: dict[str, str] | None = None) -> str:
    """Its stdout, once it exited 0 with nothing on stderr."""
    done = admin(*args, env=env)
    assert (done.returncode, done.stderr) == (0, ""), done
    return done.stdout


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines()]


def one_line_error(done: subprocess.CompletedProcess[str], status: int, words: str) -> None:
    assert done.returncode == status, done
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("ferry admin"), done.stderr
    assert words in done.stderr


def _enroll_device(
    directory: SqliteDirectory, device_id: str, user: str, name: str
) -> DeviceRecord:
    """What EnrollDevice does: a device's public keys recorded for its user."""
    keys = DeviceKeys.generate()
    device = DeviceRecord(device_id, user, name, keys.signing_key, keys.encryption_key, time.time())
    asyncio.run(directory.add_device(device))
    return device


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def directory(data_dir: Path) -> Iterator[SqliteDirectory]:
    """The people directory on the data dir's store, as a running broker holds it."""
    directory = SqliteDirectory.open(data_dir / "broker.sqlite3")
    yield directory
    asyncio.run(directory.close())


def test_the_operator_story_on_sqlite(data_dir: Path, directory: SqliteDirectory) -> None:
    store = ["--data-dir", str(data_dir)]
    out = ok(
        "users",
        "add",
        "alice",
        "--org",
        "acme",
        "--offers-per-hour",
        "5",
        "--store-bytes",
        "10GiB",
        *store,
    )
    assert out == "Added user alice (organisation acme).\n"
    ok("users", "add", "bob", "--org", "acme", env=_env(FERRY_DATA_DIR=str(data_dir)))
    ok("users", "add", "carol", *store)

    listing = ok("users", "list", *store).splitlines()
    assert listing[0].split() == ["USER", "ORGANISATION", "OFFERS/HOUR", "STORE", "DEVICES"]
    assert listing[1].split() == ["alice", "acme", "5", "10.0", "GiB", "0"]
    assert listing[3].split() == ["carol", "default", "default", "default", "0"]
    acme = json_lines(ok("users", "list", "--org", "acme", "--json", *store))
    assert [(u["user"], u["offers_per_hour"], u["store_bytes"]) for u in acme] == [
        ("alice", 5, 10 << 30),
        ("bob", None, None),
    ]
    ok("users", "set", "alice", "--store-bytes", "default", "--offers-per-hour", "7", *store)
    ok("users", "set", "bob", "--store-bytes", "500M", *store)
    acme = json_lines(ok("users", "list", "--org", "acme", "--json", *store))
    assert [(u["offers_per_hour"], u["store_bytes"]) for u in acme] == [
        (7, None),
        (None, 500 << 20),
    ]

    # Enrollment: the token is printed once; the store keeps its SHA-256 only.
    lines = ok("enroll", "alice", *store).splitlines()
    assert lines[0] == "Enrollment token for alice (one use, valid 24 h):"
    token = lines[1].strip()
    assert len(token) >= 43  # 256 random bits, URL-safe base64
    assert lines[2].startswith("On alice's device:  ferry login   (it asks for the token")
    assert token not in lines[2]
    issued = json_lines(ok("enroll", "bob", "--ttl", "30m", "--json", *store))[0]
    assert issued["user"] == "bob"
    assert isinstance(issued["token"], str)
    tokens = [token, issued["token"]]
    with contextlib.closing(sqlite3.connect(data_dir / "broker.sqlite3")) as db:
        kept = dict(db.execute("SELECT token_hash, user FROM people_enrollments").fetchall())
    assert kept == {
        hashlib.sha256(t.encode()).hexdigest(): u
        for t, u in zip(tokens, ["alice", "bob"], strict=True)
    }
    # grep, not open(): closing a file of the database here would drop this process's SQLite
    # locks on it (POSIX locks are per process), which the directory fixture holds.
    for t in tokens:
        assert subprocess.run(["grep", "-rqF", t, str(data_dir)], timeout=30).returncode == 1
    # ... and the broker's EnrollDevice takes it once.
    sha = hashlib.sha256(token.encode()).hexdigest()
    assert asyncio.run(directory.take_enrollment(sha, time.time())) == "alice"
    assert asyncio.run(directory.take_enrollment(sha, time.time())) is None

    laptop = _enroll_device(directory, "dev-laptop", "alice", "laptop")
    hostile = _enroll_device(directory, "dev-hostile", "alice", HOSTILE)
    _enroll_device(directory, "dev-bob", "bob", "phone")
    asyncio.run(directory.set_online("dev-laptop", "stream-1", time.time() + 300))

    devices = ok("devices", "alice", *store)
    assert "\x1b" not in devices
    assert "\u202e" not in devices
    rows = {line.split()[0]: line for line in devices.splitlines()[1:]}
    assert set(rows) == {"dev-laptop", "dev-hostile"}
    assert fingerprint(laptop.signing_key, laptop.encryption_key) in rows["dev-laptop"]
    assert rows["dev-laptop"].split()[-1] == "yes"
    assert rows["dev-hostile"].split()[-1] == "no"
    assert "\\x1b]0;pwned\\x07lap\\u202etop" in rows["dev-hostile"]
    every = json_lines(ok("devices", "--json", *store))
    assert [(d["device_id"], d["user"], d["online"]) for d in every] == [
        ("dev-laptop", "alice", True),
        ("dev-hostile", "alice", False),
        ("dev-bob", "bob", False),
    ]
    assert every[1]["display_name"] == HOSTILE  # JSON carries it exactly (escaped as JSON)
    assert every[1]["fingerprint"] == fingerprint(hostile.signing_key, hostile.encryption_key)

    out = ok("revoke", "dev-hostile", *store)
    assert out.startswith("Revoked device dev-hostile (")
    assert out.endswith(") of alice.\n")
    assert "\x1b" not in out
    assert "revoked already" in ok("revoke", "dev-hostile", *store)
    one_line_error(admin("revoke", "dev-nothing", *store), 1, "no device dev-nothing")
    assert [d["device_id"] for d in json_lines(ok("devices", "alice", "--json", *store))] == [
        "dev-laptop"
    ]
    with_revoked = json_lines(ok("devices", "alice", "--all", "--json", *store))
    assert [d["revoke_time"] is None for d in with_revoked] == [True, False]
    assert "REVOKED" in ok("devices", "--all", *store).splitlines()[0]

    # The broker's own entries: what a sender's manifest holds comes from the sender.
    asyncio.run(
        directory.audit(
            "offer.created",
            time.time(),
            {"sender": "bob", "recipient": "alice", "files": [{"path": "\x1b[2J" + HOSTILE}]},
        )
    )
    out = ok("users", "remove", "alice", *store)
    assert out == "Removed user alice; revoked 1 device(s).\n"
    assert all(
        d["revoke_time"] for d in json_lines(ok("devices", "alice", "--all", "--json", *store))
    )
    one_line_error(admin("users", "remove", "alice", *store), 1, "no user alice")

    log = ok("audit", *store)
    assert "\x1b" not in log
    assert "\u202e" not in log
    events = [line.split()[1] for line in log.splitlines()]
    assert events == [
        "user.added",
        "user.added",
        "user.added",
        "user.quotas",
        "user.quotas",
        "enrollment.issued",
        "enrollment.issued",
        "device.revoked",
        "offer.created",
        "user.removed",
    ]
    assert "device.revoked user=alice device=dev-hostile" in log
    for t in tokens:
        assert t not in log
        assert hashlib.sha256(t.encode()).hexdigest() not in log
    bob = json_lines(ok("audit", "--user", "bob", "--json", *store))
    assert [e["event"] for e in bob] == [
        "user.added",
        "user.quotas",
        "enrollment.issued",
        "offer.created",
    ]
    assert bob[2]["fields"] == {"user": "bob", "expire_time": issued["expire_time"]}
    hostile_path = "\x1b[2J" + HOSTILE
    assert bob[3]["fields"] == {
        "sender": "bob",
        "recipient": "alice",
        "files": [{"path": hostile_path}],
    }
    last = json_lines(ok("audit", "--since", "1h", "--limit", "2", "--json", *store))
    assert [e["event"] for e in last] == ["offer.created", "user.removed"]
    assert ok("audit", "--since", "2999-01-01T00:00:00Z", *store) == ""


def test_usage_errors_are_one_line_and_change_nothing(data_dir: Path) -> None:
    """Status 2: the command did not run (a bad name, size, duration or flag); 1: it ran and
    failed (see the story above)."""
    store = ["--data-dir", str(data_dir)]
    one_line_error(admin("users", "add", "Bad Name", *store), 2, "not a valid user name")
    one_line_error(admin("users", "add", "bob", "--org", "A B", *store), 2, "organisation name")
    one_line_error(admin("users", "add", "bob", "--store-bytes", "lots", *store), 2, "not a size")
    one_line_error(admin("enroll", "bob", "--ttl", "forever", *store), 2, "not a duration")
    one_line_error(admin("enroll", "bob", "--ttl", "90d", *store), 2, "at most 30d")
    one_line_error(admin("audit", "--since", "yesterday", *store), 2, "not a time")
    one_line_error(admin("users", "set", "bob", *store), 2, "nothing to set")
    one_line_error(admin("users", "frob", *store), 2, "invalid choice")
    one_line_error(admin("users", "add", *store), 2, "required")
    assert ok("users", "list", "--json", *store) == ""  # no user was made
    one_line_error(admin("enroll", "bob", *store), 1, "no user bob")
    one_line_error(admin("users", "list", "--data-dir", str(data_dir / "nope")), 1, "no data dir")
    secret_url = "redis://:hunter2@127.0.0.1:1/0"
    done = admin("users", "list", "--store", secret_url, *store)
    one_line_error(done, 2, "FERRY_STORE")
    assert "hunter2" not in done.stderr


def test_admin_beside_a_running_broker_store(data_dir: Path) -> None:
    """The broker holds the SQLite file open (WAL); the admin's writes reach it at once."""
    from ferry.broker.people import SqliteDirectory as Directory

    store = SqliteStore(data_dir / "broker.sqlite3")
    try:
        broker_view = Directory(store._db)
        asyncio.run(store.broker_id())
        ok("users", "add", "alice", "--data-dir", str(data_dir))
        user = asyncio.run(broker_view.get_user("alice"))
        assert user is not None
        assert user.organization == "default"
    finally:
        asyncio.run(store.close())


def test_the_operator_story_on_redis(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server:
        env = _env(FERRY_STORE=server.url)
        ok("users", "add", "alice", "--offers-per-hour", "3", env=env)
        token = json_lines(ok("enroll", "alice", "--json", env=env))[0]["token"]
        assert isinstance(token, str)
        raw: redis.Redis = server.client()
        sha = hashlib.sha256(token.encode()).hexdigest()
        assert raw.hget(f"ferry:p:e:{sha}", "user") == b"alice"  # the broker's default prefix
        assert not any(token.encode() in (raw.dump(k) or b"") for k in raw.scan_iter())
        users = json_lines(ok("users", "list", "--json", "--store-url", server.url, env=_env()))
        assert [(u["user"], u["offers_per_hour"]) for u in users] == [("alice", 3)]
        log = ok("audit", env=env)
        assert [line.split()[1] for line in log.splitlines()] == ["user.added", "enrollment.issued"]
        assert token not in log
    gone = admin("users", "list", env=_env(FERRY_STORE=f"redis://127.0.0.1:{free_port()}/0"))
    one_line_error(gone, 1, "cannot reach the Redis store at redis://127.0.0.1:")


def test_the_store_flags_go_before_or_after_the_subcommand(tmp_path: Path) -> None:
    """`ferry admin --data-dir DIR users add` and `ferry admin users add --data-dir DIR` are
    the same command; a flag after the subcommand wins."""
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir()
    second.mkdir()
    env = _env()
    ok("--data-dir", str(first), "users", "add", "zed", env=env)
    ok("users", "add", "yan", "--data-dir", str(first), env=env)
    ok("--data-dir", str(second), "users", "add", "xia", "--data-dir", str(first), env=env)
    listed = ok("--data-dir", str(first), "--json", "users", "list", env=env)
    assert sorted(json.loads(line)["user"] for line in listed.splitlines()) == [
        "xia",
        "yan",
        "zed",
    ]
    assert ok("users", "list", "--json", "--data-dir", str(second), env=env) == ""
