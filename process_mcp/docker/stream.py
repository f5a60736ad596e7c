"""The byte stream to the agent: one exec running it, its input raw, its output in the engine's frames."""

from __future__ import annotations

import logging
import socket
from typing import Any

from ..box.client import Channel
from ..streams import READ_CHUNK
from .engine import Demuxer

logger = logging.getLogger(__name__)

# Starts the agent with the first python3 on PATH; $1 is the bootstrap, $2 (if given) the user the agent,
# run as root, drops to for each command. Without python3, it says so and the backend falls back to one
# exec per process.
AGENT_SCRIPT = (
    'command -v python3 >/dev/null 2>&1 || { echo "no python3 in the image" >&2; exit 127; }; '
    'exec python3 -I -S -c "$@"'
)


class ExecStream(Channel):
    """The agent's exec stream: its stdin raw, its stdout and stderr in the engine's frames (no TTY)."""

    STDERR_KEPT = 4096
    """Characters of the agent's stderr kept to explain a failure (its tracebacks, a missing python3)."""

    def __init__(self, wrapper: Any, sock: socket.socket) -> None:
        self._wrapper = wrapper  # keeps the HTTP response (and so the socket) alive
        self._sock = sock
        self._fd = sock.fileno()
        self._demux = Demuxer()
        self.agent_stderr = ""
        sock.setblocking(False)

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
            raise EOFError
        stdout = []
        for stream, payload in self._demux.feed(data):
            if stream == 1:
                stdout.append(payload)
            else:
                text = bytes(payload).decode(errors="replace")
                logger.warning("agent: %s", text.rstrip())
                self.agent_stderr = (self.agent_stderr + text)[-self.STDERR_KEPT :]
        return stdout

    def send(self, data: memoryview) -> int:
        return self._sock.send(data)

    def close(self) -> None:
        self._wrapper.close()
        self._sock.close()
