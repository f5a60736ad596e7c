"""Rendering a TTY process's output as the screen a person would see.

pyte is slow (well under 1 MB/s) while a PTY delivers tens of MB/s, so output is never fed to pyte
as it arrives. The raw bytes go to the process's bounded buffer; the screen catches up only when
someone asks for it, and from a bounded tail: after a flood, the last ``RENDER_TAIL_BYTES`` are
enough to paint a 120x30 screen, and rendering them takes tens of milliseconds, not minutes.
"""

from __future__ import annotations

import re
from collections import deque

import anyio
import anyio.to_thread
import pyte

from .buffer import OutputBuffer

RENDER_TAIL_BYTES = 16 * 1024
"""Most bytes fed to pyte per render; ~20 ms of pyte work, and several full screens of text."""
SCROLLBACK_LINES = 1000
"""Lines kept once they scroll off the top of the screen."""


# CSI (colours, cursor moves), OSC (titles, ended by BEL or ST), other two-byte escapes, and the
# control characters a screen would act on rather than show (\r, backspace, bell, ...).
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[ -~]|[\x00-\x08\x0b-\x1f\x7f]")


def strip_escapes(text: str) -> str:
    """Terminal output as plain text: escape sequences and control characters removed, \r\n as \n."""
    return _ESCAPES.sub("", text.replace("\r\n", "\n"))


class _Screen(pyte.Screen):
    """A pyte screen that remembers lines scrolled off the top, cheaply (HistoryScreen is ~4x slower)."""

    def __init__(self, columns: int, lines: int, scrollback: deque[str]) -> None:
        super().__init__(columns, lines)
        self.scrollback = scrollback

    def index(self) -> None:
        top, bottom = self.margins or pyte.screens.Margins(0, self.lines - 1)
        if top == 0 and self.cursor.y == bottom:
            row = self.buffer[0]
            self.scrollback.append("".join(row[x].data for x in range(self.columns)).rstrip())
        super().index()


class Terminal:
    """A virtual terminal that renders, on demand, what a process wrote to its PTY.

    The source buffer is only touched on the event loop; pyte runs in a worker thread.
    """

    def __init__(self, source: OutputBuffer, cols: int, rows: int) -> None:
        self._source = source
        self._cols = cols
        self._rows = rows
        self._scrollback: deque[str] = deque(maxlen=SCROLLBACK_LINES)
        self._screen = _Screen(cols, rows, self._scrollback)
        self._stream = pyte.ByteStream(self._screen)
        self._rendered = 0  # position in source up to which the screen is up to date
        self._skipped = 0  # bytes never rendered because the screen was too far behind
        self._lock = anyio.Lock()

    async def lines(self, *, scrollback: bool = False) -> list[str]:
        """The screen (after the scrollback, if asked), right-trimmed, without trailing blank rows."""
        async with self._lock:
            pending, lost = self._source.since(self._rendered)
            self._rendered = self._source.total
            if not pending:
                return self._display(scrollback)
            return await anyio.to_thread.run_sync(self._feed_and_display, pending, lost, scrollback)

    def _feed_and_display(self, pending: bytes, lost: int, scrollback: bool) -> list[str]:
        if lost or len(pending) > RENDER_TAIL_BYTES:
            # Too far behind to replay at pyte speed: paint a fresh screen from the tail alone.
            self._skipped += lost + len(pending) - RENDER_TAIL_BYTES
            self._scrollback.clear()
            self._screen = _Screen(self._cols, self._rows, self._scrollback)
            self._stream = pyte.ByteStream(self._screen)
            pending = pending[-RENDER_TAIL_BYTES:]
        self._stream.feed(pending)
        return self._display(scrollback)

    def _display(self, scrollback: bool) -> list[str]:
        screen: list[str] = self._screen.display
        if not scrollback:
            return _trim(screen)
        marker = [f"[... {self._skipped} bytes of earlier terminal output not rendered ...]"] if self._skipped else []
        return _trim([*marker, *self._scrollback, *screen])


def _trim(lines: list[str]) -> list[str]:
    trimmed = [line.rstrip() for line in lines]
    while trimmed and not trimmed[-1]:
        trimmed.pop()
    return trimmed
