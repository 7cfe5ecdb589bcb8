"""People on the broker: notification latency and memory per idle signed-in device (issue 13).

    python bench/inbox.py [--devices 1000] [--offers 50] [--setups sqlite,redis] [--cli 5]
                          [--streams-per-connection 50]

For each setup a real `ferry serve` runs on loopback (``sqlite``: its embedded store;
``redis``: a redis-server started for the run), with the per-address limits raised, as
bench/negotiate.py does: everything here comes from 127.0.0.1. Then, all in this process:

- --devices users of one organisation (alice among them; one device each) are made in the
  broker's store with an enrollment token each, and their devices enroll and sign in over
  gRPC (EnrollDevice, CreateChallenge, SignIn: real Ed25519 signatures); so does bob, the
  sender, who holds no stream.
- Memory. The broker's RSS is read with alice's stream and one session watch open (what
  the first of each costs once is left out), after --devices idle WatchSession streams on
  code offers made beforehand (the baseline, as negotiate.py's watchers) and after the
  other devices' WatchInbox streams; each read after a short settle. Per idle device: the
  growth over the devices; per idle session watch likewise. Streams share connections,
  --streams-per-connection each; nothing is freed between the reads.
- Latency, with the session watches closed and the devices idle: bob makes --offers person
  offers to alice, spread over 16 s so that they meet one round of the devices' presence
  renewals (every 7.5 to 15 s with the default --presence-ttl, at a random point: streams
  that opened together, as after a broker restart, do not renew together). ListPeers and
  the sealing
  happen before the clock starts; each offer is timed from just before CreateOffer to the
  WatchInbox response that lists it on alice's stream (CreateOffer + ConfirmKey + the
  broker's wake + the read), then cancelled, and its leaving the inbox awaited. The steps
  are printed too, and ListPeers of the recipient + sealing, which every `ferry send --to`
  pays before its offer. Baselines in the same run: a bare GetBrokerInfo round
  trip (median of 200), and the same offers with 0 other devices connected: half before
  the other devices' streams open, half after they closed (the machine's drift shared).
- --cli K: `ferry send FILE --to alice --json` as a subprocess (a device of bob's own,
  enrolled with `ferry login`, a state dir of its own per run), timed from spawning it to
  alice's stream listing the offer; alice's device then takes and declines it over gRPC
  and the sender exits. Median of K, after one unmeasured run (its first ListPeers pins
  every peer's device). Baseline: `ferry --help` (Python start-up and imports), run
  after each of them, median of K.

Medians and p99s of one run; compare within the run only (the machine is shared). Every
wait is bounded, every process killed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import grpc
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.negotiate import _OWN_CONNECTION, UNLIMITED
from bench.transfer import FERRY, ferry_env
from ferry.broker.people import Directory
from ferry.broker.redis_store import RedisStore
from ferry.protocol.identity import DeviceKeys
from ferry.protocol.pake import PeerRole
from ferry.v1 import broker_pb2, broker_pb2_grpc
from tests.support.broker_flow import auth, offer_request
from tests.support.people import (
    PersonDevice,
    add_user,
    enroll_request,
    enrollment,
    person_offer_request,
    sign_in,
    sqlite_directory,
)
from tests.support.processes import BrokerProcess
from tests.support.redis import RedisServer

if TYPE_CHECKING:
    from ferry.v1.broker_pb2_grpc import BrokerServiceAsyncStub as Stub

R = TypeVar("R")
InboxCall = grpc.aio.UnaryStreamCall[broker_pb2.WatchInboxRequest, broker_pb2.WatchInboxResponse]
WatchCall = grpc.aio.UnaryStreamCall[
    broker_pb2.WatchSessionRequest, broker_pb2.WatchSessionResponse
]

T = 10.0  # deadline of every unary call, and of every wait for a stream, seconds
SETTLE_S = 2.0  # before each RSS read
ENROLL_CONCURRENCY = 16
UNARY_RUNS = 200
# The offers with the devices connected span one round of their presence renewals (each
# stream renews every third of the broker's default --presence-ttl, 45 s), and a bit more.
SPREAD_S = 45 / 3 + 1
# negotiate.py's raised limits, and the people ones: sign-in failures would count against
# the claim limits (raised there), every device's stream is one more watch from 127.0.0.1.
LIMITS = [
    *UNLIMITED,
    "--user-offers-per-hour", "1000000", "--inbox-max-offers", "1000",
]  # fmt: skip


@dataclass
class Sample:
    """One offer's times, seconds: ListPeers + sealing (before the clock), CreateOffer,
    ConfirmKey, and from ConfirmKey's answer to alice's stream listing it."""

    peers: float
    create: float
    confirm: float
    wake: float

    @property
    def total(self) -> float:
        """From just before CreateOffer to the stream's response."""
        return self.create + self.confirm + self.wake


