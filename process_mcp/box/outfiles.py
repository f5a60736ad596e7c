"""Output files: each output stream of a process kept whole in a file in the box, as it passes.

The server keeps only the newest bytes of a stream in memory. The agent also writes every byte it
sends on into a file in the box (up to a size the server sets), so the agent driving the box can
``grep`` or ``sed -n`` the whole output with its own commands, and the server can read back what its
buffer let go (``protocol.READ_FILE``). A file is removed when the server lets go of its process, and
all of them when the agent ends.

The files are in a directory of the agent's own in /tmp, ``process-mcp-<pid>-<start time>``, made as
the processes' user with mode 0700 (on a host without a sandbox, /tmp is shared with other users). An
agent that was killed leaves its directory behind: the next agent of the user removes the directories
of agents that are gone. Together the files take at most a quarter of /tmp's size (BUDGET_SHARE), so
they never crowd out the processes' own temporary files; past that, or past its own size, a file
stops growing, and stays the exact beginning of its stream.

The files belong to the box: its processes run as the user that owns them and may change or remove
them. That only spoils their own view of their own output: the agent works through descriptors (of
the directory and of each file, so a name moved or replaced leads it nowhere else), makes each file
without following a link, removes a name only while it holds the file it made, and sends exactly the
bytes a frame promised even when a file was cut short under it.

Sent into the box with the agent: standard library only, and syntax that Python 3.8 parses.
"""

from __future__ import annotations

import binascii
import contextlib
import os
import re
import stat
from collections.abc import Callable, Iterator
from typing import Any

ROOT = "/tmp"
PREFIX = "process-mcp-"
BUDGET_SHARE = 4
"""The files of one agent take at most 1/BUDGET_SHARE of the size of the file system they are on."""
FILE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NAME_TRIES = 5
"""Names tried for one file or directory: the one meant, then that name with a random suffix (a process
of the box may have taken the first)."""
AGENT_DIRECTORY = re.compile(r"process-mcp-(\d+)-(\d+)(-[0-9a-f]{8})?")


def _suffixed(name: str, attempt: int) -> str:
    if not attempt:
        return name
    stem, dot, extension = name.rpartition(".") if "." in name else (name, "", "")
    return f"{stem}-{binascii.hexlify(os.urandom(4)).decode()}{dot}{extension}"


class Files:
    """One agent's output files: their directory, made at the first file, and the room they share."""

    def __init__(self, tag: str, as_user: Callable[[], Any]) -> None:
        """``tag``: the agent's pid and start time, ``<pid>-<start>``; ``as_user``: a context that takes
        the processes' user, so they own (and may read) what is made."""
        self.tag = tag
        self.as_user = as_user
        self.dir_fd = -1
        self.path = ""
        self.left = 0  # bytes the files may still take together
        self.tried = False

    def make(self, name: str, room: int) -> OutputFile | None:
        """A new file ``name`` in the directory (suffixed when the name is taken) that may grow to ``room``
        bytes; None when none can be made (no /tmp, no room), and the stream is then kept only by the
        server."""
        if not self._directory():
            return None
        for attempt in range(NAME_TRIES):
            candidate = _suffixed(name, attempt)
            try:
                with self.as_user():
                    fd = os.open(candidate, FILE_FLAGS, 0o600, dir_fd=self.dir_fd)
            except FileExistsError:
                continue
            except OSError:
                return None
            return OutputFile(self, fd, candidate, room)
        return None

    def close(self) -> None:
        """Remove the directory (once its files are removed) and let it go."""
        if self.dir_fd < 0:
            return
        with contextlib.suppress(OSError), self.as_user():
            os.rmdir(self.path)  # a directory a process put in its place is removed only if empty
        os.close(self.dir_fd)
        self.dir_fd = -1

    def _directory(self) -> bool:
        if self.dir_fd >= 0 or self.tried:
            return self.dir_fd >= 0
        self.tried = True
        with self.as_user():
            sweep(ROOT)
            for attempt in range(NAME_TRIES):
                path = f"{ROOT}/{_suffixed(PREFIX + self.tag, attempt)}"
                try:
                    os.mkdir(path, 0o700)
                    fd = os.open(path, DIR_FLAGS)
                except FileExistsError:
                    continue
                except OSError:
                    return False
                try:
                    found = os.statvfs(fd)
                except OSError:
                    os.close(fd)
                    return False
                self.dir_fd, self.path = fd, path
                self.left = found.f_blocks * found.f_frsize // BUDGET_SHARE
                return True
        return False


