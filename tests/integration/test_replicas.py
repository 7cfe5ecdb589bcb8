"""Two `ferry serve` replicas on one Redis (issue 12): real broker processes, real transfers.

- A sender on replica A and a receiver on replica B: each sees the other's steps at once
  (the watch fan-out across replicas, ferry.broker.relay) and the file moves.
- A replica killed with SIGKILL after the offer: the clients, behind one address (a TCP
  relay standing in for a Kubernetes Service), reconnect to the other replica and finish.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.files import random_file, sha256
from tests.support.processes import FerryProcess, cli_env, start_replica
from tests.support.redis import RedisServer
from tests.support.replicas import finish_on_the_other

pytestmark = [pytest.mark.timeout(120)]


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with RedisServer(tmp_path / "redis") as server:
        yield server.url


def test_a_sender_on_one_replica_and_a_receiver_on_the_other(
    tmp_path: Path, redis_url: str
) -> None:
    a, b = start_replica(tmp_path, "a", redis_url), start_replica(tmp_path, "b", redis_url)
    src = random_file(tmp_path / "src" / "two.bin", 3 << 20)
    sender = FerryProcess(["send", str(src), "--json"], cli_env(tmp_path, a.address, "s"), tmp_path)
    receiver: FerryProcess | None = None
    try:
        sender.start()
        offered = sender.line()
        receiver = FerryProcess(
            ["receive", offered["code"], "--dest", str(tmp_path / "dest"), "--yes", "--json"],
            cli_env(tmp_path, b.address, "r"),
            tmp_path,
        ).start()
        started = time.monotonic()
        rc, lines, err = receiver.finish(60)
        assert rc == 0, err
        assert lines[-1]["event"] == "completed", lines
        assert lines[-1]["path"] == "direct", lines[-1]
        assert sha256(tmp_path / "dest" / "two.bin") == sha256(src)
        # The sender heard the receiver's completion, made through the other replica.
        src_rc, src_lines, src_err = sender.finish(30)
        assert src_rc == 0, src_err
        assert src_lines[-1]["event"] == "completed", src_lines
        assert time.monotonic() - started < 30
    finally:
        sender.kill()
        if receiver is not None:
            receiver.kill()
        a.kill()
        b.kill()


def test_a_replica_killed_mid_session_the_clients_finish_on_the_other(
    tmp_path: Path, redis_url: str
) -> None:
    a, b = start_replica(tmp_path, "a", redis_url), start_replica(tmp_path, "b", redis_url)
    src = random_file(tmp_path / "src" / "moved.bin", 3 << 20)

    def kill_a() -> None:  # SIGKILL: nothing is handed over
        assert a.proc is not None
        a.proc.kill()
        a.proc.wait(timeout=10)

    finish_on_the_other(tmp_path, a, b, src, kill_a)
