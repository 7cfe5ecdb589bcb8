"""Pure pieces of the object-store fallback: the layout, the env config, the uploads table."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.broker import objectlayout as layout
from ferry.broker.__main__ import parse_args
from ferry.broker.config import BrokerConfig, s3_from_environment
from ferry.broker.store import SqliteStore, UploadRecord
from ferry.v1 import broker_pb2

pytestmark = pytest.mark.timeout(30)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SEALED = 28  # nonce and tag per sealed chunk (ferry.protocol.sealing)


@pytest.mark.parametrize(
    ("chunk", "per_part"),
    [(64 * KiB, 128), (1 * MiB, 8), (3 * MiB, 3), (5 * MiB, 2), (8 * MiB, 1), (64 * MiB, 1)],
)
def test_parts_are_whole_sealed_chunks_of_at_least_8_mib(chunk: int, per_part: int) -> None:
    size = 100 * MiB + 1
    assert layout.chunks_per_part(size, chunk) == per_part
    assert layout.part_size(size, chunk) == (chunk + SEALED) * per_part
    assert layout.part_size(size, chunk) >= max(layout.TARGET_PART_BYTES, layout.MIN_PART_BYTES)


def test_sealed_sizes_and_offsets() -> None:
    assert layout.SEAL_OVERHEAD == SEALED
    assert layout.sealed_chunk_size(MiB) == MiB + 28
    assert layout.object_size(0, MiB) == 0
    assert layout.object_size(1, MiB) == 1 + 28
    assert layout.object_size(3 * MiB, MiB) == 3 * MiB + 3 * 28
    assert layout.object_size(3 * MiB + 5, MiB) == 3 * MiB + 5 + 4 * 28
    assert [layout.chunk_offset(MiB, i) for i in (0, 1, 7)] == [0, MiB + 28, 7 * (MiB + 28)]
    with pytest.raises(ValueError, match="chunk_index"):
        layout.chunk_offset(MiB, -1)


def test_part_lengths_add_up_and_only_the_last_is_short() -> None:
    for size in (1, 8 * MiB - 1, 8 * MiB, 8 * MiB + 1, 16 * MiB + 300_000, 100 * MiB):
        count = layout.part_count(size, MiB)
        lengths = [layout.part_length(size, MiB, n) for n in range(1, count + 1)]
        assert sum(lengths) == layout.object_size(size, MiB)
        assert all(n == 8 * (MiB + SEALED) for n in lengths[:-1])
        assert 0 < lengths[-1] <= 8 * (MiB + SEALED)
    # 16 MiB + 300,000 bytes: two parts of 8 sealed chunks, then one short sealed chunk.
    assert layout.part_length(16 * MiB + 300_000, MiB, 3) == 300_000 + SEALED


@settings(deadline=None, max_examples=300)
@given(
    size=st.one_of(st.integers(0, 64 * MiB), st.integers(0, 1 << 40)),
    chunk=st.one_of(
        st.sampled_from([64 * KiB, MiB, 3 * MiB, 8 * MiB, 64 * MiB]),
        st.integers(64 * KiB, 64 * MiB),
    ),
)
def test_sealed_layout_properties(size: int, chunk: int) -> None:
    """For any manifest: parts are whole sealed chunks, in S3's limits, and add up."""
    chunks = layout.chunk_count(size, chunk)
    per_part = layout.chunks_per_part(size, chunk)
    count = layout.part_count(size, chunk)
    step = layout.part_size(size, chunk)
    total = layout.object_size(size, chunk)
    assert total == size + SEALED * chunks
    assert 1 <= count <= layout.MAX_PARTS
    assert step == per_part * (chunk + SEALED)
    assert layout.MIN_PART_BYTES <= step <= 5 * GiB  # S3: non-last parts >= 5 MiB, any <= 5 GiB
    assert layout.digests_size(size, chunk) == 32 * chunks + SEALED
    last = layout.part_length(size, chunk, count)
    # Every part but the last is part_size; the parts tile the object exactly.
    assert (count - 1) * step + last == total
    if count > 1:
        assert layout.part_length(size, chunk, 1) == step
        assert 0 < last <= step
    # Each chunk starts inside its part, at a sealed-chunk boundary of that part.
    for index in {0, chunks // 2, chunks - 1} if chunks else set():
        part = layout.part_of_chunk(size, chunk, index)
        offset = layout.chunk_offset(chunk, index)
        length = min(chunk, size - index * chunk) + SEALED
        assert (part - 1) * step <= offset
        assert offset + length <= min(part * step, total)
        assert (offset - (part - 1) * step) % (chunk + SEALED) == 0


def test_chunk_to_part() -> None:
    size = 16 * MiB + 300_000  # 17 chunks of 1 MiB
    assert [layout.part_of_chunk(size, MiB, c) for c in (0, 7, 8, 15, 16)] == [1, 1, 2, 2, 3]
    with pytest.raises(ValueError, match="chunk_index"):
        layout.part_of_chunk(size, MiB, 17)
    with pytest.raises(ValueError, match="part_number"):
        layout.part_length(size, MiB, 4)
    with pytest.raises(ValueError, match="part_number"):
        layout.part_length(size, MiB, 0)


def test_empty_file_is_one_empty_part_and_no_digest() -> None:
    assert layout.part_count(0, MiB) == 1
    assert layout.part_length(0, MiB, 1) == 0
    assert layout.digests_size(0, MiB) == SEALED  # no digest, sealed
    assert layout.digests_size(MiB + 1, MiB) == 64 + SEALED


def test_huge_files_stay_within_s3_part_limit() -> None:
    size = 1 << 40  # the manifest maximum, 1 TiB
    for chunk in (64 * KiB, MiB):
        count = layout.part_count(size, chunk)
        assert count <= layout.MAX_PARTS
        assert layout.part_size(size, chunk) % (chunk + SEALED) == 0
        assert layout.part_size(size, chunk) <= 5 * GiB  # S3's largest part


def test_keys() -> None:
    key = layout.object_key("ferry/", "abc", 3)
    assert key == "ferry/abc/3"
    assert layout.digests_key("ferry/", "abc", 3) == "ferry/abc/3.digests"
    assert layout.parse_key("ferry/", key) == ("abc", 3)
    for other in ("ferry/abc/3.digests", "other/abc/3", "ferry/abc", "ferry//3"):
        assert layout.parse_key("ferry/", other) is None


def test_s3_config_from_environment_then_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "FERRY_S3_ENDPOINT": "http://minio:9000",
        "FERRY_S3_BUCKET": "b",
        "FERRY_S3_PREFIX": "p/",
        "FERRY_S3_REGION": "eu-west-1",
        "FERRY_S3_URL_TTL": "60",
    }
    assert s3_from_environment(env) == {
        "s3_endpoint": "http://minio:9000",
        "s3_bucket": "b",
        "s3_prefix": "p/",
        "s3_region": "eu-west-1",
        "s3_url_ttl_s": 60.0,
    }
    assert s3_from_environment({"FERRY_S3_BUCKET": " "}) == {}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = parse_args(["--s3-bucket", "flag-bucket", "--log-level", "WARNING"])
    assert (config.s3_bucket, config.s3_endpoint, config.s3_url_ttl_s) == (
        "flag-bucket",
        "http://minio:9000",
        60.0,
    )
    for key in env:
        monkeypatch.delenv(key)
    config = parse_args(["--log-level", "WARNING"])
    assert config.s3_bucket is None
    assert config.s3_endpoint is None
    assert config.s3_url_ttl_s == 900.0
    with pytest.raises(ValueError, match="s3_prefix"):
        BrokerConfig(s3_prefix="/abs")


