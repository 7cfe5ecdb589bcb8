"""A claim repeated with its request_id gets the same token; nothing else reopens a code."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ferry.broker import states
from ferry.broker.config import BrokerConfig
from ferry.broker.core import Broker
from ferry.broker.errors import NotFound, Reason
from ferry.broker.server import load_token_key
from ferry.broker.store import SqliteStore
from ferry.v1 import broker_pb2
from tests.support.broker_flow import RECEIVER_PAKE, pake_sender

pytestmark = pytest.mark.timeout(30)


async def _offer(broker: Broker) -> broker_pb2.CreateOfferResponse:
    return await broker.create_offer(
        broker_pb2.CreateOfferRequest(
            manifest=broker_pb2.Manifest(
                files=[broker_pb2.FileEntry(path="a.txt", size_bytes=1)],
                chunk_size_bytes=1 << 20,
            ),
            sender=pake_sender(
                broker_pb2.PeerInfo(
                    allowed_ports=broker_pb2.PortRange(first_port=9000, last_port=9100),
                    certificate_der=b"cert",
                )
            ),
        ),
        "192.0.2.1",
    )


async def _claim(
    broker: Broker, code: str, ip: str, request_id: str
) -> broker_pb2.ClaimOfferResponse:
    return await broker.claim_offer(code, ip, request_id, pake_message=RECEIVER_PAKE)


def _broker(tmp_path: Path, key: bytes) -> tuple[Broker, SqliteStore]:
    store = SqliteStore(tmp_path / "b.sqlite3")
    return Broker(BrokerConfig(data_dir=tmp_path), store, token_key=key), store


@pytest.mark.asyncio
async def test_repeated_claim_with_the_same_request_id(tmp_path: Path) -> None:
    key = os.urandom(32)
    broker, store = _broker(tmp_path, key)
    try:
        offer = await _offer(broker)
        first = await _claim(broker, offer.code, "192.0.2.2", "req-1")
        again = await _claim(broker, offer.code, "192.0.2.2", "req-1")
        assert again.party_token == first.party_token
        assert again.session.name == offer.session.name
        # The token works for the receiver's calls.
        got = await broker.get(offer.session.name, again.party_token)
        assert got.claimed
        # Another request id, or none, is a second claim: refused like a wrong code.
        for other in ("req-2", ""):
            with pytest.raises(NotFound) as info:
                await _claim(broker, offer.code, "192.0.2.3", other)
            assert info.value.reason == Reason.CODE_NOT_FOUND
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_repeat_survives_a_restart_with_the_same_key(tmp_path: Path) -> None:
    key = load_token_key(tmp_path / "token.key")
    assert stat.S_IMODE((tmp_path / "token.key").stat().st_mode) == 0o600
    broker, store = _broker(tmp_path, key)
    offer = await _offer(broker)
    first = await _claim(broker, offer.code, "192.0.2.2", "req-1")
    await store.close()
    assert load_token_key(tmp_path / "token.key") == key
    broker, store = _broker(tmp_path, load_token_key(tmp_path / "token.key"))
    try:
        again = await _claim(broker, offer.code, "192.0.2.2", "req-1")
        assert again.party_token == first.party_token
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_no_repeat_once_the_session_is_over(tmp_path: Path) -> None:
    broker, store = _broker(tmp_path, os.urandom(32))
    try:
        offer = await _offer(broker)
        claim = await _claim(broker, offer.code, "192.0.2.2", "req-1")
        await broker.decline(offer.session.name, claim.party_token, "no")
        assert (await broker.get(offer.session.name, offer.party_token)).state == states.DECLINED
        with pytest.raises(NotFound) as info:
            await _claim(broker, offer.code, "192.0.2.2", "req-1")
        assert info.value.reason == Reason.CODE_NOT_FOUND
    finally:
        await store.close()
