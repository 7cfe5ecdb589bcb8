"""What the broker keeps between calls that is not a session: the `Ledger`.

Token buckets (new offers and failed claims per source network, failed claims broker-wide),
counters (wrong guesses at one offer), first-seen times (when a live offer was claimed) and
small sealed values (the answer a retried CreateOffer gets back). Replicas on one Redis share
one ledger (`RedisStore.ledger`), so a guesser gains nothing by spreading its claims over the
replicas, and a retry that reaches another replica gets the first answer; a broker on SQLite
is one process and keeps its ledger in memory (:class:`MemoryLedger`).

Every entry is forgotten after a time that the caller gives (a bucket: once it is full again,
when it remembers nothing), so a ledger holds only what is still in force. The in-memory one
also holds at most `max_keys` entries of each kind, dropping the full or expired first, then
the least recently used, a tenth at a time (tests/unit/broker/test_broker_ratelimit_room.py:
a pass per new key would let a botnet buy the event loop's time).

Times are the broker's clock (seconds since the epoch): replicas compare them, so their clocks
must agree to within a fraction of a bucket's refill time (NTP does far better).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

__all__ = ["Bucket", "Ledger", "LocalLedger", "MemoryLedger"]

#: Longest any entry is kept, whatever the caller asks (a bucket with no refill rate).
MAX_TTL_S = 24 * 3600.0


class Ledger(Protocol):
    """Token buckets, counters, first-seen times and values, by key; see the module doc."""

    async def has_token(self, key: str, burst: float, rate: float, now: float) -> bool:
        """Whether bucket `key` (`burst` tokens, `rate` back per second) holds one token."""

    async def take(
        self,
        key: str,
        burst: float,
        rate: float,
        now: float,
        cost: float = 1.0,
        force: bool = False,
    ) -> bool:
        """Whether bucket `key` held a token; spend `cost` of them if it did, or anyway if
        `force` (the count may then go below zero, which delays its recovery)."""

    async def count(self, key: str, ttl_s: float) -> int:
        """Add one to counter `key` and return it; the counter lives `ttl_s` from its first."""

    async def first(self, key: str, now: float, ttl_s: float) -> float:
        """The time first noted for `key` (noting `now` if none was), kept for `ttl_s`."""

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        """Keep `value` under `key` for `ttl_s` seconds."""

    async def get(self, key: str) -> bytes | None:
        """The value kept under `key`, or None."""

    async def forget(self, key: str) -> None:
        """Drop whatever `key` holds (a first-seen time, a value, a counter)."""


class Bucket:
    """`burst` tokens, refilled at `rate` per second: the arithmetic both ledgers use."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, burst: float, rate: float, now: float) -> None:
        self.burst = burst
        self.rate = rate
        self.tokens = burst
        self.stamp = now

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def is_full(self, now: float) -> bool:
        self.refill(now)
        return self.tokens >= self.burst


class LocalLedger:
    """The Ledger's steps in this process's memory, synchronously: what MemoryLedger does,
    and what the per-process call limit (ratelimit.CallLimiter) checks before each call
    without an await.

    `clock` times the expiry of counters, first-seen times and values; buckets use the `now`
    each call passes, as the Ledger protocol says.
    """

    def __init__(self, clock: Callable[[], float] = time.time, max_keys: int = 100_000) -> None:
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, Bucket] = OrderedDict()
        # key -> (expire_s, value): counters hold an int, first-seen times a float.
        self._entries: OrderedDict[str, tuple[float, int | float | bytes]] = OrderedDict()

    # -- buckets ------------------------------------------------------------------------------

    def has_token(self, key: str, burst: float, rate: float, now: float) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            return burst >= 1
        bucket.refill(now)
        return bucket.tokens >= 1

    def take(
        self,
        key: str,
        burst: float,
        rate: float,
        now: float,
        cost: float = 1.0,
        force: bool = False,
    ) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_keys:
                self._evict_buckets(now)
            bucket = self._buckets[key] = Bucket(burst, rate, now)
        self._buckets.move_to_end(key)
        bucket.refill(now)
        had = bucket.tokens >= 1
        if had or force:
            bucket.tokens -= cost
        return had

    def _evict_buckets(self, now: float) -> None:
        """Drop the full buckets (they remember nothing), then the least recently used, down
        to nine tenths of max_keys: one pass buys the next tenth of new keys."""
        for key in [k for k, b in self._buckets.items() if b.is_full(now)]:
            del self._buckets[key]
        keep = self._max_keys * 9 // 10
        while len(self._buckets) > keep:
            self._buckets.popitem(last=False)

    # -- entries ------------------------------------------------------------------------------

    def count(self, key: str, ttl_s: float) -> int:
        now = self._clock()
        entry = self._live(key, now)
        value = (int(entry[1]) if entry else 0) + 1
        self._set(key, now + ttl_s if entry is None else entry[0], value, now)
        return value

    def first(self, key: str, now: float, ttl_s: float) -> float:
        today = self._clock()
        entry = self._live(key, today)
        if entry is not None:
            return float(entry[1])
        self._set(key, today + ttl_s, now, today)
        return now

    def put(self, key: str, value: bytes, ttl_s: float) -> None:
        now = self._clock()
        self._set(key, now + ttl_s, bytes(value), now)

    def get(self, key: str) -> bytes | None:
        entry = self._live(key, self._clock())
        if entry is None or not isinstance(entry[1], bytes):
            return None
        return entry[1]

    def forget(self, key: str) -> None:
        self._entries.pop(key, None)

    def _live(self, key: str, now: float) -> tuple[float, int | float | bytes] | None:
        entry = self._entries.get(key)
        if entry is not None and entry[0] <= now:
            del self._entries[key]
            return None
        return entry

    def _set(self, key: str, expire_s: float, value: int | float | bytes, now: float) -> None:
        if key not in self._entries and len(self._entries) >= self._max_keys:
            for old in [k for k, (expire, _) in self._entries.items() if expire <= now]:
                del self._entries[old]
            keep = self._max_keys * 9 // 10
            while len(self._entries) > keep:
                self._entries.popitem(last=False)
        self._entries[key] = (min(expire_s, now + MAX_TTL_S), value)
        self._entries.move_to_end(key)


class MemoryLedger:
    """A Ledger in this process's memory (one broker on SQLite): LocalLedger's steps behind
    the Ledger protocol's awaits (each runs at once; nothing else runs in between)."""

    def __init__(self, clock: Callable[[], float] = time.time, max_keys: int = 100_000) -> None:
        #: The entries themselves (tests look at their number).
        self.local = LocalLedger(clock, max_keys)

    async def has_token(self, key: str, burst: float, rate: float, now: float) -> bool:
        return self.local.has_token(key, burst, rate, now)

    async def take(
        self,
        key: str,
        burst: float,
        rate: float,
        now: float,
        cost: float = 1.0,
        force: bool = False,
    ) -> bool:
        return self.local.take(key, burst, rate, now, cost, force)

    async def count(self, key: str, ttl_s: float) -> int:
        return self.local.count(key, ttl_s)

    async def first(self, key: str, now: float, ttl_s: float) -> float:
        return self.local.first(key, now, ttl_s)

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        self.local.put(key, value, ttl_s)

    async def get(self, key: str) -> bytes | None:
        return self.local.get(key)

    async def forget(self, key: str) -> None:
        self.local.forget(key)


def rounded_ms(seconds: float) -> int:
    """Whole milliseconds for a Redis expiry, at least one."""
    return max(1, math.ceil(seconds * 1000))
