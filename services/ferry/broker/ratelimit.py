"""Token buckets, pure: the caller passes the time. Used to slow down code guessing.

Limits count per source network (:func:`source_of`): an IPv4 address, an IPv6 /64.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import OrderedDict


class TokenBucket:
    """`burst` tokens, refilled at `rate` per second."""

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, burst: float, rate: float, now: float) -> None:
        self.burst = burst
        self.rate = rate
        self._tokens = burst
        self._stamp = now

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = max(self._stamp, now)

    def has_token(self, now: float) -> bool:
        """Whether at least one token is there (without taking it)."""
        self._refill(now)
        return self._tokens >= 1.0

    def take(self, now: float) -> None:
        """Spend one token (the count may go below zero, which delays recovery)."""
        self._refill(now)
        self._tokens -= 1.0

    def is_full(self, now: float) -> bool:
        """Whether the bucket is back at its burst size."""
        self._refill(now)
        return self._tokens >= self.burst


@functools.lru_cache(maxsize=4096)  # parsed on every call: about 6 % of a negotiation's CPU
def source_of(ip: str | None, ipv4_prefix: int = 32, ipv6_prefix: int = 64) -> str:
    """The network a caller is counted as: its IPv4 address (or /ipv4_prefix), its IPv6 /64.

    One IPv6 host usually holds a whole /64 and can pick any address in it, so counting IPv6
    addresses one by one would give one attacker 2**64 allowances. An IPv4-mapped IPv6
    address counts as the IPv4 address. Anything that is not an IP address counts as itself.
    """
    if not ip:
        return "unknown"
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = ipv4_prefix if address.version == 4 else ipv6_prefix
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


class ClaimLimiter:
    """Failed-claim limits per source network, broker-wide pressure, and guesses per offer.

    Why it is built this way (issue 10, findings 3 and 4): a broker-wide bucket that refuses
    claims lets anyone with enough addresses refuse every real receiver. So nothing here
    refuses a claim for what *other* callers did:

    - Each source (an IPv4 address, an IPv6 /64: :func:`source_of`) has a bucket of failed
      claims, `burst` then `rate` per second. While it is empty every claim from that source
      is refused, right or wrong, before the nameplate is looked up: the answer tells a
      guesser nothing about the nameplate.
    - The broker-wide bucket refuses nothing. While it is empty (a sweep from many sources is
      under way), each failure costs its source `flood_cost` tokens instead of one, which
      slows every guessing source down without touching a source that does not fail.
    - Failed claims of one found offer are counted (:meth:`offer_failed`), so the caller can
      give up an offer that is being guessed at instead of letting its guess count grow with
      its lifetime.

    At most `max_sources` source buckets (and as many offer counts) are kept; full buckets
    are dropped first, then the oldest.
    """

    def __init__(
        self,
        burst_per_ip: float,
        rate_per_ip: float,
        burst_global: float,
        rate_global: float,
        now: float,
        max_ips: int = 100_000,
        *,
        flood_cost: float = 10.0,
        ipv4_prefix: int = 32,
        ipv6_prefix: int = 64,
    ) -> None:
        self._burst_ip = burst_per_ip
        self._rate_ip = rate_per_ip
        self._global = TokenBucket(burst_global, rate_global, now)
        self._ips: OrderedDict[str, TokenBucket] = OrderedDict()
        self._max_ips = max_ips
        self._flood_cost = max(1.0, flood_cost)
        self._prefixes = (ipv4_prefix, ipv6_prefix)
        self._offers: OrderedDict[str, int] = OrderedDict()

    def source(self, ip: str | None) -> str:
        """The source network `ip` is counted as."""
        return source_of(ip, *self._prefixes)

    def allowed(self, ip: str | None, now: float) -> bool:
        """Whether a claim from `ip` may be tried now (only its own source's failures count)."""
        bucket = self._ips.get(self.source(ip))
        return bucket is None or bucket.has_token(now)

    def flooded(self, now: float) -> bool:
        """Whether failed claims broker-wide are over the global allowance just now."""
        return not self._global.has_token(now)

    def failed(self, ip: str | None, now: float) -> None:
        """Record a failed claim from `ip`: its source pays more while the broker is flooded."""
        cost = self._flood_cost if self.flooded(now) else 1.0
        self._global.take(now)
        key = self.source(ip)
        bucket = self._ips.get(key)
        if bucket is None:
            if len(self._ips) >= self._max_ips:
                self._evict(now)
            bucket = self._ips[key] = TokenBucket(self._burst_ip, self._rate_ip, now)
        self._ips.move_to_end(key)
        for _ in range(int(cost)):
            bucket.take(now)

    def offer_failed(self, offer: str) -> int:
        """Count a failed claim of the found offer `offer`; return its count so far."""
        count = self._offers.pop(offer, 0) + 1
        while len(self._offers) >= self._max_ips:
            self._offers.popitem(last=False)
        self._offers[offer] = count
        return count

    def _evict(self, now: float) -> None:
        _make_room(self._ips, self._max_ips, now)


class SourceLimiter:
    """A token bucket per source: new offers per caller (issue 10, finding 2), and calls of
    any kind per caller.

    Every new offer (or call) spends a token (a retried request_id that gets its first answer
    back is no new offer); an empty bucket refuses. The key is the caller's address, an IPv6 one by
    its /64 (:func:`source_of`), so one host cannot spread a flood over its own subnet.
    There is no broker-wide bucket on purpose: it would let one flooder lock out everyone.
    At most `max_keys` buckets are kept; full buckets are dropped first, then the oldest.
    """

    def __init__(self, burst: float, rate: float, max_keys: int = 100_000) -> None:
        self._burst = burst
        self._rate = rate
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._max_keys = max_keys

    def take(self, key: str, now: float) -> bool:
        """Spend one of `key`'s tokens if it has one; whether it had."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_keys:
                self._evict(now)
            bucket = self._buckets[key] = TokenBucket(self._burst, self._rate, now)
        self._buckets.move_to_end(key)
        if not bucket.has_token(now):
            return False
        bucket.take(now)
        return True

    def _evict(self, now: float) -> None:
        _make_room(self._buckets, self._max_keys, now)


def _make_room(buckets: OrderedDict[str, TokenBucket], max_keys: int, now: float) -> None:
    """Drop the full buckets (they remember nothing), then the least recently used, down to
    nine tenths of `max_keys`: a pass over all of them, so it must not run on every new key
    once the table is full (100,000 keys, each new source paying a full pass, would let a
    botnet buy tens of milliseconds of the broker's time per call)."""
    for key in [k for k, b in buckets.items() if b.is_full(now)]:
        del buckets[key]
    keep = max_keys * 9 // 10
    while len(buckets) > keep:
        buckets.popitem(last=False)
