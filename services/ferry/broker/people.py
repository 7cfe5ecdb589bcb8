"""The broker's people directory: users, enrollment tokens, devices, presence and the audit log.

`Directory` is what the broker (and the operator's `ferry admin`, admin.py) needs to know about
people; `SqliteDirectory` keeps it in the broker's SQLite file beside the sessions, and
`RedisDirectory` in the Redis that broker replicas share. As with the Store (store.py), every
method is awaited and is one atomic step, so that calls of one process interleave between
steps exactly as the calls of two replicas do, and nothing relies on no call running between
a read and the write after it (an enrollment token is taken by one step, so it is used once).

What is kept, and for how long::

    users        name, organisation, quotas (None: the broker's default)  until removed
    enrollments  sha256(token) -> user, expiry (never the token)          until taken, expired
                                                                          (swept by later takes)
                                                                          or the user removed
    devices      id, user, name, public keys, created, revoked            for ever: a revoked
                                                                          device stays known as
                                                                          revoked
    presence     (device, stream) -> until                                until then (swept by
                                                                          `online`; Redis: a TTL)
    audit        time, event, JSON fields: metadata, never a secret       until trimmed

Presence is per stream: a device reconnecting may hold two streams for a moment, on two
replicas, and the first one ending must not make it offline. A device is online while any
of its streams has ``until_s > now``; the broker refreshes each stream's `until_s` while it
is open and removes it when it closes (a replica that dies leaves its streams to expire).

Times are the broker's clock (seconds since the epoch), passed in, as in the Store; only the
Redis presence keys also carry a Redis TTL (`PRESENCE_TTL_S`, on Redis's clock), a backstop so
that a device that never comes back leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import sqlite3
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from ferry.broker.store import StorageFull, storage_full

if TYPE_CHECKING:  # redis-py is imported only by a RedisDirectory (as server.py does)
    import redis.asyncio

__all__ = [
    "DEFAULT_ORGANIZATION",
    "AuditEntry",
    "DeviceRecord",
    "Directory",
    "RedisDirectory",
    "SqliteDirectory",
    "UnknownUser",
    "User",
    "UserExists",
    "check_org_name",
    "check_user_name",
    "enrollment_token_hash",
]

DEFAULT_ORGANIZATION = "default"
#: Entries the audit log keeps at most, whatever their age (Redis: approximately, XADD
#: MAXLEN ~; SQLite: at each trim_audit), so that a flood of anonymous code offers, each a
#: few entries, cannot grow it without bound within the retention (a few hundred MB).
AUDIT_MAX_ENTRIES = 1_000_000
#: Redis: a device's presence key lives this long after its last set_online (Redis's clock),
#: far longer than any stream's refresh interval.
PRESENCE_TTL_S = 24 * 3600
#: Redis: streams one device may hold at once; beyond, the ones ending first are dropped.
MAX_STREAMS_PER_DEVICE = 16
#: Expired enrollment tokens forgotten per take_enrollment, at most (Redis).
_SWEEP_BATCH = 100

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


class UserExists(Exception):
    """add_user: a user of that name exists already."""


class UnknownUser(Exception):
    """The user named does not exist (or was removed)."""


def _checked(what: str, name: str) -> str:
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        shown = repr(name[:70] + "..." if isinstance(name, str) and len(name) > 70 else name)
        raise ValueError(
            f"not a valid {what} name: {shown} (1 to 64 characters of a-z, 0-9, '.', '_' and"
            " '-', the first a letter or a digit)"
        )
    return name


def check_user_name(name: str) -> str:
    """`name` if it is a valid user name, else ValueError (one line, saying the rule)."""
    return _checked("user", name)


def check_org_name(name: str) -> str:
    """`name` if it is a valid organisation name (the user names' rule), else ValueError."""
    return _checked("organisation", name)


def enrollment_token_hash(token: str) -> str:
    """What the directory keeps of an enrollment token: its SHA-256, hex. The token has 256
    random bits (admin.py), so a plain hash is enough: nobody can search for it."""
    return hashlib.sha256(token.encode()).hexdigest()


def _check_quotas(offers_per_hour: int | None, store_bytes: int | None) -> None:
    for what, value in (("offers_per_hour", offers_per_hour), ("store_bytes", store_bytes)):
        if value is not None and (isinstance(value, bool) or value < 0):
            raise ValueError(f"{what} must be a whole number >= 0 (or None: the default)")


@dataclasses.dataclass(slots=True)
class User:
    """A person the operator made (`ferry admin users add`)."""

    name: str
    organization: str
    create_s: float
    #: Offers per hour, bytes in the object store: None for the broker's default quota.
    offers_per_hour: int | None = None
    store_bytes: int | None = None


@dataclasses.dataclass(slots=True)
class DeviceRecord:
    """An enrolled device: its public keys (Ed25519 to sign, X25519 to seal keys to)."""

    device_id: str
    user: str
    display_name: str
    signing_key: bytes
    encryption_key: bytes
    create_s: float
    revoked_s: float | None = None


@dataclasses.dataclass(slots=True)
class AuditEntry:
    """One entry of the audit log. `id` orders the entries: SQLite's row id as text, or the
    Redis stream entry's id; `fields` holds JSON values only."""

    id: str
    time_s: float
    event: str
    fields: dict[str, Any]


#: The fields of an audit entry a `user` filter looks at.
AUDIT_USER_FIELDS = ("sender", "recipient", "user")


class Directory(Protocol):
    """Users, enrollments, devices, presence and the audit log; every method one atomic step.
    Implementations: SqliteDirectory, RedisDirectory."""

    async def add_user(self, user: User) -> None:
        """Make a user. UserExists if the name is taken; ValueError for a bad name or quota."""

    async def get_user(self, name: str) -> User | None:
        """The user of that name, or None."""

    async def set_user_quotas(
        self, name: str, offers_per_hour: int | None, store_bytes: int | None
    ) -> None:
        """Set both of the user's quotas (None: the default). UnknownUser."""

    async def list_users(self, organization: str | None = None) -> list[User]:
        """Every user (of `organization`, if given), by name."""

    async def remove_user(self, name: str, now: float) -> bool:
        """Remove the user: revoke every device at `now`, forget its enrollment tokens. False
        if there was no such user. Its devices stay known, revoked."""

    async def add_enrollment(self, token_hash: str, user: str, expire_s: float) -> None:
        """Keep an enrollment token's hash for `user` until `expire_s`. UnknownUser."""

    async def take_enrollment(self, token_hash: str, now: float) -> str | None:
        """The user the token was for if it has not expired, in one step with forgetting it
        (so two takes of one token give one user); None if unknown, used or expired."""

    async def add_device(self, device: DeviceRecord) -> None:
        """Record a new device. UnknownUser if its user is gone; ValueError if its id is taken."""

    async def get_device(self, device_id: str) -> DeviceRecord | None:
        """The device (revoked or not), or None."""

    async def devices_of(self, user: str, include_revoked: bool = False) -> list[DeviceRecord]:
        """The user's devices (not revoked, unless asked), by create_s."""

    async def devices_in(self, organization: str) -> list[DeviceRecord]:
        """The devices, not revoked, of every user of `organization`: by user, then create_s."""

    async def revoke_device(self, device_id: str, now: float) -> DeviceRecord | None:
        """Revoke the device at `now` (one revoked already keeps its time) and end its
        presence; the device as stored now, or None if unknown."""

    async def set_online(self, device_id: str, stream_id: str, until_s: float) -> None:
        """The device holds stream `stream_id` open until `until_s` (unless refreshed). A
        revoked or unknown device is never online."""

    async def set_offline(self, device_id: str, stream_id: str) -> None:
        """The stream closed."""

    async def online(self, device_ids: Sequence[str], now: float) -> set[str]:
        """Those of `device_ids` holding any stream with until_s > now."""

    async def audit(self, event: str, now: float, fields: Mapping[str, Any]) -> None:
        """Append an entry (JSON values only; never a secret)."""

    async def read_audit(
        self, *, since_s: float | None = None, user: str | None = None, limit: int = 1000
    ) -> list[AuditEntry]:
        """The last `limit` entries at or after `since_s` whose field "sender", "recipient"
        or "user" is `user` (filters that are None match all), oldest first."""

    async def trim_audit(self, before_s: float) -> int:
        """Drop the entries older than `before_s`, and the oldest beyond AUDIT_MAX_ENTRIES;
        how many were dropped."""


def _fields_json(fields: Mapping[str, Any]) -> str:
    """The fields as compact JSON (ValueError for a value JSON cannot hold)."""
    try:
        return json.dumps(dict(fields), separators=(",", ":"), allow_nan=False)
    except TypeError as exc:
        raise ValueError(f"audit fields must be JSON values: {exc}") from None


def _matches(fields: Mapping[str, Any], user: str | None) -> bool:
    return user is None or any(fields.get(name) == user for name in AUDIT_USER_FIELDS)


# -- SQLite -----------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS people_users (
    name TEXT PRIMARY KEY,
    organization TEXT NOT NULL,
    create_time REAL NOT NULL,
    offers_per_hour INTEGER,
    store_bytes INTEGER
);
CREATE INDEX IF NOT EXISTS people_users_org ON people_users (organization, name);
CREATE TABLE IF NOT EXISTS people_enrollments (
    token_hash TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    expire_time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS people_enrollments_user ON people_enrollments (user);
CREATE INDEX IF NOT EXISTS people_enrollments_expiry ON people_enrollments (expire_time);
CREATE TABLE IF NOT EXISTS people_devices (
    device_id TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    display_name TEXT NOT NULL,
    signing_key BLOB NOT NULL,
    encryption_key BLOB NOT NULL,
    create_time REAL NOT NULL,
    revoke_time REAL
);
CREATE INDEX IF NOT EXISTS people_devices_user ON people_devices (user, create_time);
CREATE TABLE IF NOT EXISTS people_presence (
    device_id TEXT NOT NULL,
    stream_id TEXT NOT NULL,
    until_time REAL NOT NULL,
    PRIMARY KEY (device_id, stream_id)
);
CREATE INDEX IF NOT EXISTS people_presence_until ON people_presence (until_time);
CREATE TABLE IF NOT EXISTS people_audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    event TEXT NOT NULL,
    fields TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS people_audit_time ON people_audit (time);
"""

_USER_COLUMNS = "name, organization, create_time, offers_per_hour, store_bytes"
_DEVICE_COLUMNS = (
    "device_id, user, display_name, signing_key, encryption_key, create_time, revoke_time"
)


def _user(row: Sequence[Any]) -> User:
    name, organization, create_s, offers_per_hour, store_bytes = row
    return User(str(name), str(organization), float(create_s), offers_per_hour, store_bytes)


def _device(row: Sequence[Any]) -> DeviceRecord:
    device_id, user, display_name, signing_key, encryption_key, create_s, revoked_s = row
    return DeviceRecord(
        device_id=str(device_id),
        user=str(user),
        display_name=str(display_name),
        signing_key=bytes(signing_key),
        encryption_key=bytes(encryption_key),
        create_s=float(create_s),
        revoked_s=None if revoked_s is None else float(revoked_s),
    )


@contextlib.contextmanager
def _disk_full() -> Iterator[None]:
    """SQLite's "database or disk is full" as StorageFull, on any connection (the store's
    `_Connection` does so itself; one from `SqliteDirectory.open` is a plain one)."""
    try:
        yield
    except (sqlite3.Error, OSError) as exc:
        if storage_full(exc):
            raise StorageFull() from None
        raise


class SqliteDirectory:
    """Directory in a SQLite database: the broker's broker.sqlite3, over the store's own
    connection (tables ``people_*``, made if missing).

    The connection must be in autocommit mode (``isolation_level=None``, as SqliteStore opens
    it): steps of more than one statement are BEGIN IMMEDIATE ... COMMIT, so that another
    process on the same file (`ferry admin` beside a running broker) never sees half of one.
    Use it from the connection's thread; each method runs to its end without awaiting.
    """

    def __init__(self, connection: sqlite3.Connection) -> None:
        if connection.isolation_level is not None:
            raise ValueError("SqliteDirectory needs a connection with isolation_level=None")
        self._db = connection
        self._owned = False
        with _disk_full():
            self._db.executescript(_SCHEMA)

    @classmethod
    def open(cls, path: Path | str) -> SqliteDirectory:
        """A directory on the SQLite file at `path` with a connection of its own, opened as
        SqliteStore opens it (file mode 0600, WAL, busy timeout); `close` closes it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(path, 0o600)
        db = sqlite3.connect(path, isolation_level=None)
        try:
            with _disk_full():
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute("PRAGMA busy_timeout=5000")
            directory = cls(db)
        except BaseException:
            db.close()
            raise
        directory._owned = True
        return directory

    async def close(self) -> None:
        """Close the connection if `open` made it (the store's is the store's to close)."""
        if self._owned:
            self._db.close()

    def _run(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        with _disk_full():
            return self._db.execute(sql, args)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._run("BEGIN IMMEDIATE")
        try:
            yield
            self._run("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def _has_user(self, name: str) -> bool:
        return (
            self._run("SELECT 1 FROM people_users WHERE name = ?", (name,)).fetchone() is not None
        )

    # -- users --------------------------------------------------------------------------------

    async def add_user(self, user: User) -> None:
        check_user_name(user.name)
        check_org_name(user.organization)
        _check_quotas(user.offers_per_hour, user.store_bytes)
        cursor = self._run(
            f"INSERT OR IGNORE INTO people_users ({_USER_COLUMNS})"  # noqa: S608 - fixed
            " VALUES (?, ?, ?, ?, ?)",
            (user.name, user.organization, user.create_s, user.offers_per_hour, user.store_bytes),
        )
        if cursor.rowcount != 1:
            raise UserExists(f"the user {user.name} exists already")

    async def get_user(self, name: str) -> User | None:
        row = self._run(
            f"SELECT {_USER_COLUMNS} FROM people_users WHERE name = ?",  # noqa: S608 - fixed
            (name,),
        ).fetchone()
        return None if row is None else _user(row)

    async def set_user_quotas(
        self, name: str, offers_per_hour: int | None, store_bytes: int | None
    ) -> None:
        _check_quotas(offers_per_hour, store_bytes)
        cursor = self._run(
            "UPDATE people_users SET offers_per_hour = ?, store_bytes = ? WHERE name = ?",
            (offers_per_hour, store_bytes, name),
        )
        if cursor.rowcount != 1:
            raise UnknownUser(f"no user {name}")

    async def list_users(self, organization: str | None = None) -> list[User]:
        where, args = ("WHERE organization = ?", (organization,)) if organization else ("", ())
        rows = self._run(
            f"SELECT {_USER_COLUMNS} FROM people_users {where} ORDER BY name",  # noqa: S608
            args,
        ).fetchall()
        return [_user(r) for r in rows]

    async def remove_user(self, name: str, now: float) -> bool:
        with self._transaction():
            cursor = self._run("DELETE FROM people_users WHERE name = ?", (name,))
            if cursor.rowcount != 1:
                return False
            self._run("DELETE FROM people_enrollments WHERE user = ?", (name,))
            self._run(
                "DELETE FROM people_presence WHERE device_id IN"
                " (SELECT device_id FROM people_devices WHERE user = ?)",
                (name,),
            )
            self._run(
                "UPDATE people_devices SET revoke_time = ? WHERE user = ? AND revoke_time IS NULL",
                (now, name),
            )
        return True

    # -- enrollments --------------------------------------------------------------------------

    async def add_enrollment(self, token_hash: str, user: str, expire_s: float) -> None:
        cursor = self._run(
            "INSERT INTO people_enrollments (token_hash, user, expire_time)"
            " SELECT ?, name, ? FROM people_users WHERE name = ?",
            (token_hash, expire_s, user),
        )
        if cursor.rowcount != 1:
            raise UnknownUser(f"no user {user}")

    async def take_enrollment(self, token_hash: str, now: float) -> str | None:
        with self._transaction():
            row = self._run(
                "SELECT user, expire_time FROM people_enrollments WHERE token_hash = ?",
                (token_hash,),
            ).fetchone()
            self._run("DELETE FROM people_enrollments WHERE token_hash = ?", (token_hash,))
            self._run("DELETE FROM people_enrollments WHERE expire_time <= ?", (now,))
        if row is None or row[1] <= now:
            return None
        return str(row[0])

    # -- devices ------------------------------------------------------------------------------

    async def add_device(self, device: DeviceRecord) -> None:
        with self._transaction():
            if not self._has_user(device.user):
                raise UnknownUser(f"no user {device.user}")
            try:
                self._run(
                    f"INSERT INTO people_devices ({_DEVICE_COLUMNS})"  # noqa: S608 - fixed
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        device.device_id,
                        device.user,
                        device.display_name,
                        bytes(device.signing_key),
                        bytes(device.encryption_key),
                        device.create_s,
                        device.revoked_s,
                    ),
                )
            except sqlite3.IntegrityError:
                raise ValueError(f"a device {device.device_id} exists already") from None

    def _get_device(self, device_id: str) -> DeviceRecord | None:
        row = self._run(
            f"SELECT {_DEVICE_COLUMNS} FROM people_devices WHERE device_id = ?",  # noqa: S608
            (device_id,),
        ).fetchone()
        return None if row is None else _device(row)

    async def get_device(self, device_id: str) -> DeviceRecord | None:
        return self._get_device(device_id)

    async def devices_of(self, user: str, include_revoked: bool = False) -> list[DeviceRecord]:
        live = "" if include_revoked else " AND revoke_time IS NULL"
        rows = self._run(
            f"SELECT {_DEVICE_COLUMNS} FROM people_devices WHERE user = ?{live}"  # noqa: S608
            " ORDER BY create_time, device_id",
            (user,),
        ).fetchall()
        return [_device(r) for r in rows]

    async def devices_in(self, organization: str) -> list[DeviceRecord]:
        columns = ", ".join(f"d.{c.strip()}" for c in _DEVICE_COLUMNS.split(","))
        rows = self._run(
            f"SELECT {columns} FROM people_devices d JOIN people_users u"  # noqa: S608 - fixed
            " ON u.name = d.user WHERE u.organization = ? AND d.revoke_time IS NULL"
            " ORDER BY d.user, d.create_time, d.device_id",
            (organization,),
        ).fetchall()
        return [_device(r) for r in rows]

    async def revoke_device(self, device_id: str, now: float) -> DeviceRecord | None:
        with self._transaction():
            self._run(
                "UPDATE people_devices SET revoke_time = ?"
                " WHERE device_id = ? AND revoke_time IS NULL",
                (now, device_id),
            )
            self._run("DELETE FROM people_presence WHERE device_id = ?", (device_id,))
            return self._get_device(device_id)

    # -- presence -----------------------------------------------------------------------------

    async def set_online(self, device_id: str, stream_id: str, until_s: float) -> None:
        self._run(
            "INSERT OR REPLACE INTO people_presence (device_id, stream_id, until_time)"
            " SELECT device_id, ?, ? FROM people_devices"
            " WHERE device_id = ? AND revoke_time IS NULL",
            (stream_id, until_s, device_id),
        )

    async def set_offline(self, device_id: str, stream_id: str) -> None:
        self._run(
            "DELETE FROM people_presence WHERE device_id = ? AND stream_id = ?",
            (device_id, stream_id),
        )

    async def online(self, device_ids: Sequence[str], now: float) -> set[str]:
        # The sweep of expired streams rides along; a full disk must not make people offline.
        with contextlib.suppress(StorageFull):
            self._run("DELETE FROM people_presence WHERE until_time <= ?", (now,))
        ids = list(dict.fromkeys(device_ids))
        found: set[str] = set()
        for start in range(0, len(ids), 500):  # within SQLite's limit of bound parameters
            part = ids[start : start + 500]
            marks = ", ".join("?" for _ in part)
            rows = self._run(
                f"SELECT DISTINCT device_id FROM people_presence"  # noqa: S608 - placeholders
                f" WHERE device_id IN ({marks}) AND until_time > ?",
                (*part, now),
            ).fetchall()
            found.update(str(r[0]) for r in rows)
        return found

    # -- audit --------------------------------------------------------------------------------

    async def audit(self, event: str, now: float, fields: Mapping[str, Any]) -> None:
        self._run(
            "INSERT INTO people_audit (time, event, fields) VALUES (?, ?, ?)",
            (now, event, _fields_json(fields)),
        )

    async def read_audit(
        self, *, since_s: float | None = None, user: str | None = None, limit: int = 1000
    ) -> list[AuditEntry]:
        where = ["time >= ?"] if since_s is not None else []
        args: list[Any] = [since_s] if since_s is not None else []
        if user is not None:
            where.append(
                "("
                + " OR ".join(f"json_extract(fields, '$.{f}') = ?" for f in AUDIT_USER_FIELDS)
                + ")"
            )
            args += [user] * len(AUDIT_USER_FIELDS)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._run(
            f"SELECT id, time, event, fields FROM people_audit {clause}"  # noqa: S608 - fixed
            " ORDER BY id DESC LIMIT ?",
            (*args, max(limit, 0)),
        ).fetchall()
        return [
            AuditEntry(str(i), float(t), str(event), json.loads(fields))
            for i, t, event, fields in reversed(rows)
        ]

    async def trim_audit(self, before_s: float) -> int:
        dropped = self._run("DELETE FROM people_audit WHERE time < ?", (before_s,)).rowcount
        return dropped + self._trim_to(AUDIT_MAX_ENTRIES)

    def _trim_to(self, keep: int) -> int:
        """Drop the oldest entries beyond the newest ``keep``."""
        return self._run(
            "DELETE FROM people_audit WHERE id <= (SELECT MAX(id) FROM people_audit) - ?",
            (keep,),
        ).rowcount


# -- Redis ------------------------------------------------------------------------------------
#
# Keys, under ``{prefix}p:`` (prefix: the RedisStore's, default ``ferry:``)::
#
#     u:{name}        hash    a user: org, create, oph, sb (quotas; absent: the default)
#     users           zset    every user name (score 0: by name)
#     org:{org}       zset    the names of the organisation's users (score 0)
#     e:{token_hash}  hash    an enrollment: user, expire
#     ue:{user}       set     the user's enrollment token hashes
#     enroll          zset    every enrollment token hash, by expire
#     d:{device_id}   hash    a device: user, name, sk, ek (public keys), create, revoked
#     ud:{user}       zset    the user's device ids, by create
#     on:{device_id}  zset    the device's open streams, by until; a Redis TTL of a day
#     audit           stream  the audit log: t (time), e (event), f (JSON fields); ids are
#                             milliseconds of the broker's clock, never going back
#     audit:ms        string  the milliseconds of the newest audit entry's id
#
# ARGV[1] of every script that computes key names is the prefix with ``p:``.

_WRITES = "#!lua\n"
_READS = "#!lua flags=no-writes\n"
_FREES = "#!lua flags=allow-oom\n"

_DEVICE_ROW = """
local function device(p, id)
  local f = redis.call('HMGET', p .. 'd:' .. id, 'user', 'name', 'sk', 'ek', 'create', 'revoked')
  if not f[1] then return false end
  return {id, f[1], f[2], f[3], f[4], f[5], f[6]}
end
"""

# KEYS: u:{name}, users, org:{org}. ARGV: prefix, name, org, create, oph, sb ('' = default).
_ADD_USER = (
    _WRITES
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'org', ARGV[3], 'create', ARGV[4])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'oph', ARGV[5]) end
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'sb', ARGV[6]) end
redis.call('ZADD', KEYS[2], 0, ARGV[2])
redis.call('ZADD', KEYS[3], 0, ARGV[2])
return 1
"""
)

# KEYS: u:{name}. ARGV: oph, sb ('' = default). 1, or 0 if there is no such user.
_SET_QUOTAS = (
    _WRITES
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local names = {'oph', 'sb'}
for i, name in ipairs(names) do
  if ARGV[i] == '' then redis.call('HDEL', KEYS[1], name)
  else redis.call('HSET', KEYS[1], name, ARGV[i]) end
end
return 1
"""
)

