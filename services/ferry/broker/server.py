"""Run the broker: a grpc.aio server with BrokerService, health, reflection and the sweeper.

The listening socket is bound without SO_REUSEPORT (grpc.aio sets it by default): a second
broker started on the port a running one holds fails to start (OSError, "cannot listen on
HOST:PORT: address already in use") instead of silently sharing the port with it.

With ``tls_cert``/``tls_key`` the port speaks TLS only (ferry.broker.tls: renewed files are
picked up without a restart; ``tls_client_ca`` makes it mutual TLS); without them BrokerConfig
allows only a loopback address, or any with ``insecure_plaintext`` (logged as a warning). An
optional second port, ``health_listen``, is plaintext and serves grpc.health.v1 alone (the
same health status), for probes that cannot speak TLS such as Kubernetes' gRPC probes: it
answers SERVING or NOT_SERVING and nothing else, no token or code ever crosses it.

The store is SqliteStore on ``data_dir/broker.sqlite3``, or with ``store_url`` RedisStore
(ferry.broker.redis_store, imported only then, so that a broker on SQLite and `ferry send`
never load redis-py) on a Redis that replicas share. The token key (it keys the code hashes
the store keeps and the tokens of repeated claims) is then the store's, made once in Redis, so
that every replica finds the codes the others made; on SQLite it is token.key in ``data_dir``.
On Redis each replica also runs a `RedisRelay` (ferry.broker.relay): a change made through one
replica reaches the watchers connected to the others at once.

The reflexive responder (ferry.broker.reflexive, ``reflexive_listen``; on by default, next
to the gRPC port) is bound right after the gRPC port, so a port that is taken fails the
start the same way, and it starts answering with the server. What GetBrokerInfo advertises
for it, ``reflexive_advertise``, defaults to ":" and the port bound: start_server fills it
in, and the RunningBroker's config has it.

Operations (issue 12): with ``metrics_listen`` a plaintext HTTP port serves Prometheus metrics
on /metrics (ferry.broker.metrics; nothing is counted without it). ``max_connection_age_s``
sends each connection a GOAWAY once it is that old, and closes it ``max_connection_age_grace_s``
later, so that WatchSession streams, which never end by themselves, are re-opened by their
clients (the Python client re-watches on the UNAVAILABLE that ends them), perhaps on
another replica. `RunningBroker.stop` (SIGTERM, SIGINT) drains: health NOT_SERVING on both
ports first, then the port stops taking calls (a new one is refused with UNAVAILABLE, on a
new connection or an open one), the watches end so that their clients re-watch elsewhere,
and the calls in flight get ``shutdown_grace_s`` before they are cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import resource
import secrets
import signal
import socket
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ferry.broker.config import BrokerConfig
from ferry.broker.core import Broker, Clock
from ferry.broker.fallback import Fallback
from ferry.broker.metrics import PrometheusRecorder, Recorder, serve_metrics
from ferry.broker.objectstore import ObjectStore
from ferry.broker.reflexive import ReflexiveLimits, ReflexiveResponder
from ferry.broker.relay import Loader, RedisRelay
from ferry.broker.service import BrokerService, add_to_server
from ferry.broker.store import SqliteStore, StorageFull, Store
from ferry.broker.tls import CertificateFiles, describe
from ferry.v1 import broker_pb2

log = logging.getLogger(__name__)
#: Descriptors beside the connections: the store, the listening sockets, logs, S3's pool.
_SPARE_DESCRIPTORS = 256

SERVICE_NAME: str = broker_pb2.DESCRIPTOR.services_by_name["BrokerService"].full_name
_HEALTH_NAME = "grpc.health.v1.Health"
# No SO_REUSEPORT: with it, two brokers could bind one port and split the clients between them.
_SERVER_OPTIONS = [("grpc.so_reuseport", 0)]


def _limits(config: BrokerConfig) -> list[tuple[str, int]]:
    """gRPC's own bounds on what a caller holds before any Ferry code runs: connections,
    the time to handshake, idle connections, and the size of a request (a manifest of
    max_manifest_bytes and its offer's other fields fit with room to spare); and the age
    of a connection, if bounded."""
    limits = [
        ("grpc.max_allowed_incoming_connections", config.max_connections),
        ("grpc.server_handshake_timeout_ms", round(config.handshake_timeout_s * 1000)),
        ("grpc.max_connection_idle_ms", round(config.connection_idle_s * 1000)),
        ("grpc.max_receive_message_length", config.max_manifest_bytes + (256 << 10)),
        ("grpc.max_concurrent_streams", 128),
    ]
    if config.max_connection_age_s is not None:
        limits += [
            ("grpc.max_connection_age_ms", round(config.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", round(config.max_connection_age_grace_s * 1000)),
        ]
    return limits


@dataclasses.dataclass
class RunningBroker:
    """A started broker; `address` is `host:port` with the port actually bound."""

    config: BrokerConfig
    address: str
    port: int
    server: grpc.aio.Server
    broker: Broker
    store: Store
    health: health.aio.HealthServicer
    sweeper: asyncio.Task[None]
    cleaner: asyncio.Task[None] | None = None
    #: The certificate files when the port speaks TLS, else None.
    tls: CertificateFiles | None = None
    #: The plaintext health-only server (``health_listen``) and its `host:port`, if any.
    health_server: grpc.aio.Server | None = None
    health_address: str = ""
    #: The reflexive responder (``reflexive_listen``) and its bound `host:port`, if any.
    reflexive: ReflexiveResponder | None = None
    reflexive_address: str = ""
    #: The other replicas' changes, for this one's watchers (a store on Redis only).
    relay: RedisRelay | None = None
    #: What the service counts (a no-op Recorder without ``metrics_listen``).
    metrics: Recorder = dataclasses.field(default_factory=Recorder)
    #: The Prometheus port (``metrics_listen``) and its bound `host:port`, if any.
    metrics_server: asyncio.Server | None = None
    metrics_address: str = ""

    async def stop(self, grace: float | None = None) -> None:
        """Drain: go NOT_SERVING, stop taking calls, end watches, give the calls in flight
        `grace` seconds (default shutdown_grace_s), then close the rest and the store."""
        grace = self.config.shutdown_grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()  # NOT_SERVING, and it stays so
        # The port stops taking calls at once (new ones: UNAVAILABLE); the ones in flight,
        # watches included, go on until they end or the grace runs out.
        stopping = asyncio.create_task(self.server.stop(grace), name="ferry-broker-drain")
        await asyncio.sleep(0)  # let the shutdown begin before the watches end
        self.broker.hub.close()  # each watch ends; its client re-watches, elsewhere if need be
        for task in (self.sweeper, self.cleaner):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.reflexive is not None:
            await self.reflexive.close()
        await stopping
        if self.relay is not None:
            await self.relay.close()
        if self.health_server is not None:
            await self.health_server.stop(0)
        if self.metrics_server is not None:
            self.metrics_server.close()
            await self.metrics_server.wait_closed()
        await self.store.close()


def _loader(store: Store) -> Loader:
    """How the relay reads a session another replica changed."""

    async def load(session_id: str) -> tuple[int, broker_pb2.Session] | None:
        record = await store.get_session(session_id)
        return None if record is None else (record.version, record.session)

    return load


def open_store(config: BrokerConfig) -> Store:
    """The store `config` names: RedisStore on ``store_url``, else SqliteStore in data_dir."""
    if config.store_url is None:
        return SqliteStore(config.database_path)
    from ferry.broker.redis_store import RedisStore  # redis-py only when a broker uses it

    return RedisStore.from_url(config.store_url)


def load_token_key(path: Path) -> bytes:
    """Read the broker's secret key, or create it (32 random bytes, 0600) on first start.

    It keys the nameplate hashes and repeated-claim tokens. Its directory, the data dir, is
    made (or tightened to) 0700: it holds the database and this key, nobody else's business.
    """
    secure_dir(path.parent)
    try:
        key = path.read_bytes()
        if len(key) == 32:
            os.chmod(path, 0o600)
            return key
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(32)
    temp = path.with_name(path.name + ".new")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    return key


def secure_dir(path: Path) -> None:
    """Make ``path`` (and its parents) if missing; take group and other access off it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        try:
            os.chmod(path, mode & 0o700)
        except OSError as exc:  # not ours (a mounted volume, say): say so, go on
            log.warning(
                "cannot make the data dir private", extra={"path": str(path), "error": str(exc)}
            )


def bind_failure(listen: str) -> str:
    """Why `host:port` cannot be bound, for people: gRPC only says that it failed.

    Found by binding a plain socket the way gRPC does (SO_REUSEADDR, so a port in TIME_WAIT
    is free and only a live listener counts as in use), e.g. "address already in use".
    """
    host, _, port = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (socket.gaierror, UnicodeError) as exc:
        return f"cannot resolve the host ({exc})"
    reasons = []
    for family, kind, proto, _, address in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
                probe.listen()
        except OSError as exc:
            reasons.append((exc.strerror or str(exc)).lower())
    return reasons[0] if reasons else "gRPC could not bind it"


def _bind(server: grpc.aio.Server, listen: str, tls: CertificateFiles | None) -> int:
    """Add the port, TLS or not; OSError with the reason if it cannot be bound."""
    try:
        if tls is None:
            return server.add_insecure_port(listen)
        return server.add_secure_port(listen, tls.credentials())
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {listen}: {bind_failure(listen)}") from exc


async def _start_health_only(
    listen: str, servicer: health.aio.HealthServicer
) -> tuple[grpc.aio.Server, str]:
    """The plaintext port that serves grpc.health.v1 and nothing else."""
    server = grpc.aio.server(options=_SERVER_OPTIONS)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = _bind(server, listen, None)
    await server.start()
    return server, f"{listen.rpartition(':')[0]}:{port}"


def _bind_reflexive(config: BrokerConfig) -> tuple[ReflexiveResponder | None, str]:
    """The reflexive responder bound (not started yet) and its `host:port`, if configured
    (else None, ""); OSError if the port cannot be bound, worded like the gRPC port's."""
    listen = config.reflexive_bind
    if listen is None:
        return None, ""
    host, _, port = listen.rpartition(":")
    limits = ReflexiveLimits(
        max_connections=config.reflexive_max_connections,
        per_address=config.reflexive_per_address,
        hold_s=config.reflexive_hold_s,
        ipv4_prefix=config.caller_ipv4_prefix,
        ipv6_prefix=config.caller_ipv6_prefix,
    )
    try:
        responder = ReflexiveResponder(host, int(port), limits)
    except OSError as exc:  # socket.create_server's strerror names the address again
        code = 0 if isinstance(exc, socket.gaierror) else (exc.errno or 0)
        reason = os.strerror(code) if code > 0 else (exc.strerror or str(exc))
        raise OSError(f"cannot listen on {listen}: {reason.lower()}") from exc
    return responder, f"{host}:{responder.port}"


async def _let_go(server: grpc.aio.Server) -> None:
    """Release the port of a server that never started: gRPC lets go of it only once it
    has started."""
    await server.start()
    await server.stop(0)


async def start_server(
    config: BrokerConfig, *, store: Store | None = None, clock: Clock | None = None
) -> RunningBroker:
    """Open the store, bind `config.listen` (port 0 allowed) and the reflexive responder's
    port, and start serving.

    With TLS the certificate files are read first: a broker whose certificate or key is
    missing or does not match fails to start (OSError) before it opens its store. The
    RunningBroker's config is `config` with ``reflexive_advertise`` filled in (":" and the
    bound port) when the responder runs and `config` leaves it unset.
    """
    tls = (
        CertificateFiles(config.tls_cert, config.tls_key, config.tls_client_ca)
        if config.tls_cert is not None and config.tls_key is not None
        else None
    )
    store = store if store is not None else open_store(config)
    try:
        await store.check()
        key = await store.token_key() or load_token_key(config.token_key_path)
    except BaseException:
        await store.close()
        raise
    server = grpc.aio.server(
        options=[*_SERVER_OPTIONS, *_limits(config)],
        maximum_concurrent_rpcs=config.max_concurrent_calls,
    )
    try:
        port = _bind(server, config.listen, tls)
    except OSError:
        await store.close()
        raise
    try:
        reflexive, reflexive_address = _bind_reflexive(config)
    except OSError:
        await _let_go(server)
        await store.close()
        raise
    if reflexive is not None and config.reflexive_advertise is None:
        config = dataclasses.replace(config, reflexive_advertise=f":{reflexive.port}")
    broker = (
        Broker(config, store, token_key=key)
        if clock is None
        else Broker(config, store, clock=clock, token_key=key)
    )
    objects = (
        ObjectStore(config.s3_bucket, endpoint=config.s3_endpoint, region=config.s3_region)
        if config.s3_bucket
        else None
    )
    fallback = Fallback(broker, objects)
    metrics = _recorder(config, store)
    # Undecodable requests: INVALID_ARGUMENT.
    add_to_server(BrokerService(broker, fallback, metrics), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, _HEALTH_NAME, reflection.SERVICE_NAME), server
    )
    host = config.listen.rpartition(":")[0]
    await server.start()
    health_server, health_address = None, ""
    metrics_server, metrics_address = None, ""
    try:
        if reflexive is not None:
            await reflexive.start()
        if config.health_listen:
            health_server, health_address = await _start_health_only(
                config.health_listen, health_servicer
            )
        if config.metrics_listen:
            metrics_server = await serve_metrics(config.metrics_listen, metrics)
            bound = metrics_server.sockets[0].getsockname()[1]
            metrics_address = f"{config.metrics_listen.rpartition(':')[0]}:{bound}"
    except OSError:
        if reflexive is not None:
            await reflexive.close()
        if health_server is not None:
            await health_server.stop(0)
        await server.stop(0)
        await store.close()
        raise
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if tls is not None:
        mutual = ", client certificates required" if config.tls_client_ca else ""
        log.info("TLS on %s: %s%s", config.listen, describe(tls.current), mutual)
    elif config.insecure_plaintext:
        log.warning(
            "PLAINTEXT gRPC on %s (--insecure-plaintext): party tokens and codes cross the "
            "network in clear; anyone on the path can read them and take over transfers",
            config.listen,
        )
    log.info("broker id %s", await broker.broker_id())  # made here on a new store
    try:
        await broker.sweep()  # expire what ran out while the broker was down
    except StorageFull:  # a full disk must not keep the live sessions' broker down
        log.warning("start-up sweep deferred: the data dir is full")
    relay = None
    if config.store_url is not None:
        relay = RedisRelay(config.store_url, broker.hub, _loader(store))
        try:
            await relay.start()
        except BaseException:
            await relay.close()
            await server.stop(0)
            await store.close()
            raise
    sweeper = asyncio.create_task(broker.run_sweeper(), name="ferry-broker-sweeper")
    cleaner = asyncio.create_task(fallback.run_cleaner(), name="ferry-broker-object-cleaner")
    return RunningBroker(
        relay=relay,
        config=config,
        address=f"{host}:{port}",
        port=port,
        server=server,
        broker=broker,
        store=store,
        health=health_servicer,
        sweeper=sweeper,
        cleaner=cleaner,
        tls=tls,
        health_server=health_server,
        health_address=health_address,
        reflexive=reflexive,
        reflexive_address=reflexive_address,
        metrics=metrics,
        metrics_server=metrics_server,
        metrics_address=metrics_address,
    )


