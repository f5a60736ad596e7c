"""The byte stream to the agent: one exec running it, its input raw, its output in the engine's frames."""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from ..box.client import Channel
from ..core.streams import READ_CHUNK
from .engine import Demuxer

logger = logging.getLogger(__name__)

# Starts the agent with the first python3 on PATH; $1 is the bootstrap, $2 the agent's name, $3 (if given)
# the user the agent, run as root, drops to for each command. Without python3, it says so and the backend
# falls back to one exec per process.
AGENT_SCRIPT = (
    'command -v python3 >/dev/null 2>&1 || { echo "no python3 in the image" >&2; exit 127; }; '
    'exec python3 -I -S -c "$@"'
)

STDERR_LINE_MAX = 1024
"""Bytes of one line of the agent's stderr that are logged; a longer line is logged in pieces this long."""
STDERR_WINDOW_S = 10.0
"""The interval over which the agent's stderr is rate-limited in the server's log."""
STDERR_LINES_PER_WINDOW = 20
"""Lines of the agent's stderr logged per STDERR_WINDOW_S; the rest is counted, and said once."""
STDERR_BYTES_PER_WINDOW = 8 * 1024
"""Bytes of the agent's stderr logged per STDERR_WINDOW_S; the rest is counted, and said once."""


def escape(line: bytes) -> str:
    """``line`` as Python's repr shows a string, without the quotes: newlines, carriage returns, escape
    sequences and other unprintable characters (U+2028 too) are backslash escapes."""
    return repr(line.decode(errors="replace"))[1:-1]


class StderrLog:
    """The agent's stderr as lines of the server's log: each escaped (no newline or control character of
    the agent's reaches the log, so it cannot forge a line of the server's), and at most
    STDERR_LINES_PER_WINDOW lines and STDERR_BYTES_PER_WINDOW bytes per STDERR_WINDOW_S, then one line
    saying how much was dropped. Holds at most a line and the last KEPT bytes."""

    KEPT = 4096
    """Bytes of the agent's stderr kept to explain a failure to start (a traceback, a missing python3)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._tail = bytearray()
        self._partial = bytearray()
        self._window_start = time.monotonic()
        self._lines = 0
        self._bytes = 0
        self._dropped_lines = 0
        self._dropped_bytes = 0

    def feed(self, data: bytes | memoryview) -> None:
        """Log the whole lines ``data`` completes (a line longer than STDERR_LINE_MAX in pieces)."""
        self._partial += data
        while True:
            end = self._partial.find(b"\n", 0, STDERR_LINE_MAX + 1)
            if end >= 0:
                line, cut = self._partial[:end], end + 1
            elif len(self._partial) > STDERR_LINE_MAX:
                line, cut = self._partial[:STDERR_LINE_MAX], STDERR_LINE_MAX
            else:
                return
            self._line(bytes(line))
            del self._partial[:cut]

    def close(self) -> None:
        """Log what is left: a last line without a newline, and what was dropped."""
        if self._partial:
            self._line(bytes(self._partial))
            self._partial.clear()
        self._say_dropped()

    @property
    def kept(self) -> str:
        """The last lines (up to KEPT bytes), each escaped, one per line."""
        return "\n".join(escape(line) for line in bytes(self._tail).splitlines())

    def _line(self, line: bytes) -> None:
        self._tail += line + b"\n"
        del self._tail[: -self.KEPT]
        now = time.monotonic()
        if now - self._window_start >= STDERR_WINDOW_S:
            self._say_dropped()
            self._window_start, self._lines, self._bytes = now, 0, 0
        if self._lines >= STDERR_LINES_PER_WINDOW or self._bytes + len(line) > STDERR_BYTES_PER_WINDOW:
            self._dropped_lines += 1
            self._dropped_bytes += len(line) + 1
            return
        self._lines += 1
        self._bytes += len(line) + 1
        logger.warning("agent %s says: %s", self.name, escape(line))

    def _say_dropped(self) -> None:
        if self._dropped_lines:
            logger.warning(
                "agent %s: %d more lines (%d bytes) of its stderr were not logged (at most %d lines and %d bytes "
                "per %g s are)",
                self.name,
                self._dropped_lines,
                self._dropped_bytes,
                STDERR_LINES_PER_WINDOW,
                STDERR_BYTES_PER_WINDOW,
                STDERR_WINDOW_S,
            )
            self._dropped_lines = self._dropped_bytes = 0


class ExecStream(Channel):
    """The agent's exec stream: its stdin raw, its stdout and stderr in the engine's frames (no TTY)."""

    def __init__(self, wrapper: Any, sock: socket.socket, name: str) -> None:
        self._wrapper = wrapper  # keeps the HTTP response (and so the socket) alive
        self._sock = sock
        self._fd = sock.fileno()
        self._demux = Demuxer()
        self.stderr = StderrLog(name)
        """The agent's stderr, as lines of the server's log (``name`` is the agent's, in each)."""
        sock.setblocking(False)

    def stderr_tail(self) -> str:
        """The end of what the agent wrote to its stderr (what is pending is logged first), escaped, to
        explain why it could not start."""
        self.stderr.close()
        return self.stderr.kept

    @property
    def read_fd(self) -> int:
        return self._fd

    @property
    def write_fd(self) -> int:
        return self._fd

    def receive(self) -> list[memoryview] | None:
        try:
            data = self._sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return None
        if not data:
            self.stderr.close()
            raise EOFError
        stdout = []
        for stream, payload in self._demux.feed(data):
            if stream == 1:
                stdout.append(payload)
            else:
                self.stderr.feed(payload)
        return stdout

    def send(self, data: memoryview) -> int:
        return self._sock.send(data)

    def close(self) -> None:
        self.stderr.close()
        self._wrapper.close()
        self._sock.close()
