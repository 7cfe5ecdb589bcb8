"""Both sides' production connection objects, linked in memory over simulated streams.

No sockets, no threads: each stream is a `ReceiverConnection` and a `SenderConnection`
(sharing one `ReceiveSession` and one `SendSession`) with two byte pipes between them, as
h11's tests link a client and a server `Connection`. This file holds no conversation rules
of its own: it only moves bytes, does what the I/O threads do with each event (write a
verified payload, read a source chunk), and picks the next step at random: one side of one
stream consumes exactly the bytes its connection wants, or the sender sends one queued
chunk. Corrupted payloads (a flipped byte in transit) and the loss of a stream midway are
random too. Every run must end with the files reassembled byte for byte and the session
done, or with `TooManyCorruptChunks` once more corrupt payloads arrived than allowed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from ferry.protocol import (
    NEED_DATA,
    ChunkArrived,
    ChunkData,
    ChunksRequested,
    DigestRequested,
    FileConfirmed,
    Finished,
    Greeted,
    LocalProtocolError,
    ReceiverConnection,
    ReceiveSession,
    SenderConnection,
    SendSession,
    State,
    TooManyCorruptChunks,
    chunk_digest,
)
from ferry.protocol.sender import MAX_REQUEST_CHUNKS

SESSION = "sessions/link"
MAX_STEPS = 200_000


def file_bytes(index: int, size: int) -> bytes:
    rng = random.Random(index * 7919 + size)
    return bytes(rng.getrandbits(8) for _ in range(size))


def pull(pipe: bytearray, n: int) -> memoryview:
    data = bytes(pipe[:n])
    del pipe[:n]
    return memoryview(data)


@dataclass
class Stream:
    receiver: ReceiverConnection
    sender: SenderConnection
    to_sender: bytearray = field(default_factory=bytearray)
    to_receiver: bytearray = field(default_factory=bytearray)
    chunk: ChunkArrived | None = None  # announced to the receiver, payload not read yet


class Link:
    """Both peers and the streams between them."""

    def __init__(
        self,
        sizes: list[int],
        chunk_size: int,
        *,
        streams: int,
        window: int,
        max_retries: int,
        rng: random.Random,
        corrupt_odds: float = 0.0,
        lose: tuple[int, int] | None = None,
    ) -> None:
        self.originals = [file_bytes(i, size) for i, size in enumerate(sizes)]
        self.written = [bytearray(size) for size in sizes]
        self.receive_session = ReceiveSession(
            sizes, chunk_size, window=window, max_retries=max_retries
        )
        self.send_session = SendSession(sizes, chunk_size)
        self.rng = rng
        self.corrupt_odds = corrupt_odds
        self.lose = lose  # (step, stream index)
        self.stream_count = streams
        self.streams: dict[int, Stream] = {}
        self.corrupt_delivered = 0
        self.confirmed: list[int] = []
        for i in range(streams):
            stream = Stream(
                ReceiverConnection(SESSION, i, self.receive_session),
                SenderConnection(SESSION, self.send_session),
            )
            stream.to_sender += stream.receiver.send_hello()
            self.streams[i] = stream

    # -- the receiver: what _receive.py's stream threads do ----------------------------

    def receiver_step(self, index: int) -> None:
        stream = self.streams[index]
        conn = stream.receiver
        conn.receive_data(pull(stream.to_receiver, conn.wanted))
        ev = conn.next_event()
        if isinstance(ev, Greeted):
            assert ev.stream_index == index
            self.receive_session.open_stream(index)  # ReceivePeer._adopt
        elif isinstance(ev, ChunkArrived):
            assert conn.expecting_payload
            stream.chunk = ev
        elif isinstance(ev, ChunkData):
            chunk, stream.chunk = stream.chunk, None
            assert chunk is not None
            span = slice(chunk.offset, chunk.offset + chunk.length)
            if bytes(ev.data) != self.originals[chunk.file_index][span]:
                self.corrupt_delivered += 1
            ok = chunk_digest(ev.data) == chunk.digest
            if ok:
                self.written[chunk.file_index][span] = ev.data
            conn.chunk_checked(ok)
        elif isinstance(ev, FileConfirmed):
            self.confirmed.append(ev.file_index)
        else:
            assert ev is NEED_DATA
        self.wake_receivers()

    def wake_receivers(self) -> None:
        """Every open stream asks for what is due, or says Done (the threads' loop)."""
        for stream in self.streams.values():
            conn = stream.receiver
            if conn.state is not State.OPEN or stream.chunk is not None:
                continue
            if self.receive_session.done:
                stream.to_sender += conn.send_done()
            else:
                stream.to_sender += conn.next_requests()

    def lose_stream(self, index: int) -> None:
        del self.streams[index]
        self.receive_session.stream_lost(index)
        self.wake_receivers()

    # -- the sender: what _send.py's connection threads do -----------------------------

    def sender_step(self, index: int) -> None:
        stream = self.streams[index]
        conn = stream.sender
        conn.receive_data(pull(stream.to_sender, conn.wanted))
        ev = conn.next_event()
        if isinstance(ev, Greeted):
            assert ev.stream_index == index
            stream.to_receiver += conn.send_hello()
        elif isinstance(ev, DigestRequested):
            assert self.send_session.missing_digests(ev.file_index) == []
            stream.to_receiver += conn.send_file_end(ev.file_index)
        else:
            assert ev is NEED_DATA or isinstance(ev, ChunksRequested | Finished)

    def sender_send(self, index: int) -> None:
        stream = self.streams[index]
        conn = stream.sender
        work = conn.work[0]
        payload = bytearray(
            self.originals[work.file_index][work.offset : work.offset + work.length]
        )
        head = conn.send_chunk(work, chunk_digest(payload))
        if self.rng.random() < self.corrupt_odds:
            payload[self.rng.randrange(len(payload))] ^= 1 << self.rng.randrange(8)
        stream.to_receiver += head + payload

    # -- the simulation ---------------------------------------------------------------

    def run(self) -> None:
        for step in range(MAX_STEPS):
            if self.lose is not None and step == self.lose[0] and self.lose[1] in self.streams:
                self.lose_stream(self.lose[1])
            actions = [(self.receiver_step, i) for i, s in self.streams.items() if s.to_receiver]
            actions += [(self.sender_step, i) for i, s in self.streams.items() if s.to_sender]
            actions += [(self.sender_send, i) for i, s in self.streams.items() if s.sender.work]
            if not actions:
                return
            action, index = self.rng.choice(actions)
            action(index)
        pytest.fail("the transfer did not settle")

    def check_success(self) -> None:
        assert self.receive_session.done
        assert [bytes(w) for w in self.written] == self.originals
        assert self.receive_session.bytes_verified == sum(len(o) for o in self.originals)
        assert self.receive_session.retries == self.corrupt_delivered
        assert sorted(self.confirmed) == list(range(len(self.originals)))
        for stream in self.streams.values():
            assert stream.receiver.state is State.DONE
            assert stream.sender.state is State.DONE
            assert not stream.receiver.awaiting
            assert not stream.sender.work
            assert stream.receiver.at_frame_boundary
            assert stream.sender.at_frame_boundary

    def check_written_is_correct(self) -> None:
        """Whatever was written, even in a failed transfer, is the original data."""
        for written, original in zip(self.written, self.originals, strict=True):
            assert all(w in (0, o) for w, o in zip(written, original, strict=True))


def run_link(link: Link, max_retries: int) -> None:
    try:
        link.run()
    except TooManyCorruptChunks:
        event("outcome: too many corrupt chunks")
        assert link.corrupt_delivered == max_retries + 1
        link.check_written_is_correct()
        return
    event("outcome: done")
    event(f"corrupt payloads survived: {min(link.corrupt_delivered, 1)}+")
    event(f"stream lost: {len(link.streams) < link.stream_count}")
    event(f"files: {len(link.originals)}, streams: {link.stream_count}")
    assert link.corrupt_delivered <= max_retries
    link.check_success()


# -- fixed scenarios ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("streams", [1, 3])
def test_clean_transfer(seed: int, streams: int) -> None:
    sizes = [0, 1, 10, 64, 63, 0]
    link = Link(sizes, 8, streams=streams, window=4, max_retries=0, rng=random.Random(seed))
    link.run()
    link.check_success()
    assert link.receive_session.retries == 0


def test_no_files() -> None:
    link = Link([], 4, streams=2, window=2, max_retries=0, rng=random.Random(0))
    link.run()
    link.check_success()


def test_only_empty_files() -> None:
    link = Link([0, 0, 0], 4, streams=2, window=2, max_retries=0, rng=random.Random(0))
    link.run()
    link.check_success()


def test_corrupt_chunks_are_fetched_again() -> None:
    link = Link(
        [200, 37],
        5,
        streams=2,
        window=3,
        max_retries=1000,
        rng=random.Random(1),
        corrupt_odds=0.3,
    )
    link.run()
    assert link.corrupt_delivered > 0
    link.check_success()


def test_every_chunk_corrupt_gives_up() -> None:
    link = Link([50], 5, streams=2, window=4, max_retries=3, rng=random.Random(2), corrupt_odds=1)
    with pytest.raises(TooManyCorruptChunks):
        link.run()
    assert link.corrupt_delivered == 4
    assert link.receive_session.bytes_verified == 0


@pytest.mark.parametrize("lose_at", [0, 5, 20, 60])
def test_lost_stream_others_finish(lose_at: int) -> None:
    link = Link(
        [100, 0, 33],
        4,
        streams=3,
        window=4,
        max_retries=0,
        rng=random.Random(lose_at),
        lose=(lose_at, 1),
    )
    link.run()
    assert 1 not in link.streams
    link.check_success()


# -- random scenarios --------------------------------------------------------------------


@st.composite
def scenarios(
    draw: st.DrawFn,
) -> tuple[list[int], int, int, int, int, float, tuple[int, int] | None]:
    # sampled_from spreads the draws evenly; integers() would favour the small end.
    chunk_size = draw(st.sampled_from([1, 2, 3, 5, 8, 13, 64]))
    count = draw(st.sampled_from(range(6)))
    sizes = draw(st.lists(st.integers(0, 5 * chunk_size), min_size=count, max_size=count))
    streams = draw(st.sampled_from(range(1, 5)))
    window = draw(st.sampled_from(range(1, 9)))
    max_retries = draw(st.sampled_from([0, 1, 3, 100]))
    corrupt_odds = draw(st.sampled_from([0.0, 0.05, 0.2, 0.6]))
    lose = None
    if streams > 1 and draw(st.sampled_from([False, True, True])):
        lose = (draw(st.sampled_from(range(40))), draw(st.sampled_from(range(streams))))
    return sizes, chunk_size, streams, window, max_retries, corrupt_odds, lose


@settings(deadline=None, max_examples=400)
@given(scenarios(), st.integers(0, 2**32 - 1))
def test_random_links(
    scenario: tuple[list[int], int, int, int, int, float, tuple[int, int] | None],
    seed: int,
) -> None:
    sizes, chunk_size, streams, window, max_retries, corrupt_odds, lose = scenario
    link = Link(
        sizes,
        chunk_size,
        streams=streams,
        window=window,
        max_retries=max_retries,
        rng=random.Random(seed),
        corrupt_odds=corrupt_odds,
        lose=lose,
    )
    run_link(link, max_retries)


def test_receiver_never_asks_more_than_the_sender_allows() -> None:
    """A window above MAX_REQUEST_CHUNKS is refused; the largest allowed window's first
    request is one the sender accepts (otherwise the very first request would fail)."""
    with pytest.raises(LocalProtocolError):
        ReceiveSession([10], 1, window=MAX_REQUEST_CHUNKS + 1)
    sizes = [2 * MAX_REQUEST_CHUNKS]
    receiver = ReceiveSession(sizes, 1, window=MAX_REQUEST_CHUNKS)
    receiver.open_stream(0)
    message = receiver.request(0)
    assert message is not None
    work = SendSession(sizes, 1).on_request(message.request)
    assert len(work) == MAX_REQUEST_CHUNKS
