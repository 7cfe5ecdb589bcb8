"""A real redis-server for tests on 127.0.0.1, and stores of both kinds over one backing.

`RedisServer(dir).start()` runs Debian's `redis-server` on a free loopback port with its
files in `dir` and no persistence (``--save "" --appendonly no``; ``appendonly=True`` for a
test that restarts it and wants its data back), waits until it answers PING and `stop()`
kills it. With ``tls=(cert, key, ca)`` the port speaks TLS only and `url` is a rediss:// URL
that trusts `ca`. `ensure_redis()` installs the Debian package redis-server with apt-get when the
binary is missing, as `.ci/run` does, so the README's test command alone provisions it too.

`StoreFactory` opens stores of one kind ("sqlite" or "redis") over one backing (one SQLite
file, or one key prefix on one server): the second one it opens is a second replica of the
first; it also reads the leases (and Redis keys) the stores hold. `session_record` makes a
SessionRecord for store tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import redis

from ferry.broker import states
from ferry.broker.core import timestamp
from ferry.broker.redis_store import RedisStore
from ferry.broker.store import SessionRecord, SqliteStore, Store
from ferry.v1 import broker_pb2
from tests.support.processes import free_port

__all__ = [
    "STORE_KINDS",
    "RedisServer",
    "StoreFactory",
    "ensure_redis",
    "redis_server",
    "session_record",
]

STORE_KINDS = ("sqlite", "redis")
# An install may have to fetch the package lists first.
_INSTALL_TIMEOUT = 300.0
_START_TIMEOUT = 10.0


def ensure_redis() -> str:
    """The redis-server binary; installs Debian's redis-server first if it is missing
    (root and apt-get needed)."""
    found = shutil.which("redis-server")
    if found is not None:
        return found
    if os.geteuid() != 0:
        raise RuntimeError("the Redis store tests need redis-server; install it (as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "redis-server"],
    ):
        subprocess.run(command, check=True, env=env, capture_output=True, timeout=_INSTALL_TIMEOUT)
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("apt-get installed redis-server, but it is not on PATH")
    return found


@dataclass
class RedisServer:
    """One redis-server process on 127.0.0.1, its files in `dir`."""

    dir: Path
    appendonly: bool = False
    #: TLS only on the port: the server's certificate, its key and the CA that issued it.
    tls: tuple[Path, Path, Path] | None = None
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    _clients: list[redis.Redis] = field(default_factory=list)

    @property
    def url(self) -> str:
        """Its redis:// URL (database 0); rediss:// trusting its CA with TLS."""
        if self.tls is not None:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls[2]}"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start it (on the same port again, if it ran before) and wait until it answers."""
        binary = ensure_redis()
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        if self.tls is None:
            ports = ["--port", str(self.port)]
        else:
            cert, key, ca = self.tls
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert)]
            ports += ["--tls-key-file", str(key), "--tls-ca-cert-file", str(ca)]
            ports += ["--tls-auth-clients", "no"]
        command = [
            binary,
            *("--bind", "127.0.0.1", *ports, "--dir", str(self.dir)),
            *("--save", "", "--appendonly", "yes" if self.appendonly else "no"),
            *("--daemonize", "no", "--protected-mode", "yes", "--loglevel", "warning"),
            *("--logfile", str(self.dir / "redis.log")),
        ]
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            try:
                self.client().ping()
                return self
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                    self.stop()
                    raise RuntimeError(f"redis-server did not answer PING:\n{log}") from None
                time.sleep(0.02)

    def client(self) -> redis.Redis:
        """A plain client of its database 0 (closed by `stop`)."""
        client = redis.Redis.from_url(self.url, socket_timeout=5)
        self._clients.append(client)
        return client

    def stop(self) -> None:
        """Kill it (SIGKILL: nothing is saved on the way out) and wait for it."""
        for client in self._clients:
            client.close()
        self._clients.clear()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


@contextlib.contextmanager
def redis_server(dir: Path) -> Iterator[RedisServer]:
    """A started RedisServer in `dir`, killed at the end."""
    with RedisServer(dir) as server:
        yield server