@dataclass
class Figures:
    """What one setup measured (seconds, bytes)."""

    rss_base: int = 0
    rss_watches: int = 0
    rss_devices: int = 0
    unary: list[float] = field(default_factory=list)
    busy: list[Sample] = field(default_factory=list)  # with the devices connected
    alone: list[Sample] = field(default_factory=list)  # with 0 other devices connected
    cli: list[float] = field(default_factory=list)
    help: list[float] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)


class Inbox:
    """A device's WatchInbox stream, read by a task: when each offer was first listed on
    it, and which offers it said had left."""

    def __init__(self, call: InboxCall) -> None:
        self.call = call
        self.listed: dict[str, float] = {}
        self.gone: set[str] = set()
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> Inbox:
        """Wait for the first response (the stream is up), then read on in a task."""
        await self._take(await asyncio.wait_for(self.call.read(), T))
        self._task = asyncio.create_task(self._read())
        return self

    async def _take(self, response: object) -> None:
        if response is grpc.aio.EOF:
            raise RuntimeError("the inbox stream ended")
        assert isinstance(response, broker_pb2.WatchInboxResponse)
        now = time.perf_counter()
        for offer in response.offers:
            self.listed.setdefault(offer.name, now)
        self.gone.update(g.name for g in response.gone)
        async with self._changed:
            self._changed.notify_all()

    async def _read(self) -> None:
        try:
            while True:
                response = await self.call.read()
                await self._take(response)
                if response is grpc.aio.EOF:
                    return
        finally:
            async with self._changed:
                self._changed.notify_all()

    async def until(self, done: Callable[[], bool], what: str) -> None:
        """Wait (at most T) until ``done()``; raise if the stream ended first."""
        task = self._task
        assert task is not None

        def ready() -> bool:
            return done() or task.done()

        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(ready), T)
            except TimeoutError:
                raise TimeoutError(f"alice's inbox: {what} within {T} s") from None
        if not done():
            task.result()  # the stream's error, if it failed
            raise RuntimeError(f"alice's inbox stream ended before {what}")

    async def listed_at(self, name: str) -> float:
        await self.until(lambda: name in self.listed, f"no {name}")
        return self.listed[name]

    async def left(self, name: str) -> None:
        await self.until(lambda: name in self.gone, f"{name} never left")

    def close(self) -> None:
        self.call.cancel()
        if self._task is not None:
            self._task.cancel()


def _rss(pid: int) -> int:
    rss: int = psutil.Process(pid).memory_info().rss
    return rss


async def _settled_rss(pid: int) -> int:
    await asyncio.sleep(SETTLE_S)
    return _rss(pid)


