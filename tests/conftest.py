"""Fixtures shared by every test directory: real brokers and CLI runs, cleaned up; and the
one-time install of s3rver (npm) before the tests that use it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Tests talk only over loopback: every client (in-process or a child process) offers its peer
# 127.0.0.1 and nothing else, never this machine's other interface addresses.
os.environ["FERRY_ADDRESSES"] = "127.0.0.1"

from tests.support.processes import FAST_BROKER, BrokerProcess, FerryProcess
from tests.support.s3 import S3rverUnavailable, s3rver_command
from tests.support.tls import TestPKI

BrokerFactory = Callable[..., BrokerProcess]
FerryFactory = Callable[..., FerryProcess]


def _uses_s3rver(item: pytest.Item) -> bool:
    """Whether a test takes the `s3rver` fixture or runs with an "s3rver" parameter."""
    callspec = getattr(item, "callspec", None)
    params = callspec.params.values() if callspec is not None else ()
    return "s3rver" in getattr(item, "fixturenames", ()) or "s3rver" in params


def pytest_collection_finish(session: pytest.Session) -> None:
    """Install the pinned s3rver (tests/support/s3.py) before the first test that needs it,
    so that the install counts against no test's timeout. If it fails, each of those tests
    fails with the reason when it starts s3rver; the others run as usual."""
    if session.config.option.collectonly or not any(map(_uses_s3rver, session.items)):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    # A failure is remembered, and reported by every test that starts s3rver.
    with contextlib.suppress(S3rverUnavailable):
        s3rver_command(announce=reporter.write_line if reporter is not None else None)


@pytest.fixture
def pki(tmp_path: Path) -> TestPKI:
    """A certificate authority made for this test (tests/support/tls.py)."""
    return TestPKI.create(tmp_path / "pki")


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
