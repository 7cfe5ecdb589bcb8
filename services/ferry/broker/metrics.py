"""The broker's Prometheus metrics (issue 12), served on ``metrics_listen`` only.

:class:`Recorder` is what the service and the server tell about calls, offers, watches and
transfers; it does nothing. :class:`PrometheusRecorder` counts them in its own registry
(one per broker, so that brokers in one process do not mix), with prometheus-client, which
is imported only then: a broker without ``--metrics-listen`` neither imports it (about 0.2 s
of start-up) nor counts anything. :func:`serve_metrics` answers ``GET /metrics`` on a small
asyncio HTTP server, on the broker's event loop: each scrape first awaits the store's figures
(sessions by state, uploads; one cheap query or round trip each), then renders them with the
rest.

Labels come only from small fixed sets (gRPC method, status code, state, route, reason):
never a code, a token, a URL, an address or a session id, whose number has no bound.

Metrics (the ``_total``/``_bucket`` suffixes are Prometheus's):

- ``ferry_rpc_duration_seconds{method,code}``: handling time of each call, from the rate
  check to the status (a WatchSession's is the stream's lifetime);
- ``ferry_refusals_total{method,reason}``: refused calls by ErrorInfo reason;
  ``ferry_claims_refused_total{reason}`` and ``ferry_rate_limited_total{method}`` (reason
  RATE_LIMITED, the per-address call limit included) are slices of it kept at hand;
- ``ferry_offers_created_total``; ``ferry_offer_accept_seconds``: from an offer's creation
  to its acceptance;
- ``ferry_watch_streams``: WatchSession streams open on this replica;
- ``ferry_transfer_bytes_total{path}``: what the direct path and the object store carried
  of each transfer (``direct``, ``store``), as its receiver reported at completion, counted
  once per session and never past the offer's size (a client cannot inflate it);
  ``ferry_transfers_total{path,route}``: completed transfers by the path that carried their
  bytes (``direct``, ``store``, ``mixed``; ``unreported`` from a client that does not say)
  and the route the peers connected by (``host``, ``punched``, ``store``, ``unreported``);
- ``ferry_sessions{state}``, ``ferry_store_uploads``, ``ferry_store_reserved_bytes``,
  ``ferry_store_uploads_in_flight``, ``ferry_store_up``: read from the store at each scrape
  (shared by all replicas on Redis: every replica reports the same figures);
- ``ferry_redis_round_trip_seconds``: each call of the Redis store to Redis;
- ``process_*``: prometheus-client's process collector.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ferry.broker.store import Store

log = logging.getLogger(__name__)

#: Routes a receiver may report (validation.PATH_ROUTES); any other counts as "unreported".
ROUTES = ("host", "punched", "store")
#: The paths a transfer's bytes may take.
PATHS = ("direct", "store")
_READ_LIMIT = 8192  # bytes of a request line and headers; a scrape sends a few hundred
_READ_TIMEOUT_S = 5.0
_MAX_CONNECTIONS = 32  # scrapers are few; more at once are closed as they come
# RPC latency buckets: store calls take 0.1-1 ms, a slow one (S3, a full Redis) seconds.
_RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# A person reads the code out and the receiver accepts: seconds to minutes.
_ACCEPT_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600)
# One Redis round trip: about 0.2 ms on loopback, a few ms across a zone.
_REDIS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2)


class Recorder:
    """Where the broker tells what happened; this one forgets it (no ``--metrics-listen``)."""

    def call_done(self, method: str, code: str, reason: str | None, seconds: float) -> None:
        """A call ended with status `code` (a grpc.StatusCode name), refused for `reason`."""

    def offer_created(self) -> None:
        """CreateOffer made an offer."""

    def offer_accepted(self, seconds: float) -> None:
        """An offer was accepted `seconds` after it was made."""

    def watch_opened(self) -> None:
        """A WatchSession stream began."""

    def watch_closed(self) -> None:
        """A WatchSession stream ended."""

    def transfer_completed(self, route: str, size_bytes: int, direct: int, store: int) -> None:
        """The receiver completed a transfer of `size_bytes`, the peers connected by `route`,
        and said `direct` and `store` bytes of it came over each path (its report)."""

    def redis_round_trip(self, seconds: float) -> None:
        """One call of the Redis store to Redis took `seconds`."""

    async def exposition(self) -> tuple[bytes, str]:
        """The metrics in Prometheus's text format, and its content type."""
        return b"", "text/plain; version=0.0.4; charset=utf-8"