# KEYS: users or org:{org}. ARGV: prefix. Every user in it: {name, org, create, oph, sb}.
_LIST_USERS = (
    _READS
    + """
local out = {}
for _, name in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local f = redis.call('HMGET', ARGV[1] .. 'u:' .. name, 'org', 'create', 'oph', 'sb')
  if f[1] then table.insert(out, {name, f[1], f[2], f[3], f[4]}) end
end
return out
"""
)

# KEYS: u:{name}, users, ue:{name}, enroll, ud:{name}. ARGV: prefix, name, now.
# 1 if removed (devices revoked, enrollments forgotten), 0 if there was no such user.
_REMOVE_USER = (
    _WRITES
    + """
local p, name = ARGV[1], ARGV[2]
local org = redis.call('HGET', KEYS[1], 'org')
if not org then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], name)
redis.call('ZREM', p .. 'org:' .. org, name)
for _, hash in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  redis.call('DEL', p .. 'e:' .. hash)
  redis.call('ZREM', KEYS[4], hash)
end
redis.call('DEL', KEYS[3])
for _, id in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do
  redis.call('HSETNX', p .. 'd:' .. id, 'revoked', ARGV[3])
  redis.call('DEL', p .. 'on:' .. id)
end
return 1
"""
)

# KEYS: u:{user}, e:{hash}, ue:{user}, enroll. ARGV: hash, user, expire. 0: no such user.
_ADD_ENROLLMENT = (
    _WRITES
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], 'user', ARGV[2], 'expire', ARGV[3])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
return 1
"""
)

# KEYS: e:{hash}, enroll. ARGV: prefix, hash, now, sweep batch. The token's user if it had
# not expired (and the user still exists), else nil; the token is gone either way, and so
# are up to a batch of expired ones.
_TAKE_ENROLLMENT = (
    _FREES
    + """
