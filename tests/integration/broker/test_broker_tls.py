"""TLS on the broker's gRPC port, with real processes and a CA made on the fly (trustme).

A transfer through a TLS broker, and what a tap on the wire reads with and without TLS; each
kind of TLS failure refused at once (not waited out for --broker-wait) with its own message;
a renewed certificate served without a restart; client certificates; the refusal to serve
plaintext off loopback; the plaintext health-only port.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ferry.client import BrokerTLSError, Client
from ferry.v1 import broker_pb2, broker_pb2_grpc
from tests.conftest import BrokerFactory
from tests.support.files import random_file, sha256
from tests.support.processes import FerryProcess
from tests.support.tap import TcpTap
from tests.support.tls import TestPKI, presented_serial

pytestmark = pytest.mark.timeout(120)

#: Far longer than any of these tests may take: a TLS failure must not be waited for.
BROKER_WAIT = "300"
#: What "at once" means for a `ferry` run, interpreter start and imports included.
FAST = 15.0


def _env(tmp_path: Path, broker: str, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FERRY_BROKER", "FERRY_INSECURE", "FERRY_TLS"))
    }
    return {
        **env,
        "FERRY_BROKER": broker,
        "FERRY_BROKER_WAIT": BROKER_WAIT,
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def _ferry(env: dict[str, str], cwd: Path, *args: str) -> tuple[int, str, float]:
    """Run `ferry ARGS --json` that should fail fast: exit code, stderr, seconds taken."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "ferry.cli", *args],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stderr, time.monotonic() - started


def _tls_args(cert: Path, key: Path, *more: str) -> list[str]:
    return ["--tls-cert", str(cert), "--tls-key", str(key), *more]


# -- a transfer, and what a passive observer sees ----------------------------------------


@pytest.fixture
def started() -> Iterator[list[FerryProcess]]:
    procs: list[FerryProcess] = []
    yield procs
    for proc in procs:
        proc.kill()


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_transfer_through_the_broker_and_what_a_tap_reads(
    tls: bool,
    broker_factory: BrokerFactory,
    pki: TestPKI,
    tmp_path: Path,
    started: list[FerryProcess],
) -> None:
    cert, key, _ = pki.server("127.0.0.1")
    broker = broker_factory(*(_tls_args(cert, key) if tls else []))
    assert broker.listening["tls"] is tls
    source = random_file(tmp_path / "out" / "report.bin", 256 << 10)
    with TcpTap(broker.address) as tap:
        address = f"grpcs://{tap.address}" if tls else tap.address  # loopback: plaintext
        env = _env(tmp_path, address, **({"FERRY_BROKER_CA": str(pki.ca_file)} if tls else {}))
        sender = FerryProcess(["send", str(source), "--json"], env, tmp_path).start()
        started.append(sender)
        offered = sender.line()
        assert offered["event"] == "offered", offered
        receiver = FerryProcess(
            ["receive", "--dest", str(tmp_path / "in"), "--yes", "--json"],
            {**env, "FERRY_CODE": offered["code"]},
            tmp_path,
        ).start()
        started.append(receiver)
        rc, lines, err = receiver.finish(timeout=60)
        assert rc == 0, err
        assert lines[-1]["event"] == "completed"
        rc, lines, err = sender.finish(timeout=60)
        assert rc == 0, err
        wire = tap.recorded()
    assert sha256(tmp_path / "in" / "report.bin") == sha256(source)
    state = json.loads((tmp_path / "state" / "ferry" / "sessions.json").read_text())
    tokens = [e["token"].encode() for e in state.values() if e.get("token")]
    nameplate = "-".join(offered["code"].split("-")[:2]).encode()
    assert tokens
    secrets = [*tokens, nameplate, offered["session"].encode()]
    assert len(wire) > 1000
    if tls:
        assert wire[:3] == b"\x16\x03\x01"  # a TLS handshake record: the ClientHello
        assert not [s for s in secrets if s in wire]
    else:
        assert all(s in wire for s in secrets)  # what TLS is for


# -- failures that waiting would not fix: refused at once, each with its message ----------


def _broker_wait_not_waited(rc: int, err: str, took: float, expected: str) -> None:
    assert rc == 1, err
    assert took < FAST, f"took {took:.1f} s: the TLS failure was waited for"
    last = err.strip().splitlines()[-1]
    assert last.startswith("ferry: error: "), err
    assert expected in last, err
    assert len(err.strip().splitlines()) == 1, err  # one line, no gRPC log before it


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong_ca", "the broker's certificate is not trusted (unable to get local issuer"),
        ("expired", "the broker's certificate has expired"),
        ("wrong_host", "the broker's certificate is not valid for host 127.0.0.1"),
        ("plaintext_broker", "does not speak TLS"),
        ("plaintext_client", "speaks TLS, not plaintext: use grpcs://127.0.0.1:"),
        ("no_client_cert", "requires a client certificate"),
        ("client_cert_of_another_ca", "refused this client's certificate"),
    ],
)
def test_tls_failures_are_told_at_once(
    case: str, expected: str, broker_factory: BrokerFactory, pki: TestPKI, tmp_path: Path
) -> None:
    extra: dict[str, str] = {"FERRY_BROKER_CA": str(pki.ca_file)}
    scheme = "grpcs://"
    broker_args: list[str] = []
    if case == "wrong_ca":
        extra["FERRY_BROKER_CA"] = str(TestPKI.create(tmp_path / "other").ca_file)
        broker_args = _tls_args(*pki.server("127.0.0.1")[:2])
    elif case == "expired":
        now = datetime.datetime.now(datetime.UTC)
        cert, key, _ = pki.server(
            "127.0.0.1",
            not_before=now - datetime.timedelta(days=30),
            not_after=now - datetime.timedelta(days=1),
        )
        broker_args = _tls_args(cert, key)
    elif case == "wrong_host":
        broker_args = _tls_args(*pki.server("broker.example")[:2])
    elif case == "plaintext_broker":
        pass
    elif case == "plaintext_client":
        broker_args = _tls_args(*pki.server("127.0.0.1")[:2])
        scheme = "grpc://"
    else:
        client_ca = pki.ca_file
        broker_args = _tls_args(*pki.server("127.0.0.1")[:2], "--tls-client-ca", str(client_ca))
        if case == "client_cert_of_another_ca":
            other = TestPKI.create(tmp_path / "other")
            cert, key = other.client()
            extra |= {"FERRY_BROKER_CERT": str(cert), "FERRY_BROKER_KEY": str(key)}
    broker = broker_factory(*broker_args)
    env = _env(tmp_path, scheme + broker.address, **extra)
    source = random_file(tmp_path / "small.bin", 1000)
    rc, err, took = _ferry(env, tmp_path, "send", str(source))
    _broker_wait_not_waited(rc, err, took, expected)


def test_the_library_raises_broker_tls_error(
    broker_factory: BrokerFactory, pki: TestPKI, tmp_path: Path
) -> None:
    broker = broker_factory(*_tls_args(*pki.server("127.0.0.1")[:2]))
    other = TestPKI.create(tmp_path / "other")
    client = Client(f"grpcs://{broker.address}", broker_ca=other.ca_file, broker_wait=300)
    started = time.monotonic()
    with pytest.raises(BrokerTLSError) as info:
        asyncio.run(client.broker_id())
    assert time.monotonic() - started < 5
    assert info.value.kind == "untrusted"
    assert info.value.verify_code == 20  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    assert not info.value.unreachable
    good = Client(f"grpcs://{broker.address}", broker_ca=pki.ca_file)
    assert asyncio.run(good.broker_id())


# -- mutual TLS ---------------------------------------------------------------------------


