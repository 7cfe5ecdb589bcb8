"""Tests of ferry.files.paths: nothing received is written outside the destination folder."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path, PurePosixPath, PureWindowsPath

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from ferry.files.paths import (
    MAX_PATH_BYTES,
    MAX_SEGMENT_BYTES,
    DestinationExistsError,
    UnsafePathError,
    check_manifest_paths,
    check_no_overwrite,
    local_paths,
    local_segment,
    make_parents,
    resolve_destination,
    sanitize_relative_path,
)

# --- sanitize_relative_path -------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "a.txt",
        "photos/2024/a.jpg",
        ".hidden",
        "..dots-inside..x",
        "a..b/c",
        "résumé/日本語/😀.png",
        "with space/in the middle.txt",
        "console.txt",  # only exact device stems are reserved
        "COM10",
        "LPT0.txt",
        "nulls/a",
        "a" * MAX_SEGMENT_BYTES,
    ],
)
def test_accepts_ordinary_paths(path: str) -> None:
    assert sanitize_relative_path(path) == PurePosixPath(path)
    assert str(sanitize_relative_path(path)) == path


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("", "empty path"),
        ("/etc/passwd", "absolute"),
        ("//server/share", "absolute"),
        ("..", '".." segment'),
        ("../x", '".." segment'),
        ("a/../../x", '".." segment'),
        ("a/..", '".." segment'),
        (".", '"." segment'),
        ("./a", '"." segment'),
        ("a/./b", '"." segment'),
        ("a//b", "empty segment"),
        ("a/", "empty segment"),
        ("a\\b", "backslash"),
        ("..\\..\\x", "backslash"),
        ("C:", "colon"),
        ("C:x", "colon"),
        ("c:foo/bar", "colon"),
        ("file:stream", "colon"),
        ("x/c:y", "colon"),  # on Windows, joining "c:y" restarts on drive C:
        ("x/file.txt:hidden", "stream"),
        ("x/12:30 meeting.txt", "colon"),
        ("a\x00b", "NUL"),
        ("a\x01b", "control"),
        ("a\nb", "control"),
        ("a\x1b[31m", "control"),
        ("a\x7f", "control"),
        ("a\x85", "control"),
        ("a\x9b", "control"),
        ("CON", "device name"),
        ("con", "device name"),
        ("x/Prn", "device name"),
        ("aux.c", "device name"),
        ("nul.txt", "device name"),
        ("NUL.tar.gz", "device name"),
        ("nul .txt", "device name"),
        ("COM1", "device name"),
        ("com9.log", "device name"),
        ("LPT5", "device name"),
        ("lpt\u00b9", "device name"),
        ("dir/conin$", "device name"),
        ("a ", "space or a dot"),
        ("a.", "space or a dot"),
        ("dir./a", "space or a dot"),
        ("dir /a", "space or a dot"),
        ("...", "space or a dot"),
        ("a" * (MAX_SEGMENT_BYTES + 1), "longer than 255 bytes"),
        ("é" * 128, "longer than 255 bytes"),  # 256 bytes in UTF-8, 128 characters
        ("/".join(["a" * 200] * 21), "longer than 4096 bytes"),
        ("bad\udc80", "Unicode"),
        ("\ud800", "Unicode"),
    ],
)
def test_refuses_unsafe_paths(path: str, reason: str) -> None:
    with pytest.raises(UnsafePathError, match="unsafe path") as info:
        sanitize_relative_path(path)
    assert reason in info.value.reason
    assert info.value.path == path
    message = str(info.value)
    assert "\n" not in message
    assert not any(unicodedata.category(ch) in {"Cc", "Cs"} for ch in message)


def test_error_shows_path_escaped() -> None:
    with pytest.raises(UnsafePathError) as info:
        sanitize_relative_path("evil\x1b[2J")
    assert str(info.value) == 'unsafe path "evil\\x1b[2J": contains a control character'


def test_error_shortens_long_path() -> None:
    with pytest.raises(UnsafePathError) as info:
        sanitize_relative_path("a" * 5000)
    assert len(str(info.value)) < 300
    assert "\u2026" in str(info.value)
    assert info.value.path == "a" * 5000


def test_unsafe_path_error_is_a_value_error() -> None:
    assert issubclass(UnsafePathError, ValueError)


def test_refuses_non_str() -> None:
    with pytest.raises(TypeError):
        sanitize_relative_path(b"a.txt")  # type: ignore[arg-type]


def test_longest_path_is_accepted() -> None:
    path = "/".join(["a" * 254] * 16) + "/" + "b" * (MAX_PATH_BYTES - 16 * 255)
    assert len(path.encode()) == MAX_PATH_BYTES
    assert sanitize_relative_path(path) == PurePosixPath(path)


SEGMENT_ALPHABET = st.sampled_from(
    ["a", "B", ".", "..", "/", "\\", ":", " ", "\x00", "\x1b", "é", "😀", "nul", "C:", "\udc80"]
)


@given(st.one_of(st.text(), st.lists(SEGMENT_ALPHABET, max_size=12).map("".join)))
@example("../x")
@example("a/../../b")
@example("C:/Windows")
@example("C:\\Windows")
@example("\\\\server\\share")
@example("//x")
@example("x/c:y")
@example("x/C:")
def test_any_accepted_path_stays_inside_root(path: str) -> None:
    try:
        rel = sanitize_relative_path(path)
    except UnsafePathError as e:
        message = str(e)
        assert "\n" not in message
        return
    assert not rel.is_absolute()
    assert ".." not in rel.parts
    assert "." not in rel.parts
    assert str(rel) == path  # nothing was silently rewritten
    assert not any(unicodedata.category(ch) == "Cc" for ch in path)
    root = Path("/srv/dest")
    joined = root.joinpath(*rel.parts)
    assert os.path.normpath(joined) == str(joined)
    assert joined.is_relative_to(root)
    assert joined != root
    # The same path would also stay inside a destination on Windows.
    win_root = PureWindowsPath("C:/dest")
    win_joined = win_root.joinpath(*rel.parts)
    assert win_joined.drive == "C:"
    assert win_joined.is_relative_to(win_root)
    assert len(win_joined.parts) == len(win_root.parts) + len(rel.parts)


# --- check_manifest_paths ---------------------------------------------------------------------


def test_manifest_paths_ok() -> None:
    paths = ["a.txt", "dir/b.txt", "dir/sub/c.txt", "ab/c"]
    assert check_manifest_paths(paths) == [PurePosixPath(p) for p in paths]


def test_manifest_paths_empty_is_ok() -> None:
    assert check_manifest_paths([]) == []


@pytest.mark.parametrize(
    ("paths", "reason"),
    [
        (["a.txt", "a.txt"], "duplicate path"),
        (["A.txt", "a.txt"], 'same name as "A.txt"'),
        (["dir/File", "DIR/file"], "case-insensitive"),
        (["Stra\u00dfe", "STRASSE"], "case-insensitive"),
        (["caf\u00e9", "cafe\u0301"], "case-insensitive"),  # NFC vs NFD, as on macOS
        (["a", "a/b"], 'folder of "a/b"'),
        (["a/b", "a"], 'folder of "a/b"'),
        (["x/a", "x/a/b/c"], "folder of"),
        (["A", "a/b"], "folder of"),
        (["ok", "../bad"], '".." segment'),
    ],
)
def test_manifest_paths_refused(paths: list[str], reason: str) -> None:
    with pytest.raises(UnsafePathError) as info:
        check_manifest_paths(paths)
    assert reason in str(info.value)


# --- local_paths: unsafe names mapped, never refused ------------------------------------------


@pytest.mark.parametrize(
    ("name", "local"),
    [
        ("plain.txt", "plain.txt"),
        ("e\x1b[2Jsc", "e%1B[2Jsc"),
        ("tab\there", "tab%09here"),
        ("del\x7f\x9b", "del%7F%9B"),
        ("c:x", "c%3Ax"),
        ("back\\slash", "back%5Cslash"),
        ("aux.c", "aux_.c"),
        ("CON", "CON_"),
        ("lpt1.tar.gz", "lpt1_.tar.gz"),
        ("nul .txt", "nul _.txt"),
        ("dot.", "dot"),
        ("space ", "space"),
        ("...", "_"),
        ("caf\udce9", "caf%E9"),
        ("x" * 300 + ".txt", "x" * 251 + ".txt"),
    ],
)
def test_local_segment(name: str, local: str) -> None:
    assert local_segment(name) == local
    sanitize_relative_path(local)


def test_local_segment_cuts_by_bytes_at_a_character() -> None:
    out = local_segment("é" * 200)
    assert len(out.encode()) <= MAX_SEGMENT_BYTES
    assert out == "é" * 127


@pytest.mark.parametrize(
    ("paths", "local"),
    [
        (["Makefile", "makefile"], ["Makefile", "makefile (2)"]),
        (["a.txt", "A.txt", "a (2).txt"], ["a.txt", "A (2).txt", "a (2) (2).txt"]),
        (["a", "a/b"], ["a", "a (2)/b"]),
        (["a/b", "a"], ["a/b", "a (2)"]),
        (["Docs/x", "docs/x", "docs/y"], ["Docs/x", "docs (2)/x", "docs (2)/y"]),
        (["dot./a", "dot/b"], ["dot/a", "dot (2)/b"]),
        (["same", "same"], ["same", "same (2)"]),
        (["aux/aux.c"], ["aux_/aux_.c"]),
    ],
)
def test_local_paths_keep_every_file_apart(paths: list[str], local: list[str]) -> None:
    assert local_paths(paths) == [PurePosixPath(p) for p in local]


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("", "empty path"),
        ("/etc/passwd", "absolute"),
        ("a//b", "empty segment"),
        ("a/../b", '".." segment'),
        ("./a", '"." segment'),
        ("a" * 5000, "longer than"),
        ("/".join(["é" * 120] * 18), "longer than 4096 bytes as a local path"),
    ],
)
def test_local_paths_refuse_what_has_no_safe_form(path: str, reason: str) -> None:
    with pytest.raises(UnsafePathError, match=reason):
        local_paths([path])


# --- resolve_destination, make_parents (real folders) -----------------------------------------


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    d = tmp_path / "dest"
    d.mkdir()
    return d


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    o = tmp_path / "outside"
    o.mkdir()
    return o


def test_resolve_new_file(dest: Path) -> None:
    target = resolve_destination(dest, PurePosixPath("a/b/c.txt"))
    assert target == dest.resolve() / "a" / "b" / "c.txt"
    assert not target.exists()


def test_resolve_existing_file_and_folders(dest: Path) -> None:
    (dest / "a").mkdir()
    (dest / "a" / "c.txt").write_text("x")
    assert resolve_destination(dest, PurePosixPath("a/c.txt")) == dest.resolve() / "a" / "c.txt"


def test_resolve_through_symlinked_dest_root(tmp_path: Path, dest: Path) -> None:
    # The destination itself may be a symlink: that is the user's own choice.
    link = tmp_path / "link-to-dest"
    link.symlink_to(dest)
    assert resolve_destination(link, PurePosixPath("x.txt")) == dest.resolve() / "x.txt"


def test_resolve_refuses_symlinked_parent_pointing_outside(dest: Path, outside: Path) -> None:
    (dest / "a").symlink_to(outside)
    with pytest.raises(UnsafePathError, match='"a" is a symlink'):
        resolve_destination(dest, PurePosixPath("a/passwd"))
    assert list(outside.iterdir()) == []


def test_resolve_refuses_symlinked_parent_pointing_inside(dest: Path) -> None:
    (dest / "real").mkdir()
    (dest / "a").symlink_to(dest / "real")
    with pytest.raises(UnsafePathError, match="symlink"):
        resolve_destination(dest, PurePosixPath("a/x"))


def test_resolve_refuses_deep_symlinked_parent(dest: Path, outside: Path) -> None:
    (dest / "a" / "b").mkdir(parents=True)
    (dest / "a" / "b" / "c").symlink_to(outside)
    with pytest.raises(UnsafePathError, match='"c" is a symlink'):
        resolve_destination(dest, PurePosixPath("a/b/c/d/e.txt"))


def test_resolve_refuses_symlink_at_target(dest: Path, outside: Path) -> None:
    (dest / "x.txt").symlink_to(outside / "victim.txt")
    with pytest.raises(UnsafePathError, match=r'"x\.txt" is a symlink'):
        resolve_destination(dest, PurePosixPath("x.txt"))


def test_resolve_refuses_dangling_symlink_at_target(dest: Path) -> None:
    (dest / "x.txt").symlink_to("/nonexistent/ferry-test")
    with pytest.raises(UnsafePathError, match="symlink"):
        resolve_destination(dest, PurePosixPath("x.txt"))


def test_resolve_refuses_file_as_parent(dest: Path) -> None:
    (dest / "a").write_text("x")
    with pytest.raises(UnsafePathError, match='"a" is not a folder'):
        resolve_destination(dest, PurePosixPath("a/b"))


def test_resolve_refuses_folder_as_target(dest: Path) -> None:
    (dest / "a").mkdir()
    with pytest.raises(UnsafePathError, match="is a folder"):
        resolve_destination(dest, PurePosixPath("a"))


def test_resolve_sanitizes_again(dest: Path) -> None:
    with pytest.raises(UnsafePathError, match=r'"\.\." segment'):
        resolve_destination(dest, PurePosixPath("../escape"))
    with pytest.raises(UnsafePathError, match="absolute"):
        resolve_destination(dest, PurePosixPath("/etc/passwd"))
    with pytest.raises(UnsafePathError):
        resolve_destination(dest, PurePosixPath(""))


def test_resolve_missing_dest(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        resolve_destination(tmp_path / "missing", PurePosixPath("a"))


def test_resolve_dest_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        resolve_destination(tmp_path / "f", PurePosixPath("a"))


def test_make_parents_creates_folders(dest: Path) -> None:
    parent = make_parents(dest, PurePosixPath("a/b/c/file.txt"))
    assert parent == dest.resolve() / "a" / "b" / "c"
    assert parent.is_dir()
    assert not (parent / "file.txt").exists()
    # Again: existing folders are fine.
    assert make_parents(dest, PurePosixPath("a/b/c/other.txt")) == parent


def test_make_parents_top_level_file(dest: Path) -> None:
    assert make_parents(dest, PurePosixPath("file.txt")) == dest.resolve()
    assert list(dest.iterdir()) == []


def test_make_parents_refuses_symlink(dest: Path, outside: Path) -> None:
    (dest / "a").symlink_to(outside)
    with pytest.raises(UnsafePathError, match='"a" is a symlink'):
        make_parents(dest, PurePosixPath("a/b/file.txt"))
    assert list(outside.iterdir()) == []


def test_make_parents_refuses_file(dest: Path) -> None:
    (dest / "a").write_text("x")
    with pytest.raises(UnsafePathError, match="not a folder"):
        make_parents(dest, PurePosixPath("a/b/file.txt"))


def test_make_parents_sanitizes_again(dest: Path, tmp_path: Path) -> None:
    with pytest.raises(UnsafePathError):
        make_parents(dest, PurePosixPath("../escaped/file.txt"))
    assert not (tmp_path / "escaped").exists()


# --- check_no_overwrite -----------------------------------------------------------------------


def test_no_overwrite_when_nothing_exists(dest: Path) -> None:
    check_no_overwrite(dest, [PurePosixPath("a"), PurePosixPath("b/c")], overwrite=False)


def test_no_overwrite_refuses_existing(dest: Path) -> None:
    (dest / "a").write_text("x")
    (dest / "b").mkdir()
    (dest / "b" / "c").write_text("x")
    rels = [PurePosixPath("a"), PurePosixPath("b/c"), PurePosixPath("new")]
    with pytest.raises(DestinationExistsError) as info:
        check_no_overwrite(dest, rels, overwrite=False)
    assert info.value.paths == [PurePosixPath("a"), PurePosixPath("b/c")]
    assert str(info.value) == (
        '2 files already exist in the destination: "a", "b/c" (allow overwriting to replace)'
    )
    check_no_overwrite(dest, rels, overwrite=True)


def test_no_overwrite_counts_dangling_symlink(dest: Path) -> None:
    (dest / "a").symlink_to("/nonexistent/ferry-test")
    with pytest.raises(DestinationExistsError, match=r'1 file already exists.*"a"'):
        check_no_overwrite(dest, [PurePosixPath("a")], overwrite=False)


def test_no_overwrite_lists_first_few_escaped(dest: Path) -> None:
    names = [f"f{i}\x1b" for i in range(5)]
    for name in names:
        (dest / name).write_text("x")
    with pytest.raises(DestinationExistsError) as info:
        check_no_overwrite(dest, [PurePosixPath(n) for n in names], overwrite=False)
    message = str(info.value)
    assert '"f0\\x1b", "f1\\x1b", "f2\\x1b" and 2 more' in message
    assert "\x1b" not in message
    assert len(info.value.paths) == 5


def test_destination_exists_error_is_a_file_exists_error() -> None:
    assert issubclass(DestinationExistsError, FileExistsError)
