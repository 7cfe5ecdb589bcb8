"""Finding 9: a receiver that holds the right code floods a real `ferry send` with requests.

The sender queues the chunks each ChunkRequest asks for; a receiver that keeps asking (each
request for the most chunks one request may name) while it reads and drops what comes would
grow that queue without end (before the fix: +1.6 GiB in 20 s). The protocol promises a
window: a receiver has at most `MAX_REQUEST_CHUNKS` chunks outstanding on one stream. The
sender holds it to that promise: a receiver that asks beyond it gets an Abort saying so, and
the sender fails the transfer with a protocol error, its memory flat meanwhile.
"""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

from ferry.protocol import RemoteProtocolError, SenderConnection, SendSession, encode_control
from ferry.protocol.conversation import State
from ferry.protocol.sender import MAX_OUTSTANDING_CHUNKS, MAX_REQUEST_CHUNKS
from ferry.v1 import peer_pb2
from tests.conftest import FerryFactory
from tests.support.files import random_file
from tests.support.hostile_receiver import HostileReceiver
from tests.support.processes import BrokerProcess

pytestmark = [pytest.mark.timeout(120)]

CHUNK = 64 << 10
FILE_CHUNKS = 16
#: How much the sender may grow while it is flooded (its honest window is a few MiB).
RSS_BOUND = 64 << 20
#: The watch kills a sender that grows past this (the unfixed sender grows by GiB).
RSS_KILL = 512 << 20
WATCH_SECONDS = 20.0


def _feed(conn: SenderConnection, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = conn.wanted
        conn.receive_data(view[:n])
        view = view[n:]
        conn.next_event()


def test_sender_connection_holds_the_receiver_to_its_window() -> None:
    """Sans-I/O: requests up to the window queue; one chunk beyond it is a protocol error."""
    conn = SenderConnection("sessions/w", SendSession([MAX_REQUEST_CHUNKS], 1))
    hello = peer_pb2.PeerMessage()
    hello.hello.session, hello.hello.protocol_version = "sessions/w", 1
    _feed(conn, encode_control(hello))
    conn.send_hello()
    half = MAX_OUTSTANDING_CHUNKS // 2
    request = peer_pb2.PeerMessage()
    request.request.ranges.add(file_index=0, first_chunk=0, chunk_count=half)
    _feed(conn, encode_control(request) * 2)  # exactly the window
    assert len(conn.work) == MAX_OUTSTANDING_CHUNKS
    conn.send_chunk(conn.work[0], bytes(32))  # one sent: room for one more
    one = peer_pb2.PeerMessage()
    one.request.ranges.add(file_index=0, first_chunk=5, chunk_count=1)
    _feed(conn, encode_control(one))
    with pytest.raises(RemoteProtocolError, match="beyond the window of 4096"):
        _feed(conn, encode_control(one))
    assert conn.state is State.ERROR
    assert len(conn.work) == MAX_OUTSTANDING_CHUNKS


def test_request_flood_is_refused_and_memory_stays_flat(
    ferry: FerryFactory, broker: BrokerProcess, tmp_path: Path
) -> None:
    source = random_file(tmp_path / "src" / "one.bin", FILE_CHUNKS * CHUNK)
    sender = ferry("send", str(source), "--chunk-size", "64K", "--json")
    offered = sender.line()
    assert offered["event"] == "offered"
    assert sender.proc is not None
    proc = psutil.Process(sender.proc.pid)
    with HostileReceiver(broker.address, offered["code"], file_chunks=FILE_CHUNKS) as hostile:
        hostile.start()
        base = proc.memory_info().rss
        grown, fds, threads = 0, 0, 0
        started = time.monotonic()
        deadline = started + WATCH_SECONDS
        while sender.proc.poll() is None and time.monotonic() < deadline:
            try:
                grown = max(grown, proc.memory_info().rss - base)
                fds = max(fds, proc.num_fds())
                threads = max(threads, proc.num_threads())
            except psutil.NoSuchProcess:
                break
            if grown > RSS_KILL:
                sender.kill()
                break
            hostile.ended.wait(0.05)
        print(
            f"sender RSS growth {grown / 2**20:.1f} MiB in {time.monotonic() - started:.1f} s, "
            f"fds {fds}, threads {threads}, "
            f"{hostile.requests_sent} requests, {hostile.bytes_received / 2**20:.1f} MiB received"
        )
        assert grown < RSS_BOUND, f"the sender grew by {grown / 2**20:.0f} MiB"
        assert hostile.ended.wait(10), "the sender did not hang up on the flood"
    rc, _, err = sender.finish(30)
    assert hostile.error is None, hostile.error
    assert hostile.abort is not None
    assert "window" in hostile.abort, hostile.abort
    assert rc != 0
    assert "window" in err, err
    assert "Traceback" not in err, err
