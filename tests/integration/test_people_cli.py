"""People end to end, with real processes on loopback: a `ferry serve` broker, two users,
three devices (alice has two, bob one), each device a `ferry` CLI with a config and state
directory of its own; the library against the same kind of broker.

Users and enrollment tokens are made in the broker's own database (the operator's
`ferry.broker.people.SqliteDirectory`, what `ferry admin` runs on).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from ferry.broker.people import SqliteDirectory, User, enrollment_token_hash
from ferry.broker.store import SessionRecord, SqliteStore
from ferry.client import BrokerError, Client, Device, OfferReplayed, TransferResult
from ferry.protocol.identity import EnvelopeError
from ferry.protocol.pake import SessionKey
from ferry.protocol.sealing import Sealer, SealError
from ferry.v1 import broker_pb2
from tests.conftest import BrokerFactory
from tests.support.files import random_file, sha256
from tests.support.processes import BrokerProcess, FerryProcess
from tests.support.s3 import S3Server

pytestmark = [pytest.mark.timeout(120)]


class People:
    """The operator's directory of one broker, and the devices (CLI homes) of this test."""

    def __init__(self, root: Path, broker: BrokerProcess) -> None:
        self.root = root
        self.broker = broker
        self.started: list[FerryProcess] = []

    def _directory(self, work: Any) -> Any:
        async def run() -> Any:
            directory = SqliteDirectory.open(self.broker.data_dir / "broker.sqlite3")
            try:
                return await work(directory)
            finally:
                await directory.close()

        return asyncio.run(run())

    def enrollment(self, user: str) -> str:
        """A new one-time enrollment token for ``user`` (made if new)."""
        token = f"enroll-{user}-{time.monotonic_ns()}-{os.urandom(8).hex()}"

        async def work(directory: SqliteDirectory) -> None:
            if await directory.get_user(user) is None:
                await directory.add_user(User(user, "default", time.time()))
            await directory.add_enrollment(enrollment_token_hash(token), user, time.time() + 600)

        self._directory(work)
        return token

    def revoke(self, device_id: str) -> None:
        async def work(directory: SqliteDirectory) -> None:
            assert await directory.revoke_device(device_id, time.time()) is not None

        self._directory(work)

    def env(self, who: str) -> dict[str, str]:
        return {
            **os.environ,
            "FERRY_BROKER": self.broker.address,
            "XDG_CONFIG_HOME": str(self.root / who / "config"),
            "XDG_STATE_HOME": str(self.root / who / "state"),
            "PYTHONUNBUFFERED": "1",
        }

    def run(self, who: str, *args: str, **env: str) -> FerryProcess:
        (self.root / who).mkdir(parents=True, exist_ok=True)
        proc = FerryProcess(list(args), {**self.env(who), **env}, self.root / who)
        self.started.append(proc)
        return proc.start()

    def login(self, who: str, user: str) -> dict[str, Any]:
        token = self.enrollment(user)
        proc = self.run(who, "login", "--name", who, "--json", FERRY_ENROLLMENT_TOKEN=token)
        rc, lines, err = proc.finish(60)
        assert rc == 0, err
        assert lines[-1]["event"] == "logged_in"
        assert lines[-1]["user"] == user
        return lines[-1]


@pytest.fixture
def people(tmp_path: Path, broker: BrokerProcess) -> Iterator[People]:
    found = People(tmp_path / "homes", broker)
    yield found
    for proc in found.started:
        proc.kill()


def _until(proc: FerryProcess, event: str, timeout: float = 60) -> dict[str, Any]:
    """The next JSON line of ``proc`` whose event is ``event`` (others skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        line = proc.line(max(deadline - time.monotonic(), 0.1))
        if line["event"] == event:
            return line


def _wait_online(people: People, who: str, user: str, devices: int) -> None:
    """Until ``devices`` of ``user``'s devices are online, as ``who`` sees it (bounded)."""
    for _ in range(100):
        rc, lines, err = people.run(who, "peers", "--json").finish(30)
        assert rc == 0, err
        peer = next(p for p in lines if p["event"] == "peer" and p["user"] == user)
        if sum(d["online"] for d in peer["devices"]) >= devices:
            return
        time.sleep(0.2)
    raise AssertionError(f"{user}'s {devices} devices never came online")