local p = ARGV[1]
local function forget(hash)
  local key = p .. 'e:' .. hash
  local user = redis.call('HGET', key, 'user')
  redis.call('DEL', key)
  redis.call('ZREM', KEYS[2], hash)
  if user then redis.call('SREM', p .. 'ue:' .. user, hash) end
end
local f = redis.call('HMGET', KEYS[1], 'user', 'expire')
forget(ARGV[2])
local old = redis.call('ZRANGE', KEYS[2], '-inf', ARGV[3], 'BYSCORE', 'LIMIT', 0, ARGV[4])
for _, hash in ipairs(old) do forget(hash) end
if not f[1] or tonumber(f[2]) <= tonumber(ARGV[3]) then return false end
if redis.call('EXISTS', p .. 'u:' .. f[1]) == 0 then return false end
return f[1]
"""
)

# KEYS: u:{user}, d:{id}, ud:{user}. ARGV: id, user, name, sk, ek, create, revoked ('' none).
# 1; 0 if there is no such user; -1 if the device id is taken.
_ADD_DEVICE = (
    _WRITES
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
redis.call('HSET', KEYS[2], 'user', ARGV[2], 'name', ARGV[3], 'sk', ARGV[4], 'ek', ARGV[5],
  'create', ARGV[6])
if ARGV[7] ~= '' then redis.call('HSET', KEYS[2], 'revoked', ARGV[7]) end
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[1])
return 1
"""
)

