"""Operating the broker (issue 12): metrics, JSON logs, connection age, drain; real processes.

- /metrics of a real broker after a real negotiation: the counters moved; on Redis, the
  round-trip histogram has observations.
- JSON logs through offer, claim, accept and cancel on Redis with a password: every line is
  JSON, session ids appear, no code, party token or Redis password does.
- max_connection_age: a watch that outlives it is ended, and the client's watch() re-watches
  and sees the later change.
- SIGTERM: health NOT_SERVING first, new calls UNAVAILABLE, exit within the grace; with two
  replicas on Redis, a sender whose replica drains finishes through the other.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
import urllib.request
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from ferry.client._broker import BrokerLink
from ferry.client._session import watch
from ferry.v1 import broker_pb2, broker_pb2_grpc
from tests.conftest import BrokerFactory
from tests.support.broker_flow import RECEIVER_PAKE, auth, claim_confirmed_rpc, pake_sender
from tests.support.files import random_file
from tests.support.processes import (
    FAST_BROKER,
    BrokerProcess,
    FerryProcess,
    cli_env,
    start_replica,
)
from tests.support.redis import RedisServer
from tests.support.replicas import finish_on_the_other
from tests.support.rpc import reason_of

pytestmark = [pytest.mark.timeout(120)]

S = broker_pb2.Session
T = 5.0  # deadline of every call, seconds
METRICS = ["--metrics-listen", "127.0.0.1:0"]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _peer(first: int, last: int) -> broker_pb2.PeerInfo:
    return broker_pb2.PeerInfo(
        candidates=[broker_pb2.Candidate(ip="192.0.2.7", kind=broker_pb2.Candidate.KIND_HOST)],
        allowed_ports=broker_pb2.PortRange(first_port=first, last_port=last),
        certificate_der=b"\x30\x82fake-der",
    )


def _offer_request() -> broker_pb2.CreateOfferRequest:
    manifest = broker_pb2.Manifest(
        files=[broker_pb2.FileEntry(path="a.bin", size_bytes=1234, mode=0o644)],
        chunk_size_bytes=1 << 20,
    )
    return broker_pb2.CreateOfferRequest(manifest=manifest, sender=pake_sender(_peer(40000, 40100)))


def scrape(broker: BrokerProcess) -> Samples:
    """Every sample of the broker's /metrics, by name and labels."""
    url = f"http://{broker.listening['metrics_address']}/metrics"
    with urllib.request.urlopen(url, timeout=T) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def _next_state(call: grpc.aio.UnaryStreamCall[Any, Any]) -> int:
    """The state of the next update a WatchSession stream brings."""
    response = await call.read()
    assert isinstance(response, broker_pb2.WatchSessionResponse), response
    return response.session.state


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


async def _negotiate(
    stub: broker_pb2_grpc.BrokerServiceAsyncStub,
) -> tuple[broker_pb2.CreateOfferResponse, broker_pb2.ClaimOfferResponse]:
    """Offer, claim (PAKE placeholders), accept: an accepted session."""
    offer = await stub.CreateOffer(_offer_request(), timeout=T)
    claim = await claim_confirmed_rpc(stub, offer)
    await stub.AcceptOffer(
        broker_pb2.AcceptOfferRequest(name=offer.session.name, receiver=_peer(50000, 50100)),
        metadata=auth(claim.party_token),
        timeout=T,
    )
    return offer, claim


