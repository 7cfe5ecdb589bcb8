"""ferry.client.testing: a whole transfer through the in-process broker, no broker process.

The double is the real broker behind the real servicer, so what a program sees through it
(results, `BrokerError` codes and reasons, `Declined`) is what a broker process gives.
The two sides still meet over TCP on loopback (tests/conftest.py sets FERRY_ADDRESSES).
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from ferry.client import BrokerError, Client, Declined, TransferResult
from ferry.client.testing import InProcessBroker

pytestmark = pytest.mark.timeout(60)

README = Path(__file__).resolve().parents[3] / "README.md"


def _no_broker_process() -> None:
    for child in psutil.Process().children(recursive=True):
        try:
            assert "ferry.broker" not in " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.asyncio
async def test_a_whole_transfer_with_no_broker_process(tmp_path: Path) -> None:
    source = tmp_path / "out"
    (source / "photos").mkdir(parents=True)
    (source / "big.bin").write_bytes(os.urandom(3 << 20))
    (source / "photos" / "a.jpg").write_bytes(b"jpeg")
    (source / "empty.txt").write_bytes(b"")
    async with InProcessBroker() as broker:
        sender = broker.client()
        outgoing = await sender.offer([source / "big.bin", source / "photos", source / "empty.txt"])
        sending = asyncio.create_task(outgoing.transfer())
        incoming = await broker.client().claim(outgoing.code)
        try:
            assert sorted(f.path for f in incoming.files) == [
                "big.bin",
                "empty.txt",
                "photos/a.jpg",
            ]
            received = await incoming.accept(tmp_path / "inbox")
            sent = await asyncio.wait_for(sending, 30)
        finally:
            await outgoing.close()
            await incoming.close()
        _no_broker_process()
        assert isinstance(received, TransferResult)
        assert received.bytes == sent.bytes == (3 << 20) + 4
        assert [f.digest for f in received.files] == [f.digest for f in sent.files]
        assert _files(tmp_path / "inbox") == _files(source)
        session = await sender.session(outgoing.name, outgoing.token)
        assert session.state == session.STATE_COMPLETED


@pytest.mark.asyncio
async def test_a_wrong_code_is_the_brokers_own_refusal() -> None:
    async with InProcessBroker() as broker:
        with pytest.raises(BrokerError) as caught:
            await broker.client().claim("7-orbit-lantern-quiet")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert caught.value.reason == "CODE_NOT_FOUND"
    assert not caught.value.unreachable
    assert str(caught.value) == "code: no offer has this code"


@pytest.mark.asyncio
async def test_a_bad_token_is_refused_with_its_reason(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"a")
    async with InProcessBroker() as broker:
        client = broker.client()
        outgoing = await client.offer([tmp_path / "a.txt"])
        try:
            with pytest.raises(BrokerError) as caught:
                await client.session(outgoing.name, "not-a-token")
        finally:
            await outgoing.close()
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.reason == "TOKEN_INVALID"


@pytest.mark.asyncio
async def test_declining_raises_declined_on_the_sender(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"a")
    async with InProcessBroker() as broker:
        outgoing = await broker.client().offer([tmp_path / "a.txt"])
        sending = asyncio.create_task(outgoing.transfer())
        incoming = await broker.client().claim(outgoing.code)
        try:
            await incoming.decline("no thanks")
            with pytest.raises(Declined, match="no thanks"):
                await asyncio.wait_for(sending, 30)
        finally:
            await outgoing.close()
            await incoming.close()


@pytest.mark.asyncio
async def test_the_readme_example_runs_against_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 3  # the library story, the in-process rehearsal, people
    code_text, made = re.subn(r'Client\("127\.0\.0\.1:50051"\)', "Client(broker)", blocks[0])
    assert made == 2  # only the construction of the clients changes
    monkeypatch.chdir(tmp_path)
    Path("holiday.bin").write_bytes(os.urandom(1 << 20))
    Path("photos").mkdir()
    Path("photos/a.jpg").write_bytes(b"jpeg")
    async with InProcessBroker() as broker:
        namespace: dict[str, Any] = {"broker": broker}
        exec(compile(code_text, "README.md", "exec"), namespace)
        sender = asyncio.create_task(namespace["send"]())
        code = ""
        for _ in range(200):  # the example prints the code; wait for it (bounded)
            match = re.search(r"code: (\S+)", capsys.readouterr().out)
            if match:
                code = match.group(1)
                break
            await asyncio.sleep(0.05)
        assert code
        await asyncio.wait_for(namespace["receive"](code), 30)
        await asyncio.wait_for(sender, 30)
    assert Path("inbox/holiday.bin").read_bytes() == Path("holiday.bin").read_bytes()
    assert Path("inbox/photos/a.jpg").read_bytes() == b"jpeg"
    assert f"{(1 << 20) + 4} bytes in" in capsys.readouterr().out


@pytest.mark.asyncio
async def test_the_client_names_its_broker() -> None:
    assert Client("broker.example:50051").broker == "broker.example:50051"
    async with InProcessBroker(address="test-broker") as broker:
        assert broker.client().broker == "test-broker"
        assert Client(broker).broker == "test-broker"


@pytest.mark.asyncio
async def test_a_watch_ends_at_its_deadline_and_when_the_broker_closes(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"a")
    broker = InProcessBroker()
    async with broker:
        outgoing = await broker.client().offer([tmp_path / "a.txt"])
        link = broker(timeout=1.0, patience=0.0, on_wait=None)
        link.token = outgoing.token
        seen: list[int] = []

        async def watch_briefly() -> None:
            async for session in link.watch(outgoing.name, 0.2):
                seen.append(session.state)

        with pytest.raises(BrokerError) as caught:
            await watch_briefly()
        assert seen == [outgoing.session.STATE_OFFERED]
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED

        async def watch_all() -> list[int]:
            return [s.state async for s in link.watch(outgoing.name, 30.0)]

        watching = asyncio.create_task(watch_all())
        await asyncio.sleep(0.1)
    assert await asyncio.wait_for(watching, 5) == [outgoing.session.STATE_OFFERED]
    assert broker.broker.hub.watcher_count() == 0
    await outgoing.close()
    await link.close()


@pytest.mark.asyncio
async def test_a_closed_broker_is_unreachable_and_waited_for_as_configured() -> None:
    async with InProcessBroker() as broker:
        pass
    heard: list[BrokerError] = []
    client = broker.client(broker_wait=0.5, on_broker_wait=heard.append)
    with pytest.raises(BrokerError) as gone:
        await client.broker_id()
    assert gone.value.unreachable
    assert gone.value.retried  # it kept trying for broker_wait seconds
    assert [e.code for e in heard] == [grpc.StatusCode.UNAVAILABLE]
    link = broker(timeout=1.0, patience=0.0, on_wait=None)
    with pytest.raises(BrokerError) as no_watch:
        await anext(link.watch("sessions/x", 1.0))
    assert no_watch.value.code == grpc.StatusCode.UNAVAILABLE
    await link.close()


def test_the_double_is_a_public_module_of_its_own() -> None:
    import ferry.client
    import ferry.client.testing

    assert ferry.client.testing.__all__ == ["InProcessBroker"]
    assert "InProcessBroker" not in ferry.client.__all__


@pytest.mark.asyncio
async def test_the_object_store_is_unavailable_as_on_a_broker_without_a_bucket(
    tmp_path: Path,
) -> None:
    (tmp_path / "a.txt").write_bytes(b"a")
    async with InProcessBroker() as broker:
        outgoing = await broker.client().offer([tmp_path / "a.txt"])
        link = broker(timeout=1.0, patience=0.0, on_wait=None)
        link.token = outgoing.token
        try:
            with pytest.raises(BrokerError) as caught:
                await link.start_store_upload(outgoing.name, 0)
        finally:
            await link.close()
            await outgoing.close()
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.reason == "STORE_UNAVAILABLE"
