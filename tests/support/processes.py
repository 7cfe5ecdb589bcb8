"""Real `ferry` processes for tests: a broker on 127.0.0.1 port 0, and CLI runs.

Every process is started with a bounded wait for its first line and killed at the end of
its test (the fixtures in tests/conftest.py own them).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FAST_BROKER", "BrokerProcess", "FerryProcess", "free_port", "read_json_line"]

# Broker flags that make expiry observable within a test's time.
FAST_BROKER = ["--sweep-interval", "0.2", "--offer-ttl-min", "0.5", "--log-level", "WARNING"]


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def read_json_line(proc: subprocess.Popen[bytes], timeout: float, what: str) -> dict[str, Any]:
    """Read one line from the process's stdout within ``timeout`` and parse it as JSON."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([proc.stdout], [], [], max(remaining, 0))
        if not ready:
            raise TimeoutError(f"{what}: no line within {timeout} s (got {line!r})")
        chunk = os.read(proc.stdout.fileno(), 1)
        if not chunk:
            raise RuntimeError(f"{what}: exited with {proc.poll()} before a line ({line!r})")
        line += chunk
    value = json.loads(line)
    assert isinstance(value, dict)
    return value


def _kill(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)
    if proc is not None:
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


@dataclass
class BrokerProcess:
    """A broker subprocess (`python -m ferry.broker`) and where it listens."""

    data_dir: Path
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None
    address: str = ""
    log: list[Path] = field(default_factory=list)
    listen: str = "127.0.0.1:0"
    #: The last start's `{"event": "listening", ...}` line (tls, health_address, ...).
    listening: dict[str, Any] = field(default_factory=dict)
    #: Where its reflexive responder listens (the line's reflexive_address); "" if none.
    reflexive_address: str = ""
    #: What the command runs inside, e.g. `ip netns exec NS` (tests/support/netlab.py).
    prefix: list[str] = field(default_factory=list)
    #: More environment for it (e.g. the S3 server's credentials).
    env: dict[str, str] | None = None

    def start(self) -> None:
        """Start it (again) and wait for its listening line."""
        _kill(self.proc)  # an earlier run's process and pipes, if any
        log_path = self.data_dir.parent / f"{self.data_dir.name}-{len(self.log)}.log"
        self.log.append(log_path)
        with log_path.open("wb") as log_file:
            self.proc = subprocess.Popen(
                [
                    *self.prefix,
                    sys.executable,
                    "-m",
                    "ferry.broker",
                    "--listen",
                    self.listen,
                    "--data-dir",
                    str(self.data_dir),
                    *self.args,
                    # a restart comes back on the same responder port too
                    *(
                        ["--reflexive-listen", self.reflexive_address]
                        if self.reflexive_address
                        else []
                    ),
                ],
                stdout=subprocess.PIPE,
                stderr=log_file,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})},
            )
        try:
            event = read_json_line(self.proc, 20, "broker")
        except (TimeoutError, RuntimeError) as exc:
            self.kill()
            raise RuntimeError(f"{exc}\n{log_path.read_text()}") from exc
        assert event["event"] == "listening"
        self.listening = event
        self.address = event["address"]
        self.listen = self.address  # a restart comes back on the same port
        self.reflexive_address = event.get("reflexive_address", "")

    def restart(self) -> None:
        """Stop it gracefully and start it again on the same address and data."""
        self.stop()
        self.start()

    def stop(self) -> int:
        """SIGTERM and wait; return the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        finally:
            self.kill()

    def kill(self) -> None:
        """SIGKILL if still running."""
        _kill(self.proc)


@dataclass
class FerryProcess:
    """One `ferry ...` CLI run with --json output, stdin a pipe."""

    args: list[str]
    env: dict[str, str]
    cwd: Path
    proc: subprocess.Popen[bytes] | None = None
    stderr_path: Path | None = None
    #: What the command runs inside, e.g. `ip netns exec NS` (tests/support/netlab.py).
    prefix: list[str] = field(default_factory=list)

    def start(self) -> FerryProcess:
        """Start the command."""
        self.stderr_path = self.cwd / f"ferry-{os.getpid()}-{time.monotonic_ns()}.err"
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "ferry.cli", *self.args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=self.cwd,
                env=self.env,
            )
        return self

    def line(self, timeout: float = 30) -> dict[str, Any]:
        """The next JSON line of its stdout."""
        assert self.proc is not None
        return read_json_line(self.proc, timeout, f"ferry {' '.join(self.args[:1])}")

    def answer(self, text: str) -> None:
        """Type a line on its stdin."""
        assert self.proc is not None
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 120) -> tuple[int, list[dict[str, Any]], str]:
        """Wait for exit; return the exit code, the remaining JSON lines and stderr."""
        assert self.proc is not None
        assert self.stderr_path is not None
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        lines = [json.loads(raw) for raw in out.splitlines() if raw.strip()]
        return self.proc.returncode, lines, self.stderr_path.read_text()

    def kill(self) -> None:
        """SIGKILL if still running."""
        _kill(self.proc)


def cli_env(tmp_path: Path, broker: str, role: str) -> dict[str, str]:
    """The environment of a `ferry` run by a test: the broker, a state dir of its own."""
    return {
        **os.environ,
        "FERRY_BROKER": broker,
        "XDG_STATE_HOME": str(tmp_path / f"state-{role}"),
        "PYTHONUNBUFFERED": "1",
    }


def start_replica(tmp_path: Path, name: str, store_url: str) -> BrokerProcess:
    """A `ferry serve` replica on the shared store `store_url` (data dir tmp_path/name)."""
    broker = BrokerProcess(
        data_dir=tmp_path / name, args=[*FAST_BROKER], env={"FERRY_STORE": store_url}
    )
    broker.start()
    return broker