def _recorder(config: BrokerConfig, store: Store) -> Recorder:
    """Prometheus metrics with ``metrics_listen`` (the Redis store's round trips timed too);
    else a Recorder that counts nothing."""
    if not config.metrics_listen:
        return Recorder()
    recorder = PrometheusRecorder(store)
    if config.store_url is not None:
        from ferry.broker.redis_store import RedisStore

        if isinstance(store, RedisStore):
            store.on_round_trip = recorder.redis_round_trip
    return recorder


def raise_descriptor_limit(config: BrokerConfig) -> int:
    """Raise this process's soft limit of open files to its hard limit, and warn when even
    that is short of what the settings let the broker hold; return the limit now in force.

    Each connection, watch's connection and responder connection is a descriptor, and many
    hosts start a process with a soft limit of 1,024: without this a broker would refuse
    connections (EMFILE) long before max_connections.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d: %s", soft, exc)
    needed = config.max_connections + config.reflexive_max_connections + _SPARE_DESCRIPTORS
    if soft < needed:
        log.warning(
            "open-files limit %d is below max_connections + reflexive_max_connections + %d"
            " = %d: connections past it are refused; raise the hard limit (ulimit -Hn) or"
            " lower --max-connections",
            soft,
            _SPARE_DESCRIPTORS,
            needed,
        )
    return soft


async def serve(config: BrokerConfig) -> None:
    """Start, print `{"event": "listening", "address": ..., "tls": ...}` on stdout (and
    `"health_address"` with a health port, `"reflexive_address"` with a reflexive
    responder, `"metrics_address"` with a metrics port), run until SIGTERM/SIGINT, then
    drain (`RunningBroker.stop`)."""
    raise_descriptor_limit(config)
    running = await start_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        line: dict[str, object] = {
            "event": "listening",
            "address": running.address,
            "tls": running.tls is not None,
        }
        if running.health_address:
            line["health_address"] = running.health_address
        if running.reflexive_address:
            line["reflexive_address"] = running.reflexive_address
        if running.metrics_address:
            line["metrics_address"] = running.metrics_address
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()
        log.info(
            "broker listening on %s (%s)%s%s",
            running.address,
            "TLS" if running.tls is not None else "plaintext",
            f", health only on {running.health_address}" if running.health_address else "",
            f", reflexive responder on {running.reflexive_address}"
            if running.reflexive_address
            else "",
        )
        if running.metrics_address:
            log.info("Prometheus metrics on %s, path /metrics", running.metrics_address)
        await stop.wait()
        log.info("broker draining", extra={"grace_s": config.shutdown_grace_s})
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await running.stop()
