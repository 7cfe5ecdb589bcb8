"""Rate limits over a Ledger (ledger.py): the caller passes the time. They slow down code
guessing and floods of offers or calls.

Limits count per source network (:func:`source_of`): an IPv4 address, an IPv6 /64.
"""

from __future__ import annotations

import functools
import ipaddress

from ferry.broker.ledger import Ledger, LocalLedger


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

    All of it lives in `ledger`: on Redis every replica counts into the same buckets, so a
    guesser gains nothing by spreading its claims over the replicas.
    """

    def __init__(
        self,
        ledger: Ledger,
        burst_per_ip: float,
        rate_per_ip: float,
        burst_global: float,
        rate_global: float,
        *,
        flood_cost: float = 10.0,
        ipv4_prefix: int = 32,
        ipv6_prefix: int = 64,
        guesses_kept_s: float = 24 * 3600.0,
    ) -> None:
        self._ledger = ledger
        self._ip = (burst_per_ip, rate_per_ip)
        self._global = (burst_global, rate_global)
        self._flood_cost = max(1.0, flood_cost)
        self._prefixes = (ipv4_prefix, ipv6_prefix)
        self._guesses_kept_s = guesses_kept_s

    def source(self, ip: str | None) -> str:
        """The source network `ip` is counted as."""
        return source_of(ip, *self._prefixes)

    async def allowed(self, ip: str | None, now: float) -> bool:
        """Whether a claim from `ip` may be tried now (only its own source's failures count)."""
        return await self._ledger.has_token(f"claim:{self.source(ip)}", *self._ip, now)

    async def flooded(self, now: float) -> bool:
        """Whether failed claims broker-wide are over the global allowance just now."""
        return not await self._ledger.has_token("claims", *self._global, now)

    async def failed(self, ip: str | None, now: float) -> None:
        """Record a failed claim from `ip`: its source pays more while the broker is flooded."""
        flooded = not await self._ledger.take("claims", *self._global, now, force=True)
        cost = self._flood_cost if flooded else 1.0
        await self._ledger.take(f"claim:{self.source(ip)}", *self._ip, now, cost=cost, force=True)

    async def offer_failed(self, offer: str) -> int:
        """Count a failed claim of the found offer `offer`; return its count so far."""
        return await self._ledger.count(f"guess:{offer}", self._guesses_kept_s)


class SourceLimiter:
    """A token bucket per source: new offers per caller (issue 10, finding 2), and calls of
    any kind per caller.

    Every new offer (or call) spends a token (a retried request_id that gets its first answer
    back is no new offer); an empty bucket refuses. The key is the caller's address, an IPv6 one by
    its /64 (:func:`source_of`), so one host cannot spread a flood over its own subnet.
    There is no broker-wide bucket on purpose: it would let one flooder lock out everyone.
    The buckets live in `ledger` under `name`: shared by replicas on Redis (new offers), or
    this process's own (for calls, see CallLimiter).
    """

    def __init__(self, ledger: Ledger, name: str, burst: float, rate: float) -> None:
        self._ledger = ledger
        self._name = name
        self._burst = burst
        self._rate = rate

    async def take(self, key: str, now: float) -> bool:
        """Spend one of `key`'s tokens if it has one; whether it had."""
        return await self._ledger.take(f"{self._name}:{key}", self._burst, self._rate, now)


class CallLimiter:
    """SourceLimiter's bucket per source for calls of any kind, in this process's memory and
    synchronous: the servicer checks it before each call (BrokerService.admit) with no
    await and no round trip to a shared store; what one replica's event loop can take is
    its own business."""

    def __init__(self, ledger: LocalLedger, burst: float, rate: float) -> None:
        self._ledger = ledger
        self._burst = burst
        self._rate = rate

    def take(self, key: str, now: float) -> bool:
        """Spend one of `key`'s tokens if it has one; whether it had."""
        return self._ledger.take(f"call:{key}", self._burst, self._rate, now)