def test_login_peers_and_pins(people: People) -> None:
    a1 = people.login("alice-laptop", "alice")
    people.login("bob-desk", "bob")
    rc, lines, err = people.run("bob-desk", "peers", "--json").finish(30)
    assert rc == 0, err
    peers = {p["user"]: p for p in lines if p["event"] == "peer"}
    assert peers["alice"]["devices"][0]["fingerprint"] == a1["fingerprint"]
    assert [p["device_id"] for p in lines if p["event"] == "new_device"] == [a1["device_id"]]
    # The device file holds the private keys: owner only.
    config = people.root / "alice-laptop" / "config" / "ferry"
    (device_file,) = (config / "devices").iterdir()
    assert device_file.stat().st_mode & 0o777 == 0o600
    assert (config / "devices").stat().st_mode & 0o777 == 0o700
    # Seen again: nothing new to tell.
    rc, lines, err = people.run("bob-desk", "peers", "--json").finish(30)
    assert rc == 0, err
    assert not [p for p in lines if p["event"] == "new_device"]


def test_an_offer_reaches_both_devices_one_takes_it_the_other_sees_it_gone(
    people: People, tmp_path: Path
) -> None:
    people.login("alice-laptop", "alice")
    phone = people.login("alice-phone", "alice")
    people.login("bob-desk", "bob")
    laptop_watch = people.run(
        "alice-laptop", "receive", "--watch", "--dest", str(tmp_path / "laptop"), "--json"
    )
    phone_watch = people.run(
        "alice-phone", "receive", "--watch", "--dest", str(tmp_path / "phone"), "--json"
    )
    _wait_online(people, "bob-desk", "alice", 2)
    source = random_file(tmp_path / "src" / "report.bin", 3 << 20)
    sender = people.run("bob-desk", "send", str(source), "--to", "alice", "--json")
    offered = _until(sender, "offered")
    assert offered["devices"] == 2
    assert offered["online"] is True
    # Both devices are told; the phone says yes first.
    seen_laptop = _until(laptop_watch, "offer")
    assert seen_laptop["session"] == offered["session"]
    assert seen_laptop["from"] == "bob"
    assert _until(phone_watch, "offer")["session"] == offered["session"]
    phone_watch.answer("y")
    done = _until(phone_watch, "completed")
    assert done["bytes"] == 3 << 20
    assert sha256(tmp_path / "phone" / "report.bin") == sha256(source)
    # The laptop, still asking, hears that the phone took it: the question is withdrawn,
    # and a yes typed late is not taken for the next offer's question.
    gone = _until(laptop_watch, "gone")
    assert gone["session"] == offered["session"]
    assert gone["taken_by"] == phone["device_id"]
    assert gone["taken_here"] is False
    rc, lines, err = sender.finish(60)
    assert rc == 0, err
    assert lines[-1]["event"] == "completed"
    laptop_watch.answer("y")  # too late: nothing is asked now
    time.sleep(0.5)
    second = people.run("bob-desk", "send", str(source), "--to", "alice", "--json")
    offered_again = _until(second, "offered")
    assert _until(laptop_watch, "offer")["session"] == offered_again["session"]
    laptop_watch.answer("n")
    assert laptop_watch.line()["event"] == "skipped"  # the n, not the stale y
    assert not (tmp_path / "laptop" / "report.bin").exists()
    second.kill()


def test_bob_cannot_take_an_offer_made_to_alice(people: People, tmp_path: Path) -> None:
    people.login("alice-laptop", "alice")
    people.login("bob-desk", "bob")
    people.login("carol-pc", "carol")
    source = random_file(tmp_path / "src" / "a.bin", 1000)
    sender = people.run("carol-pc", "send", str(source), "--to", "alice", "--json")
    offered = _until(sender, "offered")
    offer_id = offered["session"].removeprefix("sessions/")
    # bob's inbox does not show it, and bob cannot take it by its id either.
    rc, lines, err = people.run("bob-desk", "inbox", "--json").finish(30)
    assert rc == 0, err
    assert lines == []
    rc, _, err = people.run("bob-desk", "receive", offer_id, "--yes", "--json").finish(30)
    assert rc == 1
    assert "not_found" in err.lower() or "no offer" in err.lower()
    # alice's inbox does show it, with its sender.
    rc, lines, err = people.run("alice-laptop", "inbox", "--json").finish(30)
    assert rc == 0, err
    assert [(o["id"], o["from"]) for o in lines] == [(offer_id, "carol")]