@pytest.mark.asyncio
async def test_uploads_table(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db.sqlite3")
    first = await store.add_upload(UploadRecord("s1", 0, "up-1", 10.0))
    assert first.upload_id == "up-1"
    assert (await store.add_upload(UploadRecord("s1", 0, "up-2", 11.0))).upload_id == "up-1"
    # A fresh upload replaces the old one only while the old one is the file's upload.
    assert not await store.replace_upload("s1", 0, "up-other", "up-3")
    assert await store.replace_upload("s1", 0, "up-1", "up-3")
    assert await store.get_upload("s1", 0) == UploadRecord("s1", 0, "up-3", 10.0)
    assert await store.replace_upload("s1", 0, "up-3", "up-1")
    await store.extend_upload_urls("s1", 0, 100.0)
    await store.extend_upload_urls("s1", 0, 50.0)
    await store.complete_upload("s1", 0)
    assert not await store.replace_upload("s1", 0, "up-1", "up-4")  # never once completed
    got = await store.get_upload("s1", 0)
    assert got is not None
    assert (got.completed, got.urls_expire_s) == (True, 100.0)
    # Orphans (no session row) and uploads of final sessions are due; live ones are not.
    assert [u.session_id for u in await store.uploads_to_clean(0.0, 10)] == ["s1"]
    await store.defer_upload_cleanup("s1", 0, 200.0)
    assert await store.uploads_to_clean(199.0, 10) == []
    assert len(await store.uploads_to_clean(200.0, 10)) == 1
    await store.delete_upload("s1", 0)
    assert await store.get_upload("s1", 0) is None
    await store.close()


@pytest.mark.asyncio
async def test_live_session_uploads_are_not_cleaned(tmp_path: Path) -> None:
    from ferry.broker.store import SessionRecord

    store = SqliteStore(tmp_path / "db.sqlite3")
    session = broker_pb2.Session(name="sessions/live", state=broker_pb2.Session.STATE_OFFERED)
    session.expire_time.FromSeconds(1000)
    await store.create_session(SessionRecord(session=session, sender_token_hash="h"))
    await store.add_upload(UploadRecord("live", 0, "up", 1.0))
    assert await store.uploads_to_clean(500.0, 10) == []
    record = await store.get_session("live")
    assert record is not None
    record.session.state = broker_pb2.Session.STATE_COMPLETED
    await store.update_session(record)
    assert [u.upload_id for u in await store.uploads_to_clean(500.0, 10)] == ["up"]
    await store.close()


class _FakeObjects:
    """Just what Fallback.abort_stale calls, recording the aborts."""

    def __init__(self, uploads: list[tuple[str, str, float]]) -> None:
        from ferry.broker.objectstore import StaleUpload

        self.uploads = [StaleUpload(k, u, t) for k, u, t in uploads]
        self.aborted: list[str] = []

    async def list_uploads(self, prefix: str) -> list[object]:
        return [u for u in self.uploads if u.key.startswith(prefix)]

    async def abort_upload(self, key: str, upload_id: str) -> None:
        self.aborted.append(upload_id)


@pytest.mark.asyncio
async def test_abort_stale_only_old_unknown_uploads(tmp_path: Path) -> None:
    from typing import Any, cast

    from ferry.broker.core import Broker
    from ferry.broker.fallback import Fallback

    config = BrokerConfig(offer_ttl_default_s=100.0, offer_ttl_max_s=100.0, session_ttl_s=100.0)
    store = SqliteStore(tmp_path / "db.sqlite3")
    await store.add_upload(UploadRecord("known", 0, "known-up", 0.0))
    broker = Broker(config, store, clock=lambda: 1000.0)
    fake = _FakeObjects(
        [
            ("ferry/known/0", "known-up", 0.0),  # recorded: its session's cleanup owns it
            ("ferry/known/0", "lost-race", 0.0),  # same file, unrecorded id: stale
            ("ferry/young/0", "young", 900.0),  # 100 s old: may still be recorded
            ("ferry/orphan/1", "orphan", 700.0),  # 300 s old, unknown: stale
            ("ferry/not-a-file-key", "odd", 0.0),  # unparsable under the prefix: stale
        ]
    )
    fallback = Fallback(broker, cast(Any, fake))
    assert await fallback.abort_stale() == 3
    assert sorted(fake.aborted) == ["lost-race", "odd", "orphan"]
    await store.close()
