"""The Ledger (ledger.py): one contract over both kinds, then what sharing it across replicas
buys (issue 12): a guesser, a flooder or a retry that spreads its calls over two brokers on one
Redis meets the same limits and answers as on one broker.

The contract runs on MemoryLedger (a SQLite store's) and RedisLedger (a real redis-server,
tests/support/redis.py). The replica tests run two `Broker`s, each on its own RedisStore over
one Redis and one key prefix, as two `ferry serve` processes would be.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from ferry.broker import codes, states
from ferry.broker.config import BrokerConfig
from ferry.broker.core import Broker
from ferry.broker.errors import BrokerRefusal, NotFound, Reason, ResourceExhausted
from ferry.broker.ledger import Ledger, MemoryLedger
from tests.support.broker_flow import (
    CLAIM_VERIFIER,
    RECEIVER_PAKE,
    FakeClock,
    offer_request,
    store_and_forward,
)
from tests.support.redis import RedisServer, StoreFactory

pytestmark = pytest.mark.timeout(60)

NOW = 1_700_000_000.0


@pytest.fixture
def ledger(stores: StoreFactory) -> Ledger:
    return stores().ledger()


# -- the contract --------------------------------------------------------------------------------


def test_ledger_kind_follows_the_store(stores: StoreFactory) -> None:
    ledger = stores().ledger()
    assert type(ledger).__name__ == {"sqlite": "MemoryLedger", "redis": "RedisLedger"}[stores.kind]


@pytest.mark.asyncio
async def test_a_bucket_spends_its_burst_then_refuses_then_refills(ledger: Ledger) -> None:
    assert await ledger.has_token("b", 3, 0.5, NOW)  # an unknown bucket is full
    assert [await ledger.take("b", 3, 0.5, NOW) for _ in range(4)] == [True, True, True, False]
    assert not await ledger.has_token("b", 3, 0.5, NOW)
    assert not await ledger.has_token("b", 3, 0.5, NOW + 1.9)  # 0.95 of a token back
    assert await ledger.has_token("b", 3, 0.5, NOW + 2.0)
    assert await ledger.take("b", 3, 0.5, NOW + 2.0)
    assert not await ledger.take("b", 3, 0.5, NOW + 2.0)
    assert await ledger.has_token("other", 3, 0.5, NOW)  # buckets are apart


@pytest.mark.asyncio
async def test_a_forced_take_goes_below_zero_and_delays_recovery(ledger: Ledger) -> None:
    assert await ledger.take("f", 2, 1.0, NOW, cost=10, force=True)  # it had tokens
    assert not await ledger.take("f", 2, 1.0, NOW, force=True)  # -8, then -9
    assert not await ledger.has_token("f", 2, 1.0, NOW + 9.9)
    assert await ledger.has_token("f", 2, 1.0, NOW + 10.0)
    # A take that is not forced spends nothing from an empty bucket.
    assert not await ledger.take("g", 1, 1.0, NOW + 0.0) or not await ledger.take("g", 1, 1.0, NOW)
    assert await ledger.has_token("g", 1, 1.0, NOW + 1.0)


@pytest.mark.asyncio
async def test_a_refill_never_passes_the_burst(ledger: Ledger) -> None:
    await ledger.take("r", 2, 100.0, NOW)
    assert [await ledger.take("r", 2, 100.0, NOW + 3600) for _ in range(3)] == [True, True, False]


@pytest.mark.asyncio
async def test_counters_count_and_expire(ledger: Ledger, stores: StoreFactory) -> None:
    assert [await ledger.count("c", 60) for _ in range(3)] == [1, 2, 3]
    assert await ledger.count("d", 60) == 1
    await ledger.forget("c")
    assert await ledger.count("c", 60) == 1
    assert await ledger.count("short", 0.2) == 1
    _pass(ledger, 0.3)
    assert await ledger.count("short", 0.2) == 1  # it expired: counting starts again


@pytest.mark.asyncio
async def test_first_keeps_the_first_time(ledger: Ledger) -> None:
    assert await ledger.first("t", NOW, 60) == NOW
    assert await ledger.first("t", NOW + 5, 60) == NOW
    await ledger.forget("t")
    assert await ledger.first("t", NOW + 7, 60) == NOW + 7


@pytest.mark.asyncio
async def test_values_are_kept_for_their_time(ledger: Ledger) -> None:
    assert await ledger.get("v") is None
    await ledger.put("v", b"\x00sealed\xff", 60)
    assert await ledger.get("v") == b"\x00sealed\xff"
    await ledger.put("w", b"brief", 0.2)
    _pass(ledger, 0.3)
    assert await ledger.get("w") is None
    await ledger.forget("v")
    assert await ledger.get("v") is None


@pytest.mark.asyncio
async def test_redis_entries_carry_a_ttl(redis_stores: StoreFactory) -> None:
    """The in-memory ledger's bounds are test_broker_ratelimit_room's; Redis forgets by TTL."""
    ledger = redis_stores().ledger()
    await ledger.take("b", 10, 1.0, time.time(), cost=5, force=True)
    await ledger.count("c", 30)
    await ledger.first("t", time.time(), 30)
    await ledger.put("v", b"x", 30)
    keys = [k for k in redis_stores.keys() if k.startswith("x:")]  # noqa: SIM118
    assert len(keys) == 4
    ttls = {k[2:]: redis_stores.raw.pttl(redis_stores.prefix + k) for k in keys}
    assert 0 < ttls["b"] <= 6_000  # full again after 5 s (+ 1 s), then forgotten
    assert all(0 < ttls[k] <= 30_000 for k in "ctv")


def _pass(ledger: Ledger, seconds: float) -> None:
    """Let `seconds` pass for the ledger's expiry: the real clock (Redis TTLs), or the memory
    ledger's own, moved forward."""
    if isinstance(ledger, MemoryLedger):
        now = ledger.local._clock() + seconds
        ledger.local._clock = lambda: now
    else:
        time.sleep(seconds)


