"""Tests of ferry.files.manifest: the sender's manifest from PATH arguments."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferry.files.manifest import (
    ManifestError,
    build_manifest,
    chunk_count,
    free_space_ok,
    total_size,
)
from ferry.files.paths import check_manifest_paths
from ferry.v1 import broker_pb2

CHUNK = 4096


def write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_single_file_is_sent_under_its_base_name(tmp_path: Path) -> None:
    f = write(tmp_path / "deep" / "report.pdf", b"x" * 10, 0o640)
    os.utime(f, ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
    manifest, sources = build_manifest([f], CHUNK)
    assert sources == [f]
    assert manifest.chunk_size_bytes == CHUNK
    [entry] = manifest.files
    assert entry.path == "report.pdf"
    assert entry.size_bytes == 10
    assert entry.mode == 0o640
    assert entry.modify_time.seconds == 1_700_000_000
    assert entry.modify_time.nanos == 123_456_789


def test_folder_tree_is_walked_sorted(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    write(root / "b.jpg", b"bb")
    write(root / "a.jpg", b"a")
    write(root / "2024" / "z.jpg", b"zzz")
    write(root / "2024" / "jan" / "x.jpg", b"")
    write(root / "c" / "d" / "e" / "f.txt", b"f" * 5000, 0o600)
    (root / "empty" / "nested").mkdir(parents=True)
    manifest, sources = build_manifest([root], CHUNK)
    paths = [e.path for e in manifest.files]
    assert paths == [
        "photos/2024/jan/x.jpg",
        "photos/2024/z.jpg",
        "photos/a.jpg",
        "photos/b.jpg",
        "photos/c/d/e/f.txt",
    ]
    assert sources == [root.joinpath(*p.split("/")[1:]) for p in paths]
    assert all(s.is_absolute() for s in sources)
    assert [e.size_bytes for e in manifest.files] == [0, 3, 1, 2, 5000]
    assert manifest.files[4].mode == 0o600
    assert total_size(manifest) == 5006
    check_manifest_paths(paths)  # the receiver accepts what we send


def test_manifest_is_deterministic(tmp_path: Path) -> None:
    for name in ["q", "b", "Z", "a", "é", "m/n"]:
        write(tmp_path / "d" / name, b"1")
    first, _ = build_manifest([tmp_path / "d"], CHUNK)
    second, _ = build_manifest([tmp_path / "d"], CHUNK)
    assert first.SerializeToString(deterministic=True) == second.SerializeToString(
        deterministic=True
    )


def test_mixed_arguments_keep_order(tmp_path: Path) -> None:
    f = write(tmp_path / "z.txt", b"1")
    d = tmp_path / "dir"
    write(d / "a.txt", b"2")
    manifest, sources = build_manifest([f, d], CHUNK)
    assert [e.path for e in manifest.files] == ["z.txt", "dir/a.txt"]
    assert sources == [f, d / "a.txt"]


def test_relative_arguments_become_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "here" / "a.txt", b"1")
    monkeypatch.chdir(tmp_path / "here")
    manifest, sources = build_manifest([Path("."), Path("a.txt")], CHUNK)
    # "." is sent under the folder's own name, not as "." (and so a.txt collides with nothing).
    assert [e.path for e in manifest.files] == ["here/a.txt", "a.txt"]
    assert sources == [tmp_path / "here" / "a.txt"] * 2


def test_symlink_argument_is_followed(tmp_path: Path) -> None:
    target = write(tmp_path / "target.txt", b"abc")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    manifest, sources = build_manifest([link], CHUNK)
    assert manifest.files[0].path == "link.txt"
    assert manifest.files[0].size_bytes == 3
    # Resolved once, at the offer: the sender later opens the real path, following nothing.
    assert sources == [target]


def test_symlink_inside_folder_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "d"
    write(d / "real.txt", b"1")
    (d / "link.txt").symlink_to(d / "real.txt")
    with pytest.raises(ManifestError, match=r'link\.txt" is a symlink'):
        build_manifest([d], CHUNK)


def test_symlinked_folder_inside_folder_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "d"
    write(d / "a.txt", b"1")
    (d / "etc").symlink_to("/etc")
    with pytest.raises(ManifestError, match="symlink"):
        build_manifest([d], CHUNK)


def test_dangling_symlink_inside_folder_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "gone").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ManifestError, match="symlink"):
        build_manifest([d], CHUNK)


def test_fifo_inside_folder_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "d"
    write(d / "a.txt", b"1")
    os.mkfifo(d / "pipe")
    with pytest.raises(ManifestError, match='pipe" is not a regular file'):
        build_manifest([d], CHUNK)


def test_fifo_argument_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ManifestError, match="not a regular file"):
        build_manifest([tmp_path / "pipe"], CHUNK)


def test_socket_inside_folder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "d"
    d.mkdir()
    # AF_UNIX paths are limited to about 100 bytes, so bind with a short relative name.
    monkeypatch.chdir(d)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind("sock")
        with pytest.raises(ManifestError, match="not a regular file"):
            build_manifest([d], CHUNK)


def test_device_argument_is_refused() -> None:
    with pytest.raises(ManifestError, match="not a regular file"):
        build_manifest([Path("/dev/null")], CHUNK)


def test_missing_argument(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        build_manifest([tmp_path / "missing"], CHUNK)


_LIST = """
import sys
from pathlib import Path
from ferry.files import ManifestError, build_manifest
try:
    build_manifest([Path(sys.argv[1])], 4)
except ManifestError as e:
    print(e)
    sys.exit(3)
