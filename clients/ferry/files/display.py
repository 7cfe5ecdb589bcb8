"""Showing file names and sizes on a terminal.

File names come from the other peer, so they are untrusted: a name may carry an escape sequence that
rewrites the screen, a bidi override that makes ``gpj.exe`` look like ``exe.jpg``, or invisible
characters that make two different names look the same. :func:`escape_name` turns every such
character into a visible escape (``\\x1b``, ``\\u202e``) and leaves ordinary text (accents, CJK,
emoji) alone. A backslash is doubled so that an escape can never be confused with literal text.

Text from the other peer or from the broker (a decline, cancel or failure reason, an Abort's
reason, a broker's error details) is untrusted in the same way and may also be long: a 1 MiB
"reason" is one screen-filling line. :func:`shown` is the one function that makes such text
presentable -- escaped like a name and cut to a bounded length -- wherever it enters a message.
:func:`terminal_line` is the last guard in front of the terminal: the CLI passes every line it
writes through it, so that a string that reached a message by a path nobody thought of still
cannot move the cursor, set the title, write the clipboard (OSC 52) or fill the screen.
"""

from __future__ import annotations

import unicodedata

__all__ = ["LINE_CHARS", "SHOWN_CHARS", "escape_name", "format_size", "shown", "terminal_line"]

SHOWN_CHARS = 240
"""How much of one untrusted string (a peer's reason, say) a message shows, escapes included."""

LINE_CHARS = 4096
"""The longest line the CLI writes to a terminal (a manifest path is at most 4,096 bytes)."""

_CUT = "\u2026"  # the ellipsis that marks where text was cut

_ZWJ = 0x200D
_VARIATION_SELECTOR_16 = 0xFE0F
_BLACK_FLAG = 0x1F3F4
_TAG_FIRST, _TAG_LAST = 0xE0020, 0xE007F
_SKIN_TONE_FIRST, _SKIN_TONE_LAST = 0x1F3FB, 0x1F3FF

# Categories that never print as themselves: controls, format characters (bidi controls, zero-width
# characters, soft hyphen, BOM, ...), surrogates, and the line/paragraph separators.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _escape_char(cp: int) -> str:
    if cp < 0x100:
        return f"\\x{cp:02x}"
    if cp < 0x10000:
        return f"\\u{cp:04x}"
    return f"\\U{cp:08x}"


def _is_emoji_base(ch: str) -> bool:
    cp = ord(ch)
    return (
        unicodedata.category(ch) == "So"
        or cp == _VARIATION_SELECTOR_16
        or _SKIN_TONE_FIRST <= cp <= _SKIN_TONE_LAST
    )


def _keep_format_char(s: str, i: int) -> bool:
    """Whether the format character ``s[i]`` is part of an emoji and so may be shown as is."""
    cp = ord(s[i])
    if cp == _ZWJ:
        # A zero-width joiner between two emoji builds one picture (family, rainbow flag).
        return 0 < i < len(s) - 1 and _is_emoji_base(s[i - 1]) and _is_emoji_base(s[i + 1])
    if _TAG_FIRST <= cp <= _TAG_LAST:
        # Tag characters spell subdivision flags after a black flag (England, Scotland, Wales).
        j = i - 1
        while j >= 0 and _TAG_FIRST <= ord(s[j]) <= _TAG_LAST:
            j -= 1
        return j >= 0 and ord(s[j]) == _BLACK_FLAG
    return False


def _pieces(s: str, *, backslash: bool) -> list[str]:
    """Each character of ``s`` as it is shown (itself, or its escape): one piece per character,
    so that cutting between pieces never cuts an escape in half."""
    out: list[str] = []
    for i, ch in enumerate(s):
        if ch == "\\" and backslash:
            out.append("\\\\")
        elif unicodedata.category(ch) in _ESCAPED_CATEGORIES and not (
            unicodedata.category(ch) == "Cf" and _keep_format_char(s, i)
        ):
            out.append(_escape_char(ord(ch)))
        else:
            out.append(ch)
    return out


def escape_name(s: str) -> str:
    """Return ``s`` made safe to print on a terminal.

    Escaped: C0 and C1 control characters and DEL (so also every ESC sequence), Unicode format
    characters (bidi embeddings, overrides and isolates, marks, zero-width spaces and joiners, BOM,
    soft hyphen), lone surrogates, and line/paragraph separators. A zero-width joiner between two
    emoji and the tag characters of a subdivision flag are kept, so emoji still render. A
    backslash becomes ``\\\\``. Everything else is returned unchanged.
    """
    return "".join(_pieces(s, backslash=True))


def _bounded(s: str, limit: int, *, backslash: bool) -> str:
    """``s`` escaped, and if that is longer than ``limit``, its start and end around an ellipsis.

    Only the first and last ``limit`` characters can be shown, so only they are escaped: a
    huge string costs no more than a short one.
    """
    if limit < 3:
        raise ValueError(f"a limit must be at least 3 characters: {limit}")
    if len(s) <= limit:
        pieces = _pieces(s, backslash=backslash)
        if sum(map(len, pieces)) <= limit:
            return "".join(pieces)
        head_src, tail_src = s, s
    else:
        head_src, tail_src = s[:limit], s[-limit:]
    budget = limit - len(_CUT)
    head_budget = budget - budget // 2
    head: list[str] = []
    used = 0
    for piece in _pieces(head_src, backslash=backslash):
        if used + len(piece) > head_budget:
            break
        head.append(piece)
        used += len(piece)
    tail: list[str] = []
    used = 0
    for piece in reversed(_pieces(tail_src, backslash=backslash)):
        if used + len(piece) > budget // 2:
            break
        tail.append(piece)
        used += len(piece)
    return "".join(head) + _CUT + "".join(reversed(tail))


def shown(text: str, limit: int = SHOWN_CHARS) -> str:
    """Return untrusted ``text`` (a peer's or the broker's reason, a name) as a message may
    show it: escaped like `escape_name`, and at most ``limit`` characters long -- a longer one
    keeps its start and its end around an ellipsis (``\u2026``)."""
    return _bounded(text, limit, backslash=True)


def terminal_line(line: str, limit: int = LINE_CHARS) -> str:
    """Return one line of output made safe for a terminal, whatever it holds.

    The last guard before the CLI writes: every character `escape_name` escapes is escaped
    here too (a newline included: one call, one line), except that a backslash is left
    alone, because the untrusted parts of a message were escaped with `shown` already and
    doubling their backslashes again would garble them. The line is cut to ``limit``
    characters as `shown` cuts.
    """
    return _bounded(line, limit, backslash=False)


_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_size(n: int) -> str:
    """Return a byte count in binary units: ``999 B``, ``1.0 KiB``, ``1.5 MiB``.

    Raises ValueError for a negative count.
    """
    if n < 0:
        raise ValueError(f"a size cannot be negative: {n}")
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in _UNITS:
        value /= 1024
        # Move to the next unit when rounding would print "1024.0".
        if round(value, 1) < 1024 or unit == _UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover
