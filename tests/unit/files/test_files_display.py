"""Tests of ferry.files.display: terminal-safe names and sizes."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferry.files.display import escape_name, format_size, shown, terminal_line

BIDI = {chr(c) for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C]}


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain.txt", "plain.txt"),
        ("\x1b[2J\x1b[31mred", "\\x1b[2J\\x1b[31mred"),
        ("a\nb\rc\td", "a\\x0ab\\x0dc\\x09d"),
        ("nul\x00", "nul\\x00"),
        ("del\x7f", "del\\x7f"),
        ("c1\x9b31m", "c1\\x9b31m"),
        ("invoice\u202efdp.exe", "invoice\\u202efdp.exe"),
        ("\u2066iso\u2069", "\\u2066iso\\u2069"),
        ("zero\u200bwidth", "zero\\u200bwidth"),
        ("bom\ufeff", "bom\\ufeff"),
        ("line\u2028sep", "line\\u2028sep"),
        ("lone\udc80", "lone\\udc80"),
        ("back\\slash", "back\\\\slash"),
        ("\U000e0001tag", "\\U000e0001tag"),
    ],
)
def test_escapes_dangerous_characters(raw: str, shown: str) -> None:
    assert escape_name(raw) == shown


@pytest.mark.parametrize(
    "name",
    [
        "résumé-naïve.txt",
        "日本語のファイル.txt",
        "Ελληνικά.pdf",
        "עברית.doc",  # right-to-left text itself is fine; only the invisible controls are not
        "smile 😀.png",
        "family 👨\u200d👩\u200d👧.png",
        "rainbow 🏳\ufe0f\u200d🌈.png",
        "england 🏴\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f.png",
        "thumbs 👍🏽.png",
        "e\u0301 combining.txt",
    ],
)
def test_leaves_ordinary_text_alone(name: str) -> None:
    assert escape_name(name) == name


def test_zero_width_joiner_outside_emoji_is_escaped() -> None:
    assert escape_name("a\u200db") == "a\\u200db"
    assert escape_name("\u200d😀") == "\\u200d😀"
    assert escape_name("😀\u200d") == "😀\\u200d"


def test_escaping_is_unambiguous() -> None:
    # The literal text "\x1b" and a real ESC must not look the same.
    assert escape_name("\\x1b") != escape_name("\x1b")


@given(st.text(alphabet=st.characters(codec=None)))
def test_output_has_no_control_bidi_or_surrogate(s: str) -> None:
    out = escape_name(s)
    for ch in out:
        assert unicodedata.category(ch) not in {"Cc", "Cs", "Zl", "Zp"}
        assert ch not in BIDI
        if unicodedata.category(ch) == "Cf":
            # Only emoji glue survives: a joiner or the tag characters of a flag.
            assert ch == "\u200d" or 0xE0020 <= ord(ch) <= 0xE007F


@given(st.text(alphabet=st.characters(categories=["L", "M", "N", "P", "S", "Zs"])))
def test_printable_text_is_unchanged(s: str) -> None:
    assert escape_name(s) == s.replace("\\", "\\\\")


# --- shown, terminal_line: untrusted text, bounded ------------------------------------------


def test_shown_escapes_like_a_name_and_keeps_short_text_whole() -> None:
    assert shown("declined \x1b]52;c;eA==\x07") == "declined \\x1b]52;c;eA==\\x07"
    assert shown("a\\b") == "a\\\\b"


def test_shown_cuts_long_text_around_an_ellipsis() -> None:
    out = shown("start " + "x" * 10_000 + " end", 40)
    assert len(out) <= 40
    assert out.startswith("start ")
    assert out.endswith(" end")
    assert "\u2026" in out


def test_shown_never_cuts_an_escape_in_half() -> None:
    out = shown("\x1b" * 1000, 41)
    head, _, tail = out.partition("\u2026")
    assert head == "\\x1b" * (len(head) // 4)
    assert tail == "\\x1b" * (len(tail) // 4)


def test_shown_costs_no_more_for_a_huge_string() -> None:
    assert len(shown("\x1b" * (8 << 20))) <= 240


def test_terminal_line_leaves_escaped_text_alone_but_escapes_the_rest() -> None:
    line = "ferry: error: " + shown("a\\b") + " \x1b[2J\n\x9b"
    assert terminal_line(line) == "ferry: error: a\\\\b \\x1b[2J\\x0a\\x9b"


def test_limits_below_three_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        shown("abcdef", 2)


@given(st.text(alphabet=st.characters(codec=None)), st.integers(min_value=3, max_value=300))
def test_bounded_output_is_safe_and_bounded(s: str, limit: int) -> None:
    for out in (shown(s, limit), terminal_line(s, limit)):
        assert len(out) <= limit
        assert not any(unicodedata.category(ch) in {"Cc", "Cs", "Zl", "Zp"} for ch in out)


@pytest.mark.parametrize(
    ("n", "shown"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (999, "999 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (3 * 1024 * 1024 // 2, "1.5 MiB"),
        (1024 * 1024 - 1, "1.0 MiB"),
        (5 * 1024**3, "5.0 GiB"),
        (2 * 1024**4, "2.0 TiB"),
        (1024**6, "1.0 EiB"),
        (10 * 1024**7, "10240.0 EiB"),
    ],
)
def test_format_size(n: int, shown: str) -> None:
    assert format_size(n) == shown


def test_format_size_refuses_negative() -> None:
    with pytest.raises(ValueError, match="negative"):
        format_size(-1)


@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_format_size_is_short(n: int) -> None:
    number, unit = format_size(n).split(" ")
    assert unit in {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
    assert float(number) < 1024 or unit == "EiB"
