"""One ReceiveSession linked to one SendSession over simulated streams, all in memory.

No sockets, no threads: each stream is two byte pipes. A step of the simulation lets one
side of one stream consume exactly the bytes its `FrameReader` wants; which step runs next
is chosen at random, as are corrupted payloads (a flipped byte in transit) and the loss of a
stream midway. Every run must end with the files reassembled byte for byte and the session
done, or with `TooManyCorruptChunks` once more corrupt payloads arrived than allowed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from ferry.protocol import (
    ChunkPayload,
    ChunkStart,
    ChunkTarget,
    Control,
    FrameReader,
    LocalProtocolError,
    ReceiveSession,
    SendSession,
    TooManyCorruptChunks,
    check_hello,
    chunk_digest,
    done,
    encode_chunk_head,
    encode_control,
    hello,
)
from ferry.protocol.sender import MAX_REQUEST_CHUNKS
from ferry.v1 import peer_pb2

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
class ReceiverEnd:
    """The receiver's half of one stream."""

    reader: FrameReader = field(default_factory=FrameReader)
    greeted: bool = False
    chunk: ChunkStart | None = None
    target: ChunkTarget | None = None


@dataclass
class SenderEnd:
    """The sender's half of one stream."""

    reader: FrameReader = field(default_factory=FrameReader)
    greeted: bool = False
    closed: bool = False


