"""One-time codes: shape, word list, normalization, hashing."""

from __future__ import annotations

import re

import pytest

from ferry.broker import codes
from ferry.broker._words import WORDS

pytestmark = pytest.mark.timeout(30)


def test_word_list() -> None:
    assert len(WORDS) >= 512
    assert len(set(WORDS)) == len(WORDS)
    for word in WORDS:
        assert re.fullmatch(r"[a-z]{2,8}", word), word


def test_format() -> None:
    for _ in range(200):
        code = codes.generate()
        number, *words = code.split("-")
        assert 1 <= int(number) <= 999
        assert len(words) == 3
        assert all(w in WORDS for w in words)
        assert codes.is_well_formed(code)
        assert codes.normalize(code) == code


def test_random() -> None:
    assert len({codes.generate() for _ in range(1000)}) > 990


def test_normalize() -> None:
    assert codes.normalize("  7-Orbit-LANTERN-quiet \n") == "7-orbit-lantern-quiet"
    assert codes.normalize("007 orbit  lantern_quiet") == "7-orbit-lantern-quiet"
    assert codes.hash_code(" 7-ORBIT-lantern-quiet") == codes.hash_code("7-orbit-lantern-quiet")
    assert len(codes.hash_code("7-a-b-c")) == 64


@pytest.mark.parametrize(
    "bad", ["", "orbit-lantern-quiet", "0-a-b-c", "1000-a-b-c", "7-a-b", "7-a-b-1"]
)
def test_malformed(bad: str) -> None:
    assert not codes.is_well_formed(codes.normalize(bad))


def test_tokens() -> None:
    token = codes.new_token()
    assert len(token) >= 43
    assert codes.hash_token(token) != token
