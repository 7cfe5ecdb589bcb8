"""Nameplates: shape, word list, normalization, keyed hashing; party tokens."""

from __future__ import annotations

import hashlib
import re

import pytest

from ferry.broker import codes
from ferry.protocol.words import WORDS

pytestmark = pytest.mark.timeout(30)

KEY = b"k" * 32


def test_word_list() -> None:
    assert len(WORDS) >= 512
    assert len(set(WORDS)) == len(WORDS)
    for word in WORDS:
        assert re.fullmatch(r"[a-z]{2,8}", word), word


def test_format() -> None:
    for _ in range(200):
        nameplate = codes.generate()
        number, word = nameplate.split("-")
        assert 1 <= int(number) <= 999
        assert word in WORDS
        assert codes.is_well_formed(nameplate)
        assert codes.normalize(nameplate) == nameplate


def test_random() -> None:
    assert len({codes.generate() for _ in range(1000)}) > 990


def test_normalize_and_keyed_hash() -> None:
    assert codes.normalize("  7-Orbit \n") == "7-orbit"
    assert codes.normalize("007 orbit") == "7-orbit"
    assert codes.hash_code(KEY, " 7-ORBIT") == codes.hash_code(KEY, "7-orbit")
    assert len(codes.hash_code(KEY, "7-a")) == 64
    # keyed: another broker key gives another hash, and it is not the bare sha256
    assert codes.hash_code(b"x" * 32, "7-orbit") != codes.hash_code(KEY, "7-orbit")
    assert codes.hash_code(KEY, "7-orbit") != hashlib.sha256(b"7-orbit").hexdigest()


@pytest.mark.parametrize(
    "bad",
    # Non-ASCII digits: "¹".isdigit() is true but int() refuses it (it made a claim INTERNAL,
    # found by the fuzz test); "٣" (Arabic-Indic three) int() would read as 3.
    ["", "orbit", "0-a", "1000-a", "7", "7-a-b", "7-1", "¹-orbit", "٣-orbit", "7\u00b2-orbit"],
)
def test_malformed(bad: str) -> None:
    assert not codes.is_well_formed(codes.normalize(bad))


def test_a_whole_code_is_recognised() -> None:
    assert codes.looks_like_a_whole_code("7-orbit-lantern-quiet")
    assert not codes.looks_like_a_whole_code("7-orbit")


def test_tokens() -> None:
    token = codes.new_token()
    assert len(token) >= 43
    assert codes.hash_token(token) != token