# KEYS: ud:{user} (devices_of) or org:{org} (devices_in). ARGV: prefix, "user" or "org",
# "1" to include revoked devices. The rows of the devices, by user, then create.
_DEVICES = (
    _READS
    + _DEVICE_ROW
    + """
local p = ARGV[1]
local lists = {}
if ARGV[2] == 'user' then
  lists = {KEYS[1]}
else
  for _, name in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    table.insert(lists, p .. 'ud:' .. name)
  end
end
local out = {}
for _, list in ipairs(lists) do
  for _, id in ipairs(redis.call('ZRANGE', list, 0, -1)) do
    local row = device(p, id)
    if row and (ARGV[3] == '1' or not row[7]) then table.insert(out, row) end
  end
end
return out
"""
)

# KEYS: d:{id}, on:{id}. ARGV: prefix, id, now. The device's row after revoking it, or nil.
_REVOKE = (
    _WRITES
    + _DEVICE_ROW
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSETNX', KEYS[1], 'revoked', ARGV[3])
redis.call('DEL', KEYS[2])
return device(ARGV[1], ARGV[2])
"""
)

# KEYS: d:{id}, on:{id}. ARGV: stream, until, ttl (ms), most streams.
_SET_ONLINE = (
    _WRITES
    + """
local f = redis.call('HMGET', KEYS[1], 'user', 'revoked')
if not f[1] or f[2] then return 0 end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
local extra = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
if extra > 0 then redis.call('ZPOPMIN', KEYS[2], extra) end
return 1
"""
)

# KEYS: on:{id} of each device asked about. ARGV: now. The (1-based) indexes of the keys
# with a stream live after `now`; the expired streams of each are dropped.
_ONLINE = (
    _FREES
    + """
local out = {}
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', ARGV[1])
  if redis.call('EXISTS', key) == 1 then table.insert(out, i) end
end
return out
"""
)

# KEYS: audit, audit:ms. ARGV: ms (of now), time, event, fields (JSON), max entries.
# The new entry's id: ms, or the newest entry's if that is later (a clock that went back).
_AUDIT = (
    _WRITES
    + """
local ms = tonumber(ARGV[1])
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
if last > ms then ms = last end
redis.call('SET', KEYS[2], string.format('%d', ms))
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], string.format('%d-*', ms),
  't', ARGV[2], 'e', ARGV[3], 'f', ARGV[4])
