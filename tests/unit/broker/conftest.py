"""Stores for the broker's unit tests: each test that takes `store` (or `stores`) runs once
on SQLite and once on a real redis-server (one per module, tests/support/redis.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from ferry.broker.store import Store
from tests.support.redis import STORE_KINDS, RedisServer, StoreFactory


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server for the module's tests (each store under a prefix of its own)."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest_asyncio.fixture(params=STORE_KINDS)
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """Opens stores over one backing: the first is the test's store, the next its replicas."""
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else None
    async with StoreFactory(request.param, tmp_path, url) as factory:
        yield factory


@pytest.fixture
def store(stores: StoreFactory) -> Store:
    """The test's store (SQLite, then Redis)."""
    return stores()