class OutputFile:
    """One stream's file: written at the end as output passes, read anywhere by the server. It is
    always the exact beginning of its stream: once a write falls short, it takes no more."""

    def __init__(self, files: Files, fd: int, name: str, room: int) -> None:
        self.files = files
        self.fd = fd
        self.name = name
        self.path = f"{files.path}/{name}"
        self.size = 0  # bytes written so far
        self.room = room  # bytes it may still take; 0 once it is full (its size, the budget, the disk)

    def _may_take(self, count: int) -> int:
        return max(0, min(count, self.room, self.files.left))

    def write(self, data: Any) -> None:
        """Keep ``data`` (bytes or a view) at the end, as much as there is room for."""
        count = self._may_take(len(data))
        if count <= 0:
            self.room = 0
            return
        try:
            written = os.pwrite(self.fd, data[:count], self.size)
        except OSError:  # the box's disk is full (ENOSPC, EDQUOT), or the file was made unwritable
            written = 0
        self._grew(written, len(data))

    def take(self, pipe: int, count: int) -> int:
        """Move up to ``count`` bytes from the pipe ``pipe`` to the end of the file (splice, no copy in
        the agent); return how many moved, 0 when the file takes no more (the caller sends them itself)."""
        allowed = self._may_take(count)
        if allowed <= 0:
            self.room = 0
            return 0
        try:
            moved = os.splice(pipe, self.fd, allowed, offset_dst=self.size)  # type: ignore[attr-defined,unused-ignore]
        except OSError:  # the disk is full, or the pipe had less than it said: the file takes no more
            moved = 0
        self._grew(moved, count)
        return moved

    def _grew(self, written: int, offered: int) -> None:
        """``written`` of the ``offered`` bytes went in: the rest did not, so nothing after them may."""
        self.size += written
        self.files.left -= written
        self.room = self.room - written if written == offered else 0

    def read(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes from ``offset`` (fewer where the file ends, none past it)."""
        if offset >= self.size or size <= 0:
            return b""
        try:
            return os.pread(self.fd, min(size, self.size - offset), offset)
        except OSError:
            return b""

    def read_exactly(self, offset: int, size: int) -> bytes:
        """Exactly ``size`` bytes from ``offset``, what a frame promised: zeros where a process of the box
        cut the file short."""
        data = b""
        with contextlib.suppress(OSError):
            data = os.pread(self.fd, size, offset)
        return data + bytes(size - len(data))

    def remove(self) -> None:
        """Close the file, and remove its name if the name still holds this file."""
        if self.fd < 0:
            return
        dir_fd = self.files.dir_fd
        with contextlib.suppress(OSError):
            mine = os.fstat(self.fd)
            found = os.lstat(self.name, dir_fd=dir_fd)
            if (found.st_dev, found.st_ino) == (mine.st_dev, mine.st_ino):
                os.unlink(self.name, dir_fd=dir_fd)
        os.close(self.fd)
        self.files.left += self.size
        self.fd = -1
        self.room = 0


def sweep(root: str) -> None:
    """Remove the directories of this user's agents that are gone (killed before they could), with the
    regular files in them; called as the processes' user, so only theirs are touched."""
    try:
        names = os.listdir(root)
    except OSError:
        return
    me = os.geteuid()
    for name in names:
        found = AGENT_DIRECTORY.fullmatch(name)
        if found is None or _alive(int(found.group(1)), int(found.group(2))):
            continue
        try:
            fd = os.open(f"{root}/{name}", DIR_FLAGS)
        except OSError:
            continue
        try:
            if os.fstat(fd).st_uid != me:
                continue
            for entry in os.listdir(fd):
                with contextlib.suppress(OSError):
                    if stat.S_ISREG(os.lstat(entry, dir_fd=fd).st_mode):
                        os.unlink(entry, dir_fd=fd)
            with contextlib.suppress(OSError):
                os.rmdir(f"{root}/{name}")
        except OSError:
            pass
        finally:
            os.close(fd)


def _alive(pid: int, started: int) -> bool:
    """Whether process ``pid`` runs and started at ``started`` (so it is the agent that made the name)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            return int(file.read().rsplit(b")", 1)[1].split()[19]) == started
    except (OSError, ValueError, IndexError):
        return not os.path.isdir("/proc/self")  # without /proc nothing can be told: remove nothing


def each(files: dict[int, dict[int, OutputFile]]) -> Iterator[OutputFile]:
    for streams in files.values():
        yield from streams.values()
