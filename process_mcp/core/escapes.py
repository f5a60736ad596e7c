"""Decoding of the escape sequences the stdin tool accepts.

Models often cannot put a raw control character into a tool argument, so ``stdin`` input may spell
them: ``\\n`` ``\\r`` ``\\t`` ``\\xHH`` (one byte, e.g. ``\\x03`` is Ctrl-C) ``\\uHHHH`` (one character)
and ``\\\\`` (a literal backslash, which the original server could not send). Anything else after a
backslash is an error rather than a guess.
"""

from __future__ import annotations

import re

from ..errors import InvalidInput

_SIMPLE = {"n": b"\n", "r": b"\r", "t": b"\t", "\\": b"\\"}
_ESCAPE = re.compile(r"\\(x[0-9A-Fa-f]{2}|u[0-9A-Fa-f]{4}|.|$)", re.DOTALL)
VALID_FORMS = r"\n \r \t \xHH \uHHHH \\"


def decode_input(text: str) -> bytes:
    """Return the bytes ``text`` stands for, with its escapes resolved; raise InvalidInput on a bad one."""
    out = bytearray()
    pos = 0
    for match in _ESCAPE.finditer(text):
        out += _literal(text[pos : match.start()], pos)
        out += _decode_one(match.group(1), match.start(), text)
        pos = match.end()
    out += _literal(text[pos:], pos)
    return bytes(out)


def _literal(chunk: str, where: int) -> bytes:
    try:
        return chunk.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInput(
            f"the input holds a lone surrogate at position {where + exc.start}; send valid Unicode text"
        ) from None


_HEX_NEEDED = {"x": (2, "\\x03 for Ctrl-C"), "u": (4, "\\u00e9 for e with an acute accent")}


def _decode_one(body: str, where: int, text: str) -> bytes:
    if body in _SIMPLE:
        return _SIMPLE[body]
    if len(body) == 3 and body[0] == "x":
        return bytes([int(body[1:], 16)])
    if len(body) == 5 and body[0] == "u":
        code = int(body[1:], 16)
        if 0xD800 <= code <= 0xDFFF:
            raise InvalidInput(f"\\{body} at position {where} is a lone surrogate; send the character itself")
        return chr(code).encode("utf-8")
    if body in _HEX_NEEDED:
        digits, example = _HEX_NEEDED[body]
        given = text[where : where + 2 + digits]
        raise InvalidInput(
            f"'{given}' at position {where} is not a valid escape: \\{body} needs exactly {digits} hex digits "
            f"(0-9, a-f), as in {example}; write \\\\ for a literal backslash"
        )
    shown = "a trailing backslash" if body == "" else f"'\\{body}'"
    raise InvalidInput(
        f"{shown} at position {where} is not a valid escape; use one of {VALID_FORMS} "
        "(write \\\\ for a literal backslash)"
    )
