"""Where the CLI keeps the session tokens it was given, so `ferry status` can ask later.

One JSON file, `$XDG_STATE_HOME/ferry/sessions.json` (default `~/.local/state/...`),
mode 0600, holding the last 50 sessions: name -> token, role, broker address.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["load", "remember"]

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


def remember(name: str, token: str, role: str, broker: str) -> None:
    """Remember a session's token (best effort: a read-only home just loses `status`)."""
    sessions = load()
    sessions.pop(name, None)
    sessions[name] = {"token": token, "role": role, "broker": broker}
    while len(sessions) > _KEEP:
        sessions.pop(next(iter(sessions)))
    path = _path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".sessions-")
        with os.fdopen(fd, "w") as f:
            json.dump(sessions, f)
        os.replace(tmp, path)
    except OSError:
        pass
