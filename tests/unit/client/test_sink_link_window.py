"""A receiver killed inside `FileSink._finish`, between linking the final name and removing
the temporary one (found by `bench/kill_campaign.py`, seed 11, trial 55: broker, sender and
receiver killed at the moment the final name appeared; every rerun of the receiver then
failed with '1 file already exists in the destination')."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import pytest

from ferry.client._sink import FileSink, SinkFile
from ferry.files import DestinationExistsError

SESSION = "0123456789abcdef"
DATA = b"verified bytes " * 1000


def _sink(dest: Path) -> FileSink:
    f = SinkFile(PurePosixPath("source.bin"), len(DATA), 0o644, 1_700_000_000_000_000_000)
    return FileSink(dest, [f], SESSION, overwrite=False)


def _killed_between_link_and_unlink(dest: Path) -> Path:
    """The temporary file written in full, then linked to its final name, and no more."""
    sink = _sink(dest)
    sink.prepare()
    sink.write(0, 0, memoryview(DATA))
    fd = sink.fd(0)
    os.fsync(fd)
    os.close(fd)  # the process dies here: its descriptors go with it
    temp = sink.temp_path(0)
    os.link(temp, dest / "source.bin")
    return temp


def test_a_rerun_takes_back_the_final_name_its_own_run_linked(tmp_path: Path) -> None:
    temp = _killed_between_link_and_unlink(tmp_path)
    sink = _sink(tmp_path)
    sink.prepare()  # before: DestinationExistsError
    assert temp.exists()  # every verified byte is still there
    assert not (tmp_path / "source.bin").exists()
    sink.fd(0)
    final = sink.finish(0)
    assert final.read_bytes() == DATA
    assert not temp.exists()


def test_someone_elses_file_under_the_final_name_is_still_refused(tmp_path: Path) -> None:
    temp = _killed_between_link_and_unlink(tmp_path)
    (tmp_path / "source.bin").unlink()
    (tmp_path / "source.bin").write_bytes(b"the user's own file")  # another inode
    with pytest.raises(DestinationExistsError):
        _sink(tmp_path).prepare()
    assert (tmp_path / "source.bin").read_bytes() == b"the user's own file"
    assert temp.exists()