class StoreFactory:
    """Opens stores of one kind over one backing; `aclose` closes every one it opened (use it
    as ``async with``: a store's close is awaited, and a Redis store's connections belong to
    the event loop that used them).

    "sqlite": SqliteStore on one file in `dir`. "redis": RedisStore on `url` under a key
    prefix of its own, so that tests sharing one server never see each other's keys.
    """

    def __init__(self, kind: str, dir: Path, url: str | None = None) -> None:
        if kind not in STORE_KINDS or (kind == "redis") != (url is not None):
            raise ValueError(f"bad store kind {kind!r} (url {url!r})")
        self.kind = kind
        self.path = dir / "broker.sqlite3"
        self.url = url
        self.prefix = f"t{uuid.uuid4().hex[:12]}:"
        self._opened: list[Store] = []
        self._raw: redis.Redis | None = None

    def __call__(self, *, close_at_end: bool = True) -> Store:
        """A new store over the backing: the first one, or another replica of it.

        Without ``close_at_end`` the caller closes it (a SqliteStore must be closed in the
        thread that opened it). Nothing connects yet: a Redis store connects on its first
        call (a test of the connection awaits `check`).
        """
        store: Store
        if self.url is not None:
            store = RedisStore.from_url(self.url, prefix=self.prefix)
        else:
            store = SqliteStore(self.path)
        if close_at_end:
            self._opened.append(store)
        return store

    @property
    def raw(self) -> redis.Redis:
        """A plain client of the Redis behind the stores (kind "redis" only)."""
        assert self.url is not None, "a SQLite store has no Redis"
        if self._raw is None:
            self._raw = redis.Redis.from_url(self.url, socket_timeout=5)
        return self._raw

    def keys(self) -> list[str]:
        """Every Redis key under the stores' prefix, without it, sorted."""
        return sorted(
            key.decode().removeprefix(self.prefix)
            for key in self.raw.scan_iter(match=f"{self.prefix}*", count=1000)
        )

    def leases(self) -> list[tuple[str, int, int]]:
        """(session_id, first_port, last_port) of every lease the stores hold, sorted."""
        if self.url is None:
            with contextlib.closing(sqlite3.connect(self.path)) as db:
                rows = db.execute("SELECT session_id, first_port, last_port FROM leases")
                return sorted((str(r[0]), int(r[1]), int(r[2])) for r in rows.fetchall())
        found = []
        for key in self.raw.scan_iter(match=f"{self.prefix}l:*", count=1000):
            first, last = self.raw.hmget(key, "first", "last")
            assert first is not None
            assert last is not None
            session_id = key.decode().removeprefix(f"{self.prefix}l:")
            found.append((session_id, int(first), int(last)))
        return sorted(found)

    async def aclose(self) -> None:
        """Close every store it opened (and its plain client)."""
        for store in self._opened:
            await store.close()
        self._opened.clear()
        if self._raw is not None:
            self._raw.close()
            self._raw = None

    async def __aenter__(self) -> StoreFactory:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


def session_record(
    session_id: str,
    *,
    state: states.State = states.OFFERED,
    create: float = 1.0,
    update: float | None = None,
    expire: float = 100.0,
    code_hash: str | None = "",
    request_id: str | None = None,
    receiver: str | None = None,
    verifier: bytes | None = None,
) -> SessionRecord:
    """A session record; its code hash is c-{id} unless given (None: no code)."""
    session = broker_pb2.Session(
        name=f"sessions/{session_id}",
        state=state,
        manifest=broker_pb2.Manifest(
            files=[broker_pb2.FileEntry(path="a/b.txt", size_bytes=5)], chunk_size_bytes=1 << 20
        ),
        create_time=timestamp(create),
        update_time=timestamp(create if update is None else update),
        expire_time=timestamp(expire),
    )
    return SessionRecord(
        session=session,
        sender_token_hash=f"s-{session_id}",
        code_hash=f"c-{session_id}" if code_hash == "" else code_hash,
        receiver_token_hash=receiver,
        request_id=request_id,
        claim_verifier=verifier,
    )


async def token_owner(store: Store, token_hash: str) -> tuple[str, states.Party] | None:
    """(session id, party) of the session a token hash belongs to, or None."""
    found = await store.session_by_token_hash(token_hash)
    return None if found is None else (found[0].session_id, found[1])
