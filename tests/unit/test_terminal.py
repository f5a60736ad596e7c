from __future__ import annotations

import time

import pytest

from process_mcp.core.buffer import OutputBuffer
from process_mcp.core.terminal import RENDER_BUDGET_S, RENDER_TAIL_BYTES, SAVED_CURSORS, Terminal, strip_escapes

pytestmark = pytest.mark.anyio


def make(cols: int = 20, rows: int = 4) -> tuple[OutputBuffer, Terminal]:
    buffer = OutputBuffer(1 << 20)
    return buffer, Terminal(buffer, cols, rows)


async def test_the_screen_shows_text_after_control_sequences_are_applied() -> None:
    buffer, terminal = make()
    buffer.append(b"hello\r\nworld\rW\x1b[1;32m!\x1b[0m\r\n")
    assert await terminal.lines() == ["hello", "W!rld"]


async def test_lines_scrolled_off_the_top_stay_in_the_scrollback() -> None:
    buffer, terminal = make(rows=3)
    buffer.append(b"".join(b"%d\r\n" % n for n in range(1, 8)))
    assert await terminal.lines() == ["6", "7"]
    assert await terminal.lines(scrollback=True) == [str(n) for n in range(1, 8)]


async def test_rendering_catches_up_incrementally() -> None:
    buffer, terminal = make()
    buffer.append(b"one")
    assert await terminal.lines() == ["one"]
    buffer.append(b"\rtwo")
    assert await terminal.lines() == ["two"]


async def test_clearing_the_screen_clears_it() -> None:
    buffer, terminal = make()
    buffer.append(b"old stuff\r\n\x1b[2J\x1b[Hnew")
    assert await terminal.lines() == ["new"]


async def test_a_flood_is_rendered_from_its_tail_only() -> None:
    buffer, terminal = make(rows=3)
    buffer.append(b"".join(b"line %06d\r\n" % n for n in range(200_000)))
    assert buffer.dropped > 0
    assert len(buffer) > 50 * RENDER_TAIL_BYTES
    assert await terminal.lines() == ["line 199998", "line 199999"]
    history = await terminal.lines(scrollback=True)
    assert history[0].startswith("[... ")
    assert "not rendered" in history[0]
    assert history[-1] == "line 199999"


async def test_a_malformed_sequence_is_dropped_and_what_follows_still_renders() -> None:
    # pyte raises on each of these (extra parameters, a 5000-digit number, private for a plain handler,
    # origin mode without margins) and loses the rest of what it was fed.
    for sequence in (b"\x1b[1;2L", b"\x1b[" + b"9" * 5000 + b"m", b"\x1b[?5A", b"\x1b[?6h\x1b[5d", b"\x1b[5K"):
        buffer, terminal = make()
        buffer.append(b"before\r\n" + sequence + b"\r\nafter")
        lines = await terminal.lines()
        assert lines[0] == "before", sequence
        assert lines[-1] == "after", sequence


def test_raw_text_loses_every_kind_of_escape_sequence() -> None:
    assert strip_escapes("a\x1b(Bb\x1b#8c\x1b7d\x1b[1;31me\x1b]0;title\x07f") == "abcdef"


async def test_a_wide_character_overwritten_by_a_narrow_one_renders() -> None:
    buffer, terminal = make()
    buffer.append("中文\ra".encode())
    assert await terminal.lines() == ["a 文"]


async def test_cursor_saves_do_not_pile_up() -> None:
    buffer, terminal = make()
    buffer.append(b"\x1b7" * 50_000 + b"\x1b8ok")
    assert await terminal.lines() == ["ok"]
    assert len(terminal._screen.savepoints) <= SAVED_CURSORS


# Sequences whose cost in pyte is per screen or per line, not per byte (DECALN fills the screen in 3
# bytes): a full tail of each, on a full screen, must cost a bounded render, then render or say it does not.
COSTLY = {
    "DECALN": b"\x1b#8",
    "DECALN then erase display": b"\x1b#8\x1b[2J",
    "erase below after DECALN": b"\x1b[H\x1b#8\x1b[J",
    "reverse video on and off": b"\x1b[?5h\x1b[?5l",
    "132 columns on and off": b"\x1b[?3h\x1b[?3l",
    "insert characters": b"\x1b[9999@",
    "delete characters": b"\x1b[9999P",
    "insert lines": b"\x1b[9999L",
    "delete lines": b"\x1b[9999M",
    "erase characters": b"\x1b[9999X",
    "erase line": b"\x1b[2K",
    "reverse index at the top": b"\x1b[H\x1bM",
    "line feed at the bottom": b"\n",
    "tab stops": b"\x1bH\t",
    "combining characters": "\u0301".encode(),
}


@pytest.mark.parametrize("unit", COSTLY.values(), ids=COSTLY.keys())
async def test_a_flood_of_screen_wide_sequences_costs_a_bounded_render(unit: bytes) -> None:
    buffer, terminal = make(cols=120, rows=30)
    filled = b"".join(b"\x1b[%d;1H" % (y + 1) + b"x" * 120 for y in range(30))
    buffer.append(filled + unit * ((RENDER_TAIL_BYTES - len(filled)) // len(unit)))
    began = time.process_time()
    lines = await terminal.lines()
    # Generous: the budget, a slice of overshoot, and the display; unbounded, most took seconds to minutes.
    assert time.process_time() - began < RENDER_BUDGET_S + 1.0
    if lines and lines[0].startswith("[terminal not rendered"):
        assert f"more than {RENDER_BUDGET_S:g} s of CPU" in lines[0]
    buffer.append(b"\x1b[H\x1b[2Jstill here")
    after = await terminal.lines()
    assert after[-1].endswith("still here"), after[:2]