# -- two replicas, one Redis ---------------------------------------------------------------------


@pytest_asyncio.fixture
async def redis_stores(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    async with StoreFactory("redis", tmp_path, redis_server.url) as factory:
        yield factory


@pytest_asyncio.fixture
async def replicas(redis_stores: StoreFactory, tmp_path: Path) -> tuple[Broker, Broker]:
    """Two brokers on one Redis, as two `ferry serve` replicas (a SQLite store is one
    process: nothing to share)."""
    stores = redis_stores
    clock = FakeClock()
    config = BrokerConfig(
        data_dir=tmp_path,
        claim_burst_per_ip=10,
        claim_refill_per_ip_s=0.01,
        offer_burst_per_address=6,
        offer_refill_per_address_s=0.01,
        claim_guesses_per_offer=5,
        claim_confirm_timeout_s=30,
    )
    one, two = stores(), stores()
    key = await one.token_key()  # as start_server does: every replica hashes codes alike
    assert key is not None
    assert await two.token_key() == key
    return (
        Broker(config, one, clock=clock, token_key=key),
        Broker(config, two, clock=clock, token_key=key),
    )


async def _refusal(broker: Broker, code: str, ip: str) -> BrokerRefusal:
    with pytest.raises(BrokerRefusal) as info:
        await broker.claim_offer(code, ip, pake_message=RECEIVER_PAKE)
    return info.value


@pytest.mark.asyncio
async def test_failed_claims_on_one_replica_count_on_the_other(
    replicas: tuple[Broker, Broker],
) -> None:
    a, b = replicas
    code = (await a.create_offer(offer_request(), "198.51.100.1")).code
    guesser = "192.0.2.66"
    for i in range(10):  # the burst, spread over both replicas
        refusal = await _refusal((a, b)[i % 2], "9-wrong", guesser)
        assert isinstance(refusal, NotFound)
    for broker in (a, b):  # out of failures on both, even for the right nameplate
        refusal = await _refusal(broker, code, guesser)
        assert isinstance(refusal, ResourceExhausted)
        assert refusal.reason == Reason.RATE_LIMITED
    # Someone else still claims, on either replica.
    assert (await b.claim_offer(code, "203.0.113.5", pake_message=RECEIVER_PAKE)).session.claimed


@pytest.mark.asyncio
async def test_new_offers_from_one_source_share_one_allowance(
    replicas: tuple[Broker, Broker],
) -> None:
    a, b = replicas
    made, reasons = 0, []
    for i in range(20):
        try:
            await (a, b)[i % 2].create_offer(offer_request(), "192.0.2.7")
            made += 1
        except ResourceExhausted as exc:
            reasons.append(exc.reason)
    assert reasons == [Reason.RATE_LIMITED] * 14
    assert made == 6  # the burst, not twice it
    await a.create_offer(offer_request(), "192.0.2.8")  # another source is not touched


@pytest.mark.asyncio
async def test_guesses_at_one_offer_are_counted_across_replicas(
    replicas: tuple[Broker, Broker],
) -> None:
    a, b = replicas
    request = store_and_forward(offer_request())
    offer = await a.create_offer(request, "198.51.100.1")
    wrong = bytes(32)
    assert wrong != CLAIM_VERIFIER
    for i in range(5):  # claim_guesses_per_offer = 5, from five sources, over both replicas
        with pytest.raises(NotFound):
            await (a, b)[i % 2].claim_offer(offer.code, f"192.0.2.{10 + i}", claim_verifier=wrong)
    session = await a.get(offer.session.name, offer.party_token)
    assert session.state == states.EXPIRED
    assert "guessed at 5 times" in session.failure_reason


@pytest.mark.asyncio
async def test_a_squatted_claim_is_timed_across_replicas(replicas: tuple[Broker, Broker]) -> None:
    a, b = replicas
    clock = a.clock
    assert isinstance(clock, FakeClock)
    offer = await a.create_offer(offer_request(), "198.51.100.1")
    await a.claim_offer(offer.code, "192.0.2.20", pake_message=RECEIVER_PAKE)  # never confirms
    clock.now += 31
    with pytest.raises(NotFound):  # the next claim, on the other replica, ends the offer
        await b.claim_offer(offer.code, "203.0.113.9", pake_message=RECEIVER_PAKE)
    session = await a.get(offer.session.name, offer.party_token)
    assert session.state == states.EXPIRED
    assert "never proved it" in session.failure_reason


@pytest.mark.asyncio
async def test_a_claim_not_yet_timed_out_is_kept_across_replicas(
    replicas: tuple[Broker, Broker],
) -> None:
    a, b = replicas
    clock = a.clock
    assert isinstance(clock, FakeClock)
    offer = await a.create_offer(offer_request(), "198.51.100.1")
    await a.claim_offer(offer.code, "192.0.2.20", pake_message=RECEIVER_PAKE)
    clock.now += 29  # B must not start the claim's clock anew: it ends at 30 s after A's claim
    with pytest.raises(NotFound):
        await b.claim_offer(offer.code, "203.0.113.9", pake_message=RECEIVER_PAKE)
    assert (await a.get(offer.session.name, offer.party_token)).state == states.OFFERED
    clock.now += 2
    with pytest.raises(NotFound):
        await b.claim_offer(offer.code, "203.0.113.9", pake_message=RECEIVER_PAKE)
    assert (await a.get(offer.session.name, offer.party_token)).state == states.EXPIRED


@pytest.mark.asyncio
async def test_a_retried_offer_gets_the_first_answer_from_the_other_replica(
    replicas: tuple[Broker, Broker], redis_stores: StoreFactory
) -> None:
    stores = redis_stores
    a, b = replicas
    first = await a.create_offer(offer_request("retry-7d3f0c"), "198.51.100.1")
    again = await b.create_offer(offer_request("retry-7d3f0c"), "198.51.100.1")
    assert (again.code, again.party_token) == (first.code, first.party_token)
    assert again.session.name == first.session.name
    different = offer_request("retry-7d3f0c")
    different.manifest.files[0].size_bytes = 2
    with pytest.raises(BrokerRefusal) as info:
        await b.create_offer(different, "198.51.100.1")
    assert info.value.reason == Reason.REQUEST_ID_REUSED
    # What Redis holds never shows the nameplate, the token or the request id in clear.
    names = stores.keys()
    assert names
    dump = b"".join(stores.raw.dump(stores.prefix + name) or b"" for name in names)
    for secret in (first.code, first.party_token, "retry-7d3f0c"):
        assert secret.encode() not in dump


@pytest.mark.asyncio
async def test_the_call_limit_stays_per_process(replicas: tuple[Broker, Broker]) -> None:
    """Calls of any kind are limited per replica, on purpose (ratelimit.CallLimiter): it
    guards that replica's event loop and costs no round trip on every call."""
    a, b = replicas
    burst = int(a.config.calls_burst_per_address)
    assert all(a.calls.take("192.0.2.1", NOW) for _ in range(burst))
    assert not a.calls.take("192.0.2.1", NOW)
    assert b.calls.take("192.0.2.1", NOW)


@pytest.mark.asyncio
async def test_two_replicas_offering_at_once_never_share_a_nameplate(
    replicas: tuple[Broker, Broker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both replicas draw the same nameplate first (as two random draws may): both find it
    free, the store gives it to one, and the other draws again."""
    a, b = replicas
    draws = iter(["7-orbit", "7-orbit", "8-comet", "9-delta"])
    monkeypatch.setattr(codes, "generate", lambda: next(draws))
    first, second = await asyncio.gather(
        a.create_offer(offer_request(), "198.51.100.1"),
        b.create_offer(offer_request(), "198.51.100.2"),
    )
    assert sorted([first.code, second.code]) == ["7-orbit", "8-comet"]
    taker = a if first.code == "7-orbit" else b
    other = second if first.code == "7-orbit" else first
    claim = await taker.claim_offer("7-orbit", "203.0.113.1", pake_message=RECEIVER_PAKE)
    assert claim.session.name in (first.session.name, second.session.name)
    assert claim.session.name != other.session.name
