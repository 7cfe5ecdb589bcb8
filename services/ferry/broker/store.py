"""The broker's store: the `Store` interface and `SqliteStore`, its embedded implementation.

Everything that must survive a restart lives here: sessions (the Session proto as a blob, plus
the columns we look things up by), port leases, the object-store uploads of the fallback path
(so that a restarted broker still deletes every object it made), and the broker's id (in
`meta`: random, made once per store, so replicas sharing a store share it and a lost store
means a new broker). Secrets are stored only as sha256 hashes.

The interface is asynchronous (every method but `ledger` is awaited) and every method is one
short atomic step, so that a store over Redis implements each with one transaction (MULTI/EXEC
or a script) and the event loop serves other calls while it waits for the answer. Calls of one
process therefore interleave between store steps, as calls on two replicas do: nothing may
rely on no other call running between a read and the write that follows it. Updates are
compare-and-set on `SessionRecord.version`: two writers racing on one session cannot both win,
which is what makes a code single-use across interleaved calls and broker replicas alike.

SqliteStore runs in WAL mode with synchronous=NORMAL: a committed write survives the process
dying at any point (not necessarily a power cut, which would lose at most the last commits).
Its calls take microseconds, so its async methods run the same synchronous code on the event
loop directly (no thread: the connection is used from the loop's thread only).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import sqlite3
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ferry.broker import leases
from ferry.broker.errors import Reason, ResourceExhausted
from ferry.broker.ledger import Ledger, MemoryLedger
from ferry.broker.states import CONNECTING, FINAL_STATES, LIVE_STATES, TRANSFERRING, Party
from ferry.v1 import broker_pb2

if TYPE_CHECKING:
    from ferry.broker.people import Directory


class StaleRecord(Exception):
    """The session changed since it was read; read it again and retry."""


class CodeTaken(Exception):
    """create_session: another session holds the code hash, and a claim could still find it
    (it is live, or it ended but has not expired yet: its claimant is told so)."""


class StorageFull(ResourceExhausted):
    """The store's disk is full (SQLite's "database or disk is full", ENOSPC, EDQUOT).

    A refusal of its own (RESOURCE_EXHAUSTED, reason STORAGE_FULL), raised by the store for
    any call that needed to write, so that a full disk is a clear answer to whoever called
    and never an INTERNAL with a traceback (issue 10, finding 2).
    """

    def __init__(self, message: str = "the broker's storage is full; try again later") -> None:
        super().__init__(Reason.STORAGE_FULL, message)


@dataclasses.dataclass(slots=True)
class SessionRecord:
    """One session as stored: the proto plus what we look it up by."""

    session: broker_pb2.Session
    sender_token_hash: str
    code_hash: str | None = None
    receiver_token_hash: str | None = None
    request_id: str | None = None
    version: int = 0
    #: A store-and-forward offer's claim verifier (None for a PAKE offer).
    claim_verifier: bytes | None = None

    @property
    def session_id(self) -> str:
        """The id part of `sessions/{id}`."""
        return self.session.name.removeprefix("sessions/")

    @property
    def expire_s(self) -> float:
        """expire_time in seconds since the epoch."""
        return self.session.expire_time.ToNanoseconds() / 1e9


@dataclasses.dataclass(slots=True)
class UploadRecord:
    """One file's object-store upload: the S3 multipart upload and its cleanup bookkeeping.

    `urls_expire_s` is the latest expiry of any upload URL handed out for it: until then a
    holder could still PUT, so cleanup runs once more after it. `clean_after_s` is when the
    cleanup of a finished session may (next) run.
    """

    session_id: str
    file_index: int
    upload_id: str
    create_s: float
    completed: bool = False
    urls_expire_s: float = 0.0
    clean_after_s: float = 0.0
    #: Bytes reserved in the object store for the file (sealed object and digests), and the
    #: sender's source network they count against (issue 10, finding 6: store quotas).
    size_bytes: int = 0
    owner: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class StoreQuota:
    """Bytes the object store may hold: for one offer, for one owner (address), in all."""

    per_offer: int
    per_owner: int
    total: int


class QuotaExceeded(Exception):
    """Recording an upload would take the object store past a quota; str() says which."""


class Store(Protocol):
    """What the broker needs from its storage. Implementations: SqliteStore, RedisStore
    (redis_store.py). Every step is awaited but `ledger`, which only hands out an object."""

    async def create_session(self, record: SessionRecord) -> None:
        """Insert a new session (version 0). Raises CodeTaken if its code hash is held by
        a session that is live or expires after the new one's create_time: the check and
        the insert are one step, so two offers never share a nameplate."""

    async def get_session(self, session_id: str) -> SessionRecord | None:
        """The session with this id, or None."""

    async def find_by_code_hash(self, code_hash: str) -> SessionRecord | None:
        """The newest session whose unclaimed code has this hash, or None."""

    async def session_by_token_hash(self, token_hash: str) -> tuple[SessionRecord, Party] | None:
        """The session this token hash belongs to, and whose token it is, or None: what
        find_by_token_hash and get_session find, in one step (every authorized call)."""

    async def find_by_request_id(self, request_id: str) -> SessionRecord | None:
        """The newest session created with this request_id, or None."""

    async def update_session(self, record: SessionRecord) -> SessionRecord:
        """Store `record` if the stored version is still `record.version`; return it bumped.

        Raises StaleRecord when someone else updated the session first.
        """

    async def due_for_expiry(self, now: float, limit: int) -> list[SessionRecord]:
        """Up to `limit` live sessions whose expire_time is at or before `now`."""

    async def lease_ports(
        self,
        host_id: str,
        allowed: leases.Span,
        count: int,
        session_id: str,
        expire_s: float,
        now: float,
        *,
        owner: str = "",
        hold_until: float | None = None,
        max_per_owner: int | None = None,
    ) -> leases.Span:
        """Atomically find and record `count` free ports on `host_id` for the session.

        A lease is live until `expire_s`; one with `hold_until` only until then, unless its
        session is CONNECTING or TRANSFERRING. Raises leases.NoPortsAvailable when the
        host's range is full, leases.TooManyLeases when `owner` holds `max_per_owner` live
        leases on the host already (the session's own lease, being replaced, not counted).
        """

    async def release_lease(self, session_id: str) -> None:
        """Forget the session's lease, if any."""

    async def add_upload(
        self, record: UploadRecord, quota: StoreQuota | None = None
    ) -> UploadRecord:
        """Record the upload unless the file has one already; return the one that is stored.

        With `quota`, a new record whose size_bytes would take its session, its owner or
        the whole store past the quota is not recorded: QuotaExceeded.
        """

    async def store_usage(self) -> tuple[int, int]:
        """(bytes reserved, uploads) the object store holds for recorded uploads."""

    async def get_upload(self, session_id: str, file_index: int) -> UploadRecord | None:
        """The upload of this file of this session, or None."""

    async def replace_upload(
        self, session_id: str, file_index: int, old_upload_id: str, new_upload_id: str
    ) -> bool:
        """Point the file at a new upload, if it is still at `old_upload_id`; True if so."""

    async def complete_upload(self, session_id: str, file_index: int) -> None:
        """Mark the file's upload completed."""

    async def extend_upload_urls(self, session_id: str, file_index: int, expire_s: float) -> None:
        """Raise the upload's urls_expire_s to `expire_s` if that is later."""

    async def uploads_to_clean(self, now: float, limit: int) -> list[UploadRecord]:
        """Up to `limit` uploads whose session is final (or gone) and clean_after_s <= now."""

    async def defer_upload_cleanup(self, session_id: str, file_index: int, after_s: float) -> None:
        """Run the upload's cleanup again at `after_s`."""

    async def delete_upload(self, session_id: str, file_index: int) -> None:
        """Forget the upload (its objects are gone)."""

    async def free_bytes(self) -> int | None:
        """Free space left to the store's file system, in bytes; None if it has no disk."""

    async def delete_ended(self, before_s: float, limit: int) -> int:
        """Delete up to `limit` sessions in a final state since at or before `before_s`
        (their leases with them); return how many. Their uploads stay for the cleaner."""

    async def broker_id(self) -> str:
        """The id of the broker this store belongs to: random, made on the first call ever.

        Every later call, from any process sharing the store, returns the same id; creating
        it is atomic, so replicas starting together agree on one.
        """

    async def token_key(self) -> bytes | None:
        """The secret key that keys code hashes and derived tokens, if the store keeps one
        that every broker sharing it uses (Redis: made once, atomically); None: each broker
        process keeps its own (SQLite: token.key beside the database)."""

    def ledger(self) -> Ledger:
        """The rate-limit buckets, counters and sealed retry answers of the brokers on this
        store (ledger.py): shared through it by replicas (Redis), else in this process."""

    async def close(self) -> None:
        """Release the store's resources."""

    async def check(self) -> None:
        """Make sure the store can serve, once at start-up (Redis: reachable, 7.0 or later,
        and a warning if it may evict keys); raise if it cannot."""

    async def count_sessions_by_state(self) -> dict[str, int]:
        """How many sessions the store holds, by lower-case state name ("offered", ...; a
        store without a per-state index may answer coarser: "live", "ended"). Cheap enough
        for every metrics scrape."""

    async def count_uploads_in_flight(self) -> int | None:
        """Uploads started and not completed; None if the store cannot tell cheaply."""

    async def offers_to(self, recipient: str, now: float, limit: int) -> list[SessionRecord]:
        """Up to `limit` sessions offered to the person `recipient` (Session.person) that
        are still in STATE_OFFERED and expire after `now`, oldest first (claimed ones too:
        the caller filters)."""

    async def count_offers_to(self, recipient: str, now: float) -> int:
        """How many sessions offers_to would find without a limit, read without their
        data (a new offer's check of the recipient's inbox room)."""

    def directory(self) -> Directory:
        """The people directory kept in the same store (people.py): users, devices,
        enrollments, presence and the audit log."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    state INTEGER NOT NULL,
    code_hash TEXT,
    expire_time REAL NOT NULL,
    create_time REAL NOT NULL,
    sender_token_hash TEXT NOT NULL,
    receiver_token_hash TEXT,
    request_id TEXT,
    version INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_code ON sessions (code_hash) WHERE code_hash IS NOT NULL;
CREATE INDEX IF NOT EXISTS sessions_sender ON sessions (sender_token_hash);
CREATE INDEX IF NOT EXISTS sessions_receiver ON sessions (receiver_token_hash)
    WHERE receiver_token_hash IS NOT NULL;
CREATE INDEX IF NOT EXISTS sessions_request ON sessions (request_id) WHERE request_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS sessions_expiry ON sessions (state, expire_time);
CREATE TABLE IF NOT EXISTS leases (
    session_id TEXT PRIMARY KEY,
    host_id TEXT NOT NULL,
    first_port INTEGER NOT NULL,
    last_port INTEGER NOT NULL,
    expire_time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS leases_host ON leases (host_id, expire_time);
CREATE TABLE IF NOT EXISTS uploads (
    session_id TEXT NOT NULL,
    file_index INTEGER NOT NULL,
    upload_id TEXT NOT NULL,
    create_time REAL NOT NULL,
    completed INTEGER NOT NULL DEFAULT 0,
    urls_expire_time REAL NOT NULL DEFAULT 0,
    clean_after REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (session_id, file_index)
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT
);
"""

# The live leases of a host, other than the session's own (parameters: session_id, host_id,
# now, now, CONNECTING, TRANSFERRING): past their connect deadline (hold_until) a lease
# holds only while its session reports connecting or transferring (issue 10, finding 5).
_HELD_LEASES = (
    "leases l LEFT JOIN sessions s ON s.id = l.session_id"
    " WHERE l.session_id != ? AND l.host_id = ? AND l.expire_time > ?"
    " AND (l.hold_until IS NULL OR l.hold_until > ? OR s.state IN (?, ?))"
)

_UPLOAD_COLUMNS = (
    "session_id, file_index, upload_id, create_time, completed, urls_expire_time, clean_after,"
    " size_bytes, owner"
)


def _upload(row: tuple[str, int, str, float, int, float, float, int, str]) -> UploadRecord:
    session_id, file_index, upload_id, create_s, completed, urls_expire_s, clean_after_s = row[:7]
    return UploadRecord(
        session_id=session_id,
        file_index=file_index,
        upload_id=upload_id,
        create_s=create_s,
        completed=bool(completed),
        urls_expire_s=urls_expire_s,
        clean_after_s=clean_after_s,
        size_bytes=row[7],
        owner=row[8],
    )


_COLUMNS = (
    "data, code_hash, sender_token_hash, receiver_token_hash, request_id, version, claim_verifier"
)
_Row = tuple[bytes, str | None, str, str | None, str | None, int, bytes | None]
# Columns added after the first release, each with its type, added to older files on open.
_ADDED_COLUMNS = {
    # Issue 13: the person an offer is addressed to (Session.person.recipient_user).
    "sessions": {"claim_verifier": "BLOB", "update_time": "REAL", "recipient": "TEXT"},
    # Issue 10, finding 5: who a lease counts against, and until when it holds unconnected.
    "leases": {"owner": "TEXT NOT NULL DEFAULT ''", "hold_until": "REAL"},
    # Issue 10, finding 6: the bytes an upload reserves, and whose address they count for.
    "uploads": {"size_bytes": "INTEGER NOT NULL DEFAULT 0", "owner": "TEXT NOT NULL DEFAULT ''"},
}
# Indexes on added columns: made after the columns are there.
_ADDED_INDEXES = (
    # Finding the ended sessions whose retention ran out (delete_ended).
    "CREATE INDEX IF NOT EXISTS sessions_ended ON sessions (state, update_time)",
    # Counting an address's bytes in the object store (add_upload's quota).
    "CREATE INDEX IF NOT EXISTS uploads_owner ON uploads (owner)",
    # A person's inbox (offers_to).
    "CREATE INDEX IF NOT EXISTS sessions_recipient ON sessions (recipient, state, create_time)"
    " WHERE recipient IS NOT NULL",
)
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def storage_full(exc: BaseException) -> bool:
    """Whether `exc` says the disk is full: SQLite's SQLITE_FULL, or ENOSPC/EDQUOT."""
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS


class _Connection(sqlite3.Connection):
    """A connection whose statements raise StorageFull when the disk is full."""

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        try:
            return super().execute(sql, parameters)
        except (sqlite3.Error, OSError) as exc:
            if storage_full(exc):
                raise StorageFull() from None
            raise

    def executescript(self, sql_script: str, /) -> sqlite3.Cursor:
        try:
            return super().executescript(sql_script)
        except (sqlite3.Error, OSError) as exc:
            if storage_full(exc):
                raise StorageFull() from None
            raise


def _record(row: _Row) -> SessionRecord:
    data, code_hash, sender_hash, receiver_hash, request_id, version, verifier = row
    session = broker_pb2.Session()
    session.ParseFromString(data)
    return SessionRecord(
        session=session,
        sender_token_hash=sender_hash,
        code_hash=code_hash,
        receiver_token_hash=receiver_hash,
        request_id=request_id,
        version=version,
        claim_verifier=verifier,
    )


class SqliteStore:
    """Store on one SQLite file; use one instance per process, from one thread (the event
    loop's). Each async method runs to its end without awaiting anything."""

    def __init__(self, path: Path | str) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if str(path) != ":memory:":
            # Created 0600 before SQLite opens it; SQLite gives its -wal and -shm files the
            # database file's mode.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            os.chmod(path, 0o600)
        self._path = path
        self._db = sqlite3.connect(path, isolation_level=None, factory=_Connection)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        for table, columns in _ADDED_COLUMNS.items():
            have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for column, kind in columns.items():
                if column not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        for index in _ADDED_INDEXES:
            self._db.execute(index)
        self._ledger = MemoryLedger()
        self._directory: Directory | None = None

    async def create_session(self, record: SessionRecord) -> None:
        s = record.session
        if record.code_hash is not None:  # no await between this check and the insert
            held = self._db.execute(
                "SELECT state, expire_time FROM sessions WHERE code_hash = ?"
                " ORDER BY create_time DESC LIMIT 1",
                (record.code_hash,),
            ).fetchone()
            created = s.create_time.ToNanoseconds() / 1e9
            if held is not None and (held[0] in LIVE_STATES or held[1] >= created):
                raise CodeTaken
        self._db.execute(
            "INSERT INTO sessions (id, state, code_hash, expire_time, create_time,"
            " sender_token_hash, receiver_token_hash, request_id, version, data, claim_verifier,"
            " update_time, recipient)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.session_id,
                int(s.state),
                record.code_hash,
                record.expire_s,
                s.create_time.ToNanoseconds() / 1e9,
                record.sender_token_hash,
                record.receiver_token_hash,
                record.request_id,
                record.version,
                s.SerializeToString(deterministic=True),
                record.claim_verifier,
                s.update_time.ToNanoseconds() / 1e9,
                s.person.recipient_user or None,
            ),
        )

    def _one(self, where: str, *args: object) -> SessionRecord | None:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM sessions WHERE {where}"  # noqa: S608 - fixed fragments
            " ORDER BY create_time DESC LIMIT 1",
            args,
        ).fetchone()
        return None if row is None else _record(row)

    async def get_session(self, session_id: str) -> SessionRecord | None:
        return self._one("id = ?", session_id)

    async def find_by_code_hash(self, code_hash: str) -> SessionRecord | None:
        return self._one("code_hash = ?", code_hash)

    async def find_by_request_id(self, request_id: str) -> SessionRecord | None:
        return self._one("request_id = ?", request_id)

    async def session_by_token_hash(self, token_hash: str) -> tuple[SessionRecord, Party] | None:
        row = self._db.execute(
            f"SELECT {_COLUMNS}, sender_token_hash = ? FROM sessions"  # noqa: S608 - fixed
            " WHERE sender_token_hash = ? OR receiver_token_hash = ? LIMIT 1",
            (token_hash, token_hash, token_hash),
        ).fetchone()
        if row is None:
            return None
        return _record(row[:-1]), Party.SENDER if row[-1] else Party.RECEIVER

    async def update_session(self, record: SessionRecord) -> SessionRecord:
        s = record.session
        cursor = self._db.execute(
            "UPDATE sessions SET state = ?, code_hash = ?, expire_time = ?,"
            " receiver_token_hash = ?, version = version + 1, data = ?, update_time = ?"
            " WHERE id = ? AND version = ?",
            (
                int(s.state),
                record.code_hash,
                record.expire_s,
                record.receiver_token_hash,
                s.SerializeToString(deterministic=True),
                s.update_time.ToNanoseconds() / 1e9,
                record.session_id,
                record.version,
            ),
        )
        if cursor.rowcount != 1:
            raise StaleRecord(f"session {record.session_id} changed concurrently")
        return dataclasses.replace(record, version=record.version + 1)

    async def due_for_expiry(self, now: float, limit: int) -> list[SessionRecord]:
        marks = ", ".join("?" for _ in LIVE_STATES)
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM sessions"  # noqa: S608 - placeholders only
            f" WHERE state IN ({marks}) AND expire_time <= ? ORDER BY expire_time LIMIT ?",
            (*sorted(int(s) for s in LIVE_STATES), now, limit),
        ).fetchall()
        return [_record(r) for r in rows]

    async def lease_ports(
        self,
        host_id: str,
        allowed: leases.Span,
        count: int,
        session_id: str,
        expire_s: float,
        now: float,
        *,
        owner: str = "",
        hold_until: float | None = None,
        max_per_owner: int | None = None,
    ) -> leases.Span:
        held = (session_id, host_id, now, now, int(CONNECTING), int(TRANSFERRING))
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if max_per_owner is not None:
                (mine,) = self._db.execute(
                    f"SELECT COUNT(*) FROM {_HELD_LEASES} AND l.owner = ?",  # noqa: S608
                    (*held, owner),
                ).fetchone()
                if mine >= max_per_owner:
                    raise leases.TooManyLeases(
                        f"the receiving address holds {mine} port leases on this sender's host"
                        f" already (at most {max_per_owner}): let a transfer connect or end,"
                        " or cancel one, then try again"
                    )
            taken = self._db.execute(
                f"SELECT l.first_port, l.last_port FROM {_HELD_LEASES}",  # noqa: S608
                held,
            ).fetchall()
            span = leases.allocate(allowed, count, taken)
            self._db.execute(
                "INSERT OR REPLACE INTO leases"
                " (session_id, host_id, first_port, last_port, expire_time, owner, hold_until)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (session_id, host_id, span[0], span[1], expire_s, owner, hold_until),
            )
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return span

    async def release_lease(self, session_id: str) -> None:
        self._db.execute("DELETE FROM leases WHERE session_id = ?", (session_id,))

    async def add_upload(
        self, record: UploadRecord, quota: StoreQuota | None = None
    ) -> UploadRecord:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if quota is not None and self._get_upload(record.session_id, record.file_index) is None:
                self._check_quota(record, quota)
            self._db.execute(
                f"INSERT OR IGNORE INTO uploads ({_UPLOAD_COLUMNS})"  # noqa: S608 - fixed columns
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.session_id,
                    record.file_index,
                    record.upload_id,
                    record.create_s,
                    int(record.completed),
                    record.urls_expire_s,
                    record.clean_after_s,
                    record.size_bytes,
                    record.owner,
                ),
            )
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        stored = self._get_upload(record.session_id, record.file_index)
        assert stored is not None
        return stored

    def _check_quota(self, record: UploadRecord, quota: StoreQuota) -> None:
        """QuotaExceeded if `record`'s bytes do not fit its offer's, owner's or the total quota."""
        checks = (
            ("this offer", "session_id = ?", (record.session_id,), quota.per_offer),
            ("this sender's address", "owner = ?", (record.owner,), quota.per_owner),
            ("the whole broker", "1 = ?", (1,), quota.total),
        )
        for who, where, args, limit in checks:
            (used,) = self._db.execute(
                f"SELECT COALESCE(SUM(size_bytes), 0) FROM uploads WHERE {where}",  # noqa: S608
                args,
            ).fetchone()
            if used + record.size_bytes > limit:
                raise QuotaExceeded(
                    f"the object store would hold {used + record.size_bytes} bytes for {who},"
                    f" over the broker's limit of {limit}"
                )

    async def store_usage(self) -> tuple[int, int]:
        used, count = self._db.execute(
            "SELECT COALESCE(SUM(size_bytes), 0), COUNT(*) FROM uploads"
        ).fetchone()
        return int(used), int(count)

    async def get_upload(self, session_id: str, file_index: int) -> UploadRecord | None:
        return self._get_upload(session_id, file_index)

    def _get_upload(self, session_id: str, file_index: int) -> UploadRecord | None:
        row = self._db.execute(
            f"SELECT {_UPLOAD_COLUMNS} FROM uploads"  # noqa: S608 - fixed columns
            " WHERE session_id = ? AND file_index = ?",
            (session_id, file_index),
        ).fetchone()
        return None if row is None else _upload(row)

    async def replace_upload(
        self, session_id: str, file_index: int, old_upload_id: str, new_upload_id: str
    ) -> bool:
        cursor = self._db.execute(
            "UPDATE uploads SET upload_id = ? WHERE session_id = ? AND file_index = ?"
            " AND upload_id = ? AND completed = 0",
            (new_upload_id, session_id, file_index, old_upload_id),
        )
        return cursor.rowcount == 1

    async def complete_upload(self, session_id: str, file_index: int) -> None:
        self._db.execute(
            "UPDATE uploads SET completed = 1 WHERE session_id = ? AND file_index = ?",
            (session_id, file_index),
        )

    async def extend_upload_urls(self, session_id: str, file_index: int, expire_s: float) -> None:
        self._db.execute(
            "UPDATE uploads SET urls_expire_time = MAX(urls_expire_time, ?)"
            " WHERE session_id = ? AND file_index = ?",
            (expire_s, session_id, file_index),
        )

    async def uploads_to_clean(self, now: float, limit: int) -> list[UploadRecord]:
        marks = ", ".join("?" for _ in LIVE_STATES)
        columns = ", ".join(f"u.{c.strip()}" for c in _UPLOAD_COLUMNS.split(","))
        rows = self._db.execute(
            f"SELECT {columns} FROM uploads u LEFT JOIN sessions s ON s.id = u.session_id"  # noqa: S608
            f" WHERE (s.id IS NULL OR s.state NOT IN ({marks})) AND u.clean_after <= ?"
            " ORDER BY u.clean_after LIMIT ?",
            (*sorted(int(s) for s in LIVE_STATES), now, limit),
        ).fetchall()
        return [_upload(r) for r in rows]

    async def defer_upload_cleanup(self, session_id: str, file_index: int, after_s: float) -> None:
        self._db.execute(
            "UPDATE uploads SET clean_after = ? WHERE session_id = ? AND file_index = ?",
            (after_s, session_id, file_index),
        )

    async def delete_upload(self, session_id: str, file_index: int) -> None:
        self._db.execute(
            "DELETE FROM uploads WHERE session_id = ? AND file_index = ?",
            (session_id, file_index),
        )

    async def free_bytes(self) -> int | None:
        if str(self._path) == ":memory:":
            return None
        st = os.statvfs(self._path.parent)
        return st.f_bavail * st.f_frsize

    async def delete_ended(self, before_s: float, limit: int) -> int:
        marks = ", ".join("?" for _ in FINAL_STATES)
        finals = sorted(int(s) for s in FINAL_STATES)
        # An ended session's update_time is when it ended; rows written before the column
        # existed have none, and count from their expiry instead.
        ids = [
            str(row[0])
            for row in self._db.execute(
                f"SELECT id FROM sessions WHERE state IN ({marks})"  # noqa: S608 - placeholders
                " AND COALESCE(update_time, expire_time) <= ? LIMIT ?",
                (*finals, before_s, limit),
            ).fetchall()
        ]
        if not ids:
            return 0
        id_marks = ", ".join("?" for _ in ids)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute(f"DELETE FROM leases WHERE session_id IN ({id_marks})", ids)  # noqa: S608
            cursor = self._db.execute(
                f"DELETE FROM sessions WHERE id IN ({id_marks}) AND state IN ({marks})",  # noqa: S608
                (*ids, *finals),
            )
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return cursor.rowcount

    async def broker_id(self) -> str:
        select = "SELECT value FROM meta WHERE key = 'broker_id'"
        row = self._db.execute(select).fetchone()
        if row is None:  # first call on this store: whoever inserts first wins
            self._db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('broker_id', ?)",
                (uuid.uuid4().hex,),
            )
            row = self._db.execute(select).fetchone()
        return str(row[0])

    async def token_key(self) -> bytes | None:
        return None  # one process per SQLite file: its token.key file

    def ledger(self) -> Ledger:
        return self._ledger  # one process per SQLite file: in its memory

    async def close(self) -> None:
        self._db.close()

    async def check(self) -> None:
        return None  # opening the file checked it

    async def count_sessions_by_state(self) -> dict[str, int]:
        rows = self._db.execute("SELECT state, COUNT(*) FROM sessions GROUP BY state").fetchall()
        return {_state_label(state): int(count) for state, count in rows}

    async def count_uploads_in_flight(self) -> int | None:
        (count,) = self._db.execute("SELECT COUNT(*) FROM uploads WHERE completed = 0").fetchone()
        return int(count)

    async def offers_to(self, recipient: str, now: float, limit: int) -> list[SessionRecord]:
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM sessions WHERE recipient = ? AND state = ?"  # noqa: S608
            " AND expire_time > ? ORDER BY create_time LIMIT ?",
            (recipient, int(broker_pb2.Session.STATE_OFFERED), now, limit),
        ).fetchall()
        return [_record(row) for row in rows]

    async def count_offers_to(self, recipient: str, now: float) -> int:
        (count,) = self._db.execute(
            "SELECT COUNT(*) FROM sessions WHERE recipient = ? AND state = ? AND expire_time > ?",
            (recipient, int(broker_pb2.Session.STATE_OFFERED), now),
        ).fetchone()
        return int(count)

    def directory(self) -> Directory:
        if self._directory is None:  # made on first use: people.py imports this module
            from ferry.broker.people import SqliteDirectory

            self._directory = SqliteDirectory(self._db)
        return self._directory


def _state_label(state: int) -> str:
    """A metrics label for a stored state: "offered" for STATE_OFFERED, ..."""
    try:
        return broker_pb2.Session.State.Name(state).removeprefix("STATE_").lower()  # type: ignore[arg-type]
    except ValueError:
        return "unknown"


def is_final(record: SessionRecord) -> bool:
    """Whether the session is in a final state."""
    return record.session.state in FINAL_STATES
