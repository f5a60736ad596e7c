"""The agent's probes: whether something in the box accepts connections on a loopback port, or answers
an HTTP request there, asked by the server (PROBE) for a service's readiness and health.

A probe runs in the agent's loop without blocking it: a non-blocking connect to 127.0.0.1, then to
::1 (a dev server may listen on either), then, for a path, one HTTP/1.0 GET whose status line is read;
each probe ends within its timeout and is answered once (PROBED). Only the box's own loopback is
reached: the agent is in the box's network namespace. Shipped into the box with the agent: standard
library only, and syntax Python 3.8 parses.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import time
from collections.abc import Callable
from typing import Any

STATUS_LINE_MAX = 4096
"""Bytes of an answer read for its status line."""
MAX_PROBES = 64
"""Probes in flight at once; past it a probe is answered as failed at once."""
ADDRESSES = ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1"))


class Probe:
    def __init__(self, channel: int, seq: int, port: int, path: str | None, deadline: float) -> None:
        self.channel = channel
        self.seq = seq
        self.port = port
        self.path = path
        self.deadline = deadline
        self.addresses = list(ADDRESSES)
        self.sock: socket.socket | None = None
        self.state = "connect"  # then "send" (a path's request), then "read" (its status line)
        self.request = b""
        self.answer = b""
        self.error = "refused"


class Probes:
    """The probes in flight. ``answer(channel, seq, fields)`` sends a PROBED."""

    def __init__(self, selector: selectors.BaseSelector, answer: Callable[[int, int, dict[str, Any]], None]) -> None:
        self.selector = selector
        self.answer = answer
        self.running: dict[int, Probe] = {}  # by socket descriptor

    @property
    def next_deadline(self) -> float | None:
        return min((probe.deadline for probe in self.running.values()), default=None)

    def start(self, channel: int, seq: int, port: int, path: str | None, timeout_s: float) -> None:
        if len(self.running) >= MAX_PROBES or not 0 < port < 65536:
            self.answer(channel, seq, {"ok": False, "error": "busy" if 0 < port < 65536 else "port"})
            return
        probe = Probe(channel, seq, port, path, time.monotonic() + timeout_s)
        if path is not None:
            probe.request = f"GET {path} HTTP/1.0\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n".encode(
                "latin-1", "replace"
            )
        self._connect(probe)

    def expire(self, now: float) -> None:
        for probe in [p for p in self.running.values() if p.deadline <= now]:
            self._end(probe, {"ok": False, "error": "timeout"})

    def _connect(self, probe: Probe) -> None:
        while probe.addresses:
            family, host = probe.addresses.pop(0)
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)
            except OSError:
                continue
            sock.setblocking(False)
            code = sock.connect_ex((host, probe.port))
            if code in (0, errno.EINPROGRESS):
                probe.sock = sock
                self.running[sock.fileno()] = probe
                self.selector.register(sock, selectors.EVENT_WRITE, self._on_event)
                return
            sock.close()
        self.answer(probe.channel, probe.seq, {"ok": False, "error": probe.error})

    def _on_event(self, fd: int, events: int) -> None:
        probe = self.running.get(fd)
        if probe is None or probe.sock is None:
            return
        if probe.state == "connect":
            if probe.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):  # refused there: the next address
                self._drop(probe)
                self._connect(probe)
            elif probe.path is None:
                self._end(probe, {"ok": True})
            else:
                probe.state = "send"
        if probe.state == "send":
            self._send(probe, probe.sock)
        elif probe.state == "read":
            self._read(probe, probe.sock)

    def _send(self, probe: Probe, sock: socket.socket) -> None:
        try:
            sent = sock.send(probe.request)
        except BlockingIOError:
            return
        except OSError:
            self._end(probe, {"ok": False, "error": "closed"})
            return
        probe.request = probe.request[sent:]
        if not probe.request:
            probe.state = "read"
            self.selector.modify(sock, selectors.EVENT_READ, self._on_event)

    def _read(self, probe: Probe, sock: socket.socket) -> None:
        try:
            data = sock.recv(STATUS_LINE_MAX)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        probe.answer += data
        if b"\r\n" not in probe.answer and data and len(probe.answer) < STATUS_LINE_MAX:
            return  # the status line is not whole yet
        parts = probe.answer.split(b"\r\n", 1)[0].split()
        if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
            status = int(parts[1])
            self._end(probe, {"ok": 200 <= status < 400, "status": status})
        else:
            self._end(probe, {"ok": False, "error": "not http"})

    def _drop(self, probe: Probe) -> None:
        if probe.sock is not None:
            self.running.pop(probe.sock.fileno(), None)
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(probe.sock)
            probe.sock.close()
            probe.sock = None

    def _end(self, probe: Probe, fields: dict[str, Any]) -> None:
        self._drop(probe)
        self.answer(probe.channel, probe.seq, fields)

    def close(self) -> None:
        for probe in list(self.running.values()):
            self._drop(probe)
