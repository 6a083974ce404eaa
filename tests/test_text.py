"""Client-supplied text made safe to record: always UTF-8, never invisible, bounded."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.text import safe_text

# What aiohttp hands over for header bytes that are not UTF-8 (surrogateescape).
_raw_bytes = st.binary(max_size=40).map(lambda b: b.decode("utf-8", "surrogateescape"))
_any_text = st.one_of(st.text(max_size=40), _raw_bytes, st.text(st.characters(), max_size=40))
_printable_ascii = st.text(st.sampled_from(string.printable[:95]), max_size=200)


@given(_any_text)
def test_the_result_always_encodes_to_utf8(text: str) -> None:
    result = safe_text(text)
    result.encode("utf-8", "strict")
    assert result.isprintable()


@given(_any_text, st.integers(min_value=1, max_value=30))
def test_a_limit_bounds_the_result(text: str, limit: int) -> None:
    result = safe_text(text, limit)
    result.encode("utf-8", "strict")
    assert len(result) <= limit


@given(_printable_ascii)
def test_printable_ascii_is_left_as_it_is(text: str) -> None:
    assert safe_text(text) is text


@given(st.text(st.characters(exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"))))
def test_printable_text_beyond_ascii_is_left_as_it_is(text: str) -> None:
    assert safe_text(text) == text


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"ckiq_live_\xff\xfeab", "ckiq_live_\\xff\\xfeab"),
        (b"caf\xc3\xa9", "café"),  # valid UTF-8 stays readable
        (b"a\x00b\x1b[31m", "a\\x00b\\x1b[31m"),
        (b"line\r\nbreak\t", "line\\x0d\\x0abreak\\x09"),
        (b"\xc2\x85", "\\u0085"),  # a C1 control character, not the byte 0x85
        (b"\xe2\x80\xae", "\\u202e"),  # right-to-left override: would reorder what follows
        (b"\x85", "\\x85"),  # the byte, not a character
    ],
)
def test_what_is_escaped_and_how(raw: bytes, expected: str) -> None:
    assert safe_text(raw.decode("utf-8", "surrogateescape")) == expected


def test_a_cut_is_marked_and_never_splits_an_escape() -> None:
    assert safe_text("abcdef", 4) == "abc…"
    assert safe_text("abcd", 4) == "abcd"
    assert safe_text("ab\udcffcd", 5) == "ab…"
    assert safe_text("ab\udcffcd", 7) == "ab\\xff…"
    assert safe_text("ab\udcff", 6) == "ab\\xff"


def test_a_limit_must_leave_room() -> None:
    with pytest.raises(ValueError, match="limit"):
        safe_text("abc", 0)
