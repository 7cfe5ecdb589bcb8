"""`ferry admin`: the operator's commands for the broker's people directory.

They work on the broker's store directly, as whoever runs them holds it: the data directory
(SQLite, which a running broker keeps open beside them: WAL and a busy timeout make that
safe) or the Redis URL. No gRPC, no broker needed. The store is chosen as `ferry serve`
chooses it, by the same flags and environment variables: ``--data-dir`` (FERRY_DATA_DIR,
default ``ferry-data``) and ``--store`` (alias ``--store-url``; FERRY_STORE, the only place
for a URL with a password), so an operator's shell that serves also administers::

    ferry admin users add alice [--org ORG] [--offers-per-hour N] [--store-bytes SIZE]
    ferry admin users list [--org ORG]
    ferry admin users set alice [--offers-per-hour N|default] [--store-bytes SIZE|default]
    ferry admin users remove alice                 revokes her devices
    ferry admin enroll alice [--ttl 24h]           a one-time token for `ferry login`
    ferry admin devices [alice] [--all]            --all: revoked ones too
    ferry admin revoke DEVICE_ID
    ferry admin audit [--user U] [--since 1h|2026-12-01T10:00:00Z] [--limit N]

Every command takes ``--json`` (one JSON object per line on stdout). Errors are one line on
stderr: exit status 2 for a usage error (a bad name, size or duration: the command did not
run), 1 for a failure (no such user, the store unreachable or full), 0 otherwise.

An enrollment token is printed once and never kept: the directory holds its SHA-256 only.
Every change made here is audited ("user.added", "user.removed", "user.quotas",
"enrollment.issued", "device.revoked"; field "user", and "device" where there is one), never
with a secret. Whatever the log holds came from senders (file names in a manifest, device
names), so every string of it is escaped (ferry.files.display) before it reaches a terminal.

This module imports only the standard library at the top: `ferry` builds its parser on
every run; the store, redis-py and the client's display helpers load when a command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import re
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from ferry.broker.people import DeviceRecord, Directory

__all__ = ["add_admin_parser", "main", "run_admin"]

DEFAULT_TTL = "24h"
#: The longest an enrollment token may live.
MAX_TTL_S = 30 * 24 * 3600.0
DEFAULT_AUDIT_LIMIT = 1000
#: Random bytes of an enrollment token (256 bits; printed as 43 URL-safe characters).
TOKEN_BYTES = 32
#: Characters of a device's (untrusted) display name that a listing shows.
_NAME_CHARS = 64
_PLAIN = re.compile(r"[\w.@:/+,%-]+", re.ASCII)
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d)?")
_DURATION_UNITS = {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b)?")
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


class UsageError(Exception):
    """A bad argument: one line on stderr, exit status 2, nothing done."""


class Failure(Exception):
    """The command could not do its work: one line on stderr, exit status 1."""


# -- the parser -------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (status 2), like every other error here."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _store_flags(*, leaf: bool = True) -> argparse.ArgumentParser:
    """The flags every admin command takes (a parent parser), given after `ferry admin` or
    after its subcommand: a subcommand's own are SUPPRESSed unless given, so that they do
    not overwrite what was given before it."""
    flags = argparse.ArgumentParser(add_help=False)
    unset: Any = argparse.SUPPRESS if leaf else None
    flags.add_argument(
        "--data-dir",
        dest="admin_data_dir",
        type=Path,
        metavar="DIR",
        default=unset,
        help="the broker's data dir, with broker.sqlite3 (env FERRY_DATA_DIR, default ferry-data)",
    )
    flags.add_argument(
        "--store",
        "--store-url",
        dest="admin_store_url",
        metavar="sqlite|URL",
        default=unset,
        help="the broker's store: sqlite (in --data-dir) or its Redis URL; one with a password"
        " in FERRY_STORE only (env FERRY_STORE, default sqlite)",
    )
    flags.add_argument(
        "--json", action="store_true", default=unset or False, help="one JSON object per line"
    )
    return flags


def add_admin_parser(subparsers: Any) -> None:
    """Add the "admin" command, with its subcommands, to `subparsers` (what a parser's
    add_subparsers returned). `run_admin` runs the parsed command."""
    common = [_store_flags()]
    admin = subparsers.add_parser(
        "admin",
        parents=[_store_flags(leaf=False)],
        help="manage users, devices and the audit log (on the broker's store)",
        description="Manage the broker's users, their devices and enrollment tokens, and read"
        " its audit log, on its store directly (its data dir or Redis).",
    )
    sub = admin.add_subparsers(dest="admin_command", required=True, metavar="COMMAND")

    users = sub.add_parser("users", help="add, list, change and remove users")
    users_sub = users.add_subparsers(dest="admin_users_command", required=True, metavar="ACTION")
    p = users_sub.add_parser("add", parents=common, help="add a user")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--org", default="default", help="the user's organisation (default: default)")
    p.add_argument("--offers-per-hour", metavar="N", help="quota (default: the broker's)")
    p.add_argument(
        "--store-bytes", metavar="SIZE", help="quota, e.g. 10GiB (default: the broker's)"
    )
    p.set_defaults(admin_run=_users_add)
    p = users_sub.add_parser("list", parents=common, help="list users, their quotas and devices")
    p.add_argument("--org", help="only this organisation's users")
    p.set_defaults(admin_run=_users_list)
    p = users_sub.add_parser("set", parents=common, help="change a user's quotas")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--offers-per-hour", metavar="N|default")
    p.add_argument("--store-bytes", metavar="SIZE|default")
    p.set_defaults(admin_run=_users_set)
    p = users_sub.add_parser("remove", parents=common, help="remove a user, revoking its devices")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(admin_run=_users_remove)

    p = sub.add_parser("enroll", parents=common, help="make a one-time enrollment token")
    p.add_argument("name", metavar="NAME")
    p.add_argument(
        "--ttl", default=DEFAULT_TTL, help=f"how long it is valid (default {DEFAULT_TTL})"
    )
    p.set_defaults(admin_run=_enroll)

    p = sub.add_parser("devices", parents=common, help="list devices (of one user)")
    p.add_argument("name", metavar="NAME", nargs="?")
    p.add_argument("--all", action="store_true", help="revoked devices too")
    p.set_defaults(admin_run=_devices)

    p = sub.add_parser("revoke", parents=common, help="revoke a device")
    p.add_argument("device_id", metavar="DEVICE_ID")
    p.set_defaults(admin_run=_revoke)

    p = sub.add_parser("audit", parents=common, help="read the audit log")
    p.add_argument("--user", help="entries whose sender, recipient or user is U")
    p.add_argument("--since", help="entries since: 1h, 30m, 2d or 2026-12-01T10:00:00Z")
    p.add_argument(
        "--limit",
        default=str(DEFAULT_AUDIT_LIMIT),
        metavar="N",
        help=f"the last N entries (default {DEFAULT_AUDIT_LIMIT})",
    )
    p.set_defaults(admin_run=_audit)


# -- values -----------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """Bytes from ``500M``, ``10GiB``, ``1.5g``, ``4096`` (units are binary: k = 1024)."""
    match = _SIZE.fullmatch(text.strip().lower())
    if match is None:
        raise UsageError(f"not a size: {text!r} (e.g. 500M or 10GiB)")
    return int(float(match[1]) * _SIZE_UNITS[match[2]])


def parse_duration(text: str) -> float:
    """Seconds from ``90s``, ``30m``, ``24h``, ``2d`` (a bare number is seconds)."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise UsageError(f"not a duration: {text!r} (e.g. 30m, 24h or 2d)")
    return float(match[1]) * _DURATION_UNITS[match[2]]


