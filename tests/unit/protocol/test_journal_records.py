"""The journal's record format and `recover`: what survives a crash, a torn tail, a bad bit."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.protocol import chunk_digest
from ferry.protocol.journal import (
    RECORD_SIZE,
    JournalMismatch,
    RecordKind,
    Recovered,
    chunk_record,
    finished_record,
    header_record,
    manifest_fingerprint,
    recover,
    synced_record,
)

CHUNK_SIZE = 1024
FINGERPRINT = manifest_fingerprint("sessions/abc", b"manifest")
FILE_CHUNKS = [3, 2, 0, 5]
HEADER = header_record(CHUNK_SIZE, FINGERPRINT)

_BODY = struct.Struct(">BIQ32s")


def digest(file_index: int, chunk_index: int) -> bytes:
    return chunk_digest(f"{file_index}/{chunk_index}".encode())


def chunk(file_index: int, chunk_index: int) -> bytes:
    return chunk_record(file_index, chunk_index, digest(file_index, chunk_index))


def read(data: bytes, file_chunks: list[int] = FILE_CHUNKS) -> Recovered:
    return recover(data, chunk_size=CHUNK_SIZE, fingerprint=FINGERPRINT, file_chunks=file_chunks)


def decode(record: bytes) -> tuple[int, int, int, bytes]:
    assert len(record) == RECORD_SIZE
    body, crc = record[: _BODY.size], record[_BODY.size :]
    assert struct.unpack(">I", crc)[0] == zlib.crc32(body)
    kind, file_index, number, dig = _BODY.unpack(body)
    return kind, file_index, number, dig


def forged(kind: int, file_index: int, number: int, dig: bytes = bytes(32)) -> bytes:
    """A record with a valid CRC, whatever its content."""
    body = _BODY.pack(kind, file_index, number, dig)
    return body + struct.pack(">I", zlib.crc32(body))


# -- the records ---------------------------------------------------------------------------


def test_record_size_is_49_bytes() -> None:
    assert RECORD_SIZE == 49


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (header_record(CHUNK_SIZE, FINGERPRINT), (RecordKind.HEADER, 0, CHUNK_SIZE, FINGERPRINT)),
        (chunk_record(7, 2**40, b"d" * 32), (RecordKind.CHUNK, 7, 2**40, b"d" * 32)),
        (synced_record(12345), (RecordKind.SYNCED, 0, 12345, bytes(32))),
        (finished_record(2**32 - 1), (RecordKind.FINISHED, 2**32 - 1, 0, bytes(32))),
    ],
)
def test_every_record_kind_round_trips(
    record: bytes, expected: tuple[int, int, int, bytes]
) -> None:
    assert decode(record) == expected


def test_fingerprint_depends_on_session_and_manifest() -> None:
    assert len(FINGERPRINT) == 32
    assert manifest_fingerprint("sessions/abc", b"manifest") == FINGERPRINT
    assert manifest_fingerprint("sessions/abd", b"manifest") != FINGERPRINT
    assert manifest_fingerprint("sessions/abc", b"manifesT") != FINGERPRINT
    # The separator keeps the two fields apart.
    assert manifest_fingerprint("a", b"bc") != manifest_fingerprint("ab", b"c")


def test_records_round_trip_through_recover() -> None:
    data = HEADER + chunk(0, 0) + chunk(3, 4) + synced_record(3 * RECORD_SIZE) + finished_record(1)
    got = read(data)
    assert got.valid_length == len(data)
    assert got.sure == {(0, 0): digest(0, 0), (3, 4): digest(3, 4)}
    assert got.unsure == {}
    assert got.finished == {1}


# -- the header ------------------------------------------------------------------------------


def test_empty_journal_is_empty() -> None:
    assert read(b"") == Recovered()


def test_header_only() -> None:
    assert read(HEADER) == Recovered(valid_length=RECORD_SIZE)


def test_header_torn_is_empty_not_a_mismatch() -> None:
    for cut in range(1, RECORD_SIZE):
        assert read(HEADER[:cut]) == Recovered()


@pytest.mark.parametrize(
    "first",
    [chunk(0, 0), synced_record(0), finished_record(0), forged(9, 0, CHUNK_SIZE, FINGERPRINT)],
)
def test_first_record_not_a_header_is_a_mismatch(first: bytes) -> None:
    with pytest.raises(JournalMismatch):
        read(first + chunk(0, 1))


def test_other_fingerprint_is_a_mismatch() -> None:
    other = header_record(CHUNK_SIZE, manifest_fingerprint("sessions/other", b"manifest"))
    with pytest.raises(JournalMismatch):
        read(other + chunk(0, 0) + synced_record(2 * RECORD_SIZE))


def test_other_chunk_size_is_a_mismatch() -> None:
    with pytest.raises(JournalMismatch):
        read(header_record(CHUNK_SIZE * 2, FINGERPRINT) + chunk(0, 0))


# -- sure and unsure ---------------------------------------------------------------------------


def test_chunks_without_synced_are_unsure() -> None:
    got = read(HEADER + chunk(0, 0) + chunk(1, 1))
    assert got.sure == {}
    assert got.unsure == {(0, 0): digest(0, 0), (1, 1): digest(1, 1)}
    assert got.valid_length == 3 * RECORD_SIZE


def test_synced_vouches_for_chunks_before_it() -> None:
    data = HEADER + chunk(0, 0) + chunk(0, 1)
    data += synced_record(len(data)) + chunk(0, 2) + chunk(1, 0)
    got = read(data)
    assert got.sure == {(0, 0): digest(0, 0), (0, 1): digest(0, 1)}
    assert got.unsure == {(0, 2): digest(0, 2), (1, 0): digest(1, 0)}


def test_synced_vouches_only_for_records_starting_before_upto() -> None:
    # The syncer read the size (upto) before two more chunks were appended.
    upto = 2 * RECORD_SIZE
    data = HEADER + chunk(0, 0) + chunk(0, 1) + chunk(0, 2) + synced_record(upto)
    got = read(data)
    assert got.sure == {(0, 0): digest(0, 0)}
    assert got.unsure == {(0, 1): digest(0, 1), (0, 2): digest(0, 2)}
    # A later SYNCED covers them.
    data += synced_record(len(data))
    got = read(data)
    assert set(got.sure) == {(0, 0), (0, 1), (0, 2)}
    assert got.unsure == {}


def test_synced_upto_inside_a_record_vouches_for_it() -> None:
    # `upto` one byte into the second chunk record: that record starts before it.
    data = HEADER + chunk(0, 0) + chunk(0, 1) + synced_record(2 * RECORD_SIZE + 1)
    assert set(read(data).sure) == {(0, 0), (0, 1)}


def test_finished_promotes_that_files_chunks() -> None:
    data = HEADER + chunk(0, 0) + chunk(1, 0) + chunk(0, 1) + chunk(0, 2) + finished_record(0)
    got = read(data)
    assert set(got.sure) == {(0, 0), (0, 1), (0, 2)}
    assert got.unsure == {(1, 0): digest(1, 0)}
    assert got.finished == {0}


def test_finished_of_an_empty_file() -> None:
    got = read(HEADER + finished_record(2))
    assert got.finished == {2}
    assert got.sure == got.unsure == {}


def test_a_sure_chunk_written_again_is_not_also_unsure() -> None:
    data = HEADER + chunk(0, 0)
    data += synced_record(len(data)) + chunk(0, 0)
    got = read(data)
    assert got.sure == {(0, 0): digest(0, 0)}
    assert got.unsure == {}


# -- where reading stops ---------------------------------------------------------------------


def _five_records() -> bytes:
    data = HEADER + chunk(0, 0) + chunk(0, 1)
    return data + synced_record(len(data)) + chunk(1, 0)


def test_torn_last_record_at_every_offset() -> None:
    data = _five_records() + finished_record(0)
    whole = read(data)
    assert whole.finished == {0}
    before = read(data[:-RECORD_SIZE])
    for cut in range(len(data) - RECORD_SIZE, len(data)):
        got = read(data[:cut])
        assert got == before, cut
        assert got.valid_length == len(data) - RECORD_SIZE


def test_torn_synced_leaves_its_chunks_unsure() -> None:
    data = HEADER + chunk(0, 0)
    data += synced_record(len(data))
    for cut in range(len(data) - RECORD_SIZE + 1, len(data)):
        got = read(data[:cut])
        assert got.sure == {}
        assert got.unsure == {(0, 0): digest(0, 0)}
        assert got.valid_length == 2 * RECORD_SIZE


def test_a_flipped_bit_anywhere_stops_reading_at_that_record() -> None:
    data = _five_records()
    for position in range(RECORD_SIZE, len(data)):
        for bit in (0, 3, 7):
            broken = bytearray(data)
            broken[position] ^= 1 << bit
            got = read(bytes(broken))
            stop = position // RECORD_SIZE * RECORD_SIZE
            assert got == read(data[:stop]), (position, bit)
            assert got.valid_length == stop


def test_a_flipped_bit_in_the_header_reads_nothing() -> None:
    for position in range(RECORD_SIZE):
        broken = bytearray(_five_records())
        broken[position] ^= 0x10
        assert read(bytes(broken)) == Recovered()


@pytest.mark.parametrize(
    "bad",
    [
        chunk_record(4, 0, bytes(32)),  # no file 4
        chunk_record(0, 3, bytes(32)),  # file 0 has chunks 0..2
        chunk_record(2, 0, bytes(32)),  # file 2 is empty
        finished_record(4),
        forged(RecordKind.HEADER, 0, CHUNK_SIZE, FINGERPRINT),  # a second header
        forged(0, 0, 0),
        forged(5, 0, 0),
    ],
)
def test_out_of_range_or_unknown_record_stops_reading(bad: bytes) -> None:
    data = HEADER + chunk(0, 0)
    tail = bad + synced_record(10 * RECORD_SIZE) + chunk(1, 1)
    got = read(data + tail)
    assert got.valid_length == len(data)
    assert got.unsure == {(0, 0): digest(0, 0)}
    assert got.sure == {}
    assert got.finished == set()


def test_trailing_garbage_shorter_than_a_record_is_ignored() -> None:
    data = HEADER + chunk(0, 0)
    got = read(data + b"\xff" * (RECORD_SIZE - 1))
    assert got.valid_length == len(data)
    assert got.unsure == {(0, 0): digest(0, 0)}


# -- compaction ----------------------------------------------------------------------------


def test_records_compacts_sure_chunks_and_finished() -> None:
    data = HEADER + chunk(3, 4) + chunk(0, 1) + chunk(3, 0) + chunk(0, 1)
    data += synced_record(len(data)) + chunk(1, 1) + finished_record(2)
    got = read(data)
    records = list(got.records())
    assert records == [chunk(0, 1), chunk(3, 0), chunk(3, 4), finished_record(2)]
    compact = HEADER + b"".join(records)
    compact += synced_record(len(compact))
    again = read(compact)
    assert again.sure == got.sure
    assert again.finished == got.finished
    assert again.unsure == {}


def test_records_of_nothing_is_nothing() -> None:
    assert list(Recovered().records()) == []


# -- any sequence of operations, cut or corrupted -----------------------------------------------


@dataclass(frozen=True)
class Op:
    kind: str  # "chunk", "sync", "finish"
    file_index: int = 0
    chunk_index: int = 0
    lag: int = 0  # for sync: how many records were appended after the syncer read the size


def _op() -> st.SearchStrategy[Op]:
    chunks = st.sampled_from([(f, c) for f, n in enumerate(FILE_CHUNKS) for c in range(n)])
    return st.one_of(
        chunks.map(lambda fc: Op("chunk", fc[0], fc[1])),
        st.integers(0, 3).map(lambda lag: Op("sync", lag=lag)),
        st.integers(0, len(FILE_CHUNKS) - 1).map(lambda f: Op("finish", f)),
    )


def _encode(ops: list[Op]) -> tuple[bytes, list[tuple[Op, int]]]:
    """The journal bytes and each record's op with its `upto` (for sync) after the header."""
    data = HEADER
    written: list[tuple[Op, int]] = []
    for op in ops:
        if op.kind == "chunk":
            data += chunk(op.file_index, op.chunk_index)
            written.append((op, 0))
        elif op.kind == "sync":
            upto = max(RECORD_SIZE, len(data) - op.lag * RECORD_SIZE)
            data += synced_record(upto)
            written.append((op, upto))
        else:
            data += finished_record(op.file_index)
            written.append((op, 0))
    return data, written