"""
)

#: Entries read per XREVRANGE while filtering the audit log by user.
_AUDIT_BATCH = 1000


def _opt(value: int | None) -> str:
    return "" if value is None else str(int(value))


def _opt_int(value: bytes | None) -> int | None:
    return None if value is None else int(value)


def _redis_device(row: Sequence[Any]) -> DeviceRecord:
    device_id, user, name, sk, ek, create, revoked = row
    return DeviceRecord(
        device_id=device_id.decode(),
        user=user.decode(),
        display_name=name.decode(),
        signing_key=bytes(sk),
        encryption_key=bytes(ek),
        create_s=float(create),
        revoked_s=None if revoked is None else float(revoked),
    )


def _num(value: float) -> str:
    """A float as Redis and Lua read it back exactly."""
    return repr(float(value))


class RedisDirectory:
    """Directory on the Redis of the broker's RedisStore: keys under ``{prefix}p:`` (see the
    table above); every step one command or one Lua script.

    `client` is made as RedisStore.from_url makes it (no retries, bounded timeouts, bytes
    replies). Redis's failures surface as the store's: StoreUnavailable (connection,
    timeout, a read-only replica), StorageFull (maxmemory).
    """

    def __init__(self, client: redis.asyncio.Redis, prefix: str = "ferry:") -> None:
        if not prefix:
            raise ValueError("a RedisDirectory needs a key prefix")
        from redis import exceptions

        from ferry.broker import redis_store

        self._redis = client
        self._p = prefix + "p:"
        # ReadOnlyError: a replica answered, as during a failover (Sentinel).
        self._unavailable: tuple[type[Exception], ...] = (
            exceptions.ConnectionError,
            exceptions.TimeoutError,
            exceptions.ReadOnlyError,
        )
        self._response = exceptions.ResponseError
        self._oom = redis_store._oom
        self._store_unavailable = redis_store.StoreUnavailable
        script = client.register_script
        self._add_user = script(_ADD_USER)
        self._set_quotas = script(_SET_QUOTAS)
        self._list_users = script(_LIST_USERS)
        self._remove_user = script(_REMOVE_USER)
        self._add_enrollment = script(_ADD_ENROLLMENT)
        self._take_enrollment = script(_TAKE_ENROLLMENT)
        self._add_device = script(_ADD_DEVICE)
        self._devices = script(_DEVICES)
        self._revoke = script(_REVOKE)
        self._set_online = script(_SET_ONLINE)
        self._online = script(_ONLINE)
        self._audit = script(_AUDIT)

    @contextlib.asynccontextmanager
    async def _errors(self) -> AsyncIterator[None]:
        """Redis's failures as the store's (as RedisStore._errors has them)."""
        try:
            yield
        except self._unavailable as exc:
            raise self._store_unavailable() from exc
        except self._response as exc:
            if self._oom(exc):
                raise StorageFull() from None
            raise

    def _key(self, *parts: str) -> str:
        return self._p + "".join(parts)

    async def close(self) -> None:
        """Nothing to release: the client is the store's (or its maker's) to close."""

    # -- users --------------------------------------------------------------------------------

    async def add_user(self, user: User) -> None:
        check_user_name(user.name)
        check_org_name(user.organization)
        _check_quotas(user.offers_per_hour, user.store_bytes)
        async with self._errors():
            added = await self._add_user(
                keys=[
                    self._key("u:", user.name),
                    self._key("users"),
                    self._key("org:", user.organization),
                ],
                args=[
                    self._p,
                    user.name,
                    user.organization,
                    _num(user.create_s),
                    _opt(user.offers_per_hour),
                    _opt(user.store_bytes),
                ],
            )
        if not added:
            raise UserExists(f"the user {user.name} exists already")

    async def get_user(self, name: str) -> User | None:
        async with self._errors():
            values = await self._redis.hmget(self._key("u:", name), ("org", "create", "oph", "sb"))
        org, create, oph, sb = cast(list[Any], values)
        if org is None:
            return None
        return User(name, org.decode(), float(create), _opt_int(oph), _opt_int(sb))

    async def set_user_quotas(
        self, name: str, offers_per_hour: int | None, store_bytes: int | None
    ) -> None:
        _check_quotas(offers_per_hour, store_bytes)
        async with self._errors():
            done = await self._set_quotas(
                keys=[self._key("u:", name)], args=[_opt(offers_per_hour), _opt(store_bytes)]
            )
        if not done:
            raise UnknownUser(f"no user {name}")

    async def list_users(self, organization: str | None = None) -> list[User]:
        index = self._key("org:", organization) if organization else self._key("users")
        async with self._errors():
            rows = await self._list_users(keys=[index], args=[self._p])
        return [
            User(n.decode(), org.decode(), float(create), _opt_int(oph), _opt_int(sb))
            for n, org, create, oph, sb in rows
        ]

    async def remove_user(self, name: str, now: float) -> bool:
        keys = [
            self._key("u:", name),
            self._key("users"),
            self._key("ue:", name),
            self._key("enroll"),
            self._key("ud:", name),
        ]
        async with self._errors():
            removed = await self._remove_user(keys=keys, args=[self._p, name, _num(now)])
        return bool(removed)

    # -- enrollments --------------------------------------------------------------------------

    async def add_enrollment(self, token_hash: str, user: str, expire_s: float) -> None:
        async with self._errors():
            added = await self._add_enrollment(
                keys=[
                    self._key("u:", user),
                    self._key("e:", token_hash),
                    self._key("ue:", user),
                    self._key("enroll"),
                ],
                args=[token_hash, user, _num(expire_s)],
            )
        if not added:
            raise UnknownUser(f"no user {user}")

    async def take_enrollment(self, token_hash: str, now: float) -> str | None:
        async with self._errors():
            user = await self._take_enrollment(
                keys=[self._key("e:", token_hash), self._key("enroll")],
                args=[self._p, token_hash, _num(now), _SWEEP_BATCH],
            )
        return None if user is None else cast(bytes, user).decode()

    # -- devices ------------------------------------------------------------------------------

    async def add_device(self, device: DeviceRecord) -> None:
        revoked = "" if device.revoked_s is None else _num(device.revoked_s)
        async with self._errors():
            added = await self._add_device(
                keys=[
                    self._key("u:", device.user),
                    self._key("d:", device.device_id),
                    self._key("ud:", device.user),
                ],
                args=[
                    device.device_id,
                    device.user,
                    device.display_name,
                    bytes(device.signing_key),
                    bytes(device.encryption_key),
                    _num(device.create_s),
                    revoked,
                ],
            )
        if added == 0:
            raise UnknownUser(f"no user {device.user}")
        if added < 0:
            raise ValueError(f"a device {device.device_id} exists already")

    async def get_device(self, device_id: str) -> DeviceRecord | None:
        fields = ("user", "name", "sk", "ek", "create", "revoked")
        async with self._errors():
            values = cast(list[Any], await self._redis.hmget(self._key("d:", device_id), fields))
        if values[0] is None:
            return None
        return _redis_device([device_id.encode(), *values])

    async def _device_rows(self, key: str, kind: str, include_revoked: bool) -> list[DeviceRecord]:
        async with self._errors():
            rows = await self._devices(
                keys=[key], args=[self._p, kind, "1" if include_revoked else "0"]
            )
        return [_redis_device(row) for row in rows]

    async def devices_of(self, user: str, include_revoked: bool = False) -> list[DeviceRecord]:
        return await self._device_rows(self._key("ud:", user), "user", include_revoked)

    async def devices_in(self, organization: str) -> list[DeviceRecord]:
        return await self._device_rows(self._key("org:", organization), "org", False)

    async def revoke_device(self, device_id: str, now: float) -> DeviceRecord | None:
        async with self._errors():
            row = await self._revoke(
                keys=[self._key("d:", device_id), self._key("on:", device_id)],
                args=[self._p, device_id, _num(now)],
            )
        return None if row is None else _redis_device(row)

    # -- presence -----------------------------------------------------------------------------

    async def set_online(self, device_id: str, stream_id: str, until_s: float) -> None:
        async with self._errors():
            await self._set_online(
                keys=[self._key("d:", device_id), self._key("on:", device_id)],
                args=[stream_id, _num(until_s), PRESENCE_TTL_S * 1000, MAX_STREAMS_PER_DEVICE],
            )

    async def set_offline(self, device_id: str, stream_id: str) -> None:
        async with self._errors():
            await self._redis.zrem(self._key("on:", device_id), stream_id)

    async def online(self, device_ids: Sequence[str], now: float) -> set[str]:
        ids = list(dict.fromkeys(device_ids))
        if not ids:
            return set()
        async with self._errors():
            found = await self._online(keys=[self._key("on:", i) for i in ids], args=[_num(now)])
        return {ids[int(i) - 1] for i in found}

    # -- audit --------------------------------------------------------------------------------

    async def audit(self, event: str, now: float, fields: Mapping[str, Any]) -> None:
        data = _fields_json(fields)
        async with self._errors():
            await self._audit(
                keys=[self._key("audit"), self._key("audit:ms")],
                args=[math.floor(now * 1000), _num(now), event, data, AUDIT_MAX_ENTRIES],
            )

    async def read_audit(
        self, *, since_s: float | None = None, user: str | None = None, limit: int = 1000
    ) -> list[AuditEntry]:
        # Entry ids are never earlier than their time, so ids from floor(since) on hold every
        # entry at or after `since_s` (and perhaps a few before it: the time filter drops them).
        low = "-" if since_s is None else str(math.floor(since_s * 1000))
        high = "+"
        found: list[AuditEntry] = []
        while len(found) < limit:
            async with self._errors():
                batch = cast(
                    list[tuple[bytes, dict[bytes, bytes]]],
                    await self._redis.xrevrange(
                        self._key("audit"), max=high, min=low, count=_AUDIT_BATCH
                    ),
                )
            for entry_id, values in batch:
                entry = AuditEntry(
                    entry_id.decode(),
                    float(values[b"t"]),
                    values[b"e"].decode(),
                    json.loads(values[b"f"]),
                )
                if (since_s is None or entry.time_s >= since_s) and _matches(entry.fields, user):
                    found.append(entry)
                    if len(found) == limit:
                        break
            if len(batch) < _AUDIT_BATCH:
                break
            high = "(" + batch[-1][0].decode()  # each pass reads older entries: it ends
        found.reverse()
        return found

    async def trim_audit(self, before_s: float) -> int:
        async with self._errors():
            dropped = await self._redis.xtrim(
                self._key("audit"), minid=str(math.floor(before_s * 1000)), approximate=False
            )
        return int(dropped)