def parse_since(text: str, now: float) -> float:
    """A time: ``now`` less a duration (``1h``), or an ISO 8601 time (UTC unless it says)."""
    if _DURATION.fullmatch(text.strip().lower()):
        return now - parse_duration(text)
    try:
        when = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(
            f"not a time: {text!r} (a duration back from now, e.g. 1h, or 2026-12-01T10:00:00Z)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def _quota(text: str | None, parse: Callable[[str], int], keep: int | None) -> int | None:
    """A quota flag's value: `keep` if not given, None for "default", else parsed."""
    if text is None:
        return keep
    if text.strip().lower() == "default":
        return None
    return parse(text)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise UsageError(f"must not be negative: {text!r}")
    return value


def _name(text: str) -> str:
    from ferry.broker.people import check_user_name

    try:
        return check_user_name(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def iso(seconds: float) -> str:
    """An ISO 8601 time in UTC, to the second: ``2026-12-01T10:00:00Z``."""
    when = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _ttl_words(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def _value(value: Any) -> str:
    """One audit field's value for a terminal: a plain word as it is, other text quoted and
    escaped (controls, bidi, backslashes: ferry.files.display), anything else as ASCII JSON."""
    from ferry.files.display import escape_name

    if isinstance(value, str):
        if _PLAIN.fullmatch(value):
            return value
        return '"' + escape_name(value).replace('"', '\\"') + '"'
    return json.dumps(value, separators=(",", ":"))  # ASCII only: every control is escaped


def audit_line(time_s: float, event: str, fields: dict[str, Any]) -> str:
    """An audit entry as one line: its time, its event and its fields as key=value."""
    from ferry.files.display import escape_name

    parts = [iso(time_s), escape_name(event)]
    parts += [f"{escape_name(key)}={_value(value)}" for key, value in fields.items()]
    return " ".join(parts)


# -- output -----------------------------------------------------------------------------------


def _out(line: str) -> None:
    from ferry.files.display import terminal_line

    sys.stdout.write(terminal_line(line) + "\n")


def _emit(obj: dict[str, Any]) -> None:
    """One JSON line: ASCII only, so nothing in it can act on a terminal."""
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")


def _table(rows: list[list[str]]) -> None:
    """Rows as columns, each as wide as its widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        _out("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


# -- the commands -----------------------------------------------------------------------------

Command = Callable[["Directory", argparse.Namespace, float], Awaitable[None]]


async def _users_add(directory: Directory, ns: argparse.Namespace, now: float) -> None:
    from ferry.broker.people import User, UserExists, check_org_name

    name = _name(ns.name)
    try:
        org = check_org_name(ns.org)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    user = User(
        name,
        org,
        now,
        offers_per_hour=_quota(ns.offers_per_hour, _count, None),
        store_bytes=_quota(ns.store_bytes, parse_size, None),
    )
    try:
        await directory.add_user(user)
    except UserExists:
        raise Failure(f"the user {name} exists already") from None
    fields: dict[str, Any] = {"user": name, "organization": org}
    fields |= {"offers_per_hour": user.offers_per_hour, "store_bytes": user.store_bytes}
    await directory.audit("user.added", now, fields)
    if ns.json:
        _emit({"event": "user.added", **fields})
    else:
        _out(f"Added user {name} (organisation {org}).")


async def _users_list(directory: Directory, ns: argparse.Namespace, now: float) -> None:
    from ferry.files.display import format_size

    rows = [["USER", "ORGANISATION", "OFFERS/HOUR", "STORE", "DEVICES"]]
    for user in await directory.list_users(ns.org or None):
        devices = len(await directory.devices_of(user.name))
        if ns.json:
            _emit(
                {
                    "user": user.name,
                    "organization": user.organization,
                    "offers_per_hour": user.offers_per_hour,
                    "store_bytes": user.store_bytes,
                    "devices": devices,
                    "create_time": iso(user.create_s),
                }
            )
            continue
        oph = "default" if user.offers_per_hour is None else str(user.offers_per_hour)
        store = "default" if user.store_bytes is None else format_size(user.store_bytes)
        rows.append([user.name, user.organization, oph, store, str(devices)])
    if not ns.json:
        _table(rows)


async def _users_set(directory: Directory, ns: argparse.Namespace, now: float) -> None:
    from ferry.broker.people import UnknownUser

    name = _name(ns.name)
    if ns.offers_per_hour is None and ns.store_bytes is None:
        raise UsageError("nothing to set: give --offers-per-hour and/or --store-bytes")
    oph_flag = _quota(ns.offers_per_hour, _count, 0)  # checked before anything is read
    sb_flag = _quota(ns.store_bytes, parse_size, 0)
    user = await directory.get_user(name)
    if user is None:
        raise Failure(f"no user {name}")
    oph = user.offers_per_hour if ns.offers_per_hour is None else oph_flag
    sb = user.store_bytes if ns.store_bytes is None else sb_flag
    try:
        await directory.set_user_quotas(name, oph, sb)
    except UnknownUser:
        raise Failure(f"no user {name}") from None
    fields = {"user": name, "offers_per_hour": oph, "store_bytes": sb}
    await directory.audit("user.quotas", now, fields)
    if ns.json:
        _emit({"event": "user.quotas", **fields})
    else:
        shown = ("default" if q is None else str(q) for q in (oph, sb))
        _out("Quotas of {}: offers per hour {}, store bytes {}.".format(name, *shown))


async def _users_remove(directory: Directory, ns: argparse.Namespace, now: float) -> None:
    name = _name(ns.name)
    devices = await directory.devices_of(name)
    if not await directory.remove_user(name, now):
        raise Failure(f"no user {name}")
    fields = {"user": name, "devices_revoked": len(devices)}
    await directory.audit("user.removed", now, fields)
    if ns.json:
        _emit({"event": "user.removed", **fields})
    else:
        _out(f"Removed user {name}; revoked {len(devices)} device(s).")


async def _enroll(directory: Directory, ns: argparse.Namespace, now: float) -> None:
    from ferry.broker.people import UnknownUser, enrollment_token_hash

    name = _name(ns.name)
    ttl = parse_duration(ns.ttl)
    if not 0 < ttl <= MAX_TTL_S:
        raise UsageError(f"--ttl must be more than 0 and at most 30d: {ns.ttl!r}")
    token = secrets.token_urlsafe(TOKEN_BYTES)
    expire = now + ttl
    try:
        await directory.add_enrollment(enrollment_token_hash(token), name, expire)
    except UnknownUser:
        raise Failure(f"no user {name}: add it first (ferry admin users add {name})") from None
    await directory.audit("enrollment.issued", now, {"user": name, "expire_time": iso(expire)})
    if ns.json:
        _emit({"user": name, "token": token, "expire_time": iso(expire)})
        return
    _out(f"Enrollment token for {name} (one use, valid {_ttl_words(ttl)}):")
    _out(f"  {token}")
    _out(f"On {name}'s device:  ferry login   (it asks for the token: not on the command line)")


async def _devices(directory: Directory, ns: argparse.Namespace, now: float) -> None:
    from ferry.files.display import shown
    from ferry.protocol.identity import fingerprint

    devices: list[DeviceRecord] = []
    if ns.name is not None:
        name = _name(ns.name)
        devices = await directory.devices_of(name, include_revoked=ns.all)
        if not devices and await directory.get_user(name) is None:
            raise Failure(f"no user {name}")
    else:
        for user in await directory.list_users():
            devices += await directory.devices_of(user.name, include_revoked=ns.all)
    online = await directory.online([d.device_id for d in devices], now)
    header = ["DEVICE", "USER", "NAME", "FINGERPRINT", "CREATED"]
    rows = [[*header, "REVOKED", "ONLINE"] if ns.all else [*header, "ONLINE"]]
    for d in devices:
        print_ = fingerprint(d.signing_key, d.encryption_key)
        revoked = None if d.revoked_s is None else iso(d.revoked_s)
        if ns.json:
            _emit(
                {
                    "device_id": d.device_id,
                    "user": d.user,
                    "display_name": d.display_name,
                    "fingerprint": print_,
                    "create_time": iso(d.create_s),
                    "revoke_time": revoked,
                    "online": d.device_id in online,
                }
            )
            continue
        row = [shown(d.device_id, _NAME_CHARS), d.user, shown(d.display_name, _NAME_CHARS)]
        row += [print_, iso(d.create_s)]
        row += [revoked or "-"] if ns.all else []
        rows.append([*row, "yes" if d.device_id in online else "no"])
    if not ns.json:
        _table(rows)


async def _revoke(directory: Directory, ns: argparse.Namespace, now: float) -> None:
    from ferry.files.display import shown

    device_id = ns.device_id
    before = await directory.get_device(device_id)
    if before is None:
        raise Failure(f"no device {shown(device_id, _NAME_CHARS)}")
    device = await directory.revoke_device(device_id, now)
    if device is None:  # pragma: no cover - devices are never deleted
        raise Failure(f"no device {shown(device_id, _NAME_CHARS)}")
    said = f"device {shown(device_id, _NAME_CHARS)} ({shown(device.display_name, _NAME_CHARS)})"
    fields = {"user": device.user, "device": device.device_id}
    if before.revoked_s is not None:
        assert device.revoked_s is not None
        if ns.json:
            _emit({"event": "device.revoked", **fields, "revoke_time": iso(device.revoked_s)})
        else:
            _out(f"The {said} of {device.user} was revoked already, at {iso(device.revoked_s)}.")
        return
    await directory.audit("device.revoked", now, fields)
    if ns.json:
        _emit({"event": "device.revoked", **fields, "revoke_time": iso(now)})
    else:
        _out(f"Revoked {said} of {device.user}.")


async def _audit(directory: Directory, ns: argparse.Namespace, now: float) -> None:
    user = None if ns.user is None else _name(ns.user)
    since = None if ns.since is None else parse_since(ns.since, now)
    limit = _count(ns.limit)
    for entry in await directory.read_audit(since_s=since, user=user, limit=limit):
        if ns.json:
            _emit(
                {
                    "id": entry.id,
                    "time": iso(entry.time_s),
                    "time_s": entry.time_s,
                    "event": entry.event,
                    "fields": entry.fields,
                }
            )
        else:
            _out(audit_line(entry.time_s, entry.event, entry.fields))


# -- running ----------------------------------------------------------------------------------


def _store_settings(ns: argparse.Namespace) -> tuple[Path, str | None]:
    """The SQLite file (data dir) and Redis URL (None: SQLite), as `ferry serve` finds them."""
    from ferry.broker.cli import _has_password
    from ferry.broker.config import BrokerConfig

    data_dir = ns.admin_data_dir
    if data_dir is None:
        data_dir = Path(os.environ.get("FERRY_DATA_DIR", "").strip() or BrokerConfig().data_dir)
    url = ns.admin_store_url
    if url is not None and _has_password(url):
        raise UsageError(
            "--store must not carry a password (every user of the host can read a command"
            " line): give that URL in FERRY_STORE"
        )
    if url is None:
        url = os.environ.get("FERRY_STORE", "").strip() or None
    try:
        config = BrokerConfig(data_dir=data_dir, store_url=url)
    except ValueError as exc:
        raise UsageError(f"bad store settings: {exc}") from None
    return config.database_path, config.store_url


async def _run(ns: argparse.Namespace, command: Command) -> None:
    from ferry.broker.people import RedisDirectory, SqliteDirectory

    path, url = _store_settings(ns)
    now = time.time()
    if url is None:
        if not path.parent.is_dir():
            raise Failure(f"no data directory {path.parent} (give --data-dir or FERRY_DATA_DIR)")
        directory = SqliteDirectory.open(path)
        try:
            await command(directory, ns, now)
        finally:
            await directory.close()
        return
    import redis.asyncio
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    from ferry.broker.redis_store import (
        CONNECT_TIMEOUT_S,
        DEFAULT_PREFIX,
        SOCKET_TIMEOUT_S,
        StoreUnavailable,
        describe_url,
    )

    client = redis.asyncio.Redis.from_url(
        url,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=SOCKET_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        await command(RedisDirectory(client, DEFAULT_PREFIX), ns, now)
    except StoreUnavailable as exc:
        cause = " ".join(str(exc.__cause__ or exc).split())
        raise Failure(f"cannot reach the Redis store at {describe_url(url)}: {cause}") from None
    finally:
        await client.aclose()


def _fail(prog: str, message: str) -> None:
    from ferry.files.display import terminal_line

    sys.stdout.flush()
    sys.stderr.write(terminal_line(f"{prog}: error: {message}") + "\n")
    sys.stderr.flush()


def run_admin(ns: argparse.Namespace) -> int:
    """Run the admin command `ns` was parsed for (add_admin_parser); the exit status."""
    import sqlite3

    from ferry.broker.errors import BrokerRefusal

    prog = "ferry admin"
    command: Command = ns.admin_run
    try:
        asyncio.run(_run(ns, command))
    except UsageError as exc:
        _fail(prog, str(exc))
        return 2
    except (Failure, BrokerRefusal) as exc:  # BrokerRefusal: StorageFull, StoreUnavailable
        _fail(prog, str(exc))
        return 1
    except (sqlite3.Error, OSError) as exc:
        _fail(prog, f"the broker's store: {' '.join(str(exc).split())}")
        return 1
    except KeyboardInterrupt:
        return 130
    sys.stdout.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m ferry.broker.admin users add alice`: `ferry admin ...` without `ferry`."""
    parser = _Parser(prog="ferry", description=__doc__.split("\n\n")[0])
    add_admin_parser(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(["admin", *(sys.argv[1:] if argv is None else argv)])
    return run_admin(ns)


if __name__ == "__main__":
    sys.exit(main())