def _channels(address: str, streams: int, per_connection: int) -> list[grpc.aio.Channel]:
    """Enough connections of their own for ``streams`` streams, ``per_connection`` each."""
    count = -(-streams // per_connection)
    return [grpc.aio.insecure_channel(address, options=_OWN_CONNECTION) for _ in range(count)]


async def _gather_bounded(jobs: Sequence[Callable[[], Awaitable[R]]], limit: int) -> list[R]:
    """Run the coroutine functions ``jobs``, ``limit`` at a time; their results in order."""
    gate = asyncio.Semaphore(limit)

    async def one(job: Callable[[], Awaitable[R]]) -> R:
        async with gate:
            return await job()

    return list(await asyncio.gather(*(one(job) for job in jobs)))


@contextlib.asynccontextmanager
async def _directory(broker: BrokerProcess, url: str | None) -> AsyncIterator[Directory]:
    """The broker's people directory, opened from this process (what `ferry admin` does)."""
    if url is None:
        store, directory = sqlite_directory(broker.data_dir)
        try:
            yield directory
        finally:
            await store.close()
    else:
        redis_store = RedisStore.from_url(url)
        try:
            yield redis_store.directory()
        finally:
            await redis_store.close()


async def enroll_devices(stub: Stub, directory: Directory, users: list[str]) -> list[PersonDevice]:
    """One device per user (made with its enrollment token in the store), enrolled and
    signed in over gRPC, ENROLL_CONCURRENCY at a time."""
    tokens = []
    for user in users:
        await add_user(directory, user)
        tokens.append(await enrollment(directory, user))

    async def one(user: str, token: str) -> PersonDevice:
        keys = DeviceKeys.generate()
        response = await stub.EnrollDevice(enroll_request(token, keys, user), timeout=T)
        device = PersonDevice(user, keys, response.device.device_id)
        device.access_token = await sign_in(stub, device)
        return device

    jobs = [partial(one, u, t) for u, t in zip(users, tokens, strict=True)]
    return await _gather_bounded(jobs, ENROLL_CONCURRENCY)


async def code_offer_names(stub: Stub, count: int) -> list[tuple[str, str]]:
    """``count`` code offers (name, sender's party token) for the session watches."""

    async def one() -> tuple[str, str]:
        offer = await stub.CreateOffer(offer_request(), timeout=T)
        return offer.session.name, offer.party_token

    return await _gather_bounded([one] * count, ENROLL_CONCURRENCY)


async def open_session_watches(
    channels: list[grpc.aio.Channel], offers: list[tuple[str, str]], per_connection: int
) -> list[WatchCall]:
    """An idle WatchSession stream (its sender's) on each offer; each has sent its first
    response."""

    async def one(index: int, name: str, token: str) -> WatchCall:
        stub: Stub = broker_pb2_grpc.BrokerServiceStub(channels[index // per_connection])
        call = stub.WatchSession(broker_pb2.WatchSessionRequest(name=name), metadata=auth(token))
        if await asyncio.wait_for(call.read(), T) is grpc.aio.EOF:
            raise RuntimeError(f"WatchSession {name} ended at once")
        return call

    jobs = [partial(one, i, n, t) for i, (n, t) in enumerate(offers)]
    return await _gather_bounded(jobs, ENROLL_CONCURRENCY)


async def open_inboxes(
    channels: list[grpc.aio.Channel], devices: list[PersonDevice], per_connection: int
) -> list[Inbox]:
    """Each device's WatchInbox stream, its first response read."""

    async def one(index: int, device: PersonDevice) -> Inbox:
        stub: Stub = broker_pb2_grpc.BrokerServiceStub(channels[index // per_connection])
        return await Inbox(
            stub.WatchInbox(broker_pb2.WatchInboxRequest(), metadata=device.meta())
        ).open()

    jobs = [partial(one, i, d) for i, d in enumerate(devices)]
    return await _gather_bounded(jobs, ENROLL_CONCURRENCY)


async def unary_round_trips(stub: Stub, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        await stub.GetBrokerInfo(broker_pb2.GetBrokerInfoRequest(), timeout=T)
        times.append(time.perf_counter() - started)
    return times


async def offer_latencies(
    stub: Stub, bob: PersonDevice, alice: Inbox, count: int, spread_s: float = 0.0
) -> list[Sample]:
    """``count`` offers from bob to alice, each timed until alice's stream lists it, then
    cancelled (and seen leaving) before the next; spread evenly over ``spread_s`` at least."""
    samples = []
    first = time.perf_counter()
    for index in range(count):
        await asyncio.sleep(max(first + index * spread_s / count - time.perf_counter(), 0.0))
        began = time.perf_counter()
        offer = await person_offer_request(stub, bob, "alice")  # ListPeers, sealing, signing
        started = time.perf_counter()
        response = await stub.CreateOffer(offer.request, metadata=bob.meta(), timeout=T)
        created = time.perf_counter()
        name, token = response.session.name, response.party_token
        await stub.ConfirmKey(
            broker_pb2.ConfirmKeyRequest(
                name=name,
                key_confirmation=offer.key.confirmation(PeerRole.SENDER, offer.request.manifest),
                certificate_mac=offer.key.certificate_mac(
                    PeerRole.SENDER, offer.request.sender.certificate_der
                ),
            ),
            metadata=auth(token),
            timeout=T,
        )
        confirmed = time.perf_counter()
        listed = await alice.listed_at(name)
        samples.append(
            Sample(started - began, created - started, confirmed - created, listed - confirmed)
        )
        await stub.CancelSession(
            broker_pb2.CancelSessionRequest(name=name, reason="bench"),
            metadata=auth(token),
            timeout=T,
        )
        await alice.left(name)
    return samples


def _run_cli(args: list[str], env: dict[str, str], timeout: float = 60) -> str:
    """Run a `ferry` command to its end; its stdout (RuntimeError if it failed)."""
    done = subprocess.run(
        [*FERRY, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"ferry {args[0]} exited with {done.returncode}: {done.stderr[-500:]}")
    return done.stdout


async def cli_latency(
    stub: Stub, alice_device: PersonDevice, alice: Inbox, env: dict[str, str], src: Path
) -> float:
    """One `ferry send SRC --to alice` (a state dir of its own): seconds from spawning it to
    alice's stream listing its offer; alice's device then takes and declines it."""
    state = tempfile.mkdtemp(prefix="state-", dir=src.parent)
    known = set(alice.listed)
    with open(Path(state) / "stderr", "wb") as err:
        started = time.perf_counter()
        sender = subprocess.Popen(
            [*FERRY, "send", str(src), "--to", "alice", "--json"],
            env={**env, "XDG_STATE_HOME": state},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        await alice.until(lambda: bool(set(alice.listed) - known), "no offer from ferry send")
        (name,) = set(alice.listed) - known
        latency = alice.listed[name] - started
        taken = await stub.TakeOffer(
            broker_pb2.TakeOfferRequest(name=name), metadata=alice_device.meta(), timeout=T
        )
        await stub.DeclineOffer(
            broker_pb2.DeclineOfferRequest(name=name, reason="bench"),
            metadata=auth(taken.party_token),
            timeout=T,
        )
        await alice.left(name)
        # The sender hears the decline and exits (not successfully).
        await asyncio.wait_for(asyncio.to_thread(sender.wait), 30)
        return latency
    finally:
        if sender.poll() is None:
            sender.kill()
        sender.wait(timeout=10)


def help_time() -> float:
    """Seconds of one `ferry --help`: Python's start-up and the CLI's imports."""
    started = time.perf_counter()
    subprocess.run([*FERRY, "--help"], check=True, timeout=60, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


async def measure(
    broker: BrokerProcess, url: str | None, ns: argparse.Namespace, tmp: Path
) -> Figures:
    """Everything one setup measures, on its running broker."""
    figures = Figures()
    assert broker.proc is not None
    pid, address, per = broker.proc.pid, broker.address, ns.streams_per_connection
    clock = time.monotonic()

    def phase(what: str) -> None:
        nonlocal clock
        now = time.monotonic()
        figures.phases.append(f"{what} {now - clock:.1f} s")
        clock = now

    control = grpc.aio.insecure_channel(address, options=_OWN_CONNECTION)
    alice_channel = grpc.aio.insecure_channel(address, options=_OWN_CONNECTION)
    watch_channels = _channels(address, ns.devices + 1, per)
    device_channels = _channels(address, ns.devices - 1, per)
    opened: list[grpc.aio.Channel] = [control, alice_channel, *watch_channels, *device_channels]
    inboxes: list[Inbox] = []
    try:
        stub: Stub = broker_pb2_grpc.BrokerServiceStub(control)
        users = ["alice", "bob", *(f"user{i:05d}" for i in range(1, ns.devices))]
        async with _directory(broker, url) as directory:
            devices = await enroll_devices(stub, directory, users)
            cli_token = await enrollment(directory, "bob")
        alice_device, bob, others = devices[0], devices[1], devices[2:]
        phase(f"enroll+sign-in {len(devices)}")
        offers = await code_offer_names(stub, ns.devices + 1)
        phase(f"code offers {len(offers)}")

        # Memory: the first of each kind of stream opened before the first read.
        alice_stub: Stub = broker_pb2_grpc.BrokerServiceStub(alice_channel)
        alice = await Inbox(
            alice_stub.WatchInbox(broker_pb2.WatchInboxRequest(), metadata=alice_device.meta())
        ).open()
        inboxes.append(alice)
        # Half the baseline offers now, half once the devices are gone (the drift shared).
        figures.alone = await offer_latencies(stub, bob, alice, ns.offers // 2)
        phase(f"offers alone {ns.offers // 2}")
        watches = await open_session_watches(watch_channels, offers[:1], per)
        figures.rss_base = await _settled_rss(pid)
        watches += await open_session_watches(watch_channels[1:], offers[1:], per)
        figures.rss_watches = await _settled_rss(pid)
        inboxes += await open_inboxes(device_channels, others, per)
        figures.rss_devices = await _settled_rss(pid)
        phase(f"streams {len(watches)}+{len(inboxes)}")
        for call in watches:
            call.cancel()
        for channel in watch_channels:
            await channel.close()
        await asyncio.sleep(SETTLE_S)

        figures.unary = await unary_round_trips(stub, UNARY_RUNS)
        figures.busy = await offer_latencies(stub, bob, alice, ns.offers, SPREAD_S)
        phase(f"offers {ns.offers}")
        if ns.cli:
            env = {**ferry_env(address), "XDG_CONFIG_HOME": str(tmp / "cli-config")}
            _run_cli(["login", "--name", "bench-cli", "--json"],
                     {**env, "FERRY_ENROLLMENT_TOKEN": cli_token})  # fmt: skip
            src = tmp / "cli" / "note.txt"
            src.parent.mkdir()
            src.write_bytes(os.urandom(1024))
            await cli_latency(stub, alice_device, alice, env, src)  # unmeasured: pins peers
            for _ in range(ns.cli):  # each beside its baseline, the machine's drift shared
                figures.cli.append(await cli_latency(stub, alice_device, alice, env, src))
                figures.help.append(help_time())
            phase(f"cli {ns.cli}+1")

        for inbox in inboxes[1:]:
            inbox.close()
        for channel in device_channels:
            await channel.close()
        await asyncio.sleep(SETTLE_S)
        figures.alone += await offer_latencies(stub, bob, alice, ns.offers - ns.offers // 2)
        phase(f"offers alone {ns.offers - ns.offers // 2}")
    finally:
        for inbox in inboxes:
            inbox.close()
        for channel in opened:
            await channel.close()
    return figures


def _ms(values: list[float], q: int = 50) -> float:
    """The q-th percentile of ``values``, in ms (the median for 50)."""
    if len(values) < 2:
        return values[0] * 1000 if values else float("nan")
    if q == 50:
        return statistics.median(values) * 1000
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000


def _report(results: list[tuple[str, Figures]], devices: int) -> None:
    print(f"\nmemory: broker RSS growth per idle stream ({devices} of each; KiB)")
    print(f"{'setup':<7} {'RSS MiB':>8} {'KiB/device':>10} {'KiB/watch':>9} {'x watch':>8}")
    for setup, f in results:
        per_device = (f.rss_devices - f.rss_watches) / 1024 / max(devices - 1, 1)
        per_watch = (f.rss_watches - f.rss_base) / 1024 / devices
        ratio = per_device / per_watch if per_watch > 0 else float("nan")
        print(f"{setup:<7} {f.rss_devices / (1 << 20):8.0f} {per_device:10.1f} "
              f"{per_watch:9.1f} {ratio:8.2f}")  # fmt: skip

    print(f"\nlatency: offer to notification on alice's stream (ms; {devices} devices idle,"
          " or 0 others)")  # fmt: skip
    print(f"{'setup':<7} {'p50':>6} {'p99':>6} {'max':>6} {'unary':>6} {'x unary':>7} "
          f"{'p50 0dev':>8} {'p99 0dev':>8} {'x 0dev':>6}")  # fmt: skip
    for setup, f in results:
        busy, alone = [x.total for x in f.busy], [x.total for x in f.alone]
        p50, unary = _ms(busy), _ms(f.unary)
        print(f"{setup:<7} {p50:6.1f} {_ms(busy, 99):6.1f} {max(busy) * 1000:6.1f} "
              f"{unary:6.2f} {p50 / unary:7.1f} {_ms(alone):8.1f} {_ms(alone, 99):8.1f} "
              f"{p50 / _ms(alone):6.2f}")  # fmt: skip

    print(f"\nthe steps of one offer, {devices} devices idle (ms, p50 / p99)")
    print(f"{'setup':<7} {'CreateOffer':>13} {'ConfirmKey':>13} {'to the stream':>13} "
          f"{'ListPeers+seal':>15}")  # fmt: skip
    for setup, f in results:
        cells = []
        for step in ("create", "confirm", "wake", "peers"):
            values = [getattr(x, step) for x in f.busy]
            cells.append(f"{_ms(values):6.1f}/{_ms(values, 99):6.1f}")
        print(f"{setup:<7} {cells[0]:>13} {cells[1]:>13} {cells[2]:>13} {cells[3]:>15}")

    if any(f.cli for _, f in results):
        print("\nCLI: `ferry send --to alice` spawned to alice's stream listing it (ms, median)")
        print(f"{'setup':<7} {'send':>6} {'--help':>6} {'x help':>6} {'runs':>5}")
        for setup, f in results:
            cli, help_ = _ms(f.cli), _ms(f.help)
            print(f"{setup:<7} {cli:6.0f} {help_:6.0f} {cli / help_:6.2f} {len(f.cli):5d}")
    print()
    for setup, f in results:
        print(f"{setup}: {'; '.join(f.phases)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--offers", type=int, default=50)
    parser.add_argument("--setups", default="sqlite,redis")
    parser.add_argument("--cli", type=int, default=5)
    parser.add_argument("--streams-per-connection", type=int, default=50)
    ns = parser.parse_args()
    setups = ns.setups.split(",")
    if ns.devices < 2 or ns.offers < 2 or ns.cli < 0 or ns.streams_per_connection < 1:
        parser.error(
            "need --devices >= 2, --offers >= 2, --cli >= 0, --streams-per-connection >= 1"
        )
    if unknown := set(setups) - {"sqlite", "redis"}:
        parser.error(f"unknown setup(s): {', '.join(sorted(unknown))} (sqlite, redis)")
    results: list[tuple[str, Figures]] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ferry-inbox-") as root:
        for setup in setups:
            tmp = Path(root) / setup
            tmp.mkdir()
            redis: RedisServer | None = None
            broker: BrokerProcess | None = None
            try:
                url = None
                if setup == "redis":
                    redis = RedisServer(tmp / "redis").start()
                    url = redis.url
                broker = BrokerProcess(
                    data_dir=tmp / "broker",
                    args=LIMITS,
                    env={"FERRY_STORE": url} if url else None,
                )
                broker.start()
                results.append((setup, asyncio.run(measure(broker, url, ns, tmp))))
            finally:
                if broker is not None:
                    broker.kill()
                if redis is not None:
                    redis.stop()
            print(f"{setup}: done after {time.monotonic() - started:.0f} s", file=sys.stderr)
    _report(results, ns.devices)
    print(f"\nwhole run: {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