@pytest.mark.asyncio
async def test_metrics_move_with_a_real_negotiation(broker_factory: BrokerFactory) -> None:
    broker = broker_factory(*METRICS, "--claim-burst-per-ip", "2", "--claim-rate-per-ip", "0.001")
    async with grpc.aio.insecure_channel(broker.address) as channel:
        stub = broker_pb2_grpc.BrokerServiceStub(channel)
        offer, claim = await _negotiate(stub)
        name = offer.session.name
        watch_call = stub.WatchSession(
            broker_pb2.WatchSessionRequest(name=name), metadata=auth(offer.party_token)
        )
        assert await _next_state(watch_call) == S.STATE_ACCEPTED  # the stream is open
        assert sample(scrape(broker), "ferry_watch_streams") == 1
        path = broker_pb2.PathReport(route="punched", local="10.0.0.1:1", remote="10.0.0.2:2")
        for _ in range(2):  # a repeated completion (a retry) counts once
            await stub.ReportProgress(
                broker_pb2.ReportProgressRequest(
                    name=name,
                    state=S.STATE_COMPLETED,
                    bytes_done=1234,
                    path=path,
                    bytes_direct=1000,
                    bytes_store=5000,  # more than the offer: counted up to its size only
                ),
                metadata=auth(claim.party_token),
                timeout=T,
            )
        assert await _next_state(watch_call) == S.STATE_COMPLETED
        limited = 0
        for _ in range(6):  # wrong codes: refused, then rate limited
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ClaimOffer(
                    broker_pb2.ClaimOfferRequest(code="999-nothing", pake_message=RECEIVER_PAKE),
                    timeout=T,
                )
            limited += reason_of(refused.value) == "RATE_LIMITED"
        assert limited > 0
    m = scrape(broker)
    assert sample(m, "ferry_offers_created_total") == 1
    assert sample(m, "ferry_rpc_duration_seconds_count", method="CreateOffer", code="OK") == 1
    assert sample(m, "ferry_rpc_duration_seconds_count", method="AcceptOffer", code="OK") == 1
    assert sample(m, "ferry_rpc_duration_seconds_count", method="ReportProgress", code="OK") == 2
    assert sample(m, "ferry_offer_accept_seconds_count") == 1
    assert sample(m, "ferry_transfer_bytes_total", path="direct") == 1000
    assert sample(m, "ferry_transfer_bytes_total", path="store") == 234
    assert sample(m, "ferry_transfers_total", path="mixed", route="punched") == 1
    assert sample(m, "ferry_watch_streams") == 0  # the stream ended with the final state
    assert sample(m, "ferry_rate_limited_total", method="ClaimOffer") == limited
    not_found = sample(m, "ferry_claims_refused_total", reason="CODE_NOT_FOUND")
    assert not_found == 6 - limited
    assert sample(m, "ferry_refusals_total", method="ClaimOffer", reason="CODE_NOT_FOUND") == (
        not_found
    )
    assert sample(m, "ferry_rpc_duration_seconds_count", method="ClaimOffer", code="NOT_FOUND") == (
        not_found
    )
    assert sample(m, "ferry_sessions", state="completed") == 1
    assert sample(m, "ferry_store_up") == 1
    assert ("ferry_store_uploads_in_flight", frozenset()) in m
    assert sample(m, "process_resident_memory_bytes") > 0
    labels = {value for (_, pairs) in m for _, value in pairs}
    assert name not in labels
    assert name.removeprefix("sessions/") not in labels
    with urllib.request.urlopen(
        f"http://{broker.listening['metrics_address']}/metrics?x", timeout=T
    ) as response:
        assert response.status == 200
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://{broker.listening['metrics_address']}/", timeout=T)
    assert missing.value.code == 404
    missing.value.close()  # an HTTPError holds the response's socket open


