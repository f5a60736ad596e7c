"""Output files: each output stream of a process kept whole in a file in the box, as it passes.

The server keeps only the newest bytes of a stream in memory. The agent also writes every byte it
sends on into a file in the box's /tmp (up to a size the server sets), so the agent driving the box can
``grep`` or ``sed -n`` the whole output with its own commands, and the server can read back what its
buffer let go (``protocol.READ_FILE``). The file is removed when the server lets go of the process, or
when the agent ends.

The file belongs to the box: its processes run as the user that owns it and may change or remove it.
That only spoils their own view of their own output: the server shows what it read back as output
of the box, as it shows everything the box sends. The agent makes the file without following a link
(a process may have put one where it is to go) and removes it only while the name still holds the file
it made.

Sent into the box with the agent: standard library only, and syntax that Python 3.8 parses.
"""

from __future__ import annotations

import binascii
import contextlib
import os
from collections.abc import Iterator
from typing import Any

OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
NAME_TRIES = 5
"""Names tried for one file: the one the server asked for, then that name with a random suffix (a
process of the box may have taken the first)."""


class OutputFile:
    """One stream's file: written at the end as output passes, read anywhere by the server."""

    def __init__(self, fd: int, path: str, room: int) -> None:
        self.fd = fd
        self.path = path
        self.size = 0  # bytes written so far
        self.room = room  # bytes it may still take; 0 once it is full (its size, or the box's disk)

    def write(self, data: Any) -> None:
        """Keep ``data`` (bytes or a view) at the end, as much as there is room for."""
        if self.room <= 0 or not data:
            return
        part = data[: self.room]
        try:
            written = os.pwrite(self.fd, part, self.size)
        except OSError:  # the box's disk is full (ENOSPC, EDQUOT), or the file was made unwritable
            written = 0
        self._grew(written, len(part))

    def take(self, pipe: int, count: int) -> int:
        """Move up to ``count`` bytes from the pipe ``pipe`` to the end of the file (splice, no copy in
        the agent); return how many moved, 0 when the file has no room (the caller reads them itself)."""
        count = min(count, self.room)
        if count <= 0:
            return 0
        try:
            moved = os.splice(pipe, self.fd, count, offset_dst=self.size)  # type: ignore[attr-defined,unused-ignore]
        except BlockingIOError:
            return 0
        except OSError:  # the disk is full: from now on the stream is not kept
            self.room = 0
            return 0
        self._grew(moved, count)
        return moved

    def _grew(self, written: int, meant: int) -> None:
        self.size += written
        self.room = 0 if written < meant else self.room - written

    def read(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes from ``offset`` (fewer where the file ends, none past it)."""
        if offset >= self.size or size <= 0:
            return b""
        try:
            return os.pread(self.fd, min(size, self.size - offset), offset)
        except OSError:
            return b""

    def remove(self) -> None:
        """Close the file, and remove its name if the name still holds this file."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            mine = os.fstat(self.fd)
            found = os.lstat(self.path)
            if (found.st_dev, found.st_ino) == (mine.st_dev, mine.st_ino):
                os.unlink(self.path)
        os.close(self.fd)
        self.fd = -1
        self.room = 0


def make(path: str, room: int, as_user: Any) -> OutputFile | None:
    """A new file at ``path`` (or beside it, under a suffixed name, when the name is taken) that may grow
    to ``room`` bytes, made with ``as_user`` (a context that takes the processes' user, so they may read
    it); None when none can be made (no /tmp, no room), and the stream is then kept only by the server."""
    stem, dot, extension = path.rpartition(".")
    for attempt in range(NAME_TRIES):
        name = path if attempt == 0 else f"{stem}-{binascii.hexlify(os.urandom(4)).decode()}{dot}{extension}"
        try:
            with as_user():
                fd = os.open(name, OPEN_FLAGS, 0o600)
        except FileExistsError:
            continue
        except OSError:
            return None
        return OutputFile(fd, name, room)
    return None


def each(files: dict[int, dict[int, OutputFile]]) -> Iterator[OutputFile]:
    for streams in files.values():
        yield from streams.values()
