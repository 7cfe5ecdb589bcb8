"""Fixtures shared by every test directory: real brokers and CLI runs, cleaned up."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Tests talk only over loopback: every client (in-process or a child process) offers its peer
# 127.0.0.1 and nothing else, never this machine's other interface addresses.
os.environ["FERRY_ADDRESSES"] = "127.0.0.1"

from tests.support.processes import FAST_BROKER, BrokerProcess, FerryProcess

BrokerFactory = Callable[..., BrokerProcess]
FerryFactory = Callable[..., FerryProcess]


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[BrokerFactory]:
    """Start brokers with extra arguments; all are killed at the end."""
    started: list[BrokerProcess] = []

    def make(*args: str, name: str = "data") -> BrokerProcess:
        broker = BrokerProcess(data_dir=tmp_path / name, args=[*FAST_BROKER, *args])
        started.append(broker)
        broker.start()
        return broker

    yield make
    for broker in started:
        broker.kill()


@pytest.fixture
def broker(broker_factory: BrokerFactory) -> BrokerProcess:
    """One broker for this test."""
    return broker_factory()


@pytest.fixture
def ferry(tmp_path: Path, broker: BrokerProcess) -> Iterator[FerryFactory]:
    """Run `ferry` commands against this test's broker; all are killed at the end."""
    started: list[FerryProcess] = []
    env = {
        **os.environ,
        "FERRY_BROKER": broker.address,
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "PYTHONUNBUFFERED": "1",
    }

    def run(*args: str, cwd: Path | None = None) -> FerryProcess:
        proc = FerryProcess(list(args), env, cwd or tmp_path)
        started.append(proc)
        return proc.start()

    yield run
    for proc in started:
        proc.kill()
