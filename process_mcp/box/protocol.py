"""The framed protocol between the server and the agent in a box, used by both ends.

One byte stream each way carries frames: a 9-byte header (kind, channel, payload length; big-endian)
and the payload. Channel 0 is the agent itself, channel N is the server's process N. Control payloads
are JSON objects; output and input payloads are raw bytes.

This module is sent into the box and imported there by the agent: standard library only, and syntax
that Python 3.8 parses.
"""

from __future__ import annotations

import json
import struct
from typing import Any

VERSION = 1
"""Bumped when a frame's meaning changes; the agent says its version in HELLO."""
HEADER = struct.Struct(">BII")
MAX_PAYLOAD = 4 * 1024 * 1024
"""Largest payload either end sends; a header announcing more means the stream is corrupt."""

# Server to agent.
SPAWN = 1
"""{command, cwd, env, tty, cols, rows}: start a process; answered with STARTED."""
INPUT = 2
"""A 4-byte sequence number, then bytes for the process's input; answered with WRITTEN."""
SIGNAL = 3
"""{seq, signal}: signal every process in the process's tree; answered with SIGNALLED."""
RESIZE = 4
"""{cols, rows}: resize the process's terminal."""
SHUTDOWN = 5
"""Channel 0: end every process and exit; answered with BYE (the only time the agent may say BYE)."""
PROXY = 6
"""Channel 0, {port}: listen on 127.0.0.1:port in the box and tunnel each connection to the server."""
SAMPLE = 7
"""{seq}: add up what the process's tree uses; answered with SAMPLED."""
ASK_STOPPED = 8
"""Channel 0, {seq}: which processes are stopped by a signal; answered with STOPPED."""
END_INPUT = 9
"""{seq}: once the input sent before is written, close the process's stdin pipe, or type its terminal's
end-of-file character (twice after a partial line: the first ends the line); answered with WRITTEN."""
ASK_INPUT = 10
"""{seq}: whether the process waits for input; answered with INPUT_STATE."""
READ_FILE = 11
"""{seq, stream, offset, size}: up to ``size`` bytes of the stream's output file from ``offset``; answered
with FILE_BYTES."""
FORGET_FILES = 12
"""The server let go of the process: close and remove its output files. Not answered."""
LIST_PORTS = 14
"""Channel 0, {seq}: the TCP ports the processes' trees listen on; answered with PORTS."""
FORWARD = 15
"""{port} on a channel from FORWARD_BASE up, which the server numbers: connect to loopback ``port`` in the
box (127.0.0.1, then ::1 if that refuses) and carry the connection as a tunnel on that channel
(TUNNEL_DATA, TUNNEL_ACK, TUNNEL_CLOSE), for a client of the server that reaches a port in the box."""
PROBE = 13
"""{seq, port, path, timeout_s}: whether something in the box accepts a connection on loopback ``port``
(127.0.0.1, then ::1), and with ``path`` (or null) answers an HTTP GET of it with 2xx or 3xx; answered
with PROBED within ``timeout_s``."""

# Agent to server.
HELLO = 64
"""Channel 0, first frame: {version, pid, started, python, subreaper, undumpable, user}: ``started`` is its
start time (clock ticks since boot, as /proc/PID/stat says), so it can be told from a later process with
its pid; ``user`` is [uid, gid] its processes run as, or null for its own."""
STARTED = 65
"""{pid} once the command runs, or {error, message} (error "nocwd": the directory is missing)."""
STDOUT = 66
STDERR = 67
CLOSED = 68
"""Payload b"1" or b"2": that output stream reached its end (every holder closed it)."""
EXITED = 69
"""{code} or {signal}: the process (not its descendants) ended, as the kernel reported it, and every byte its
outputs held then was sent before this frame; {lost: true}: its supervisor was killed before the process's
exit was known, and the agent ended what was left of its tree."""
WRITTEN = 70
"""{seq} once that input was written, or {seq, error}."""
SIGNALLED = 71
"""{seq, sent}: how many processes the signal reached."""
BYE = 72
"""Channel 0: every process is gone; the agent exits."""
SAMPLED = 73
"""{seq, processes, threads, cpu_seconds, rss_bytes, read_bytes, written_bytes}, or {seq} if it is gone."""
STOPPED = 74
"""Channel 0, {seq, stopped}: the channels of the processes that are stopped by a signal (the process
itself, not its descendants, or a child it waits on in vfork)."""

INPUT_STATE = 75
"""{seq, wanted}: wanted is "input" when a process of its tree (on a terminal, of the terminal's
foreground group) sleeps reading its terminal or its stdin pipe, "secret" when that terminal reads
a line without echo (a password prompt), null otherwise."""
FILE_BYTES = 76
"""A 4-byte sequence number (READ_FILE's seq), then the bytes read (none past the end of the file)."""
PROBED = 78
"""{seq, ok, status, error}: the PROBE's answer: ``status`` the HTTP status, ``error`` why not (refused,
timeout, closed, not http, busy)."""
PORTS = 79
"""Channel 0, {seq, ports}: ``ports`` maps process channels (as strings) to the ports their trees listen on."""
KEPT = 84
"""Channel 0, {cgroup}: the supervisor of a process whose tree is gone stays in that process's group (the
``cgroup`` its SPAWN's ``confine`` named), kept for a later process: one the server puts in that group
starts there without a move."""
OUTPUT_FILE = 77
"""{stream, path}: the stream's output file (``outfiles``) was made, at its first output, ahead of that
output: where the SPAWN asked for it ({files: {"1": path, "2": path}, file_room}) and it could be made,
at that path or, when the name was taken, that path with a suffix."""

