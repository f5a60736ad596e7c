"""Waiting on a process for one call: until new output matches, goes quiet, or the process exits.

Shared by both backends. A wait never polls: it sleeps on the record's change event (set on every
output and on exit) or until the next deadline, whichever comes first. Output is matched as text,
incrementally, so a long wait on a chatty process does not rescan everything it printed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio

from .buffer import OutputBuffer, decode_utf8
from .errors import InvalidInput
from .models import SINCE_MAX_BYTES, WaitResult
from .registry import ManagedProcess
from .terminal import strip_escapes

PROGRESS_INTERVAL_S = 1.0
"""How often a wait reports progress to a client that asked for it."""
MATCH_OVERLAP_BYTES = 4096
"""Bytes before the new output that a pattern may start in; a match longer than this can be missed."""
OUTPUT_SETTLE_S = 0.25
"""After an exit, how long a wait lets output still in flight arrive (a PTY delivers it a moment
later); it only runs out when a leftover child keeps the output open."""

Progress = Callable[[float, float], Awaitable[None]]
"""Called with (seconds waited, seconds allowed) while a wait runs."""


@dataclass(frozen=True)
class Wait:
    """What one call waits for; ``timeout_s`` bounds it. Exit always ends a wait."""

    timeout_s: float
    pattern: re.Pattern[str] | None = None
    idle_s: float | None = None
    any_output: bool = False

    @staticmethod
    def compile(pattern: str | None) -> re.Pattern[str] | None:
        """``pattern`` as a regular expression (multiline); raise InvalidInput saying what is wrong."""
        if pattern is None:
            return None
        if not pattern:
            raise InvalidInput("waitFor is empty; pass a regular expression such as '\\\\$ $' or omit it")
        try:
            return re.compile(pattern, re.MULTILINE)
        except re.error as exc:
            raise InvalidInput(f"waitFor {pattern!r} is not a valid regular expression: {exc}") from None


class _Matcher:
    """Searches what a stream printed after ``start``, a bit more each time."""

    def __init__(self, buffer: OutputBuffer, start: int, pattern: re.Pattern[str], tty: bool) -> None:
        self._buffer = buffer
        self._checked = start  # bytes up to here were searched (with an overlap kept for the next search)
        self._start = start
        self._pattern = pattern
        self._tty = tty

    def search(self) -> bool:
        if self._buffer.total == self._checked:
            return False
        begin = max(self._start, self._checked - MATCH_OVERLAP_BYTES)
        data, _ = self._buffer.since(begin)
        self._checked = self._buffer.total
        return self._pattern.search(stream_text(data, self._tty, cut_head=begin > self._start)) is not None


def stream_text(data: bytes, tty: bool, *, cut_head: bool = False, complete: bool = True) -> str:
    """Output bytes as text; a terminal's escape sequences are removed."""
    text = decode_utf8(data, cut_head=cut_head, complete=complete)
    return strip_escapes(text) if tty else text


def text_since(buffer: OutputBuffer, cursor: int, tty: bool, *, complete: bool) -> tuple[str, int]:
    """What ``buffer`` holds after ``cursor`` (its newest SINCE_MAX_BYTES), and how many bytes after
    the cursor are not shown."""
    if cursor < 0:
        raise InvalidInput(f"since must be 0 or more (a cursor from an earlier reply), got {cursor}")
    data, lost = buffer.since(cursor)
    skipped = max(0, len(data) - SINCE_MAX_BYTES)
    text = stream_text(data[skipped:], tty, cut_head=bool(lost or skipped), complete=complete)
    return text, lost + skipped


async def wait_on(
    record: ManagedProcess, wait: Wait, start: tuple[int, int], progress: Progress | None = None
) -> WaitResult:
    """Wait as ``wait`` says, for output after ``start`` (stdout and stderr cursors). Returns why it ended."""
    matchers = []
    if wait.pattern is not None:
        matchers = [_Matcher(record.stdout, start[0], wait.pattern, record.tty)]
        if not record.tty:
            matchers.append(_Matcher(record.stderr, start[1], wait.pattern, False))
    began = time.monotonic()
    deadline = began + wait.timeout_s
    next_report = began + PROGRESS_INTERVAL_S

    def matched() -> bool:
        if wait.any_output and (record.stdout.total, record.stderr.total) != start:
            return True
        return any([m.search() for m in matchers])  # every matcher advances, so a list, not a generator

    while True:
        changed = record.changed()
        if matched():
            return "matched"
        if not record.running:
            await record.wait(OUTPUT_SETTLE_S, output=True)
            return "matched" if matched() else "exited"
        now = time.monotonic()
        wake = deadline
        if wait.idle_s is not None:
            quiet_since = max(record.last_output, began)
            if now - quiet_since >= wait.idle_s:
                return "idle"
            wake = min(wake, quiet_since + wait.idle_s)
        if now >= deadline:
            return "timeout"
        if progress is not None:
            if now >= next_report:
                await progress(now - began, wait.timeout_s)
                next_report = now + PROGRESS_INTERVAL_S
            wake = min(wake, next_report)
        with anyio.move_on_after(max(0.0, wake - time.monotonic())):
            await changed.wait()


async def wait_exit(record: ManagedProcess, timeout_s: float, progress: Progress | None = None) -> bool:
    """Wait up to ``timeout_s`` for the process to exit, reporting progress every PROGRESS_INTERVAL_S
    to a client that asked for it; say whether it exited."""
    began = time.monotonic()
    deadline = began + timeout_s
    while True:
        step = deadline - time.monotonic()
        if progress is not None:
            step = min(step, PROGRESS_INTERVAL_S)
        if await record.wait(max(0.0, step)):
            return True
        now = time.monotonic()
        if now >= deadline:
            return False
        assert progress is not None
        await progress(now - began, timeout_s)
