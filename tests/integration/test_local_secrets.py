"""Secrets stay secret on the machine: the code need not be on argv (other local users read
processes' arguments), and what the CLI keeps (code, PAKE state, key) is private."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ferry.protocol.pake import Code
from tests.conftest import FerryFactory
from tests.support.files import random_file, sha256
from tests.support.processes import BrokerProcess, FerryProcess

pytestmark = [pytest.mark.timeout(120)]


def _env(tmp_path: Path, broker: BrokerProcess, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "FERRY_BROKER": broker.address,
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def _cmdline(proc: FerryProcess) -> bytes:
    assert proc.proc is not None
    return Path(f"/proc/{proc.proc.pid}/cmdline").read_bytes()


@pytest.mark.parametrize("how", ["env", "stdin"])
def test_the_code_can_stay_off_the_command_line(
    ferry: FerryFactory, broker: BrokerProcess, tmp_path: Path, how: str
) -> None:
    source = random_file(tmp_path / "src" / "a.bin", 64 << 10)
    dest = tmp_path / "dest"
    sender = ferry("send", str(source), "--json")
    code = sender.line()["code"]
    extra = {"FERRY_CODE": code} if how == "env" else {}
    receiver = FerryProcess(
        ["receive", "--dest", str(dest), "--yes", "--json"],
        _env(tmp_path, broker, **extra),
        tmp_path,
    ).start()
    if how == "stdin":
        receiver.answer(code)
    assert Code.parse(code).password.encode() not in _cmdline(receiver)
    rc, lines, err = receiver.finish(60)
    assert rc == 0, err
    assert lines[-1]["event"] == "completed"
    assert sha256(dest / "a.bin") == sha256(source)
    assert sender.finish(60)[0] == 0


def test_a_mistyped_code_is_told_before_anything_is_sent(
    broker: BrokerProcess, tmp_path: Path
) -> None:
    receiver = FerryProcess(
        ["receive", "7-orbit-lantern", "--dest", str(tmp_path / "d"), "--json"],
        _env(tmp_path, broker),
        tmp_path,
    ).start()
    rc, lines, _ = receiver.finish(30)
    assert rc == 1
    assert "not a Ferry code" in lines[-1]["error"]


def test_what_the_cli_keeps_is_private(ferry: FerryFactory, tmp_path: Path) -> None:
    source = random_file(tmp_path / "src" / "a.bin", 64 << 10)
    sender = ferry("send", str(source), "--json")
    code = sender.line()["code"]
    state = tmp_path / "state" / "ferry"
    saved = (state / "sessions.json").read_text()
    assert code in saved  # secrets, both: hence the modes below
    assert "pake_state" in saved
    assert stat.S_IMODE((state / "sessions.json").stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    sender.kill()
