"""The rate limiters' tables stay cheap when an attacker fills them with many sources.

Once a table held `max_keys` buckets that were all spent (none full, so none can simply be
forgotten), every new source paid a pass over all of them: with 100,000 sources, about 95 ms
of the broker's single event loop per call (measured: 1,000 new sources took 94.6 s). Now a
full table is cut to nine tenths at once, so the next tenth of new sources costs no pass.
"""

from __future__ import annotations

import pytest

from ferry.broker.ledger import MemoryLedger
from ferry.broker.ratelimit import ClaimLimiter, SourceLimiter

MAX = 1000


class _Spent:
    def __init__(self) -> None:
        self.ledger = MemoryLedger(max_keys=MAX)
        self.limiter = SourceLimiter(self.ledger, "offer", burst=1, rate=0.001)

    async def spend(self) -> _Spent:
        for i in range(MAX):
            assert await self.limiter.take(f"attacker-{i}", 1.0)
        return self

    @property
    def _buckets(self) -> int:
        return len(self.ledger.local._buckets)

    async def take(self, key: str, now: float) -> bool:
        return await self.limiter.take(key, now)


async def _spent_offer_limiter() -> _Spent:
    return await _Spent().spend()


@pytest.mark.asyncio
async def test_a_full_table_of_spent_buckets_is_cut_to_nine_tenths_at_once() -> None:
    limiter = await _spent_offer_limiter()
    assert limiter._buckets == MAX
    await limiter.take("newcomer", 1.0)
    assert limiter._buckets == MAX * 9 // 10 + 1


@pytest.mark.asyncio
async def test_the_next_tenth_of_new_sources_needs_no_pass() -> None:
    limiter = await _spent_offer_limiter()
    await limiter.take("newcomer-0", 1.0)
    sizes = []
    for i in range(1, MAX // 10):
        await limiter.take(f"newcomer-{i}", 1.0)
        sizes.append(limiter._buckets)
    assert sizes == sorted(sizes)  # it only grew: nothing was evicted, no pass was made
    assert sizes[-1] == MAX


@pytest.mark.asyncio
async def test_the_most_recent_sources_are_kept() -> None:
    limiter = await _spent_offer_limiter()
    await limiter.take("newcomer", 1.0)
    assert not await limiter.take(f"attacker-{MAX - 1}", 1.0)  # still spent: remembered
    assert await limiter.take("attacker-0", 1.0)  # the oldest was forgotten


@pytest.mark.asyncio
async def test_the_claim_limiter_cuts_its_table_the_same_way() -> None:
    ledger = MemoryLedger(max_keys=MAX)
    limiter = ClaimLimiter(ledger, 1, 0.001, 100, 100)
    for i in range(MAX - 1):  # with the broker-wide bucket, MAX buckets
        await limiter.failed(f"10.0.{i >> 8}.{i & 255}", 1.0)
    await limiter.failed("192.0.2.1", 1.0)
    assert len(ledger.local._buckets) == MAX * 9 // 10 + 1