def test_client_certificate_required(
    broker_factory: BrokerFactory, pki: TestPKI, tmp_path: Path
) -> None:
    cert, key, _ = pki.server("127.0.0.1")
    broker = broker_factory(*_tls_args(cert, key, "--tls-client-ca", str(pki.ca_file)))
    address = f"grpcs://{broker.address}"
    without = Client(address, broker_ca=pki.ca_file)
    with pytest.raises(BrokerTLSError) as info:
        asyncio.run(without.broker_id())
    assert info.value.kind == "client_certificate"
    client_cert, client_key = pki.client()
    with_cert = Client(
        address, broker_ca=pki.ca_file, broker_cert=client_cert, broker_key=client_key
    )
    assert asyncio.run(with_cert.broker_id())


# -- a renewed certificate, without a restart --------------------------------------------


def test_renewed_certificate_is_served_without_restart(
    broker_factory: BrokerFactory, pki: TestPKI, tmp_path: Path
) -> None:
    cert, key, first = pki.server("127.0.0.1")
    broker = broker_factory(*_tls_args(cert, key))
    assert broker.proc is not None
    pid = broker.proc.pid
    assert presented_serial(broker.address, pki.ca_file) == first
    client = Client(f"grpcs://{broker.address}", broker_ca=pki.ca_file)
    broker_id = asyncio.run(client.broker_id())

    # Half a renewal (the certificate written, the key not yet): the old pair is served on.
    renewed = pki.ca.issue_cert("127.0.0.1")
    (tmp_path / "half").write_bytes(renewed.cert_chain_pems[0].bytes())
    os.replace(tmp_path / "half", cert)
    assert presented_serial(broker.address, pki.ca_file) == first
    assert asyncio.run(client.broker_id()) == broker_id

    # The whole renewal: the next new connection gets the new certificate.
    _, _, second = pki.server("127.0.0.1", cert=cert, key=key)
    assert second != first
    assert presented_serial(broker.address, pki.ca_file) == second
    assert asyncio.run(client.broker_id()) == broker_id  # a new channel, the new certificate
    assert broker.proc.pid == pid
    assert broker.proc.poll() is None
    log = broker.log[-1].read_text()
    assert "is not the private key of" in log  # the half renewal was noticed, once
    assert log.count("is not the private key of") == 1


# -- the server side: plaintext only on loopback, the health-only port -------------------


@pytest.mark.parametrize("command", [["-m", "ferry.broker"], ["-m", "ferry.cli", "serve"]])
def test_plaintext_refused_off_loopback(command: list[str], tmp_path: Path) -> None:
    data = tmp_path / "data"
    argv = [sys.executable, *command, "--listen", "0.0.0.0:0", "--data-dir", str(data)]
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2
    assert time.monotonic() - started < FAST
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "refusing plaintext gRPC on --listen 0.0.0.0:0, not a loopback address" in lines[0]
    assert "--tls-cert and --tls-key, or --insecure-plaintext" in lines[0]
    assert not data.exists()


def test_insecure_plaintext_is_loud(broker_factory: BrokerFactory) -> None:
    broker = broker_factory("--insecure-plaintext", "--log-level", "WARNING")
    assert broker.listening["tls"] is False
    log = broker.log[-1].read_text()
    assert "WARNING ferry.broker.server PLAINTEXT gRPC" in log


def test_health_only_port_for_probes(
    broker_factory: BrokerFactory, pki: TestPKI, tmp_path: Path
) -> None:
    cert, key, _ = pki.server("127.0.0.1")
    broker = broker_factory(*_tls_args(cert, key, "--health-listen", "127.0.0.1:0"))
    health_address = broker.listening["health_address"]
    with grpc.insecure_channel(health_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "ferry.v1.BrokerService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
        stub = broker_pb2_grpc.BrokerServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetBrokerInfo(broker_pb2.GetBrokerInfoRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED  # health, nothing else
    with grpc.insecure_channel(broker.address) as channel:  # the main port: TLS only
        health = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert broker.stop() == 0