def _expected(written: list[tuple[Op, int]], whole: int) -> Recovered:
    """A plain model of recovery from the first `whole` records after the header."""
    out = Recovered(valid_length=(whole + 1) * RECORD_SIZE)
    prefix = written[:whole]
    for j, (op, _) in enumerate(prefix):
        if op.kind == "finish":
            out.finished.add(op.file_index)
            continue
        if op.kind != "chunk":
            continue
        start = (j + 1) * RECORD_SIZE
        key = (op.file_index, op.chunk_index)
        later = prefix[j + 1 :]
        synced = any(o.kind == "sync" and upto > start for o, upto in later)
        finished = any(o.kind == "finish" and o.file_index == op.file_index for o, _ in later)
        if synced or finished:
            out.sure[key] = digest(*key)
        else:
            out.unsure[key] = digest(*key)
    for key in out.sure:
        out.unsure.pop(key, None)
    return out


def _check(data: bytes, written: list[tuple[Op, int]], whole: int) -> None:
    got = read(data)
    expected = _expected(written, whole)
    assert got == expected
    # Said plainly: nothing unwritten is reported, and a complete SYNCED is honoured.
    chunks = {(o.file_index, o.chunk_index) for o, _ in written if o.kind == "chunk"}
    assert set(got.sure) | set(got.unsure) <= chunks
    syncs = [(j, upto) for j, (o, upto) in enumerate(written[:whole]) if o.kind == "sync"]
    if syncs:
        j_last, upto_last = syncs[-1]
        for j, (o, _) in enumerate(written[:j_last]):
            if o.kind == "chunk" and (j + 1) * RECORD_SIZE < upto_last:
                assert (o.file_index, o.chunk_index) in got.sure


@settings(deadline=None, max_examples=150)
@given(ops=st.lists(_op(), max_size=25), data=st.data())
def test_any_journal_cut_anywhere(ops: list[Op], data: st.DataObject) -> None:
    encoded, written = _encode(ops)
    cut = data.draw(st.integers(0, len(encoded)), label="cut")
    if cut < RECORD_SIZE:
        assert read(encoded[:cut]) == Recovered()
        return
    _check(encoded[:cut], written, cut // RECORD_SIZE - 1)


@settings(deadline=None, max_examples=150)
@given(ops=st.lists(_op(), max_size=25), data=st.data())
def test_any_journal_corrupted_anywhere(ops: list[Op], data: st.DataObject) -> None:
    encoded, written = _encode(ops)
    position = data.draw(st.integers(0, len(encoded) - 1), label="position")
    flip = data.draw(st.integers(1, 255), label="flip")
    broken = bytearray(encoded)
    broken[position] ^= flip
    if position < RECORD_SIZE:
        # A corrupt header fails its CRC: nothing is read, and it is not a mismatch.
        assert read(bytes(broken)) == Recovered()
        return
    _check(bytes(broken), written, position // RECORD_SIZE - 1)
