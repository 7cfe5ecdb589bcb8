"""Where the CLI keeps the session tokens it was given, so `ferry status` can ask later.

One JSON file, `$XDG_STATE_HOME/ferry/sessions.json` (default `~/.local/state/...`),
mode 0600 in a directory of mode 0700, holding the last 50 sessions: name -> token, role,
broker (its id and its last known address), and what a rerun of the same command needs to
find the session again: the sender's source paths, their stamps (`ferry.files.SourceStamp`),
code and PAKE state; the receiver's code (as a SHA-256), PAKE state or session key, and
destination. Codes, PAKE states and keys are secrets: nobody else on the machine may read
them.

A session belongs to the broker that reported its id (GetBrokerInfo), wherever that broker
listens now: a broker moved to a new address keeps its sessions, and a broker that lost its
state reports a new id, so nothing saved is sent to it (not even the token).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["code_key", "find", "forget", "load", "remember", "update"]

_KEEP = 50


def _path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "ferry" / "sessions.json"


def load() -> dict[str, dict[str, Any]]:
    """The remembered sessions, oldest first."""
    try:
        data = json.loads(_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def code_key(code: str) -> str:
    """How a receiver's code is remembered: hashed, after the broker's normalization."""
    normal = "-".join(code.strip().lower().replace("_", "-").split())
    return hashlib.sha256(normal.encode()).hexdigest()


def find(role: str, broker_id: str, **match: Any) -> tuple[str, dict[str, Any]] | None:
    """The newest remembered session of ``role`` on the broker ``broker_id`` whose fields
    equal ``match``."""
    for name, entry in reversed(list(load().items())):
        if (
            entry.get("role") == role
            and entry.get("broker_id") == broker_id
            and all(entry.get(k) == v for k, v in match.items())
        ):
            return name, entry
    return None


def update(name: str, **fields: Any) -> None:
    """Change some fields of a remembered session."""
    sessions = load()
    if name in sessions:
        sessions[name].update(fields)
        _save(sessions)


def forget(name: str) -> None:
    """Drop a session that is over."""
    sessions = load()
    if sessions.pop(name, None) is not None:
        _save(sessions)


def remember(name: str, token: str, role: str, broker: str, broker_id: str, **extra: Any) -> None:
    """Remember a session's token (best effort: a read-only home just loses `status`)."""
    sessions = load()
    sessions.pop(name, None)
    sessions[name] = {
        "token": token,
        "role": role,
        "broker": broker,
        "broker_id": broker_id,
        **extra,
    }
    _save(sessions)


def _save(sessions: dict[str, dict[str, Any]]) -> None:
    while len(sessions) > _KEEP:
        sessions.pop(next(iter(sessions)))
    path = _path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.parent.stat().st_mode & 0o077:  # made by someone else: it holds secrets
            os.chmod(path.parent, 0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".sessions-")
        with os.fdopen(fd, "w") as f:
            json.dump(sessions, f)
        os.replace(tmp, path)
    except OSError:
        pass
