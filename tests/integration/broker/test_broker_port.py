"""A second broker on the port a running one holds refuses to start; the first serves on."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ferry.v1 import broker_pb2, broker_pb2_grpc
from tests.conftest import BrokerFactory
from tests.support.processes import FAST_BROKER, BrokerProcess

pytestmark = pytest.mark.timeout(90)

T = 5.0  # deadline of every call, seconds
EXIT_WITHIN = 20.0  # seconds; interpreter start and imports included


def _run(args: list[str], cwd: Path) -> tuple[int, str, float]:
    """Run a command that should fail fast; return its exit code, stderr and duration."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=EXIT_WITHIN,  # a second broker that did start is killed here, failing the test
        check=False,
    )
    return result.returncode, result.stderr, time.monotonic() - started


def _broker_id(broker: BrokerProcess) -> str:
    with grpc.insecure_channel(broker.address) as channel:
        stub = broker_pb2_grpc.BrokerServiceStub(channel)
        return stub.GetBrokerInfo(broker_pb2.GetBrokerInfoRequest(), timeout=T).broker_id


def _still_serves(broker: BrokerProcess, broker_id: str) -> None:
    assert broker.proc is not None
    assert broker.proc.poll() is None
    with grpc.insecure_channel(broker.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=T).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    assert _broker_id(broker) == broker_id


def test_second_broker_on_a_taken_port(broker_factory: BrokerFactory, tmp_path: Path) -> None:
    first = broker_factory()
    broker_id = _broker_id(first)
    # The same command run twice: same address, same data directory.
    code, stderr, took = _run(
        [
            "-m",
            "ferry.broker",
            "--listen",
            first.address,
            "--data-dir",
            str(first.data_dir),
            *FAST_BROKER,
        ],
        tmp_path,
    )
    assert code == 1, stderr
    assert took < EXIT_WITHIN
    message = f"ferry-broker: error: cannot listen on {first.address}: address already in use"
    assert stderr.splitlines()[-1] == message
    assert "Traceback" not in stderr
    _still_serves(first, broker_id)


def test_ferry_serve_on_a_taken_port(broker_factory: BrokerFactory, tmp_path: Path) -> None:
    first = broker_factory()
    broker_id = _broker_id(first)
    code, stderr, _ = _run(
        [
            "-m",
            "ferry.cli",
            "serve",
            "--listen",
            first.address,
            "--data-dir",
            str(tmp_path / "serve-data"),
        ],
        tmp_path,
    )
    assert code == 1, stderr
    message = f"ferry: error: cannot listen on {first.address}: address already in use"
    assert stderr.splitlines()[-1] == message
    assert "Traceback" not in stderr
    _still_serves(first, broker_id)