def test_a_real_transfer_is_counted_by_the_path_that_carried_it(
    broker_factory: BrokerFactory, tmp_path: Path
) -> None:
    """`ferry send` / `ferry receive` through a broker with metrics: the receiver's completion
    report says the direct path carried every byte, and the broker counts them there."""
    broker = broker_factory(*METRICS)
    src = random_file(tmp_path / "src" / "counted.bin", 3 << 20)
    sender = FerryProcess(["send", str(src), "--json"], cli_env(tmp_path, broker.address, "s"),
                          tmp_path).start()  # fmt: skip
    try:
        offered = sender.line()
        receiver = FerryProcess(
            ["receive", offered["code"], "--dest", str(tmp_path / "dest"), "--yes", "--json"],
            cli_env(tmp_path, broker.address, "r"),
            tmp_path,
        ).start()
        rc, lines, err = receiver.finish(60)
        assert rc == 0, err
        assert lines[-1]["path"] == "direct", lines[-1]
        assert sender.finish(30)[0] == 0
    finally:
        sender.kill()
    m = scrape(broker)
    assert sample(m, "ferry_transfer_bytes_total", path="direct") == 3 << 20
    assert sample(m, "ferry_transfer_bytes_total", path="store") == 0
    assert sample(m, "ferry_transfers_total", path="direct", route="host") == 1


