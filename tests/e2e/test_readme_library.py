"""The README's library example, run as written against a real broker process."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import Any

import pytest

from ferry.client import Client
from tests.support.people import add_user, enrollment, sqlite_directory
from tests.support.processes import BrokerProcess

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio]

README = Path(__file__).resolve().parents[2] / "README.md"


def _example(index: int = 0) -> str:
    """The README's Python examples: the library story, the in-process rehearsal, then
    offers to a person."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 3, "the README should have exactly three Python examples"
    return str(blocks[index])


async def test_readme_example_sends_and_receives(
    broker: BrokerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    code_text = _example().replace("127.0.0.1:50051", broker.address)
    namespace: dict[str, Any] = {}
    exec(compile(code_text, "README.md", "exec"), namespace)
    monkeypatch.chdir(tmp_path)
    Path("holiday.bin").write_bytes(os.urandom(3 << 20))
    Path("photos").mkdir()
    Path("photos/a.jpg").write_bytes(b"jpeg")

    sender = asyncio.create_task(namespace["send"]())
    code = ""
    for _ in range(200):  # the example prints the code; wait for it (bounded)
        match = re.search(r"code: (\S+)", capsys.readouterr().out)
        if match:
            code = match.group(1)
            break
        await asyncio.sleep(0.05)
    assert code
    await asyncio.wait_for(namespace["receive"](code), 60)
    await asyncio.wait_for(sender, 60)
    assert Path("inbox/holiday.bin").read_bytes() == Path("holiday.bin").read_bytes()
    assert Path("inbox/photos/a.jpg").read_bytes() == b"jpeg"
    out = capsys.readouterr().out
    assert "blake3-chunks" in out
    assert f"{(3 << 20) + 4} bytes in" in out


async def test_readme_in_process_example_runs_without_a_broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    namespace: dict[str, Any] = {}
    exec(compile(_example(1), "README.md", "exec"), namespace)
    monkeypatch.chdir(tmp_path)
    Path("report.pdf").write_bytes(os.urandom(1 << 20))
    assert await asyncio.wait_for(namespace["rehearse"](), 60) is True
    assert Path("inbox/report.pdf").read_bytes() == Path("report.pdf").read_bytes()


async def test_readme_people_example_sends_to_a_person(
    broker: BrokerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """alice's laptop logs in and watches its inbox; bob's desk (logged in before, in a
    config dir of its own) offers slides.pdf to alice; the laptop takes and receives it."""
    store, directory = sqlite_directory(broker.data_dir)
    for user in ("alice", "bob"):
        await add_user(directory, user)
    alice_token, bob_token = (
        await enrollment(directory, "alice"),
        await enrollment(directory, "bob"),
    )
    await store.close()
    code_text = _example(2).replace("127.0.0.1:50051", broker.address)
    namespace: dict[str, Any] = {}
    exec(compile(code_text, "README.md", "exec"), namespace)
    monkeypatch.chdir(tmp_path)
    Path("slides.pdf").write_bytes(os.urandom(1 << 20))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "alice-laptop"))
    laptop = asyncio.create_task(namespace["alice_laptop"](alice_token))
    for _ in range(200):  # until the laptop's device is saved (bounded)
        if (tmp_path / "alice-laptop" / "ferry" / "devices").exists():
            break
        await asyncio.sleep(0.05)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "bob-desk"))
    desk = Client(broker.address)
    bob = await desk.login(bob_token, "desk")
    for _ in range(200):  # until the laptop's inbox stream is open (bounded)
        if any(peer.online for peer in await desk.peers() if peer.user == "alice"):
            break
        await asyncio.sleep(0.05)
    await asyncio.wait_for(namespace["bob_desk"](bob.broker_id), 60)
    await asyncio.wait_for(laptop, 60)
    assert Path("in/slides.pdf").read_bytes() == Path("slides.pdf").read_bytes()
    out = capsys.readouterr().out
    assert "('alice', True)" in out  # the laptop's inbox stream made alice online
    assert f"received {1 << 20} bytes from bob" in out
