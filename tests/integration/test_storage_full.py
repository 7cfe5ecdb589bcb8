"""A full destination: space is reserved at consent, nothing verified is lost, a rerun continues.

Each test mounts a small tmpfs (the tests run as root) as the receiver's destination, so the
disk really fills up: first between the free-space check and consent (the reservation fails
before anything moves, nothing is declined), then mid-transfer (the journal cannot grow: the
receiver stops, keeps what it verified, and the sender waits for it instead of failing).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FerryFactory
from tests.support.files import random_file, sha256, tmpfs

pytestmark = [pytest.mark.timeout(180)]

SIZE = 24 << 20
CHUNK = 256 << 10
RECORD = 49  # bytes per journal record


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs of this test's own."""
    with tmpfs(tmp_path / "disk") as disk:
        yield disk


def _fill(path: Path, size: int) -> None:
    with path.open("wb") as f:
        f.write(b"\0" * size)


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _hidden(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir() if p.name.startswith("."))


def _last(lines: list[dict[str, Any]], err: str) -> dict[str, Any]:
    assert lines, err
    return lines[-1]


def test_space_taken_between_the_check_and_consent_fails_before_anything_moves(
    ferry: FerryFactory, tmp_path: Path, small_disk: Path
) -> None:
    source = random_file(tmp_path / "f.bin", SIZE)
    dest = small_disk / "in"
    sender = ferry("send", str(source), "--json", "--chunk-size", str(CHUNK))
    code = sender.line()["code"]
    receiver = ferry("receive", code, "--dest", str(dest), "--json")
    offer = receiver.line()
    assert offer["event"] == "offer"
    assert offer["free_bytes"] >= SIZE  # the check before consent passes...
    filler = small_disk / "filler"
    _fill(filler, _free(small_disk) - SIZE // 2)  # ...then someone else takes the space
    receiver.answer("y")
    rc, lines, err = receiver.finish(60)
    assert rc == 1, err
    error = _last(lines, err)["error"]
    assert "not enough space" in error, error
    assert "run the same command again" in error, error
    assert err.count("\n") == 1, err  # one line
    # Nothing reserved is left holding the space, and the offer was not declined.
    assert list(dest.iterdir()) == []
    assert sender.proc is not None
    assert sender.proc.poll() is None
    filler.unlink()
    rc, lines, err = ferry("receive", code, "--dest", str(dest), "--yes", "--json").finish(60)
    assert rc == 0, err
    assert _last(lines, err)["event"] == "completed"
    src_rc, src_lines, src_err = sender.finish(60)
    assert src_rc == 0, src_err
    assert _last(src_lines, src_err)["event"] == "completed"
    assert sha256(dest / "f.bin") == sha256(source)
    assert sorted(p.name for p in dest.iterdir()) == ["f.bin"]


def test_disk_full_mid_transfer_keeps_verified_data_and_the_sender_waits(
    ferry: FerryFactory, tmp_path: Path, small_disk: Path
) -> None:
    source = random_file(tmp_path / "f.bin", SIZE)
    dest = small_disk / "in"
    dest.mkdir()
    # Leave room for the file (reserved at consent) and the journal's first page only: the
    # journal fills that page after about 83 chunks, and its next record finds no space.
    filler = small_disk / "filler"
    _fill(filler, _free(small_disk) - SIZE - 4096)
    sender = ferry("send", str(source), "--json", "--chunk-size", str(CHUNK))
    code = sender.line()["code"]
    rc, lines, err = ferry("receive", code, "--dest", str(dest), "--yes", "--json").finish(60)
    assert rc == 1, err
    error = _last(lines, err)["error"]
    assert "not enough space" in error, error
    assert "what was received is kept" in error, error
    # The receiver's fault, not the sender's: the sender says so and keeps waiting.
    paused = sender.line(30)
    assert paused["event"] == "paused", paused
    assert "No space left on device" in paused["reason"], paused
    assert "receiver" in paused["reason"], paused
    assert sender.proc is not None
    assert sender.proc.poll() is None
    hidden = _hidden(dest)
    journal = [n for n in hidden if n.endswith(".journal")]
    assert journal, hidden
    assert any(n.endswith(".ferry-part") for n in hidden), hidden
    held = (dest / journal[0]).stat().st_size // RECORD
    assert held >= 40, held  # most of the first page: dozens of verified chunks
    assert not (dest / "f.bin").exists()
    filler.unlink()  # the user frees space and runs the same command again
    rc, lines, err = ferry("receive", code, "--dest", str(dest), "--yes", "--json").finish(60)
    assert rc == 0, err
    done = _last(lines, err)
    assert done["event"] == "completed", done
    assert done["bytes_resumed"] >= 40 * CHUNK, done
    assert done["bytes_resumed"] + done["bytes_transferred"] == SIZE
    src_rc, src_lines, src_err = sender.finish(60)
    assert src_rc == 0, src_err
    assert _last(src_lines, src_err)["event"] == "completed"
    assert sha256(dest / "f.bin") == sha256(source)
    assert sorted(p.name for p in dest.iterdir()) == ["f.bin"]