def test_a_flood_of_idle_scrapers_holds_few_descriptors(broker_factory: BrokerFactory) -> None:
    """The metrics port holds at most 32 connections: more are closed as they come, so a
    flood of clients that never send a request costs the broker a bounded number of fds."""
    broker = broker_factory(*METRICS)
    assert broker.proc is not None
    host, _, port = broker.listening["metrics_address"].rpartition(":")
    fds = len(os.listdir(f"/proc/{broker.proc.pid}/fd"))
    idle = [socket.create_connection((host, int(port)), timeout=T) for _ in range(200)]
    try:
        time.sleep(1.5)  # the broker accepted them all by now, and keeps 32 (each for 5 s)
        held = len(os.listdir(f"/proc/{broker.proc.pid}/fd")) - fds
        assert 20 <= held <= 34, held
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 10
    while True:  # the slots come back once the idle clients are gone
        try:
            assert sample(scrape(broker), "ferry_store_up") == 1
            break
        except (OSError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.asyncio
async def test_json_logs_on_redis_carry_session_ids_and_no_secrets(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    password = "redis-pass-1f3e9a"
    redis_server.client().config_set("requirepass", password)
    url = f"redis://:{password}@127.0.0.1:{redis_server.port}/0"
    args = [*FAST_BROKER, *METRICS, "--log-format", "json", "--log-level", "DEBUG"]
    broker = BrokerProcess(data_dir=tmp_path / "b", args=args, env={"FERRY_STORE": url})
    broker.start()
    try:
        secrets: list[str] = [password]
        names: list[str] = []
        async with grpc.aio.insecure_channel(broker.address) as channel:
            stub = broker_pb2_grpc.BrokerServiceStub(channel)
            for _ in range(2):
                offer, claim = await _negotiate(stub)
                secrets += [offer.code, offer.party_token, claim.party_token]
                names.append(offer.session.name)
            await stub.CancelSession(
                broker_pb2.CancelSessionRequest(name=names[1], reason="changed my mind"),
                metadata=auth(offer.party_token),
                timeout=T,
            )
        m = scrape(broker)
        assert sample(m, "ferry_redis_round_trip_seconds_count") > 0
        assert sample(m, "ferry_sessions", state="live") == 1
        assert sample(m, "ferry_sessions", state="ended") == 1
        assert ("ferry_store_uploads_in_flight", frozenset()) not in m  # Redis cannot tell
        assert broker.stop() == 0
    finally:
        broker.kill()
    lines = broker.log[-1].read_text().splitlines()
    assert lines
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    for record in records:
        assert {"time", "level", "logger", "message"} <= record.keys(), record
    logged = {str(record.get("session")) for record in records}
    assert set(names) <= logged, logged
    text = "\n".join(lines)
    for secret in secrets:
        assert secret not in text


@pytest.mark.asyncio
async def test_a_watch_older_than_the_connection_age_is_reopened(
    broker_factory: BrokerFactory,
) -> None:
    broker = broker_factory(
        *METRICS, "--max-connection-age", "1", "--max-connection-age-grace", "0.5"
    )
    async with grpc.aio.insecure_channel(broker.address) as channel:
        stub = broker_pb2_grpc.BrokerServiceStub(channel)
        offer, claim = await _negotiate(stub)
    link = BrokerLink(broker.address)
    link.token = offer.party_token
    seen: list[int] = []

    async def follow() -> None:
        async for session in watch(link, offer.session.name, 60):
            seen.append(session.state)

    following = asyncio.create_task(follow())
    try:
        ended = 0.0
        for _ in range(100):  # until the first stream was ended and a new one opened
            await asyncio.sleep(0.1)
            m = scrape(broker)
            ended = sum(
                v
                for (n, labels), v in m.items()
                if n == "ferry_rpc_duration_seconds_count" and ("method", "WatchSession") in labels
            )
            if ended >= 1 and sample(m, "ferry_watch_streams") == 1:
                break
        assert ended >= 1, "no watch was ended by the connection age"
        assert not following.done()
        async with grpc.aio.insecure_channel(broker.address) as channel:
            stub = broker_pb2_grpc.BrokerServiceStub(channel)
            await stub.CancelSession(
                broker_pb2.CancelSessionRequest(name=offer.session.name, reason="later event"),
                metadata=auth(claim.party_token),
                timeout=T,
            )
        await asyncio.wait_for(following, 20)
    finally:
        following.cancel()
        await link.close()
    assert seen[0] == S.STATE_ACCEPTED
    assert seen[-1] == S.STATE_CANCELLED
    assert seen.count(S.STATE_ACCEPTED) >= 2  # the re-watch began with the state again


async def _health_updates(address: str) -> AsyncGenerator[int, None]:
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        async for reply in health.Watch(health_pb2.HealthCheckRequest(service="")):
            yield reply.status


@pytest.mark.asyncio
async def test_sigterm_drains(broker_factory: BrokerFactory) -> None:
    broker = broker_factory("--health-listen", "127.0.0.1:0", "--shutdown-grace", "3")
    health_address = broker.listening["health_address"]
    async with grpc.aio.insecure_channel(broker.address) as channel:
        stub = broker_pb2_grpc.BrokerServiceStub(channel)
        offer, _ = await _negotiate(stub)
        watch_call = stub.WatchSession(
            broker_pb2.WatchSessionRequest(name=offer.session.name),
            metadata=auth(offer.party_token),
        )
        assert await _next_state(watch_call) == S.STATE_ACCEPTED
        statuses = _health_updates(health_address)
        assert await anext(statuses) == health_pb2.HealthCheckResponse.SERVING
        # A Health.Watch on the gRPC port holds the drain open for the whole grace.
        held = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert (await held.read()).status == health_pb2.HealthCheckResponse.SERVING
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGTERM)
        assert await anext(statuses) == health_pb2.HealthCheckResponse.NOT_SERVING
        # The watch ends (its client re-watches elsewhere), before the grace is over.
        assert await watch_call.read() is grpc.aio.EOF
        # New calls, on this connection and a new one, are refused at once.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GetBrokerInfo(broker_pb2.GetBrokerInfoRequest(), timeout=T)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.insecure_channel(broker.address) as fresh:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await broker_pb2_grpc.BrokerServiceStub(fresh).GetBrokerInfo(
                    broker_pb2.GetBrokerInfoRequest(), timeout=T
                )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        await statuses.aclose()
        held.cancel()
    assert await asyncio.to_thread(broker.proc.wait, 3 + 10) == 0


def test_a_sender_on_a_draining_replica_finishes_on_the_other(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    a = start_replica(tmp_path, "a", redis_server.url)
    b = start_replica(tmp_path, "b", redis_server.url)
    src = random_file(tmp_path / "src" / "drained.bin", 1 << 20)

    def drain_a() -> None:  # SIGTERM: A drains, its watch ends, the sender re-watches
        assert a.stop() == 0

    lines = finish_on_the_other(tmp_path, a, b, src, drain_a)
    assert lines[-1]["event"] == "completed", lines
