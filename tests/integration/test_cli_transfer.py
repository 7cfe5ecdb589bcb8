"""End to end with real processes on loopback: `ferry serve` + `ferry send` + `ferry receive`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BrokerFactory, FerryFactory
from tests.support.files import random_file, sha256
from tests.support.processes import BrokerProcess, FerryProcess

pytestmark = [pytest.mark.timeout(180)]


def _tree(root: Path) -> dict[str, tuple[str, int]]:
    """Every regular file under root: relative path -> (sha256, permission bits)."""
    return {
        p.relative_to(root).as_posix(): (sha256(p), p.stat().st_mode & 0o777)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _offer(ferry: FerryFactory, *args: str) -> tuple[FerryProcess, dict[str, Any]]:
    sender = ferry("send", *args, "--json")
    first = sender.line()
    assert first["event"] == "offered"
    assert first["code"]
    return sender, first


def _last(lines: list[dict[str, Any]]) -> dict[str, Any]:
    assert lines, "no JSON line"
    return lines[-1]


def _leftovers(dest: Path) -> list[Path]:
    return [p for p in dest.rglob("*") if p.name.endswith(".ferry-part")]


@pytest.mark.slow
def test_large_file_arrives_verified(ferry: FerryFactory, tmp_path: Path) -> None:
    source = random_file(tmp_path / "src" / "big.bin", 200 << 20)
    dest = tmp_path / "dest"
    sender, offered = _offer(ferry, str(source))
    receiver = ferry("receive", offered["code"], "--dest", str(dest), "--yes", "--json")
    offer = receiver.line()
    assert offer["event"] == "offer"
    assert offer["files"] == [{"path": "big.bin", "size": 200 << 20}]
    rc, lines, err = receiver.finish()
    assert rc == 0, err
    done = _last(lines)
    assert done["event"] == "completed"
    assert done["bytes"] == done["bytes_transferred"] == 200 << 20
    assert done["path"] == "direct"
    assert done["seconds"] > 0
    src_rc, src_lines, src_err = sender.finish()
    assert src_rc == 0, src_err
    sent = _last(src_lines)
    assert sent["event"] == "completed"
    assert sent["bytes_transferred"] == 200 << 20
    # Both sides name the same whole-file digest, and `ferry digest` recomputes it.
    digest = done["files"][0]["digests"]["blake3-chunks"]
    assert sent["files"][0]["digests"]["blake3-chunks"] == digest
    printed = subprocess.run(
        [sys.executable, "-m", "ferry.cli", "digest", str(dest / "big.bin")],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert printed.split()[0] == digest
    assert sha256(dest / "big.bin") == sha256(source)
    assert _leftovers(dest) == []


def test_folder_keeps_relative_paths_and_modes(ferry: FerryFactory, tmp_path: Path) -> None:
    src = tmp_path / "src" / "album"
    random_file(src / "a.bin", 3 << 20)
    random_file(src / "deep" / "er" / "b.bin", 1234)
    random_file(src / "deep" / "c d é.txt", 10)
    (src / "empty.txt").write_bytes(b"")
    (src / "run.sh").write_bytes(b"#!/bin/sh\n")
    (src / "run.sh").chmod(0o755)
    single = random_file(tmp_path / "src" / "single.bin", 5)
    dest = tmp_path / "dest"
    sender, offered = _offer(ferry, str(src), str(single), "--chunk-size", "256K")
    assert offered["files"] == 6
    receiver = ferry("receive", offered["code"], "--dest", str(dest), "--yes", "--json")
    rc, lines, err = receiver.finish()
    assert rc == 0, err
    assert sender.finish()[0] == 0
    assert _tree(dest / "album") == _tree(src)
    assert sha256(dest / "single.bin") == sha256(single)
    assert (dest / "album" / "run.sh").stat().st_mode & 0o777 == 0o755
    paths = sorted(f["path"] for f in _last(lines)["files"])
    assert "album/deep/er/b.bin" in paths
    assert _leftovers(dest) == []


def test_decline_tells_the_sender(ferry: FerryFactory, tmp_path: Path) -> None:
    source = random_file(tmp_path / "f.bin", 1000)
    sender, offered = _offer(ferry, str(source))
    receiver = ferry("receive", offered["code"], "--dest", str(tmp_path / "d"), "--json")
    assert receiver.line()["event"] == "offer"
    receiver.answer("n")
    rc, lines, _ = receiver.finish(30)
    assert rc == 1
    assert _last(lines)["event"] == "declined"
    src_rc, src_lines, src_err = sender.finish(30)
    assert src_rc == 1
    assert _last(src_lines)["event"] == "failed"
    assert "declined" in _last(src_lines)["error"]
    assert src_err.strip().startswith("ferry: error:")
    assert not (tmp_path / "d" / "f.bin").exists()


def test_consent_on_stdin_yes(ferry: FerryFactory, tmp_path: Path) -> None:
    source = random_file(tmp_path / "f.bin", 70_000)
    sender, offered = _offer(ferry, str(source))
    receiver = ferry("receive", offered["code"], "--dest", str(tmp_path / "d"), "--json")
    assert receiver.line()["event"] == "offer"
    receiver.answer("y")
    assert receiver.finish(60)[0] == 0
    assert sender.finish(60)[0] == 0
    assert (tmp_path / "d" / "f.bin").read_bytes() == source.read_bytes()


def test_wrong_code_is_refused(ferry: FerryFactory, tmp_path: Path) -> None:
    receiver = ferry("receive", "1-no-such-code", "--dest", str(tmp_path / "d"), "--json")
    rc, lines, err = receiver.finish(30)
    assert rc == 1
    assert _last(lines)["event"] == "failed"
    assert "no offer has this code" in _last(lines)["error"]
    assert err.count("\n") == 1
    assert err.startswith("ferry: error:")
    assert not (tmp_path / "d").exists()


def test_code_works_once(ferry: FerryFactory, tmp_path: Path) -> None:
    source = random_file(tmp_path / "f.bin", 10)
    sender, offered = _offer(ferry, str(source))
    first = ferry("receive", offered["code"], "--dest", str(tmp_path / "a"), "--yes", "--json")
    assert first.finish(60)[0] == 0
    second = ferry("receive", offered["code"], "--dest", str(tmp_path / "b"), "--yes", "--json")
    rc, lines, _ = second.finish(30)
    assert rc == 1
    assert _last(lines)["event"] == "failed"
    assert sender.finish(30)[0] == 0
    assert not (tmp_path / "b" / "f.bin").exists()


def test_expired_code(ferry: FerryFactory, tmp_path: Path) -> None:
    source = random_file(tmp_path / "f.bin", 10)
    sender, offered = _offer(ferry, str(source), "--ttl", "1")
    src_rc, src_lines, _ = sender.finish(30)
    assert src_rc == 1
    assert "expired" in _last(src_lines)["error"]
    receiver = ferry("receive", offered["code"], "--dest", str(tmp_path / "d"), "--yes", "--json")
    rc, lines, _ = receiver.finish(30)
    assert rc == 1
    assert _last(lines)["event"] == "failed"


def test_broker_restart_between_offer_and_accept(
    broker: BrokerProcess, ferry: FerryFactory, tmp_path: Path
) -> None:
    source = random_file(tmp_path / "f.bin", 5 << 20)
    sender, offered = _offer(ferry, str(source))
    broker.restart()
    receiver = ferry("receive", offered["code"], "--dest", str(tmp_path / "d"), "--yes", "--json")
    rc, _, err = receiver.finish(60)
    src_rc, _, src_err = sender.finish(60)
    assert rc == 0, err + src_err
    assert src_rc == 0, src_err
    assert sha256(tmp_path / "d" / "f.bin") == sha256(source)


def test_existing_file_is_not_overwritten(ferry: FerryFactory, tmp_path: Path) -> None:
    source = random_file(tmp_path / "src" / "f.bin", 1000)
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "f.bin").write_bytes(b"mine")
    sender, offered = _offer(ferry, str(source))
    receiver = ferry("receive", offered["code"], "--dest", str(dest), "--yes", "--json")
    rc, lines, _ = receiver.finish(30)
    assert rc == 1
    assert "exist" in _last(lines)["error"]
    assert (dest / "f.bin").read_bytes() == b"mine"
    assert sender.finish(30)[0] == 1
    # --overwrite replaces it, and only after verification.
    sender, offered = _offer(ferry, str(source))
    receiver = ferry(
        "receive", offered["code"], "--dest", str(dest), "--yes", "--overwrite", "--json"
    )
    assert receiver.finish(60)[0] == 0
    assert sender.finish(60)[0] == 0
    assert (dest / "f.bin").read_bytes() == source.read_bytes()


def test_names_are_shown_escaped(ferry: FerryFactory, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    # A control character is a legal name: it is offered, and the receiver shows it escaped
    # with the safe name it would be saved under.
    evil = src / "red\x1b[31mALERT\x07.txt"
    evil.write_bytes(b"x")
    sender, offered = _offer(ferry, str(evil))
    receiver = ferry("receive", offered["code"], "--dest", str(tmp_path / "d"))
    receiver.answer("n")
    rc, _, err = receiver.finish(30)
    assert rc == 1
    assert "\x1b" not in err
    assert "\x07" not in err
    assert "red\\x1b[31mALERT\\x07.txt  ->  red%1B[31mALERT%07.txt" in err
    assert sender.finish(30)[0] == 1
    # A bidi override is a legal name, but the receiver shows it escaped.
    tricky = src / "invoice\u202etxt.exe"
    tricky.write_bytes(b"x")
    sender, offered = _offer(ferry, str(tricky))
    receiver = ferry("receive", offered["code"], "--dest", str(tmp_path / "d"))
    receiver.answer("n")
    rc, _, err = receiver.finish(30)
    assert rc == 1
    assert "\u202e" not in err
    assert "invoice\\u202etxt.exe" in err
    assert "Accept?" in err
    assert sender.finish(30)[0] == 1


def test_not_enough_space_declines(ferry: FerryFactory, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(small)], check=True)
    try:
        source = random_file(tmp_path / "f.bin", 4 << 20)
        sender, offered = _offer(ferry, str(source))
        receiver = ferry("receive", offered["code"], "--dest", str(small), "--yes", "--json")
        rc, lines, _ = receiver.finish(30)
        assert rc == 1
        assert "free space" in _last(lines)["error"]
        assert list(small.iterdir()) == []
        src_rc, src_lines, _ = sender.finish(30)
        assert src_rc == 1
        assert "declined" in _last(src_lines)["error"]
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_status_reports_the_outcome(
    ferry: FerryFactory, broker: BrokerProcess, tmp_path: Path
) -> None:
    source = random_file(tmp_path / "f.bin", 100)
    sender, offered = _offer(ferry, str(source))
    receiver = ferry("receive", offered["code"], "--dest", str(tmp_path / "d"), "--yes", "--json")
    assert receiver.finish(60)[0] == 0
    assert sender.finish(60)[0] == 0
    status = ferry("status", offered["session"], "--json")
    rc, lines, err = status.finish(30)
    assert rc == 0, err
    assert lines == [
        {
            "session": offered["session"],
            "role": "receiver",
            "broker": broker.address,
            "state": "completed",
            "bytes_done": 100,
            "bytes": 100,
            "failure_reason": "",
            "dest": str(tmp_path / "d"),
        }
    ]


def test_status_shows_what_is_known_here_when_the_broker_is_gone(
    ferry: FerryFactory, broker: BrokerProcess, tmp_path: Path
) -> None:
    source = random_file(tmp_path / "f.bin", 100)
    sender, offered = _offer(ferry, str(source))
    receiver = ferry("receive", offered["code"], "--dest", str(tmp_path / "d"), "--yes", "--json")
    assert receiver.finish(60)[0] == 0
    assert sender.finish(60)[0] == 0
    broker.kill()
    rc, lines, err = ferry("status", "--json", "--broker-wait", "1").finish(30)
    assert rc == 0, err
    # One state file for both sides here: the session is remembered once, as the receiver's.
    (line,) = lines
    assert line["session"] == offered["session"]
    assert line["role"] == "receiver"
    assert line["state"] == "unknown"
    assert line["broker"] == broker.address
    assert "did not answer" in line["error"], line
    assert line["dest"] == str(tmp_path / "d")


@pytest.mark.slow
def test_unreachable_broker_is_waited_for_then_one_line(
    tmp_path: Path, broker_factory: BrokerFactory
) -> None:
    env = {
        **os.environ,
        "FERRY_BROKER": "127.0.0.1:9",
        "FERRY_BROKER_WAIT": "3",
        "XDG_STATE_HOME": str(tmp_path),
    }
    started = time.monotonic()
    proc = FerryProcess(["receive", "1-a-b-c", "--json"], env, tmp_path).start()
    rc, lines, err = proc.finish(60)
    assert rc == 1
    assert "cannot be reached" in _last(lines)["error"]
    said = err.splitlines()
    assert said[0].startswith("ferry: waiting for the broker at 127.0.0.1:9"), err
    assert said[-1].startswith("ferry: error:"), err
    assert len(said) == 2, err
    assert 3 <= time.monotonic() - started < 30
