"""Sealing for the object store: round trips, sizes, and every kind of tampering refused."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.broker import objectlayout
from ferry.protocol import RemoteProtocolError, chunk_digest
from ferry.protocol.sealing import (
    NONCE_BYTES,
    OVERHEAD,
    TAG_BYTES,
    Sealer,
    SealError,
    sealed_digests_size,
    sealed_size,
)

pytestmark = pytest.mark.timeout(60)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
SESSION = "sessions/abc123"
PLAIN = bytes((i * 7 + 3) % 251 for i in range(1000))


def _sealer(key: bytes = KEY, session: str = SESSION) -> Sealer:
    return Sealer(key, session)


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def test_round_trip_and_sizes() -> None:
    sealer = _sealer()
    for plain in (b"", b"x", PLAIN, bytes(64 << 10)):
        sealed = sealer.seal_chunk(2, 5, 9, plain)
        assert len(sealed) == sealed_size(len(plain)) == len(plain) + 28
        assert sealer.open_chunk(2, 5, 9, sealed) == plain
        # Another Sealer with the same key and session opens it too (the receiver).
        assert _sealer().open_chunk(2, 5, 9, memoryview(sealed)) == plain
    assert OVERHEAD == NONCE_BYTES + TAG_BYTES == 28
    assert OVERHEAD == objectlayout.SEAL_OVERHEAD  # the broker's layout counts the same
    assert sealed_digests_size(0) == 28
    assert sealed_digests_size(3) == 3 * 32 + 28


def test_seal_and_open_into_buffers() -> None:
    sealer = _sealer()
    part = bytearray(2 * sealed_size(len(PLAIN)))
    view = memoryview(part)
    sealer.seal_chunk_into(view[: sealed_size(len(PLAIN))], 0, 0, 2, PLAIN)
    sealer.seal_chunk_into(view[sealed_size(len(PLAIN)) :], 0, 1, 2, PLAIN[::-1])
    out = bytearray(len(PLAIN))
    sealer.open_chunk_into(out, 0, 1, 2, view[sealed_size(len(PLAIN)) :])
    assert out == PLAIN[::-1]
    with pytest.raises(ValueError, match="exactly"):
        sealer.seal_chunk_into(bytearray(len(PLAIN) + 27), 0, 0, 2, PLAIN)
    with pytest.raises(ValueError, match="exactly"):
        sealer.open_chunk_into(bytearray(len(PLAIN) + 1), 0, 0, 2, part[: sealed_size(len(PLAIN))])


def test_nonces_are_fresh_on_every_seal() -> None:
    sealer = _sealer()
    seals = [sealer.seal_chunk(0, 0, 1, PLAIN) for _ in range(50)]
    nonces = {s[:NONCE_BYTES] for s in seals}
    assert len(nonces) == 50  # a chunk sealed again (a re-upload) gets a new nonce
    assert len({s[NONCE_BYTES:] for s in seals}) == 50
    assert all(sealer.open_chunk(0, 0, 1, s) == PLAIN for s in seals)
    digests = [sealer.seal_digests(0, 1, bytes(32)) for _ in range(10)]
    assert len({d[:NONCE_BYTES] for d in digests}) == 10


def test_the_format_is_what_the_docstring_says() -> None:
    """A known answer, built here from the primitives: what another client must produce."""
    nonce = bytes(range(100, 112))
    sealer = Sealer(KEY, SESSION, entropy=lambda n: nonce[:n])
    chunk_key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"ferry/v1 store chunks"
    ).derive(KEY)
    name = SESSION.encode()
    aad = b"ferry/v1 store chunk\0" + struct.pack(">I", len(name)) + name
    aad += struct.pack(">IQQ", 3, 4, 10)
    assert sealer.seal_chunk(3, 4, 10, PLAIN) == nonce + AESGCM(chunk_key).encrypt(
        nonce, PLAIN, aad
    )
    digests_key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"ferry/v1 store digests"
    ).derive(KEY)
    aad = b"ferry/v1 store digests\0" + struct.pack(">I", len(name)) + name
    aad += struct.pack(">IQ", 3, 2)
    body = bytes(range(64))
    assert sealer.seal_digests(3, 2, body) == nonce + AESGCM(digests_key).encrypt(nonce, body, aad)
    with pytest.raises(ValueError, match="entropy"):
        Sealer(KEY, SESSION, entropy=lambda n: b"short").seal_chunk(0, 0, 1, b"x")


SEALED = _sealer().seal_chunk(1, 2, 5, PLAIN)


@pytest.mark.parametrize(
    ("region", "bit"),
    [
        ("nonce", 0),
        ("nonce", NONCE_BYTES * 8 - 1),
        ("ciphertext", NONCE_BYTES * 8),
        ("ciphertext", (NONCE_BYTES + len(PLAIN) // 2) * 8 + 3),
        ("ciphertext", (NONCE_BYTES + len(PLAIN)) * 8 - 1),
        ("tag", (NONCE_BYTES + len(PLAIN)) * 8),
        ("tag", len(SEALED) * 8 - 1),
    ],
)
def test_a_flipped_bit_is_refused(region: str, bit: int) -> None:
    with pytest.raises(SealError, match="does not open"):
        _sealer().open_chunk(1, 2, 5, _flip(SEALED, bit))


@pytest.mark.parametrize(
    ("what", "opener", "where"),
    [
        ("wrong key", lambda: _sealer(OTHER_KEY), (1, 2, 5)),
        ("wrong session", lambda: _sealer(session="sessions/abc124"), (1, 2, 5)),
        ("session that is a prefix", lambda: _sealer(session="sessions/abc12"), (1, 2, 5)),
        ("wrong file index", _sealer, (0, 2, 5)),
        ("swapped chunk index", _sealer, (1, 3, 5)),
        ("fewer chunks in the file (the last chunk moved)", _sealer, (1, 2, 3)),
        ("more chunks in the file (truncated after it)", _sealer, (1, 2, 6)),
    ],
)
def test_a_chunk_opens_only_in_its_one_place(
    what: str, opener: Callable[[], Sealer], where: tuple[int, int, int]
) -> None:
    with pytest.raises(SealError):
        opener().open_chunk(*where, SEALED)


def test_truncated_or_extended_chunks_are_refused() -> None:
    sealer = _sealer()
    for sealed in (SEALED[:-1], SEALED[:-TAG_BYTES], SEALED[: OVERHEAD - 1], b"", SEALED + b"\0"):
        with pytest.raises(SealError):
            sealer.open_chunk(1, 2, 5, sealed)


def test_chunks_swapped_within_a_file_are_refused() -> None:
    sealer = _sealer()
    a, b = sealer.seal_chunk(0, 0, 2, PLAIN), sealer.seal_chunk(0, 1, 2, PLAIN)
    for index, sealed in ((0, b), (1, a)):
        with pytest.raises(SealError):
            sealer.open_chunk(0, index, 2, sealed)


def test_a_refused_chunk_leaves_no_plaintext_behind() -> None:
    out = bytearray(b"\xaa" * len(PLAIN))
    with pytest.raises(SealError):
        _sealer().open_chunk_into(out, 1, 2, 5, _flip(SEALED, len(SEALED) * 8 - 1))
    assert out == bytes(len(PLAIN))


def test_seal_error_is_a_remote_protocol_error() -> None:
    # The receiving paths treat it as the other side's (here: the bucket's) fault.
    assert issubclass(SealError, RemoteProtocolError)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Sealer(b"short", SESSION)
    sealer = _sealer()
    for file_index, chunk_index, chunk_count in (
        (-1, 0, 1),
        (1 << 32, 0, 1),
        (0, 1, 1),
        (0, -1, 1),
    ):
        with pytest.raises(ValueError, match="out of range"):
            sealer.seal_chunk(file_index, chunk_index, chunk_count, b"x")
    with pytest.raises(ValueError, match="digests"):
        sealer.seal_digests(0, 2, bytes(63))


# -- digests objects -------------------------------------------------------------------


DIGESTS = [chunk_digest(bytes([i]) * 100) for i in range(5)]


def test_digests_round_trip_and_hide_the_digests() -> None:
    sealer = _sealer()
    sealed = sealer.seal_digests(4, 5, b"".join(DIGESTS))
    assert len(sealed) == sealed_digests_size(5)
    assert _sealer().open_digests(4, 5, sealed) == DIGESTS
    assert not any(d in sealed for d in DIGESTS)
    assert not any(d[:8] in sealed for d in DIGESTS)
    empty = sealer.seal_digests(0, 0, b"")
    assert len(empty) == OVERHEAD
    assert sealer.open_digests(0, 0, empty) == []


SEALED_DIGESTS = _sealer().seal_digests(4, 5, b"".join(DIGESTS))


@pytest.mark.parametrize(
    ("opener", "file_index", "chunks", "sealed"),
    [
        (lambda: _sealer(OTHER_KEY), 4, 5, SEALED_DIGESTS),
        (lambda: _sealer(session="sessions/x"), 4, 5, SEALED_DIGESTS),
        (_sealer, 3, 5, SEALED_DIGESTS),
        (_sealer, 4, 5, _flip(SEALED_DIGESTS, 200)),
        (_sealer, 4, 5, _flip(SEALED_DIGESTS, len(SEALED_DIGESTS) * 8 - 1)),
        (_sealer, 4, 5, SEALED_DIGESTS[:-1]),
        (_sealer, 4, 4, SEALED_DIGESTS[:-32]),
    ],
    ids=[
        "wrong key",
        "wrong session",
        "wrong file",
        "flipped bit",
        "flipped tag",
        "truncated",
        "fewer chunks",
    ],
)
def test_digests_open_only_as_that_files_digests(
    opener: Callable[[], Sealer], file_index: int, chunks: int, sealed: bytes
) -> None:
    with pytest.raises(SealError, match="digests of file"):
        opener().open_digests(file_index, chunks, sealed)


def test_a_chunk_and_a_digests_object_never_pass_for_each_other() -> None:
    """Separate sub-keys and labels: 32 * n bytes sealed as a chunk are not digests."""
    sealer = _sealer()
    body = b"".join(DIGESTS[:2])
    as_chunk = sealer.seal_chunk(0, 0, 1, body)
    with pytest.raises(SealError):
        sealer.open_digests(0, 2, as_chunk)
    as_digests = sealer.seal_digests(0, 2, body)
    with pytest.raises(SealError):
        sealer.open_chunk(0, 0, 1, as_digests)


# -- properties ------------------------------------------------------------------------


@settings(deadline=None, max_examples=150)
@given(
    plain=st.binary(max_size=2048),
    file_index=st.integers(0, (1 << 32) - 1),
    chunk_count=st.integers(1, 1 << 40),
    data=st.data(),
)
def test_any_chunk_round_trips_and_any_flip_is_refused(
    plain: bytes, file_index: int, chunk_count: int, data: st.DataObject
) -> None:
    chunk_index = data.draw(st.integers(0, chunk_count - 1))
    sealer = _sealer()
    sealed = sealer.seal_chunk(file_index, chunk_index, chunk_count, plain)
    assert sealer.open_chunk(file_index, chunk_index, chunk_count, sealed) == plain
    bit = data.draw(st.integers(0, len(sealed) * 8 - 1))
    with pytest.raises(SealError):
        sealer.open_chunk(file_index, chunk_index, chunk_count, _flip(sealed, bit))


def test_sealed_objects_match_the_brokers_layout() -> None:
    """Sealing a file chunk by chunk gives exactly the object size and part sizes the
    broker presigns (ferry.broker.objectlayout), with every chunk at its offset."""
    chunk = 64 << 10
    sealer = _sealer()
    for size in (0, 1, chunk, chunk + 1, 129 * chunk + 77, 300 * chunk):
        chunks = objectlayout.chunk_count(size, chunk)
        sealed = [
            sealer.seal_chunk(0, i, chunks, bytes(min(chunk, size - i * chunk)))
            for i in range(chunks)
        ]
        assert sum(map(len, sealed)) == objectlayout.object_size(size, chunk)
        offsets = list(itertools.accumulate(map(len, sealed), initial=0))[:-1]
        assert offsets == [objectlayout.chunk_offset(chunk, i) for i in range(chunks)]
        per_part = objectlayout.chunks_per_part(size, chunk)
        parts = [sum(map(len, sealed[i : i + per_part])) for i in range(0, chunks, per_part)] or [0]
        assert parts == [
            objectlayout.part_length(size, chunk, n)
            for n in range(1, objectlayout.part_count(size, chunk) + 1)
        ]
        assert len(sealer.seal_digests(0, chunks, bytes(32 * chunks))) == (
            objectlayout.digests_size(size, chunk)
        )
