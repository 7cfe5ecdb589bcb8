"""Broker throughput: full negotiations per second and per broker CPU-second.

    python bench/negotiate.py [--clients 32] [--seconds 10]
                              [--setups sqlite,redis,redis2,redisfar] [--redis-delay-ms 0.5]
                              [--watchers N [--watchers-per-connection 100]]

A negotiation is what a transfer asks of the broker before any byte moves, over gRPC with
the generated stubs: CreateOffer -> ClaimOffer -> ConfirmKey (receiver) -> ConfirmKey
(sender) -> AcceptOffer -> CancelSession (placeholder PAKE bytes: the broker relays them
without checking, tests/support/broker_flow.py). --clients asyncio workers run them back to
back for --seconds against real `ferry serve` processes on loopback:

- ``sqlite``: one broker on its embedded SQLite store (the default deployment);
- ``redis``: one broker on a redis-server started for the run;
- ``redis2``: two brokers on that Redis, the workers alternating between them;
- ``redisfar``: one broker on that Redis behind bench/delay_proxy.py (--redis-delay-ms each
  way; the round trip through it is measured and printed), as a Redis across a network.

The per-address limits (offers, claims, calls) are raised for the run: every worker comes
from 127.0.0.1. Reported per setup: negotiations per second, per broker CPU-second (the
brokers' user+system time from /proc, which does not depend on the machine's size), the
latency percentiles of one negotiation, and with --watchers N that many idle WatchSession
streams held open on the (first) broker meanwhile (each on its own offer, that many per
connection), with its RSS and what each idle watch added to it. The load generator shares
the machine's cores with the brokers: read the per-CPU-second figure as the broker's cost.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import psutil
import redis as redis_py

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferry.v1 import broker_pb2, broker_pb2_grpc
from tests.support.broker_flow import (
    RECEIVER_CONFIRMATION,
    RECEIVER_PAKE,
    SENDER_CERTIFICATE_MAC,
    SENDER_CONFIRMATION,
    SENDER_PAKE,
    auth,
)
from tests.support.processes import BrokerProcess, free_port
from tests.support.redis import RedisServer

T = 10.0
UNLIMITED = [
    "--offer-burst-per-address", "1000000", "--offer-rate-per-address", "1000000",
    "--calls-burst-per-address", "1000000", "--calls-rate-per-address", "1000000",
    "--claim-burst-per-ip", "1000000", "--claim-rate-per-ip", "1000000",
    "--leases-per-caller", "100000", "--watches-per-address", "100000",
    "--watches-total", "100000", "--max-concurrent-calls", "100000", "--max-connections", "30000",
    "--log-level", "WARNING",
]  # fmt: skip


def _peer(cert: bytes) -> broker_pb2.PeerInfo:
    return broker_pb2.PeerInfo(
        allowed_ports=broker_pb2.PortRange(first_port=20000, last_port=60000),
        certificate_der=cert,
    )


async def negotiate(stub: broker_pb2_grpc.BrokerServiceAsyncStub) -> None:
    """One full negotiation, to the end (cancelled)."""
    sender = _peer(b"sender-cert")
    sender.pake_message = SENDER_PAKE
    offer = await stub.CreateOffer(
        broker_pb2.CreateOfferRequest(
            manifest=broker_pb2.Manifest(
                files=[broker_pb2.FileEntry(path="a.bin", size_bytes=1 << 20)],
                chunk_size_bytes=1 << 20,
            ),
            sender=sender,
        ),
        timeout=T,
    )
    name = offer.session.name
    claim = await stub.ClaimOffer(
        broker_pb2.ClaimOfferRequest(code=offer.code, pake_message=RECEIVER_PAKE), timeout=T
    )
    await stub.ConfirmKey(
        broker_pb2.ConfirmKeyRequest(name=name, key_confirmation=RECEIVER_CONFIRMATION),
        metadata=auth(claim.party_token),
        timeout=T,
    )
    await stub.ConfirmKey(
        broker_pb2.ConfirmKeyRequest(
            name=name, key_confirmation=SENDER_CONFIRMATION, certificate_mac=SENDER_CERTIFICATE_MAC
        ),
        metadata=auth(offer.party_token),
        timeout=T,
    )
    await stub.AcceptOffer(
        broker_pb2.AcceptOfferRequest(name=name, receiver=_peer(b"receiver-cert")),
        metadata=auth(claim.party_token),
        timeout=T,
    )
    await stub.CancelSession(
        broker_pb2.CancelSessionRequest(name=name, reason="bench"),
        metadata=auth(offer.party_token),
        timeout=T,
    )


# As many clients would hold them: one connection each, or a few (the broker serves at most
# 128 streams per connection; --watchers-per-connection). Each channel gets its own
# connection: by default, grpc's channels to one address share one.
_OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


async def hold_watchers(
    address: str, count: int, per_connection: int
) -> tuple[list[object], list[grpc.aio.Channel]]:
    """``count`` idle WatchSession streams (one offer each, its sender watching), over
    connections of `per_connection` streams each."""
    calls: list[object] = []
    channels: list[grpc.aio.Channel] = []
    for index in range(count):
        if index % per_connection == 0:
            channels.append(grpc.aio.insecure_channel(address, options=_OWN_CONNECTION))
            stub = broker_pb2_grpc.BrokerServiceStub(channels[-1])
        sender = _peer(b"w")
        sender.pake_message = SENDER_PAKE
        offer = await stub.CreateOffer(
            broker_pb2.CreateOfferRequest(
                manifest=broker_pb2.Manifest(
                    files=[broker_pb2.FileEntry(path="w", size_bytes=1)], chunk_size_bytes=1 << 20
                ),
                sender=sender,
            ),
            timeout=T,
        )
        call = stub.WatchSession(
            broker_pb2.WatchSessionRequest(name=offer.session.name),
            metadata=auth(offer.party_token),
        )
        await call.read()
        calls.append(call)
    return calls, channels


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


async def run(addresses: list[str], pids: list[int], clients: int, seconds: float,
              watchers: int, per_connection: int) -> dict[str, float]:  # fmt: skip
    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    stubs: list[broker_pb2_grpc.BrokerServiceAsyncStub] = [
        broker_pb2_grpc.BrokerServiceStub(c) for c in channels
    ]
    rss_before = psutil.Process(pids[0]).memory_info().rss
    held, held_channels = await hold_watchers(addresses[0], watchers, per_connection)
    rss_held = psutil.Process(pids[0]).memory_info().rss
    for stub in stubs:  # warm up
        await negotiate(stub)
    latencies: list[float] = []
    errors = 0
    stop = time.monotonic() + seconds
    cpu_before, started = _cpu(pids), time.monotonic()

    async def worker(index: int) -> None:
        nonlocal errors
        stub = stubs[index % len(stubs)]
        while time.monotonic() < stop:
            begun = time.monotonic()
            try:
                await negotiate(stub)
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            latencies.append(time.monotonic() - begun)

    await asyncio.gather(*(worker(i) for i in range(clients)))
    elapsed, cpu = time.monotonic() - started, _cpu(pids) - cpu_before
    rss = psutil.Process(pids[0]).memory_info().rss / (1 << 20)
    for call in held:
        call.cancel()  # type: ignore[attr-defined]
    for channel in channels + held_channels:
        await channel.close()
    quantiles = statistics.quantiles(latencies, n=100)
    return {
        "per_s": len(latencies) / elapsed,
        "per_cpu_s": len(latencies) / cpu if cpu else float("nan"),
        "p50_ms": quantiles[49] * 1000,
        "p99_ms": quantiles[98] * 1000,
        "errors": errors,
        "rss_mib": rss,
        "kib_per_watcher": (rss_held - rss_before) / 1024 / watchers if watchers else 0.0,
    }


def _far(redis: RedisServer, delay_ms: float) -> tuple[subprocess.Popen[str], str]:
    """The setup "redisfar": Redis behind bench/delay_proxy.py; prints the round trip."""
    port = free_port()
    proxy = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("delay_proxy.py")), str(port),
         str(redis.port), str(delay_ms)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proxy.stdout is not None
    assert proxy.stdout.readline().strip() == "ready"
    client = redis_py.Redis(host="127.0.0.1", port=port, socket_timeout=5)
    client.ping()
    started = time.perf_counter()
    for _ in range(20):
        client.ping()
    rtt_ms = (time.perf_counter() - started) / 20 * 1000
    client.close()
    print(f"redisfar: Redis round trip through the proxy {rtt_ms:.1f} ms")
    return proxy, f"redis://127.0.0.1:{port}/0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--setups", default="sqlite,redis,redis2")
    parser.add_argument("--watchers", type=int, default=0)
    parser.add_argument("--watchers-per-connection", type=int, default=100)
    parser.add_argument("--redis-delay-ms", type=float, default=0.5)
    ns = parser.parse_args()
    print(f"{'setup':<8} {'neg/s':>8} {'neg/CPU-s':>10} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'errors':>7} {'RSS MiB':>8} {'KiB/watch':>9}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="ferry-negotiate-") as root:
        for setup in ns.setups.split(","):
            tmp = Path(root) / setup
            tmp.mkdir()
            redis: RedisServer | None = None
            proxy: subprocess.Popen[str] | None = None
            brokers: list[BrokerProcess] = []
            try:
                env = None
                if setup.startswith("redis"):
                    redis = RedisServer(tmp / "redis").start()
                    env = {"FERRY_STORE": redis.url}
                if setup == "redisfar":
                    proxy, url = _far(redis, ns.redis_delay_ms)  # type: ignore[arg-type]
                    env = {"FERRY_STORE": url}
                for i in range(2 if setup == "redis2" else 1):
                    broker = BrokerProcess(data_dir=tmp / f"b{i}", args=UNLIMITED, env=env)
                    broker.start()
                    brokers.append(broker)
                pids = [b.proc.pid for b in brokers if b.proc is not None]
                figures = asyncio.run(
                    run(
                        [b.address for b in brokers],
                        pids,
                        ns.clients,
                        ns.seconds,
                        ns.watchers,
                        ns.watchers_per_connection,
                    )
                )
            finally:
                for broker in brokers:
                    broker.kill()
                if proxy is not None:
                    proxy.kill()
                    proxy.wait(timeout=10)
                if redis is not None:
                    redis.stop()
            print(f"{setup:<8} {figures['per_s']:8.0f} {figures['per_cpu_s']:10.0f} "
                  f"{figures['p50_ms']:8.1f} {figures['p99_ms']:8.1f} {figures['errors']:7.0f} "
                  f"{figures['rss_mib']:8.0f} {figures['kib_per_watcher']:9.1f}")  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