def test_a_revoked_device_gets_one_line_errors(people: People, tmp_path: Path) -> None:
    bob = people.login("bob-desk", "bob")
    people.login("alice-laptop", "alice")
    people.revoke(bob["device_id"])
    source = random_file(tmp_path / "src" / "a.bin", 1000)
    for args in (
        ["login"],
        ["inbox"],
        ["peers"],
        ["send", str(source), "--to", "alice"],
    ):
        rc, _, err = people.run("bob-desk", *args).finish(30)
        assert rc == 1, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1, (args, err)
        assert "revoked by the broker's operator" in lines[0]


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[S3Server]:
    server = S3Server(tmp_path / "moto.log", kind="moto").start()
    yield server
    server.stop()


def test_an_offline_recipient_gets_a_stored_offer_sealed_to_her_devices(
    s3: S3Server, broker_factory: BrokerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    broker = broker_factory(*s3.broker_args(), "--connect-timeout", "1.5", name="s3data")
    for key in s3.env:
        monkeypatch.delenv(key)
    people = People(tmp_path / "homes", broker)
    try:
        people.login("alice-laptop", "alice")
        people.login("alice-phone", "alice")
        people.login("bob-desk", "bob")
        marker = b"PLAINTEXT-MARKER-" * 4096
        source = tmp_path / "src" / "letter.txt"
        source.parent.mkdir()
        source.write_bytes(marker)
        rc, lines, err = people.run(
            "bob-desk", "send", str(source), "--to", "alice", "--json"
        ).finish(90)
        assert rc == 0, err
        offered = next(line for line in lines if line["event"] == "offered")
        assert offered["online"] is False
        assert offered["via"] == "store"
        assert lines[-1]["event"] == "stored"
        # a person may be away for the day: the offer waits that long, not a code's 10 min
        expires = datetime.fromisoformat(lines[-1]["expire_time"].replace("Z", "+00:00"))
        assert expires.timestamp() > time.time() + 23 * 3600
        # What the bucket holds neither shows the text nor opens without alice's device key.
        bucket = s3.client()
        keys = [o["Key"] for o in bucket.list_objects_v2(Bucket=s3.bucket)["Contents"]]
        assert keys
        bodies = {key: bucket.get_object(Bucket=s3.bucket, Key=key)["Body"].read() for key in keys}
        for body in bodies.values():
            assert b"PLAINTEXT-MARKER" not in body
        # The key is in the broker's database only sealed to alice's devices: each of her
        # devices opens its envelope, and the object's first chunk with it; bob's device key
        # (or anything else the broker holds) opens no envelope.
        session = _stored_session(broker)
        (data_key,) = [k for k in keys if not k.endswith(".digests")]
        chunk = Sealer(SessionKey(b"\0" * 32).store_key, session.name)  # a wrong key
        with pytest.raises(SealError):
            chunk.open_chunk(0, 0, 1, bodies[data_key])
        envelopes = {e.device_id: e.sealed_key for e in session.person.key_envelopes}
        for who in ("alice-laptop", "alice-phone", "bob-desk"):
            device = _device(people, who, monkeypatch)
            if who.startswith("alice"):
                opened_key = SessionKey(device.keys.open_key(envelopes[device.device_id]))
                sealer = Sealer(opened_key.store_key, session.name)
                opened = sealer.open_chunk(0, 0, 1, bodies[data_key])
                assert opened == marker
            else:
                for sealed in envelopes.values():
                    with pytest.raises(EnvelopeError):
                        device.keys.open_key(sealed)
        # alice signs in later and gets it from the store.
        dest = tmp_path / "alice-in"
        rc, lines, err = people.run(
            "alice-phone", "receive", "--from", "bob", "--dest", str(dest), "--yes", "--json"
        ).finish(90)
        assert rc == 0, err
        assert lines[-1]["event"] == "completed"
        assert lines[-1]["path"] == "store"
        assert (dest / "letter.txt").read_bytes() == marker
    finally:
        for proc in people.started:
            proc.kill()


def _stored_session(broker: BrokerProcess) -> broker_pb2.Session:
    """The only person offer in the broker's database, as its operator could read it."""
    with sqlite3.connect(broker.data_dir / "broker.sqlite3") as db:
        (data,) = db.execute("SELECT data FROM sessions WHERE recipient = 'alice'").fetchone()
    return broker_pb2.Session.FromString(data)


def _device(people: People, who: str, monkeypatch: pytest.MonkeyPatch) -> Device:
    """The device (with its private keys) that ``who``'s CLI enrolled."""
    monkeypatch.setenv("XDG_CONFIG_HOME", people.env(who)["XDG_CONFIG_HOME"])
    (device,) = Device.all()
    return device


def test_the_library_login_peers_inbox_offer_take(
    broker: BrokerProcess, people: People, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice_token = people.enrollment("alice")
    bob_token = people.enrollment("bob")
    source = random_file(tmp_path / "src" / "lib.bin", 1 << 20)

    async def run() -> tuple[TransferResult, TransferResult]:
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "alice-lib"))
        alice = Client(broker.address)
        alice_device = await alice.login(alice_token, "lib-laptop")
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "bob-lib"))
        bob = Client(broker.address)
        await bob.login(bob_token, "lib-desk")
        updates = alice.inbox(60)
        first = await anext(updates)
        assert first.offers == []
        peers = {p.user: p for p in await bob.peers()}
        assert [d.device_id for d in peers["alice"].devices] == [alice_device.device_id]
        outgoing = await bob.offer([source], to="alice")
        assert outgoing.code == ""
        update = await anext(updates)
        (offer,) = update.offers
        assert (offer.name, offer.sender_user) == (outgoing.name, "bob")
        await updates.aclose()
        # bob cannot take his own offer to alice.
        with pytest.raises(BrokerError) as refused:
            await bob.take(outgoing.name)
        assert refused.value.reason == "OFFER_NOT_FOUND"
        incoming = await alice.take(offer.name)
        try:
            done = await asyncio.gather(outgoing.transfer(), incoming.accept(tmp_path / "lib-in"))
        finally:
            await incoming.close()
            await outgoing.close()
        # A broker that shows bob's signed offer again, as a new session, is caught: alice's
        # machine took that signature already.
        replayed = await _replay(broker, offer.name)
        assert replayed in {o.name for o in await alice.list_inbox()}
        with pytest.raises(OfferReplayed, match="taken here before"):
            await alice.take(replayed)
        return done

    sent, received = asyncio.run(run())
    assert sent.files[0].digest == received.files[0].digest
    assert sha256(tmp_path / "lib-in" / "lib.bin") == sha256(source)


