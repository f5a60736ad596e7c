"""Rendering a TTY process's output as the screen a person would see.

pyte is slow (well under 1 MB/s) while a PTY delivers tens of MB/s, so output is never fed to pyte
as it arrives. The raw bytes go to the process's bounded buffer; the screen catches up only when
someone asks for it, and from a bounded tail: after a flood, the last ``RENDER_TAIL_BYTES`` are
enough to paint a 120x30 screen, and rendering them takes tens of milliseconds, not minutes.

pyte's cost is per escape sequence, not per byte: three bytes of DECALN (``ESC # 8``) fill the whole
screen, so 4 KiB of them took pyte 8-10 s. The sequences that act on the whole screen are replaced by
equivalents that cost a line each (only the text is shown, so attributes need not be kept), and each
render has a CPU budget, RENDER_BUDGET_S, checked every RENDER_SLICE_BYTES: a process whose output
needs more is not rendered again, and its text is shown instead, saying so.
"""

from __future__ import annotations

import re
import time
from collections import deque

import anyio
import anyio.to_thread
import pyte
from pyte import modes
from pyte.screens import StaticDefaultDict, wcwidth

from .buffer import OutputBuffer, decode_utf8

RENDER_TAIL_BYTES = 16 * 1024
"""Most bytes fed to pyte per render; ~20 ms of pyte work, and several full screens of text."""
SCROLLBACK_LINES = 1000
"""Lines kept once they scroll off the top of the screen."""
RENDER_BUDGET_S = 0.5
"""CPU seconds one render may spend in pyte (an ordinary tail takes well under 0.1 s); a terminal whose
output needs more is not rendered again, its text is shown instead."""
RENDER_SLICE_BYTES = 256
"""Bytes fed to pyte between checks of the budget; with no sequence costing more than a few lines'
work, a slice takes milliseconds."""
SAVED_CURSORS = 16
"""Cursor saves (``ESC 7``) kept; pyte keeps a list that every save would grow."""


# CSI (colours, cursor moves), OSC (titles, ended by BEL or ST), other escapes (ESC, intermediate bytes,
# a final one: ``ESC 7``, ``ESC ( B``, ``ESC # 8``), and the control characters a screen would act on
# rather than show (\r, backspace, bell, ...).
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b\n]{0,512}(?:\x07|\x1b\\)?|\x1b[ -/]*[0-~]|[\x00-\x08\x0b-\x1f\x7f]"
)


def strip_escapes(text: str) -> str:
    """Terminal output as plain text: escape sequences and control characters removed, \r\n as \n."""
    return _ESCAPES.sub("", text.replace("\r\n", "\n"))


def clean(text: str) -> str:
    """Output as a model should read it: each line as it was last drawn (a progress bar that redraws
    itself after \r shows its last state), then without escape sequences or control characters."""
    text = text.replace("\r\n", "\n")
    if "\r" in text:
        text = "\n".join(_last_drawn(line) if "\r" in line else line for line in text.split("\n"))
    return _ESCAPES.sub("", text)


def _last_drawn(line: str) -> str:
    """The last part of a line redrawn after carriage returns that shows something."""
    for part in reversed(line.split("\r")):
        if _ESCAPES.sub("", part).strip():
            return part
    return ""


class _Screen(pyte.Screen):
    """A pyte screen that remembers lines scrolled off the top, cheaply (HistoryScreen is ~4x slower),
    keeps text only, and whose every sequence costs at most a line or so of work per line of screen."""

    def __init__(self, columns: int, lines: int, scrollback: deque[str]) -> None:
        super().__init__(columns, lines)
        self.scrollback = scrollback

    @property
    def display(self) -> list[str]:
        """The screen's lines; the right half of a wide character that was overwritten shows as a space
        (pyte's own display fails on it)."""
        return [_row_text(self.buffer[y], self.columns) for y in range(self.lines)]

    def index(self) -> None:
        top, bottom = self.margins or pyte.screens.Margins(0, self.lines - 1)
        if top == 0 and self.cursor.y == bottom:
            self.scrollback.append(_row_text(self.buffer[0], self.columns).rstrip())
        super().index()

    def alignment_display(self) -> None:
        """DECALN: the screen full of E's, a line at a time (pyte keeps each cell's attributes, cell by cell)."""
        filled = self.default_char._replace(data="E")
        for y in range(self.lines):
            row: StaticDefaultDict[int, pyte.screens.Char] = StaticDefaultDict(self.default_char)
            row.update(dict.fromkeys(range(self.columns), filled))
            self.buffer[y] = row

    def erase_in_display(self, how: int = 0, *args: int, **kwargs: bool) -> None:
        """ED: erased lines are dropped (blank), rather than each cell set to the cursor's attributes."""
        if how in (2, 3):
            self.buffer.clear()
        elif how in (0, 1):
            for y in range(self.cursor.y + 1, self.lines) if how == 0 else range(self.cursor.y):
                self.buffer.pop(y, None)
            self.erase_in_line(how)

    def erase_in_line(self, how: int = 0, private: bool = False) -> None:
        if how == 2:
            self.buffer.pop(self.cursor.y, None)
        elif how in (0, 1):  # pyte fails on any other
            super().erase_in_line(how, private)

    def set_mode(self, *modes_: int, **kwargs: bool) -> None:
        super().set_mode(*self._without_reverse_video(modes_, kwargs, on=True), **kwargs)

    def reset_mode(self, *modes_: int, **kwargs: bool) -> None:
        super().reset_mode(*self._without_reverse_video(modes_, kwargs, on=False), **kwargs)

    def _without_reverse_video(self, modes_: tuple[int, ...], kwargs: dict[str, bool], *, on: bool) -> list[int]:
        """DECSCNM (reverse video) only changes attributes, which pyte rewrites cell by cell: noted, not applied."""
        if not kwargs.get("private") or modes.DECSCNM >> 5 not in modes_:
            return list(modes_)
        if on:
            self.mode.add(modes.DECSCNM)
        else:
            self.mode.discard(modes.DECSCNM)
        return [mode for mode in modes_ if mode != modes.DECSCNM >> 5]

    def save_cursor(self) -> None:
        super().save_cursor()
        del self.savepoints[:-SAVED_CURSORS]


