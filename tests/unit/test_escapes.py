from __future__ import annotations

import pytest

from process_mcp import InvalidInput
from process_mcp.core.escapes import decode_input


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain", b"plain"),
        ("a\\nb", b"a\nb"),
        ("\\r\\t", b"\r\t"),
        ("\\x03", b"\x03"),
        ("\\x1b[A", b"\x1b[A"),
        ("\\xff", b"\xff"),
        ("\\u00e9", "é".encode()),
        ("\\u4e2D", "中".encode()),
        ("C:\\\\dir", b"C:\\dir"),
        ("\\\\n", b"\\n"),
        ("already\nreal", b"already\nreal"),
        ("café", "café".encode()),
        ("", b""),
    ],
)
def test_escapes_decode_to_the_bytes_they_stand_for(text: str, expected: bytes) -> None:
    assert decode_input(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("\\q", "'\\q' at position 0 is not a valid escape"),
        ("ab\\", "a trailing backslash at position 2"),
        ("\\ud800", "lone surrogate"),
        ("x\ud800", "lone surrogate at position 1"),
    ],
)
def test_invalid_escapes_are_refused_with_the_valid_forms(text: str, fragment: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        decode_input(text)
    assert fragment in str(caught.value)
    assert "\\n \\r \\t \\xHH \\uHHHH \\\\" in str(caught.value) or "surrogate" in fragment


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("\\x4", "'\\x4' at position 0 is not a valid escape: \\x needs exactly 2 hex digits"),
        ("ab\\xZZ", "'\\xZZ' at position 2 is not a valid escape: \\x needs exactly 2 hex digits"),
        ("\\u12", "'\\u12' at position 0 is not a valid escape: \\u needs exactly 4 hex digits"),
        ("\\u12g4", "'\\u12g4' at position 0 is not a valid escape: \\u needs exactly 4 hex digits"),
    ],
)
def test_a_short_hex_escape_says_how_many_digits_it_needs(text: str, fragment: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        decode_input(text)
    assert fragment in str(caught.value)
