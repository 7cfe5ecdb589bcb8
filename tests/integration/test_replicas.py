"""Two `ferry serve` replicas on one Redis (issue 12): real broker processes, real transfers.

- A sender on replica A and a receiver on replica B: each sees the other's steps at once
  (the watch fan-out across replicas, ferry.broker.relay) and the file moves.
- A replica killed with SIGKILL after the offer: the clients, behind one address (a TCP
  relay standing in for a Kubernetes Service), reconnect to the other replica and finish.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.files import random_file, sha256
from tests.support.processes import FAST_BROKER, BrokerProcess, FerryProcess
from tests.support.redis import RedisServer
from tests.support.tap import TcpTap

pytestmark = [pytest.mark.timeout(120)]


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with RedisServer(tmp_path / "redis") as server:
        yield server.url


def _replica(tmp_path: Path, name: str, url: str) -> BrokerProcess:
    broker = BrokerProcess(data_dir=tmp_path / name, args=[*FAST_BROKER], env={"FERRY_STORE": url})
    broker.start()
    return broker


def _env(tmp_path: Path, broker: str, role: str) -> dict[str, str]:
    return {
        **os.environ,
        "FERRY_BROKER": broker,
        "XDG_STATE_HOME": str(tmp_path / f"state-{role}"),
        "PYTHONUNBUFFERED": "1",
    }


def test_a_sender_on_one_replica_and_a_receiver_on_the_other(
    tmp_path: Path, redis_url: str
) -> None:
    a, b = _replica(tmp_path, "a", redis_url), _replica(tmp_path, "b", redis_url)
    src = random_file(tmp_path / "src" / "two.bin", 3 << 20)
    sender = FerryProcess(["send", str(src), "--json"], _env(tmp_path, a.address, "s"), tmp_path)
    receiver: FerryProcess | None = None
    try:
        sender.start()
        offered = sender.line()
        receiver = FerryProcess(
            ["receive", offered["code"], "--dest", str(tmp_path / "dest"), "--yes", "--json"],
            _env(tmp_path, b.address, "r"),
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
    a, b = _replica(tmp_path, "a", redis_url), _replica(tmp_path, "b", redis_url)
    src = random_file(tmp_path / "src" / "moved.bin", 3 << 20)
    with TcpTap(a.address) as service:  # one address in front of the replicas
        sender = FerryProcess(
            ["send", str(src), "--json"], _env(tmp_path, service.address, "s"), tmp_path
        )
        receiver: FerryProcess | None = None
        try:
            sender.start()
            offered = sender.line()  # the offer is on Redis; A holds the sender's watch
            a.proc.kill()  # type: ignore[union-attr]  # SIGKILL: nothing is handed over
            a.proc.wait(timeout=10)  # type: ignore[union-attr]
            host, _, port = b.address.rpartition(":")
            service.upstream = (host, int(port))  # the Service now reaches only B
            receiver = FerryProcess(
                ["receive", offered["code"], "--dest", str(tmp_path / "dest"), "--yes", "--json"],
                _env(tmp_path, service.address, "r"),
                tmp_path,
            ).start()
            rc, lines, err = receiver.finish(60)
            assert rc == 0, err
            assert lines[-1]["event"] == "completed", lines
            assert sha256(tmp_path / "dest" / "moved.bin") == sha256(src)
            src_rc, _, src_err = sender.finish(30)
            assert src_rc == 0, src_err
        finally:
            sender.kill()
            if receiver is not None:
                receiver.kill()
            a.kill()
            b.kill()