class _Stream(pyte.ByteStream):
    """A byte stream that drops a malformed sequence and reads on, where pyte raises (and the rest of
    the data fed with it would be lost)."""

    def _send_to_parser(self, data: str) -> bool | None:
        try:
            result: bool | None = super()._send_to_parser(data)
        except _PYTE_ERRORS:
            # pyte has reset its parser: take what follows as text again.
            return True
        return result


_PYTE_ERRORS = (TypeError, ValueError, IndexError, AssertionError, AttributeError)
"""What pyte raises on sequences a process may print: more parameters than a handler takes
(``ESC [ 1 ; 2 L``), a number of thousands of digits, ``private`` for a handler without it, origin mode
without margins."""


def _row_text(row: dict[int, pyte.screens.Char], columns: int) -> str:
    """One line of the screen as text: a wide character's second cell is skipped, an orphaned one is a space."""
    if not row:
        return ""
    cells = []
    wide = False
    for x in range(min(columns, max(row) + 1)):
        if wide:
            wide = False
            continue
        data = row[x].data
        if not data:
            cells.append(" ")
            continue
        wide = wcwidth(data[0]) == 2
        cells.append(data)
    return "".join(cells)


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
        self._stream = _Stream(self._screen)
        self._rendered = 0  # position in source up to which the screen is up to date
        self._skipped = 0  # bytes never rendered because the screen was too far behind
        self._spent = False  # a render ran out of its budget: the screen is not rendered again
        self._lock = anyio.Lock()

    async def lines(self, *, scrollback: bool = False) -> list[str]:
        """The screen (after the scrollback, if asked), right-trimmed, without trailing blank rows; for a
        terminal too costly to render, a line saying so and the output's last lines as text."""
        async with self._lock:
            if self._spent:
                return self._text(scrollback)
            pending, lost = self._source.since(self._rendered)
            self._rendered = self._source.total
            if not pending:
                return self._display(scrollback)
            rendered = await anyio.to_thread.run_sync(self._feed_and_display, pending, lost, scrollback)
            return self._text(scrollback) if rendered is None else rendered

    def _feed_and_display(self, pending: bytes, lost: int, scrollback: bool) -> list[str] | None:
        """Runs in a worker thread: feed ``pending`` to pyte within RENDER_BUDGET_S; None if it ran out."""
        if lost or len(pending) > RENDER_TAIL_BYTES:
            # Too far behind to replay at pyte speed: paint a fresh screen from the tail alone.
            self._skipped += lost + len(pending) - RENDER_TAIL_BYTES
            self._scrollback.clear()
            self._screen = _Screen(self._cols, self._rows, self._scrollback)
            self._stream = _Stream(self._screen)
            pending = pending[-RENDER_TAIL_BYTES:]
        began = time.thread_time()
        for offset in range(0, len(pending), RENDER_SLICE_BYTES):
            self._stream.feed(pending[offset : offset + RENDER_SLICE_BYTES])
            if time.thread_time() - began > RENDER_BUDGET_S:
                self._spent = True
                return None
        return self._display(scrollback)

    def _text(self, scrollback: bool) -> list[str]:
        """The output's last RENDER_TAIL_BYTES as plain text (its last screenful unless ``scrollback``),
        after a line saying why it is not rendered."""
        tail = self._source.tail(RENDER_TAIL_BYTES)
        text = strip_escapes(decode_utf8(tail, cut_head=len(tail) < self._source.total)).splitlines()
        marker = (
            f"[terminal not rendered: this process's output took more than {RENDER_BUDGET_S:g} s of CPU to "
            f"render; its last {len(tail)} bytes follow as text, without escape sequences]"
        )
        return _trim([marker, *(text if scrollback else text[-self._rows :])])

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