"""


def test_unreadable_folder(tmp_path: Path) -> None:
    d = tmp_path / "d"
    (d / "locked").mkdir(parents=True)
    (d / "locked").chmod(0)
    # Root reads any folder; setpriv runs the check without the capabilities that allow it.
    prefix = (
        ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    )
    try:
        done = subprocess.run(
            [*prefix, sys.executable, "-c", _LIST, str(d)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        (d / "locked").chmod(0o700)
    assert done.returncode == 3, done.stderr
    assert "cannot read folder" in done.stdout


def test_root_argument_is_refused() -> None:
    with pytest.raises(ManifestError, match="no name"):
        build_manifest([Path("/")], CHUNK)


def test_empty_folders_are_not_sent(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    f = write(tmp_path / "a.txt", b"1")
    manifest, _ = build_manifest([tmp_path / "empty", f], CHUNK)
    assert [e.path for e in manifest.files] == ["a.txt"]


def test_nothing_to_send(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ManifestError, match="nothing to send"):
        build_manifest([tmp_path / "empty"], CHUNK)
    with pytest.raises(ManifestError, match="nothing to send"):
        build_manifest([], CHUNK)


def test_duplicate_arguments_are_refused(tmp_path: Path) -> None:
    a = write(tmp_path / "one" / "same.txt", b"1")
    b = write(tmp_path / "two" / "same.txt", b"2")
    with pytest.raises(ManifestError, match=r'is sent under the same name "same\.txt"'):
        build_manifest([a, b], CHUNK)
    with pytest.raises(ManifestError, match="the same name"):
        build_manifest([a, a], CHUNK)


def test_names_that_fold_together_are_sent(tmp_path: Path) -> None:
    # The receiver saves the second under another name (ferry.files.local_paths).
    d = tmp_path / "d"
    write(d / "A.txt", b"1")
    write(d / "a.txt", b"2")
    manifest, _ = build_manifest([d], CHUNK)
    assert [e.path for e in manifest.files] == ["d/A.txt", "d/a.txt"]


def test_file_and_folder_with_same_name_are_sent(tmp_path: Path) -> None:
    f = write(tmp_path / "x" / "d", b"1")
    d = tmp_path / "d"
    write(d / "inner.txt", b"2")
    manifest, _ = build_manifest([f, d], CHUNK)
    assert [e.path for e in manifest.files] == ["d", "d/inner.txt"]


@pytest.mark.parametrize("name", ["con.txt", "bad\x1bname", "trailing.", "tab\there", "c:x"])
def test_names_the_receiver_maps_are_sent_as_they_are(tmp_path: Path, name: str) -> None:
    d = tmp_path / "d"
    write(d / name, b"1")
    manifest, _ = build_manifest([d], CHUNK)
    assert [e.path for e in manifest.files] == [f"d/{name}"]
    manifest, _ = build_manifest([d / name], CHUNK)
    assert [e.path for e in manifest.files] == [name]


def test_what_the_protocol_cannot_carry_is_written_as_hex(tmp_path: Path) -> None:
    # A backslash (the broker refuses it: a separator on Windows) and a byte that is not
    # UTF-8 (the manifest is UTF-8 text) travel as %XX.
    d = tmp_path / "d"
    write(d / "back\\slash", b"1")
    os.makedirs(os.fsencode(d), exist_ok=True)
    with open(os.path.join(os.fsencode(d), b"caf\xe9.txt"), "wb") as f:
        f.write(b"2")
    manifest, sources = build_manifest([d], CHUNK)
    assert [e.path for e in manifest.files] == ["d/back%5Cslash", "d/caf%E9.txt"]
    assert [s.read_bytes() for s in sources] == [b"1", b"2"]  # read from the real names


def test_bad_chunk_size(tmp_path: Path) -> None:
    f = write(tmp_path / "a", b"1")
    with pytest.raises(ValueError, match="chunk size"):
        build_manifest([f], 0)


def test_manifest_round_trips(tmp_path: Path) -> None:
    write(tmp_path / "d" / "x" / "y.bin", b"\x00" * 100)
    manifest, _ = build_manifest([tmp_path / "d"], CHUNK)
    again = broker_pb2.Manifest.FromString(manifest.SerializeToString())
    assert again == manifest


def test_total_size_of_empty_manifest() -> None:
    assert total_size(broker_pb2.Manifest()) == 0


@pytest.mark.parametrize(
    ("size", "chunk", "count"),
    [(0, 10, 0), (1, 10, 1), (10, 10, 1), (11, 10, 2), (20, 10, 2), (2**40, 2**20, 2**20)],
)
def test_chunk_count(size: int, chunk: int, count: int) -> None:
    assert chunk_count(size, chunk) == count


@given(st.integers(min_value=0, max_value=2**50), st.integers(min_value=1, max_value=2**30))
def test_chunk_count_covers_the_file(size: int, chunk: int) -> None:
    n = chunk_count(size, chunk)
    assert n * chunk >= size
    assert (n - 1) * chunk < size or n == 0


def test_chunk_count_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="negative"):
        chunk_count(-1, 10)
    with pytest.raises(ValueError, match="positive"):
        chunk_count(10, 0)


def test_free_space(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    ok, reported = free_space_ok(tmp_path, 1)
    assert ok
    assert abs(reported - free) < 64 * 1024**2  # other tests may write meanwhile
    ok, _ = free_space_ok(tmp_path, 2**62)
    assert not ok


def test_free_space_of_missing_destination(tmp_path: Path) -> None:
    ok, free = free_space_ok(tmp_path / "not" / "yet", 0)
    assert ok
    assert free > 0