class PrometheusRecorder(Recorder):
    """Counts everything in its own prometheus-client registry (`registry`)."""

    def __init__(self, store: Store | None = None) -> None:
        import prometheus_client as prom  # only a broker with metrics pays for the import

        self.registry = prom.CollectorRegistry()
        registry = self.registry
        prom.ProcessCollector(registry=registry)
        self._rpc = prom.Histogram(
            "ferry_rpc_duration_seconds",
            "Time to handle a call, by method and status code (WatchSession: the stream's life)",
            ["method", "code"],
            buckets=_RPC_BUCKETS,
            registry=registry,
        )
        self._refusals = prom.Counter(
            "ferry_refusals", "Calls refused, by method and reason", ["method", "reason"],
            registry=registry,
        )  # fmt: skip
        self._claims_refused = prom.Counter(
            "ferry_claims_refused", "ClaimOffer calls refused, by reason", ["reason"],
            registry=registry,
        )  # fmt: skip
        self._rate_limited = prom.Counter(
            "ferry_rate_limited", "Calls refused as RATE_LIMITED, by method", ["method"],
            registry=registry,
        )  # fmt: skip
        self._offers = prom.Counter("ferry_offers_created", "Offers made", registry=registry)
        self._accept = prom.Histogram(
            "ferry_offer_accept_seconds",
            "Time from an offer's creation to its acceptance",
            buckets=_ACCEPT_BUCKETS,
            registry=registry,
        )
        self._watches = prom.Gauge(
            "ferry_watch_streams", "WatchSession streams open on this broker", registry=registry
        )
        self._bytes = prom.Counter(
            "ferry_transfer_bytes",
            "Bytes of completed transfers, by the path that carried them (receivers' reports)",
            ["path"],
            registry=registry,
        )
        self._transfers = prom.Counter(
            "ferry_transfers",
            "Completed transfers, by the path that carried their bytes and the peers' route",
            ["path", "route"],
            registry=registry,
        )
        for path in PATHS:
            self._bytes.labels(path)  # every path shows, at 0 until used
        self._redis = prom.Histogram(
            "ferry_redis_round_trip_seconds",
            "Time of each call of the Redis store to Redis",
            buckets=_REDIS_BUCKETS,
            registry=registry,
        )
        self._store = None if store is None else _StoreFigures(store)
        if self._store is not None:
            registry.register(self._store.collector())
        self._generate = prom.generate_latest
        self._content_type = prom.CONTENT_TYPE_LATEST

    def call_done(self, method: str, code: str, reason: str | None, seconds: float) -> None:
        self._rpc.labels(method, code).observe(seconds)
        if reason is None:
            return
        self._refusals.labels(method, reason).inc()
        if method == "ClaimOffer":
            self._claims_refused.labels(reason).inc()
        if reason == "RATE_LIMITED":
            self._rate_limited.labels(method).inc()

    def offer_created(self) -> None:
        self._offers.inc()

    def offer_accepted(self, seconds: float) -> None:
        self._accept.observe(max(seconds, 0.0))

    def watch_opened(self) -> None:
        self._watches.inc()

    def watch_closed(self) -> None:
        self._watches.dec()

    def transfer_completed(self, route: str, size_bytes: int, direct: int, store: int) -> None:
        direct = min(max(direct, 0), max(size_bytes, 0))
        store = min(max(store, 0), max(size_bytes, 0) - direct)
        self._bytes.labels("direct").inc(direct)
        self._bytes.labels("store").inc(store)
        path = "mixed" if direct and store else "direct" if direct else "store" if store else ""
        self._transfers.labels(
            path or "unreported", route if route in ROUTES else "unreported"
        ).inc()

    def redis_round_trip(self, seconds: float) -> None:
        self._redis.observe(seconds)

    async def exposition(self) -> tuple[bytes, str]:
        if self._store is not None:
            await self._store.refresh()
        return self._generate(self.registry), self._content_type


