"""Token buckets, pure: the caller passes the time. Used to slow down code guessing."""

from __future__ import annotations

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


class ClaimLimiter:
    """Failed-claim limits per peer IP and for the whole broker.

    A claim is refused while either bucket is empty; only failed claims spend tokens. At most
    `max_ips` per-IP buckets are kept; full buckets are dropped first, then the oldest.
    """

    def __init__(
        self,
        burst_per_ip: float,
        rate_per_ip: float,
        burst_global: float,
        rate_global: float,
        now: float,
        max_ips: int = 100_000,
    ) -> None:
        self._burst_ip = burst_per_ip
        self._rate_ip = rate_per_ip
        self._global = TokenBucket(burst_global, rate_global, now)
        self._ips: OrderedDict[str, TokenBucket] = OrderedDict()
        self._max_ips = max_ips

    def allowed(self, ip: str, now: float) -> bool:
        """Whether a claim from `ip` may be tried now."""
        bucket = self._ips.get(ip)
        ip_ok = bucket is None or bucket.has_token(now)
        return ip_ok and self._global.has_token(now)

    def failed(self, ip: str, now: float) -> None:
        """Record a failed claim from `ip`."""
        self._global.take(now)
        bucket = self._ips.get(ip)
        if bucket is None:
            if len(self._ips) >= self._max_ips:
                self._evict(now)
            bucket = self._ips[ip] = TokenBucket(self._burst_ip, self._rate_ip, now)
        self._ips.move_to_end(ip)
        bucket.take(now)

    def _evict(self, now: float) -> None:
        for key in [k for k, b in self._ips.items() if b.is_full(now)]:
            del self._ips[key]
        while len(self._ips) >= self._max_ips:
            self._ips.popitem(last=False)
