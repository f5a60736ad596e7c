"""Stdio served on the event loop: the JSON-RPC lines read from stdin and written to stdout there.

The SDK's stdio transport reads each line and writes each reply (a write and a flush) in worker
threads: three hand-offs between threads per request, about a quarter of a bare tool call's round
trip. Where stdin and stdout are pipes or sockets, as every MCP client starts a server, this reads
and writes them on the event loop instead and hands the SDK's transport the two streams it accepts.
A terminal or a file keeps the SDK's own reading (the event loop would have to make a terminal
shared with a shell non-blocking).

As the SDK does, while serving, fd 0 is the null device and fd 1 is stderr, so nothing the server
or a library reads or prints by accident touches the wire; both are put back at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import stat
from collections.abc import AsyncIterator

import anyio

from ..errors import InvalidInput, excerpt

logger = logging.getLogger(__name__)

LINE_LIMIT = 16 * 1024 * 1024
"""Longest request line taken. A longer one is skipped and its request (when its id comes before its
params, as clients write it) answered with an error; the server reads on."""
READ_CHUNK = 256 * 1024
FLUSH_TIMEOUT_S = 2.0
"""How long the replies still waiting at the end may take to go out."""
_REQUEST_ID = re.compile(rb'"id"\s*:\s*("(?:[^"\\]|\\.)*"|-?\d+)')


class LineReader:
    """The lines of the client's requests, as the SDK's transport iterates them."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._buffer = bytearray()
        self._searched = 0  # bytes of the buffer known to hold no newline

    def __aiter__(self) -> LineReader:
        return self

    async def __anext__(self) -> str:
        while True:
            end = self._buffer.find(b"\n", self._searched)
            if end >= 0:
                size = end + 1
                if size > LINE_LIMIT:
                    head = bytes(self._buffer[:256])
                else:
                    with memoryview(self._buffer) as view:
                        line = str(view[:size], "utf-8", errors="replace")
                del self._buffer[:size]
                self._searched = 0
                if size > LINE_LIMIT:
                    self._refuse(head, size)
                    continue
                if not self._parses(line):
                    continue
                return line
            self._searched = len(self._buffer)
            if len(self._buffer) > LINE_LIMIT:
                await self._skip_line()
                continue
            chunk = await self._read()
            if not chunk:
                if not self._buffer:
                    raise StopAsyncIteration
                rest, self._buffer = self._buffer, bytearray()
                return rest.decode("utf-8", errors="replace")
            self._buffer += chunk

    def _parses(self, line: str) -> bool:
        """Whether ``line`` is JSON; if not, answer it with a parse error (id null, as JSON-RPC says) and log it.
        The SDK would drop it without a word. Blank lines are skipped silently."""
        if not line.strip():
            return False
        try:
            json.loads(line)
        except ValueError as exc:
            logger.warning("a request line is not JSON (%s): %s", exc, excerpt(line.strip()))
            if not self._writer.is_closing():
                message = f"Parse error: the line is not JSON ({exc}); send one JSON-RPC message per line"
                reply = {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": message}}
                self._writer.write(json.dumps(reply).encode() + b"\n")
            return False
        return True

    async def _read(self) -> bytes:
        try:
            return await self._reader.read(READ_CHUNK)
        except ConnectionError:
            return b""

    async def _skip_line(self) -> None:
        """Drop the line being read, too long to take (read to its end, not kept), and refuse it."""
        head = bytes(self._buffer[:256])
        skipped = len(self._buffer)
        self._buffer.clear()
        self._searched = 0
        while chunk := await self._read():
            end = chunk.find(b"\n")
            if end >= 0:
                skipped += end + 1
                self._buffer += chunk[end + 1 :]
                break
            skipped += len(chunk)
        self._refuse(head, skipped)

    def _refuse(self, head: bytes, size: int) -> None:
        """Answer the request that starts with ``head``, ``size`` bytes long, with an error."""
        logger.warning("refused a request of %d bytes, over the %d a request may be", size, LINE_LIMIT)
        # The request's own id, not one inside its params (a process id in a tool's arguments).
        params = head.find(b'"params"')
        found = _REQUEST_ID.search(head, 0, params if params >= 0 else len(head))
        if found is None or self._writer.is_closing():
            return
        error = InvalidInput(
            f"this request is over {LINE_LIMIT // (1024 * 1024)} MiB, the most one request may be; send large "
            "input to a process in several stdin calls"
        )
        reply = {"jsonrpc": "2.0", "id": json.loads(found.group(1)), "error": {"code": -32600, "message": str(error)}}
        self._writer.write(json.dumps(reply).encode() + b"\n")


class LineWriter:
    """The replies, written as the SDK's transport writes them; a client that stops reading holds up
    the replies, never the event loop."""

    def __init__(self, writer: asyncio.StreamWriter, reader: asyncio.StreamReader) -> None:
        self._writer = writer
        self._reader = reader

    async def write(self, text: str) -> None:
        if not self._writer.is_closing():
            self._writer.write(text.encode())

    async def flush(self) -> None:
        try:
            await self._writer.drain()
        except ConnectionError:
            # The client closed its end of stdout: it is gone, as when it closes stdin.
            self._reader.feed_eof()


def _pipe_or_socket(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


@contextlib.asynccontextmanager
async def loop_stdio() -> AsyncIterator[tuple[LineReader, LineWriter] | None]:
    """The server's stdin and stdout read and written on the running event loop, or None where they
    are not both pipes or sockets (then the SDK's transport reads them itself)."""
    if not (_pipe_or_socket(0) and _pipe_or_socket(1)):
        yield None
        return
    loop = asyncio.get_running_loop()
    wire_in = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3)
    wire_out = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 3)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    try:
        os.dup2(2, 1)
    except OSError:  # no stderr
        os.dup2(devnull, 1)
    os.close(devnull)
    reader = asyncio.StreamReader(limit=READ_CHUNK)
    in_transport: asyncio.BaseTransport | None = None
    out_transport: asyncio.WriteTransport | None = None
    writer: asyncio.StreamWriter | None = None
    try:
        in_transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(wire_in, "rb", buffering=0, closefd=False)
        )
        out_transport, out_protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, os.fdopen(wire_out, "wb", buffering=0, closefd=False)
        )
        writer = asyncio.StreamWriter(out_transport, out_protocol, None, loop)
        yield LineReader(reader, writer), LineWriter(writer, reader)
    finally:
        if in_transport is not None:
            in_transport.close()
        if writer is not None:
            # The last replies go out if the client still reads; what it does not take is dropped.
            writer.transport.set_write_buffer_limits(0)  # drain now waits for an empty buffer
            shield = anyio.CancelScope(shield=True)
            with shield, anyio.move_on_after(FLUSH_TIMEOUT_S), contextlib.suppress(ConnectionError):
                await writer.drain()
        if out_transport is not None and not out_transport.is_closing():
            out_transport.abort()
        for fd, wire in ((0, wire_in), (1, wire_out)):
            with contextlib.suppress(OSError):
                os.set_blocking(wire, True)  # the pipe's other users expect it as they gave it
            os.dup2(wire, fd)
            os.close(wire)