class _StoreFigures:
    """The store's figures for a scrape: read with awaits by `refresh` just before it, then
    rendered by the registry's collector (which cannot await)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        #: (sessions by state, reserved bytes, uploads, uploads in flight); None: no answer.
        self.figures: tuple[dict[str, int], int, int, int | None] | None = None

    async def refresh(self) -> None:
        store = self._store
        try:
            by_state = await store.count_sessions_by_state()
            reserved, uploads = await store.store_usage()
            in_flight = await store.count_uploads_in_flight()
        except Exception as exc:  # the store is down: say so, and nothing else
            log.debug("metrics: the store did not answer (%s)", type(exc).__name__)
            self.figures = None
            return
        self.figures = (by_state, reserved, uploads, in_flight)

    def collector(self) -> Any:
        """A collector of the figures the last `refresh` read: sessions by state, uploads."""
        from prometheus_client.core import GaugeMetricFamily
        from prometheus_client.registry import Collector

        figures = self

        class StoreCollector(Collector):
            def collect(self) -> Iterable[Any]:
                if figures.figures is None:
                    yield GaugeMetricFamily("ferry_store_up", "Whether the store answered", 0)
                    return
                by_state, reserved, uploads, in_flight = figures.figures
                yield GaugeMetricFamily("ferry_store_up", "Whether the store answered", 1)
                sessions = GaugeMetricFamily(
                    "ferry_sessions",
                    "Sessions in the store by state (on Redis: live and ended only)",
                    labels=["state"],
                )
                for state, count in sorted(by_state.items()):
                    sessions.add_metric([state], count)
                yield sessions
                yield GaugeMetricFamily(
                    "ferry_store_uploads",
                    "Object-store uploads recorded, not yet cleaned",
                    uploads,
                )
                yield GaugeMetricFamily(
                    "ferry_store_reserved_bytes", "Bytes the recorded uploads reserve", reserved
                )
                if in_flight is not None:
                    yield GaugeMetricFamily(
                        "ferry_store_uploads_in_flight",
                        "Object-store uploads started and not completed",
                        in_flight,
                    )

        return StoreCollector()


async def serve_metrics(listen: str, recorder: Recorder) -> asyncio.Server:
    """An HTTP/1.0 server on `listen` (host:port) answering ``GET /metrics`` with the
    recorder's exposition, 404 to any other path, 405 to other methods; one request per
    connection, its head bounded in size and time, at most _MAX_CONNECTIONS at once. OSError
    if it cannot be bound."""

    open_connections = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_connections
        if open_connections >= _MAX_CONNECTIONS:  # a flood of slow clients holds no more
            writer.transport.abort()
            return
        open_connections += 1
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT_S)
            method, _, rest = head.partition(b" ")
            path = rest.partition(b" ")[0].partition(b"?")[0]
            if method not in (b"GET", b"HEAD"):
                status, body, kind = b"405 Method Not Allowed", b"", "text/plain"
            elif path != b"/metrics":
                status, body, kind = b"404 Not Found", b"see /metrics\n", "text/plain"
            else:
                body, kind = await recorder.exposition()
                status = b"200 OK"
            writer.write(
                b"HTTP/1.0 " + status + b"\r\nContent-Type: " + kind.encode()
                + b"\r\nContent-Length: " + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + (b"" if method == b"HEAD" else body)
            )  # fmt: skip
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a slow, short or oversized request: dropped
        except ConnectionError:
            pass
        finally:
            open_connections -= 1
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    host, _, port = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        return await asyncio.start_server(
            answer, host or None, int(port), limit=_READ_LIMIT, reuse_address=True
        )
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise OSError(f"cannot listen on {listen} (metrics): {reason}") from exc
