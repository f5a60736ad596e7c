from __future__ import annotations

import pytest

from process_mcp.buffer import OutputBuffer
from process_mcp.terminal import RENDER_TAIL_BYTES, Terminal

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