@dataclass
class Stream:
    to_sender: bytearray = field(default_factory=bytearray)
    to_receiver: bytearray = field(default_factory=bytearray)
    receiver: ReceiverEnd = field(default_factory=ReceiverEnd)
    sender: SenderEnd = field(default_factory=SenderEnd)


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
        self.receiver = ReceiveSession(sizes, chunk_size, window=window, max_retries=max_retries)
        self.sender = SendSession(sizes, chunk_size)
        self.rng = rng
        self.corrupt_odds = corrupt_odds
        self.lose = lose  # (step, stream index)
        self.stream_count = streams
        self.streams = {i: Stream() for i in range(streams)}
        self.corrupt_delivered = 0
        self.digest_asked_on: dict[int, int] = {}
        # Digests to ask for as soon as a stream is up: empty files are complete at once.
        self.digest_unasked = set(self.receiver.empty_files())
        self.finished = False
        for i, stream in self.streams.items():
            stream.to_sender += encode_control(hello(SESSION, i))

    # -- the receiver -----------------------------------------------------------------

    def receiver_send(self, stream: int, message: peer_pb2.PeerMessage) -> None:
        self.streams[stream].to_sender += encode_control(message)

    def ask_digest(self, stream: int, file_index: int) -> None:
        self.digest_unasked.discard(file_index)
        self.digest_asked_on[file_index] = stream
        self.receiver_send(stream, self.receiver.digest_request(file_index))

    def top_up(self, stream: int) -> None:
        message = self.receiver.request(stream)
        if message is not None:
            self.receiver_send(stream, message)

    def receiver_step(self, index: int) -> None:
        stream = self.streams[index]
        end = stream.receiver
        event = end.reader.feed(pull(stream.to_receiver, end.reader.wanted))
        session = self.receiver
        if isinstance(event, Control):
            kind = event.message.WhichOneof("kind")
            if not end.greeted:
                assert check_hello(event.message, SESSION) == index
                end.greeted = True
                session.open_stream(index)
                for file_index in sorted(self.digest_unasked):
                    self.ask_digest(index, file_index)
            else:
                assert kind == "file_end"
                session.file_end(event.message.file_end)
                del self.digest_asked_on[event.message.file_end.file_index]
        elif isinstance(event, ChunkStart):
            end.chunk = event
            end.target = session.chunk_start(index, event)
            assert end.target.length == event.length
        elif isinstance(event, ChunkPayload):
            assert end.chunk is not None
            assert end.target is not None
            chunk, target = end.chunk, end.target
            end.chunk = end.target = None
            original = self.originals[target.file_index]
            span = slice(target.offset, target.offset + target.length)
            if bytes(event.data) != original[span]:
                self.corrupt_delivered += 1
            ok = chunk_digest(event.data) == chunk.digest
            if ok:
                self.written[target.file_index][span] = event.data
            for file_index in session.chunk_done(index, chunk, ok):
                self.ask_digest(index, file_index)
        if end.greeted:
            if session.done:
                self.finish()
            else:
                self.top_up(index)

    def finish(self) -> None:
        if not self.finished:
            self.finished = True
            for index in self.streams:
                self.receiver_send(index, done())

    def lose_stream(self, index: int) -> None:
        del self.streams[index]
        self.receiver.stream_lost(index)
        for file_index, asked_on in list(self.digest_asked_on.items()):
            if asked_on == index:
                del self.digest_asked_on[file_index]
                self.digest_unasked.add(file_index)
        for i, s in self.streams.items():
            if s.receiver.greeted:
                for file_index in sorted(self.digest_unasked):
                    self.ask_digest(i, file_index)
                self.top_up(i)

    # -- the sender -------------------------------------------------------------------

    def sender_step(self, index: int) -> None:
        stream = self.streams[index]
        end = stream.sender
        assert not end.closed
        event = end.reader.feed(pull(stream.to_sender, end.reader.wanted))
        if event is None:
            return
        assert isinstance(event, Control)
        message = event.message
        if not end.greeted:
            assert check_hello(message, SESSION) == index
            end.greeted = True
            stream.to_receiver += encode_control(hello(SESSION, index))
            return
        kind = message.WhichOneof("kind")
        if kind == "request":
            for work in self.sender.on_request(message.request):
                payload = bytearray(
                    self.originals[work.file_index][work.offset : work.offset + work.length]
                )
                digest = chunk_digest(payload)
                self.sender.chunk_sent(work, digest)
                if self.rng.random() < self.corrupt_odds:
                    payload[self.rng.randrange(len(payload))] ^= 1 << self.rng.randrange(8)
                stream.to_receiver += encode_chunk_head(
                    work.file_index, work.chunk_index, digest, work.length
                )
                stream.to_receiver += payload
        elif kind == "digest_request":
            file_index = message.digest_request.file_index
            assert self.sender.missing_digests(file_index) == []
            stream.to_receiver += encode_control(self.sender.file_end(file_index))
        else:
            assert kind == "done"
            end.closed = True

    # -- the simulation ---------------------------------------------------------------

    def run(self) -> None:
        for step in range(MAX_STEPS):
            if self.lose is not None and step == self.lose[0] and self.lose[1] in self.streams:
                self.lose_stream(self.lose[1])
            actions = [(self.receiver_step, i) for i, s in self.streams.items() if s.to_receiver]
            actions += [(self.sender_step, i) for i, s in self.streams.items() if s.to_sender]
            if not actions:
                return
            action, index = self.rng.choice(actions)
            action(index)
        pytest.fail("the transfer did not settle")

    def check_success(self) -> None:
        assert self.receiver.done
        assert self.finished
        assert [bytes(w) for w in self.written] == self.originals
        assert self.receiver.bytes_verified == sum(len(o) for o in self.originals)
        assert self.receiver.retries == self.corrupt_delivered
        assert not self.digest_asked_on
        assert not self.digest_unasked
        for stream in self.streams.values():
            assert stream.sender.closed
            assert stream.receiver.reader.at_frame_boundary
            assert stream.sender.reader.at_frame_boundary

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
    assert link.receiver.retries == 0


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
    assert link.receiver.bytes_verified == 0


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
    """A window above MAX_REQUEST_CHUNKS must be refused or capped: otherwise the very first
    request of the transfer is one the sender rejects."""
    window = MAX_REQUEST_CHUNKS + 1
    sizes = [2 * window]
    try:
        receiver = ReceiveSession(sizes, 1, window=window)
    except LocalProtocolError:
        return
    receiver.open_stream(0)
    message = receiver.request(0)
    assert message is not None
    SendSession(sizes, 1).on_request(message.request)