# Tunnels, on channels from TUNNEL_BASE up, which the agent numbers.
TUNNEL_OPEN = 80
"""Agent to server: a process connected to the proxy port."""
TUNNEL_DATA = 81
"""Either way: bytes of the connection; at most TUNNEL_WINDOW of them unacknowledged."""
TUNNEL_ACK = 82
"""Either way: a 4-byte count of bytes delivered, which the sender may send again."""
TUNNEL_CLOSE = 83
"""Either way: that side sends no more (its end of the connection ended or failed). From the server,
with the payload TUNNEL_RESET, also that it takes no more: its end is gone, and the agent drops the
connection at once (so a process writing to it learns, instead of waiting on a window never opened)."""
TUNNEL_RESET = b"reset"
TUNNEL_BASE = 1 << 31
"""First tunnel channel; process channels are the server's process numbers, far below it."""
FORWARD_BASE = TUNNEL_BASE + (1 << 30)
"""First channel of a forward (FORWARD), which the server opens; tunnels the agent opens stay below it."""
TUNNEL_WINDOW = 256 * 1024
"""Bytes either end may have in flight per tunnel: what bounds a tunnel's memory at the other end."""
MAX_TUNNELS = 128
"""Tunnels open at once per agent: each costs the server a connection to its proxy. A tunnel counts from
its TUNNEL_OPEN until each side has sent TUNNEL_CLOSE and seen the other's; the agent accepts no more
connections while this many are open, and the server ends an agent that opens more."""
COUNT = struct.Struct(">I")


class ProtocolError(Exception):
    """The stream does not hold well-formed frames."""


def frame(kind: int, channel: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, channel, len(payload)) + payload


def message(kind: int, channel: int, **fields: Any) -> bytes:
    """A frame whose payload is ``fields`` as JSON."""
    return frame(kind, channel, json.dumps(fields, separators=(",", ":")).encode())


def fields(payload: bytes) -> dict[str, Any]:
    """The JSON object a control frame carries."""
    try:
        value = json.loads(payload)
    except ValueError as exc:
        raise ProtocolError(f"a control frame is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError("a control frame is not a JSON object")
    return value


class Decoder:
    """Splits a byte stream into (kind, channel, payload) frames, across reads."""

    def __init__(self) -> None:
        self._pending = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        pending = self._pending
        pending += data
        frames = []
        start = 0
        size = HEADER.size
        while len(pending) - start >= size:
            kind, channel, length = HEADER.unpack_from(pending, start)
            if length > MAX_PAYLOAD:
                raise ProtocolError(f"a frame announces {length} bytes, more than {MAX_PAYLOAD}")
            end = start + size + length
            if end > len(pending):
                break
            frames.append((kind, channel, bytes(pending[start + size : end])))
            start = end
        del pending[:start]
        return frames


OUTPUT_KINDS = frozenset({STDOUT, STDERR})
"""Frames whose payload StreamDecoder hands over piece by piece."""


class StreamDecoder:
    """Splits a stream into frames like Decoder, but hands over the payload of output frames piece by
    piece, as views of the data fed in, as it arrives: a flood is then never joined or copied here.
    Control frames come whole, as bytes."""

    def __init__(self) -> None:
        self._head = bytearray()  # a header split across reads
        self._kind = 0
        self._channel = 0
        self._left = 0  # payload bytes of the current frame still to come
        self._body: bytearray | None = None  # the payload of a control frame being gathered

    def feed(self, data: bytes | memoryview) -> list[tuple[int, int, bytes | memoryview]]:
        view = memoryview(data)
        frames: list[tuple[int, int, bytes | memoryview]] = []
        pos, end = 0, len(view)
        while pos < end:
            if not self._left:
                if not self._head and end - pos >= HEADER.size:
                    kind, channel, length = HEADER.unpack_from(view, pos)
                    pos += HEADER.size
                else:
                    take = min(HEADER.size - len(self._head), end - pos)
                    self._head += view[pos : pos + take]
                    pos += take
                    if len(self._head) < HEADER.size:
                        break
                    kind, channel, length = HEADER.unpack(self._head)
                    self._head.clear()
                if length > MAX_PAYLOAD:
                    raise ProtocolError(f"a frame announces {length} bytes, more than {MAX_PAYLOAD}")
                if not length:
                    frames.append((kind, channel, b""))
                    continue
                self._kind, self._channel, self._left = kind, channel, length
                self._body = None if kind in OUTPUT_KINDS else bytearray()
                continue
            take = min(self._left, end - pos)
            piece = view[pos : pos + take]
            pos += take
            self._left -= take
            if self._body is None:
                frames.append((self._kind, self._channel, piece))
            else:
                self._body += piece
                if not self._left:
                    frames.append((self._kind, self._channel, bytes(self._body)))
                    self._body = None
        return frames
