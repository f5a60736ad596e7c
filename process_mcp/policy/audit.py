"""The audit log: one JSON line per tool call and per process end, written off the request path.

Records go into a bounded queue; a writer thread appends them in batches, fsyncs each batch, and
rotates the file by size (``path``, ``path.1``, ... ``path.<keep>``). A write that fails (a full disk)
is logged loudly and counted; while the log cannot be written, ``refusing`` is true if the operator
requires it, and the tools refuse calls instead of running them unaudited.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from datetime import UTC, datetime
from typing import Any

import anyio

from ..config import AuditConfig
from ..errors import InvalidConfig

logger = logging.getLogger(__name__)

QUEUE_RECORDS = 10_000
"""Records waiting to be written at most; more are counted as lost (and said), never held in memory."""

BATCH_RECORDS = 1_000
"""Records written (and fsynced) together at most."""

BATCH_WINDOW_S = 0.05
"""How long the writer gathers records after the first before writing them (a record waits at most this)."""

CLOSE_TIMEOUT_S = 10.0
"""Bound on writing what is queued when the server stops."""

_STOP = None


class AuditLog:
    """See the module docstring. ``write`` never blocks; ``close`` writes what is queued."""

    def __init__(self, config: AuditConfig) -> None:
        assert config.path is not None
        self.config = config
        self.path = config.path
        self.lost = 0
        """Records that could not be written (queue full or write failed)."""
        self.healthy = True
        """False from a failed write until a write succeeds again."""
        self._queue: queue.Queue[str | None] = queue.Queue(QUEUE_RECORDS)
        self._thread = threading.Thread(target=self._run, name="process-mcp-audit", daemon=True)
        self._fd: int | None = None
        self._size = 0

    @property
    def depth(self) -> int:
        """Records waiting to be written."""
        return self._queue.qsize()

    @property
    def refusing(self) -> bool:
        """Whether tool calls are to be refused: the log cannot be written and the operator requires it."""
        return self.config.required and not self.healthy

    def start(self) -> None:
        """Open the log (creating it, mode 0600) and start the writer. Raises InvalidConfig if it cannot be
        opened and the operator requires it; otherwise that is logged and retried on each batch."""
        try:
            self._open()
        except OSError as exc:
            if self.config.required:
                raise InvalidConfig(
                    f"PROCESS_AUDIT_LOG {self.path} cannot be opened ({exc.strerror}) and PROCESS_AUDIT_REQUIRED is set"
                ) from None
            self._failed(exc, 0)
        self._thread.start()

    def write(self, record: dict[str, Any]) -> None:
        """Queue one record (``time`` is added)."""
        line = json.dumps({"time": _now(), **record}, separators=(",", ":"), default=str) + "\n"
        try:
            self._queue.put_nowait(line)
        except queue.Full:
            self.lost += 1
            if self.lost == 1 or self.lost % 1000 == 0:
                logger.error("AUDIT: the audit queue is full; %d records lost so far", self.lost)

    async def close(self) -> None:
        """Write what is queued (bounded by CLOSE_TIMEOUT_S) and stop the writer."""
        if not self._thread.is_alive():
            return
        self._queue.put(_STOP)
        await anyio.to_thread.run_sync(self._thread.join, CLOSE_TIMEOUT_S, abandon_on_cancel=True)
        if self._thread.is_alive():
            logger.error("AUDIT: the audit log did not finish writing within %g s", CLOSE_TIMEOUT_S)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            # Gather what arrives in the next moment too: one write and one fsync for the lot, instead of
            # an fsync per record competing with the calls being recorded.
            window_ends = time.monotonic() + BATCH_WINDOW_S
            while len(batch) < BATCH_RECORDS and _STOP not in batch:
                remaining = window_ends - time.monotonic()
                try:
                    batch.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
                except queue.Empty:
                    break
            if _STOP in batch:
                stopping = True
            lines = [line for line in batch if line is not None]
            if lines:
                self._write_batch(lines)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _write_batch(self, lines: list[str]) -> None:
        try:
            if self._fd is None:
                self._open()
            chunk: list[bytes] = []
            chunk_size = 0
            for line in lines:
                data = line.encode()
                if self._size + chunk_size + len(data) > self.config.max_bytes and (self._size or chunk):
                    self._write(b"".join(chunk))
                    self._rotate()
                    chunk, chunk_size = [], 0
                chunk.append(data)
                chunk_size += len(data)
            self._write(b"".join(chunk))
        except OSError as exc:
            self._failed(exc, len(lines))
            return
        if not self.healthy:
            logger.warning("AUDIT: the audit log %s is writable again", self.path)
            self.healthy = True

    def _write(self, data: bytes) -> None:
        """Append ``data`` whole and fsync it; raise OSError (having cut off any part written)."""
        assert self._fd is not None
        if not data:
            return
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)
        self._size += len(data)

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._size = os.fstat(self._fd).st_size

    def _rotate(self) -> None:
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None
        keep = self.config.keep
        for number in range(keep - 1, 0, -1):
            older = f"{self.path}.{number}"
            if os.path.exists(older):
                os.replace(older, f"{self.path}.{number + 1}")
        if keep > 0:
            os.replace(self.path, f"{self.path}.1")
        else:
            os.unlink(self.path)
        self._open()

    def _failed(self, exc: OSError, records: int) -> None:
        self.lost += records
        if self._fd is not None:
            # Part of the batch may have been written: cut it off, so no line is ever torn.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            os.close(self._fd)
            self._fd = None
        if self.healthy:
            refusal = "; tool calls are refused until it can (PROCESS_AUDIT_REQUIRED)" if self.config.required else ""
            logger.error("AUDIT: cannot write the audit log %s: %s; %d records lost%s",
                         self.path, exc.strerror or exc, self.lost, refusal)  # fmt: skip
        self.healthy = False


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def monotonic_ms(since: float) -> float:
    """Milliseconds since ``since`` (a ``time.monotonic()`` reading), to a tenth."""
    return round((time.monotonic() - since) * 1000, 1)