async def _replay(broker: BrokerProcess, name: str) -> str:
    """What a broker's operator could do: store a person offer again as a new session,
    offered and untaken, its sender's signature and envelopes as they were; its name."""
    store = SqliteStore(broker.data_dir / "broker.sqlite3")
    try:
        original = await store.get_session(name.removeprefix("sessions/"))
        assert original is not None
        session = broker_pb2.Session()
        session.CopyFrom(original.session)
        session.name = f"sessions/{os.urandom(16).hex()}"
        session.state = broker_pb2.Session.STATE_OFFERED
        session.claimed = False
        session.person.receiver_device_id = ""
        session.ClearField("receiver")
        session.ClearField("plan")
        session.expire_time.FromSeconds(int(time.time()) + 600)
        await store.create_session(
            SessionRecord(session=session, sender_token_hash=os.urandom(16).hex())
        )
    finally:
        await store.close()
    return session.name


def test_codes_between_signed_in_devices_when_anonymous_use_is_off(
    broker_factory: BrokerFactory, tmp_path: Path
) -> None:
    """`--anonymous off`: a machine with no device gets a one-line error for a code; two
    enrolled devices still send and receive with one (the CLI signs the code in)."""
    broker = broker_factory("--anonymous", "off", name="closed")
    people = People(tmp_path / "homes", broker)
    try:
        people.login("alice-laptop", "alice")
        people.login("bob-desk", "bob")
        source = random_file(tmp_path / "src" / "code.bin", 200_000)
        rc, _, err = people.run("stranger", "send", str(source), "--json").finish(60)
        assert rc == 1
        assert "signed-in devices only" in err
        assert len(err.strip().splitlines()) == 1
        sender = people.run("bob-desk", "send", str(source), "--json")
        code = _until(sender, "offered")["code"]
        dest = tmp_path / "alice-in"
        rc, _, err = people.run(
            "alice-laptop", "receive", code, "--dest", str(dest), "--yes", "--json"
        ).finish(60)
        assert rc == 0, err
        assert sha256(dest / "code.bin") == sha256(source)
        rc, lines, err = sender.finish(60)
        assert rc == 0, err
        assert lines[-1]["event"] == "completed"
    finally:
        for proc in people.started:
            proc.kill()
