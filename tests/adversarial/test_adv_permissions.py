"""Finding 13: the receiver, not the sender, decides a received file's permissions.

A file offered as 0777 used to arrive world-writable even under the receiver's umask 077:
the receiver applied the offered mode as it was. Now it applies the offered permission
bits less its own umask, as ``cp`` does for a new file (`ferry.client._sink.received_mode`):
never set-user-id, set-group-id or sticky, never executable unless it was offered so, and
always readable by its owner. Folders it creates follow the umask too.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

import tests.support.hostile as hostile_module
from ferry.client._sink import process_umask, received_mode
from ferry.v1 import broker_pb2
from tests.conftest import FerryFactory
from tests.support.hostile import HostileFile, HostileSender, Mode
from tests.support.processes import BrokerProcess, FerryProcess

pytestmark = [pytest.mark.timeout(90)]

#: name -> (mode on the sender's disk, expected under umask 077, expected under umask 022)
FILES = {
    "open.bin": (0o777, 0o700, 0o755),
    "run.sh": (0o755, 0o700, 0o755),
    "plain.txt": (0o644, 0o600, 0o644),
    "private.txt": (0o600, 0o600, 0o600),
    "readonly.txt": (0o444, 0o400, 0o444),
    "setid.bin": (0o6755, 0o700, 0o755),  # the sender's own set-id bits never travel
}


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """Run what starts inside (a child process inherits it) under ``mask``."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _receive(ferry: FerryFactory, code: str, dest: Path, mask: int) -> FerryProcess:
    with umask(mask):
        return ferry("receive", code, "--dest", str(dest), "--yes", "--json")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o077, 0o022])
def test_the_receivers_umask_decides(ferry: FerryFactory, tmp_path: Path, mask: int) -> None:
    src = tmp_path / "src" / "tree"
    (src / "sub").mkdir(parents=True)
    for name, (mode, _, _) in FILES.items():
        path = src / "sub" / name
        path.write_bytes(name.encode())
        path.chmod(mode)
    sender = ferry("send", str(src), "--json")
    offered = sender.line()
    assert offered["event"] == "offered", offered
    dest = tmp_path / "dest"
    rc, _, err = _receive(ferry, offered["code"], dest, mask).finish(60)
    assert rc == 0, err
    assert sender.finish(30)[0] == 0
    column = 1 if mask == 0o077 else 2
    got = {name: _mode(dest / "tree" / "sub" / name) for name in FILES}
    want = {name: modes[column] for name, modes in FILES.items()}
    assert got == want, {n: (oct(got[n]), oct(want[n])) for n in FILES}
    # The folders it made: the umask's too (0700 under 077).
    assert _mode(dest / "tree" / "sub") == 0o777 & ~mask


def test_a_hostile_mode_is_not_obeyed(
    ferry: FerryFactory, broker: BrokerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hostile sender offers set-id, sticky and world-writable bits, and no mode at all."""
    modes = {"suid.bin": 0o7777, "none.bin": 0, "odd.bin": 0o202}
    plain = hostile_module.offer_request

    def offer_request(*args: object, **kwargs: object) -> broker_pb2.CreateOfferRequest:
        request = plain(*args, **kwargs)  # type: ignore[arg-type]
        for entry in request.manifest.files:
            entry.mode = modes[entry.path]
        return request

    monkeypatch.setattr(hostile_module, "offer_request", offer_request)
    files = [HostileFile(name, name.encode()) for name in modes]
    dest = tmp_path / "dest"
    with HostileSender(broker.address, Mode.HONEST, files) as hostile:
        rc, _, err = _receive(ferry, hostile.code, dest, 0o022).finish(60)
    assert rc == 0, err
    got = {name: _mode(dest / name) for name in modes}
    # No set-id or sticky bit, no write for others; an unset mode is 0644; the owner reads.
    assert got == {"suid.bin": 0o755, "none.bin": 0o644, "odd.bin": 0o600}, {
        n: oct(m) for n, m in got.items()
    }


@pytest.mark.parametrize(
    ("offered", "mask", "mode"),
    [
        (0o777, 0o077, 0o700),
        (0o4755, 0o022, 0o755),  # no set-user-id
        (0o2775, 0o002, 0o775),  # no set-group-id
        (0o1777, 0o022, 0o755),  # no sticky bit
        (0o644, 0o022, 0o644),  # never executable unless offered so
        (0o000, 0o022, 0o644),  # no mode offered
        (0o222, 0o022, 0o600),  # the owner can always read it
    ],
)
def test_received_mode(offered: int, mask: int, mode: int) -> None:
    assert received_mode(offered, mask) == mode


def test_the_umask_is_read_without_changing_it() -> None:
    with umask(0o027):
        assert process_umask() == 0o027
        assert os.umask(0o027) == 0o027  # still what it was
