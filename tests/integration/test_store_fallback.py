"""The object-store fallback end to end: real S3 servers, real broker, real CLI processes.

Bytes go through presigned URLs only (the CLI has no S3 credentials: its environment has
none); boto3 is used by the test alone, to watch and to damage the bucket. What the bucket
holds is sealed end to end (ferry.protocol.sealing): every chunk SEALED bytes longer, at
offsets computable from the manifest, and the digests object sealed as one.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ferry.protocol import chunk_digest, file_digest
from ferry.protocol.journal import RECORD_SIZE, RecordKind
from tests.conftest import BrokerFactory
from tests.support.processes import BrokerProcess, FerryProcess
from tests.support.s3 import S3_KINDS, S3Server

pytestmark = [pytest.mark.timeout(90)]

MiB = 1 << 20
SEALED = 28  # what sealing adds to each chunk and to the digests object: nonce and tag
_AWS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@pytest.fixture(scope="module", params=S3_KINDS)
def s3_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[S3Server]:
    """Each test runs against moto and against s3rver (a missing s3rver fails, never skips).

    s3rver 3.7.1 has no ListParts, AbortMultipartUpload nor ListMultipartUploads (see
    tests/support/s3.py): there the broker completes uploads with the parts the sender
    reports, and an interrupted upload starts over instead of resuming.
    """
    kind: str = request.param
    server = S3Server(tmp_path_factory.mktemp(kind) / f"{kind}.log", kind=kind).start()
    yield server
    server.stop()


@pytest.fixture
def s3_broker(
    s3_server: S3Server, broker_factory: BrokerFactory, monkeypatch: pytest.MonkeyPatch
) -> BrokerProcess:
    """A broker with the moto bucket (credentials only in the broker's environment)."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    broker = broker_factory(*s3_server.broker_args(), "--connect-timeout", "1.5")
    for key in s3_server.env:
        monkeypatch.delenv(key)
    return broker


class Cli:
    """`ferry` runs against one broker; each role keeps its own local state."""

    def __init__(self, root: Path, broker: BrokerProcess) -> None:
        self.root = root
        self.broker = broker
        self.started: list[FerryProcess] = []

    def run(self, who: str, *args: str, **env: str) -> FerryProcess:
        environ = {
            **{k: v for k, v in os.environ.items() if k not in _AWS},
            "FERRY_BROKER": self.broker.address,
            "XDG_STATE_HOME": str(self.root / f"state-{who}"),
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        proc = FerryProcess(list(args), environ, self.root).start()
        self.started.append(proc)
        return proc


@pytest.fixture
def cli(tmp_path: Path, s3_broker: BrokerProcess) -> Iterator[Cli]:
    c = Cli(tmp_path, s3_broker)
    yield c
    for proc in c.started:
        proc.kill()


def _source(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _last(lines: list[dict[str, Any]], err: str) -> dict[str, Any]:
    assert lines, err
    return lines[-1]


def _store_send(cli: Cli, source: Path, *extra: str) -> tuple[FerryProcess, dict[str, Any]]:
    sender = cli.run("sender", "send", str(source), "--json", "--via", "store", *extra)
    first = sender.line()
    assert first["event"] in ("offered", "resumed")
    return sender, first


def _receive(cli: Cli, code: str, dest: Path, *extra: str) -> FerryProcess:
    return cli.run("receiver", "receive", code, "--dest", str(dest), "--yes", "--json", *extra)


@pytest.mark.slow
def test_store_and_forward_sender_gone_before_the_receiver_comes(cli: Cli, tmp_path: Path) -> None:
    source = _source(tmp_path / "big.bin", 20 * MiB + 12_345)
    sender, offered = _store_send(cli, source)
    rc, lines, err = sender.finish(60)
    assert rc == 0, err
    stored = _last(lines, err)
    assert stored["event"] == "stored"
    assert stored["bytes_uploaded"] == stored["bytes"] == source.stat().st_size
    assert sender.proc is not None
    assert sender.proc.poll() is not None  # the sender is gone
    dest = tmp_path / "dest"
    rc, lines, err = _receive(cli, offered["code"], dest).finish(60)
    assert rc == 0, err
    done = _last(lines, err)
    assert done["event"] == "completed"
    assert done["path"] == "store"
    assert done["files"] == stored["files"]  # the same blake3-chunks digest on both sides
    assert _sha(dest / "big.bin") == _sha(source)
    assert sorted(p.name for p in dest.iterdir()) == ["big.bin"]


def test_direct_refused_falls_back_to_the_store(cli: Cli, tmp_path: Path) -> None:
    # The sender may listen only on ports this test holds: direct cannot happen.
    held: list[socket.socket] = []
    while not held:
        base = 20000 + int.from_bytes(os.urandom(2), "big") % 20000
        try:
            for port in range(base, base + 6):
                s = socket.socket(socket.AF_INET6)
                held.append(s)
                s.bind(("::", port))
        except OSError:
            for s in held:
                s.close()
            held.clear()
    try:
        source = _source(tmp_path / "f.bin", 9 * MiB + 7)
        sender = cli.run("sender", "send", str(source), "--json", FERRY_PORTS=f"{base}-{base + 5}")
        offered = sender.line()
        dest = tmp_path / "dest"
        rc, lines, err = _receive(cli, offered["code"], dest).finish(60)
        assert rc == 0, err
        done = _last(lines, err)
        assert done["path"] in ("store", "mixed")
        assert _sha(dest / "f.bin") == _sha(source)
        src_rc, src_lines, src_err = sender.finish(60)
        assert src_rc == 0, src_err
        assert _last(src_lines, src_err)["path"] == "store"
    finally:
        for s in held:
            s.close()


def _lists_uploads(s3: S3Server) -> bool:
    """Whether the server can list multipart uploads and their parts (s3rver 3.7.1 can't)."""
    return not s3.missing_operations()


def _parts_stored(s3: S3Server, prefix: str = "") -> int:
    client = s3.client()
    total = 0
    for upload in client.list_multipart_uploads(Bucket=s3.bucket, Prefix=prefix).get("Uploads", []):
        reply = client.list_parts(Bucket=s3.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        total += len(reply.get("Parts", []))
    return total


@pytest.mark.slow
def test_kill_during_upload_resumes_from_the_stored_parts(
    cli: Cli, tmp_path: Path, s3_server: S3Server
) -> None:
    size = 96 * MiB
    source = _source(tmp_path / "big.bin", size)
    sender, offered = _store_send(cli, source)
    listable = _lists_uploads(s3_server)
    # Only this session's parts: the server is shared by the module's tests, and an earlier
    # test's broker may have been stopped before it cleaned up its uploads.
    prefix = f"ferry/{offered['session'].removeprefix('sessions/')}/"
    deadline = time.monotonic() + 30
    while listable and _parts_stored(s3_server, prefix) < 1:
        assert time.monotonic() < deadline, "no part uploaded in time"
        time.sleep(0.01)
    if not listable:
        time.sleep(0.3)  # no way to see parts arrive: kill a moment into the upload
    assert sender.proc is not None
    sender.proc.send_signal(signal.SIGKILL)
    sender.proc.wait(10)
    # As a person would: rerun a moment later. moto answers 500 to parts of an upload while
    # it still handles the killed sender's cut-off PUTs.
    time.sleep(1.0)
    again, resumed = _store_send(cli, source)
    assert resumed["event"] == "resumed"
    assert resumed["session"] == offered["session"]
    rc, lines, err = again.finish(60)
    assert rc == 0, err
    stored = _last(lines, err)
    assert stored["event"] == "stored"
    if listable:
        # At least the part seen before the kill was kept (the rest may have made it too).
        assert stored["bytes_uploaded"] <= size - 8 * MiB
    else:
        # The store can't say which parts it has: the upload starts over (or was complete).
        assert stored["bytes_uploaded"] in (size, 0)
    assert stored["bytes_resumed"] == size - stored["bytes_uploaded"]
    dest = tmp_path / "dest"
    rc, lines, err = _receive(cli, offered["code"], dest, "--via", "store").finish(60)
    assert rc == 0, err
    assert _last(lines, err)["path"] == "store"
    assert _sha(dest / "big.bin") == _sha(source)


@pytest.mark.slow
def test_kill_during_download_resumes(cli: Cli, tmp_path: Path) -> None:
    size = 64 * MiB
    source = _source(tmp_path / "big.bin", size)
    sender, offered = _store_send(cli, source, "--chunk-size", "256K")
    rc, _, err = sender.finish(60)
    assert rc == 0, err
    dest = tmp_path / "dest"
    receiver = _receive(cli, offered["code"], dest, "--via", "store")
    deadline = time.monotonic() + 30
    # Kill once some verified chunks are journaled (40-byte header, ~45 bytes a chunk).
    while not any(p.stat().st_size > 2000 for p in dest.glob(".ferry-*.journal")):
        assert time.monotonic() < deadline, "nothing journaled in time"
        time.sleep(0.002)
    assert receiver.proc is not None
    receiver.proc.send_signal(signal.SIGKILL)
    receiver.proc.wait(10)
    assert not (dest / "big.bin").exists()
    rc, lines, err = _receive(cli, offered["code"], dest, "--via", "store").finish(60)
    assert rc == 0, err
    done = _last(lines, err)
    assert done["bytes_resumed"] > 0
    assert done["bytes_resumed"] + done["bytes_transferred"] == size
    assert _sha(dest / "big.bin") == _sha(source)
    assert sorted(p.name for p in dest.iterdir()) == ["big.bin"]


def _stored(s3: S3Server, session: str) -> dict[str, bytes]:
    """Every object the bucket holds for ``session``, raw, by key."""
    client = s3.client()
    prefix = f"ferry/{session.removeprefix('sessions/')}/"
    listed = client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix).get("Contents", [])
    return {
        o["Key"]: client.get_object(Bucket=s3.bucket, Key=o["Key"])["Body"].read() for o in listed
    }


def test_the_bucket_holds_only_ciphertext(cli: Cli, tmp_path: Path, s3_server: S3Server) -> None:
    """What whoever runs the bucket sees of a stored file: neither its content nor its digests.

    Checked, over the raw bytes of every object of the session: no 64-byte window of the file,
    at any offset, appears at any offset of any object. The file is random, so it does not
    repeat itself; any 64-byte window of it contains a whole 32-byte block that starts at a
    multiple of 32, so it is enough (and stronger) that none of those blocks appears: each
    32-byte window of each object, at every offset, is looked up in the set of them. The same
    set holds the file's BLAKE3 chunk digests and its whole-file digest, so neither the digests
    object nor any other object holds them in clear. Then the receiver opens it all.
    """
    chunk, size = 64 * 1024, 3 * MiB + 12_345  # 49 chunks, the last one short
    source = _source(tmp_path / "f.bin", size)
    sender, offered = _store_send(cli, source, "--chunk-size", "64K")
    rc, lines, err = sender.finish(60)
    assert rc == 0, err
    stored = _last(lines, err)
    assert stored["event"] == "stored"

    objects = _stored(s3_server, offered["session"])
    key = f"ferry/{offered['session'].removeprefix('sessions/')}/0"
    assert sorted(objects) == [key, f"{key}.digests"]
    chunks = -(-size // chunk)
    assert len(objects[key]) == size + SEALED * chunks
    assert len(objects[f"{key}.digests"]) == 32 * chunks + SEALED
    plain = source.read_bytes()
    digests = [chunk_digest(plain[i : i + chunk]) for i in range(0, size, chunk)]
    assert stored["files"][0]["digests"]["blake3-chunks"] == file_digest(digests).hex()
    secrets = {plain[at : at + 32] for at in range(0, size - 31, 32)}
    secrets |= {*digests, file_digest(digests)}
    for name, body in objects.items():
        windows = (body[at : at + 32] for at in range(len(body) - 31))
        assert secrets.isdisjoint(windows), f"{name} holds plaintext or a plaintext digest"

    dest = tmp_path / "dest"
    rc, lines, err = _receive(cli, offered["code"], dest, "--via", "store").finish(60)
    assert rc == 0, err
    assert _last(lines, err)["path"] == "store"
    assert _sha(dest / "f.bin") == _sha(source)


@pytest.mark.slow
@pytest.mark.parametrize("damaged", ["chunk", "digests"])
def test_a_corrupted_stored_object_fails_clearly(
    cli: Cli, tmp_path: Path, s3_server: S3Server, damaged: str
) -> None:
    """One bit flipped in the bucket (its owner's doing, or its disk's).

    In a chunk: the chunk does not open, so it is refused like a chunk that fails its digest
    (not written, not journaled) and fetched again; it never opens, and after the session's
    retries (8) the receiver gives up, saying why, and keeps nothing. In the digests object:
    it does not open, and the receiver fails at once, saying so.
    """
    size = 3 * MiB
    source = _source(tmp_path / "f.bin", size)
    sender, offered = _store_send(cli, source)
    rc, _, err = sender.finish(60)
    assert rc == 0, err
    client = s3_server.client()
    key = f"ferry/{offered['session'].removeprefix('sessions/')}/0"
    if damaged == "digests":
        key += ".digests"
        at = 12 + 32 + 5  # inside the digest of chunk 1, sealed
    else:
        at = (MiB + SEALED) + 12 + 5  # inside chunk 1's ciphertext (after its nonce)
    body = bytearray(client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read())
    body[at] ^= 0x01
    client.put_object(Bucket=s3_server.bucket, Key=key, Body=bytes(body))
    dest = tmp_path / "dest"
    rc, lines, err = _receive(cli, offered["code"], dest).finish(60)
    assert rc == 1
    failed = _last(lines, err)
    assert failed["event"] == "failed"
    if damaged == "digests":
        assert (
            "the stored digests of file 0 do not open with this transfer's key" in (failed["error"])
        )
    else:
        refused = re.search(
            r"(\d+) chunks from the object store did not open with this transfer's key",
            failed["error"],
        )
        assert refused is not None, failed["error"]
        assert int(refused[1]) > 1  # fetched again, refused again
        assert "giving up" in failed["error"]
    assert not (dest / "f.bin").exists()
    assert not list(dest.glob(".*ferry-part"))


def _journaled_chunks(journal: Path) -> set[int]:
    """The chunk indexes (file 0) the receiver's journal records as verified and written."""
    data = journal.read_bytes()
    out = set()
    for at in range(RECORD_SIZE, len(data) - RECORD_SIZE + 1, RECORD_SIZE):
        record = data[at : at + RECORD_SIZE]
        if zlib.crc32(record[:-4]) != int.from_bytes(record[-4:], "big"):
            break
        if record[0] == RecordKind.CHUNK:
            out.add(int.from_bytes(record[5:13], "big"))
    return out


@pytest.mark.slow
def test_a_transfer_started_direct_finishes_through_the_store(
    cli: Cli, tmp_path: Path, s3_server: S3Server
) -> None:
    """Direct first, then the sender dies and comes back with --via store: path "mixed".

    The receiver (--via auto) stays up throughout: the direct connection drops, its next
    attempt cannot connect (the sender now only uploads), so at the deadline it switches to
    the store. That it fetches only what its journal lacks is shown by damaging, in the stored
    object, every chunk it had verified directly (one bit of each sealed chunk): fetching one of
    them again would not open, so a verified file means no verified chunk moved twice.
    """
    size, chunk = 96 * MiB, 256 * 1024
    source = _source(tmp_path / "big.bin", size)
    sender = cli.run("sender", "send", str(source), "--json", "--chunk-size", "256K")
    offered = sender.line()
    dest = tmp_path / "dest"
    receiver = _receive(cli, offered["code"], dest)  # --via auto
    deadline = time.monotonic() + 30
    while not any(p.stat().st_size > 2000 for p in dest.glob(".ferry-*.journal")):
        assert time.monotonic() < deadline, "nothing journaled in time"
        time.sleep(0.002)
    assert sender.proc is not None
    assert receiver.proc is not None
    sender.proc.send_signal(signal.SIGKILL)
    sender.proc.wait(10)
    receiver.proc.send_signal(signal.SIGSTOP)  # until the store holds the damaged copy
    try:
        direct = _journaled_chunks(next(dest.glob(".ferry-*.journal")))
        assert 0 < len(direct) < size // chunk, "the direct path moved none or all of it"

        again, resumed = _store_send(cli, source)  # the same offer, now uploaded
        assert resumed["event"] == "resumed"
        assert resumed["session"] == offered["session"]
        rc, lines, err = again.finish(60)
        assert rc == 0, err
        assert _last(lines, err)["event"] == "stored"

        client, bucket = s3_server.client(), s3_server.bucket
        key = f"ferry/{offered['session'].removeprefix('sessions/')}/0"
        body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
        assert len(body) == size + SEALED * (size // chunk)
        for index in direct:
            body[index * (chunk + SEALED) + 12 + 7] ^= 0x01  # in its ciphertext
        client.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    finally:
        receiver.proc.send_signal(signal.SIGCONT)

    rc, lines, err = receiver.finish(60)
    assert rc == 0, err
    done = _last(lines, err)
    assert done["event"] == "completed"
    assert done["path"] == "mixed"
    assert done["bytes_resumed"] == 0  # one receiver run, from the start
    assert done["bytes_transferred"] + done["bytes_resumed"] == size
    assert done["chunks_retried"] == 0
    assert _sha(dest / "big.bin") == _sha(source)
    assert sorted(p.name for p in dest.iterdir()) == ["big.bin"]


def _under(s3: S3Server, prefix: str) -> list[str]:
    """Every object and unfinished multipart upload whose key starts with ``prefix``."""
    client = s3.client()
    objects = client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix).get("Contents", [])
    uploads = (
        client.list_multipart_uploads(Bucket=s3.bucket, Prefix=prefix).get("Uploads", [])
        if _lists_uploads(s3)
        else []  # s3rver: an unfinished upload can be neither listed nor aborted
    )
    return [o["Key"] for o in objects] + [f"upload {u['Key']}" for u in uploads]


TTL = 5


@pytest.mark.slow
def test_an_offer_nobody_takes_expires_and_the_store_is_emptied(
    cli: Cli, tmp_path: Path, s3_server: S3Server
) -> None:
    """`send --via store --ttl 5`, and no receiver: at expiry the broker deletes the stored
    objects (a completed upload) and aborts the multipart upload (one killed halfway).

    5 s, not less: the small file's whole store-and-forward (offer, key confirmation, sealed
    upload) must end before its URLs expire with the session, on a loaded CI machine too."""
    small = _source(tmp_path / "small.bin", 3 * MiB + 1)
    big = _source(tmp_path / "big.bin", 96 * MiB)
    stored = cli.run("sender-a", "send", str(small), "--json", "--via", "store", "--ttl", str(TTL))
    halfway = cli.run("sender-b", "send", str(big), "--json", "--via", "store", "--ttl", str(TTL))
    prefixes = [
        f"ferry/{proc.line()['session'].removeprefix('sessions/')}/" for proc in (stored, halfway)
    ]
    started = time.monotonic()
    while _lists_uploads(s3_server) and _parts_stored(s3_server, prefixes[1]) < 1:
        assert time.monotonic() < started + TTL, "no part of the big file stored before expiry"
        time.sleep(0.01)
    assert halfway.proc is not None
    halfway.proc.send_signal(signal.SIGKILL)
    halfway.proc.wait(10)
    rc, lines, err = stored.finish(10)
    assert rc == 0, err
    assert _last(lines, err)["event"] == "stored"
    assert sorted(_under(s3_server, prefixes[0])) == [f"{prefixes[0]}0", f"{prefixes[0]}0.digests"]

    # Expiry at 5 s, sweeps every 0.2 s: both prefixes are empty well within 10 s of now.
    deadline = time.monotonic() + TTL + 10
    while left := _under(s3_server, prefixes[0]) + _under(s3_server, prefixes[1]):
        assert time.monotonic() < deadline, f"still in the bucket after expiry: {left}"
        time.sleep(0.1)
