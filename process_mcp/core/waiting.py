"""Waiting on a process for one call: until new output matches, goes quiet, or the process exits.

Shared by both backends. A wait never polls: it sleeps on the record's change event (set on every
output and on exit) or until the next deadline, whichever comes first. Output is matched as text,
incrementally, so a long wait on a chatty process does not rescan everything it printed.

A pattern is the caller's, and a backtracking pattern can take exponential time (``^(a+)+b$`` on a line
of ``a``s), so it never runs on the event loop: each search runs in a worker thread, with the GIL
released (the ``regex`` module's ``concurrent``), and is stopped after MATCH_TIMEOUT_S; a pattern that
needs more is refused as too costly while its process keeps running.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import anyio
import anyio.to_thread
import regex

from ..errors import InvalidInput, excerpt
from .buffer import OutputBuffer, complete_prefix, decode_utf8
from .handle import InputWanted
from .models import SINCE_MAX_BYTES, WaitResult
from .registry import ManagedProcess
from .terminal import clean, strip_escapes

PROGRESS_INTERVAL_S = 1.0
"""How often a wait reports progress to a client that asked for it."""
MATCH_OVERLAP_BYTES = 4096
"""Bytes before the new output that a pattern may start in; a match longer than this can be missed."""
OUTPUT_SETTLE_S = 0.25
"""After an exit, how long a wait lets output still in flight arrive (a PTY delivers it a moment
later); it only runs out when a leftover child keeps the output open."""

LINE_LOOKBACK = 4096
"""How far back a page looks for the start of the line its cursor is in."""
MAX_PATTERN_CHARS = 1024
"""Longest waitFor pattern; a prompt or a log line needs a few dozen characters."""
MATCH_TIMEOUT_S = 0.25
"""Most time one search of a pattern may take (over the new output and MATCH_OVERLAP_BYTES before it);
an ordinary pattern takes microseconds, so one that needs more is refused as too costly."""
MATCH_THREADS = 2
"""Searches one executor runs at once, each in a worker thread: the threads ps and rendering use are never
all taken by patterns."""

Progress = Callable[[float, float, str], Awaitable[None]]
"""Called with (seconds waited, seconds allowed, the newest complete output lines) while a wait runs."""
PROGRESS_LINE_CHARS = 200
"""Most characters of output a progress notification carries."""
INPUT_QUIET_S = 0.05
"""How long output stays quiet before a wait asks whether the process waits for input."""
INPUT_SETTLE_S = 1.0
"""How long after input is written a yes must be said twice (see ``InputProbe``)."""
INPUT_ANSWER_S = 0.5
"""Longest a wait waits for the answer to whether the process waits for input."""
INPUT_ASK_S = 0.1
"""How often a wait asks again while output stays quiet: a read that blocks is told within about this
(plus INPUT_QUIET_S); a process whose output flows is never asked."""


class InputProbe:
    """Asks a process's backend whether it waits for input (``ProcessHandle.wants_input``), at most every
    INPUT_ASK_S once its output has been quiet INPUT_QUIET_S; ``wanted`` is the last answer.

    Input just written (``typed``, the time of a stdin call's write) may not have reached the reader yet:
    a terminal hands it over from a kernel work queue, which a loaded machine can hold back longer than
    INPUT_QUIET_S, and the reader still sleeps in its read meanwhile. Within INPUT_SETTLE_S of it, a yes
    counts only once a second question, INPUT_ASK_S later, says it again."""

    def __init__(self, ask: Callable[[], Awaitable[InputWanted | None]], typed: float | None = None) -> None:
        self._ask = ask
        self._asked = 0.0
        self._typed = typed
        self._seen = False  # the last answer was a yes not yet counted
        self.wanted: InputWanted | None = None

    def due(self, record: ManagedProcess, began: float) -> float:
        """When to ask next."""
        return max(max(record.last_output, began) + INPUT_QUIET_S, self._asked + INPUT_ASK_S)

    async def asks(self) -> bool:
        """Ask now; whether it waits for input. An answer that takes longer than INPUT_ANSWER_S counts as
        no (the wait goes on, and its own deadline holds)."""
        self._asked = time.monotonic()
        self.wanted = None
        with anyio.move_on_after(INPUT_ANSWER_S):
            self.wanted = await self._ask()
        if self.wanted is None:
            self._seen = False
            return False
        settling = self._typed is not None and self._asked - self._typed < INPUT_SETTLE_S
        if settling and not self._seen:
            self._seen = True  # asked again at the next turn
            return False
        return True


@dataclass(frozen=True)
class Wait:
    """What one call waits for; ``timeout_s`` bounds it. Exit always ends a wait."""

    timeout_s: float
    pattern: regex.Pattern[str] | None = None
    idle_s: float | None = None
    any_output: bool = False

    @staticmethod
    def compile(pattern: str | None) -> regex.Pattern[str] | None:
        """``pattern`` as a regular expression (Python syntax, multiline); raise InvalidInput saying what is
        wrong."""
        if pattern is None:
            return None
        if not pattern:
            raise InvalidInput("waitFor is empty; pass a regular expression such as '\\\\$ $' or omit it")
        if len(pattern) > MAX_PATTERN_CHARS:
            raise InvalidInput(
                f"waitFor is {len(pattern)} characters, more than the {MAX_PATTERN_CHARS} a pattern may have; "
                "match a short, distinctive part of the line instead"
            )
        try:
            return regex.compile(pattern, regex.MULTILINE)
        except (regex.error, RecursionError, OverflowError) as exc:
            raise InvalidInput(f"waitFor {excerpt(pattern)} is not a valid regular expression: {exc}") from None


class _TooCostly(Exception):
    """A search ran past MATCH_TIMEOUT_S."""

    def __init__(self, searched: int) -> None:
        super().__init__(searched)
        self.searched = searched


class _Matcher:
    """Searches what a stream printed after ``start``, a bit more each time."""

    def __init__(self, buffer: OutputBuffer, start: int, pattern: regex.Pattern[str], tty: bool) -> None:
        self._buffer = buffer
        self._checked = start  # bytes up to here were searched (with an overlap kept for the next search)
        self._start = start
        self._pattern = pattern
        self._tty = tty

    async def search(self, limiter: anyio.CapacityLimiter) -> bool:
        """Whether the output not searched yet matches; raises _TooCostly. The buffer is read here, on the
        event loop that owns it; decoding and matching happen in a worker thread."""
        if self._buffer.total == self._checked:
            return False
        begin = max(self._start, self._checked - MATCH_OVERLAP_BYTES)
        data, _ = self._buffer.since(begin)
        self._checked = self._buffer.total
        cut_head = begin > self._start
        return await anyio.to_thread.run_sync(_search, self._pattern, data, self._tty, cut_head, limiter=limiter)


def _search(pattern: regex.Pattern[str], data: bytes, tty: bool, cut_head: bool) -> bool:
    """Run in a worker thread: the GIL is released while the pattern runs, and it is stopped at the timeout."""
    text = stream_text(data, tty, cut_head=cut_head)
    try:
        return pattern.search(text, timeout=MATCH_TIMEOUT_S, concurrent=True) is not None
    except TimeoutError:
        raise _TooCostly(len(text)) from None


def stream_text(data: bytes, tty: bool, *, cut_head: bool = False, complete: bool = True, cleaned: bool = False) -> str:
    """Output bytes as text; a terminal's escape sequences are removed, and with ``cleaned`` a pipe's
    too, with each line as it was last drawn (``terminal.clean``)."""
    text = decode_utf8(data, cut_head=cut_head, complete=complete)
    if tty:
        return strip_escapes(text)
    return clean(text) if cleaned else text


def text_since(
    buffer: OutputBuffer, cursor: int, tty: bool, *, complete: bool, cleaned: bool = True
) -> tuple[str, int]:
    """What ``buffer`` holds after ``cursor`` (its newest SINCE_MAX_BYTES), and how many bytes after
    the cursor are not shown."""
    if cursor < 0:
        raise InvalidInput(f"since must be 0 or more (a cursor from an earlier reply), got {cursor}")
    data, lost = buffer.since(cursor)
    skipped = max(0, len(data) - SINCE_MAX_BYTES)
    text = stream_text(data[skipped:], tty, cut_head=bool(lost or skipped), complete=complete, cleaned=cleaned)
    return text, lost + skipped


def page_look(cursor: int) -> int:
    """Where a page from ``cursor`` looks back from, for the start of the cursor's line."""
    return max(0, cursor - LINE_LOOKBACK)


def page_since(
    buffer: OutputBuffer,
    cursor: int,
    max_bytes: int,
    tty: bool,
    *,
    complete: bool,
    cleaned: bool = True,
    kept: bytes | None = None,
) -> tuple[str, int, int]:
    """At most ``max_bytes`` of ``buffer`` from the start of the line ``cursor`` is in, ending at a line
    boundary (unless one line is longer than a page): its text, the cursor where it stopped (the next
    page's ``since``), and how many bytes after ``cursor`` are no longer held (so not shown). ``kept``:
    the stream's bytes from ``page_look(cursor)`` on, read back from where it is kept whole (its output
    file), for a cursor the buffer has dropped."""
    if cursor < 0:
        raise InvalidInput(f"since must be 0 or more (a cursor from an earlier reply), got {cursor}")
    cursor = min(cursor, buffer.total)
    look = page_look(cursor)
    before, lost = (kept, 0) if kept is not None else buffer.since(look)
    held = look + lost  # the first byte held at or after ``look``
    if held >= cursor:
        start = held  # the cursor's own bytes are gone: from the first one held
    else:
        newline = before[: cursor - held].rfind(b"\n")
        start = held + newline + 1 if newline >= 0 else (0 if held == 0 else cursor)
        if start + max_bytes <= cursor:
            start = cursor  # a line longer than a page: from the cursor on, or paging would never move
    mid_line = start == cursor and start > held and before[start - held - 1 : start - held] != b"\n"
    data = before[start - held : start - held + max_bytes]
    if start + len(data) < buffer.total:  # more follows: end at a line, or at a whole character
        if b"\n" in data[:-1] or data.endswith(b"\n"):
            data = data[: data.rindex(b"\n") + 1]
        else:
            data = data[: _whole_characters(data)]
    end = start + len(data)
    cut_head = start > cursor or mid_line
    text = stream_text(data, tty, cut_head=cut_head, complete=complete or end < buffer.total, cleaned=cleaned)
    return text, end, max(0, start - cursor)


def _whole_characters(data: bytes) -> int:
    """Length of ``data`` without a UTF-8 character cut at its end."""
    return complete_prefix(data)


async def wait_on(
    record: ManagedProcess,
    wait: Wait,
    start: tuple[int, int],
    progress: Progress | None = None,
    *,
    limiter: anyio.CapacityLimiter | None = None,
    probe: InputProbe | None = None,
) -> WaitResult:
    """Wait as ``wait`` says, for output after ``start`` (stdout and stderr cursors), or, with ``probe``,
    until the process waits for input. Returns why it ended.

    Searches for the pattern run in worker threads under ``limiter`` (one of MATCH_THREADS tokens if not
    given). Raises InvalidInput when one search takes longer than MATCH_TIMEOUT_S; the process keeps running.
    """
    searches = limiter if limiter is not None else anyio.CapacityLimiter(MATCH_THREADS)
    matchers = []
    if wait.pattern is not None:
        matchers = [_Matcher(record.stdout, start[0], wait.pattern, record.tty)]
        if not record.tty:
            matchers.append(_Matcher(record.stderr, start[1], wait.pattern, False))
    began = time.monotonic()
    deadline = began + wait.timeout_s
    next_report = began + PROGRESS_INTERVAL_S

    def any_output() -> bool:
        return wait.any_output and (record.stdout.total, record.stderr.total) != start

    async def matched() -> bool:
        found = False
        for matcher in matchers:  # every matcher advances, even after one has matched
            found = await matcher.search(searches) or found
        return found

    async def checked() -> bool:
        try:
            return await matched()
        except _TooCostly as exc:
            assert wait.pattern is not None
            raise InvalidInput(too_costly(wait.pattern.pattern, exc.searched, record.pid)) from None

    while True:
        changed = record.changed()
        if any_output():
            return "output"
        if await checked():
            return "matched"
        if not record.running:
            await record.wait(OUTPUT_SETTLE_S, output=True)
            if any_output():
                return "output"
            return "matched" if await checked() else "exited"
        now = time.monotonic()
        wake = deadline
        if wait.idle_s is not None:
            quiet_since = max(record.last_output, began)
            if now - quiet_since >= wait.idle_s:
                return "idle"
            wake = min(wake, quiet_since + wait.idle_s)
        if now >= deadline:
            return "timeout"
        if probe is not None:
            due = probe.due(record, began)
            if now >= due:
                if await probe.asks():
                    # What it printed before it came to wait (the agent sends it ahead of its answer) counts
                    # first: a prompt the pattern matches is a match.
                    if any_output():
                        return "output"
                    return "matched" if await checked() else "input"
                continue  # output may have come meanwhile
            wake = min(wake, due)
        if progress is not None:
            if now >= next_report:
                await progress(now - began, wait.timeout_s, newest_lines(record))
                next_report = now + PROGRESS_INTERVAL_S
            wake = min(wake, next_report)
        with anyio.move_on_after(max(0.0, wake - time.monotonic())):
            await changed.wait()


def newest_lines(record: ManagedProcess, limit: int = PROGRESS_LINE_CHARS) -> str:
    """The newest complete lines the process printed (stdout, else stderr), cleaned, at most ``limit``
    characters (the newest kept), joined by " | "; empty when it has printed no whole line."""
    for buffer in (record.stdout, record.stderr):
        data = buffer.tail(4 * limit + 1024)
        if b"\n" not in data:
            continue
        whole = data[: data.rindex(b"\n")]
        text = clean(decode_utf8(whole, cut_head=len(data) < buffer.total))
        cut = len(data) < buffer.total and buffer.tail(len(data) + 1)[:1] != b"\n"  # its first line is partial
        lines = [line.strip() for line in text.split("\n")[1 if cut and "\n" in text else 0 :] if line.strip()]
        shown: list[str] = []
        for line in reversed(lines):
            if shown and sum(len(each) + 3 for each in shown) + len(line) > limit:
                break
            shown.insert(0, line[-limit:])
        if shown:
            return " | ".join(shown)
    return ""


def too_costly(pattern: str, searched: int, pid: str) -> str:
    """What a caller is told when its pattern took too long on ``searched`` characters of output."""
    return (
        f"waitFor {pattern[:80]!r} is too costly: one search of {searched} characters of output took more than "
        f"{MATCH_TIMEOUT_S:g} s, so the wait was stopped; {pid} keeps running (read it with stdout). Nested "
        "quantifiers, a repeated group with a quantifier inside such as (a+)+ or (\\w+\\s?)*, can take "
        "exponential time: anchor the pattern and match the text plainly, e.g. '^a+b$' or 'port \\d+$'"
    )


async def wait_exit(
    record: ManagedProcess, timeout_s: float, progress: Progress | None = None, probe: InputProbe | None = None
) -> Literal["exited", "timeout", "input"]:
    """Wait up to ``timeout_s`` for the process to exit, reporting progress every PROGRESS_INTERVAL_S
    to a client that asked for it, and, with ``probe``, until it waits for input; say which came first.
    Output does not wake it (a flood costs nothing here)."""
    began = time.monotonic()
    deadline = began + timeout_s
    next_report = began + PROGRESS_INTERVAL_S
    while True:
        wake = deadline
        if progress is not None:
            wake = min(wake, next_report)
        if probe is not None:
            wake = min(wake, probe.due(record, began))
        if await record.wait(max(0.0, wake - time.monotonic())):
            return "exited"
        now = time.monotonic()
        if now >= deadline:
            return "timeout"
        if probe is not None and now >= probe.due(record, began) and await probe.asks():
            return "input"
        if progress is not None and now >= next_report:
            await progress(now - began, timeout_s, newest_lines(record))
            next_report = now + PROGRESS_INTERVAL_S
