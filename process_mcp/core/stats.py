"""What a process and everything it started use, read from /proc: CPU time, memory, threads, I/O.

A tree is found by walking ``/proc/<pid>/task/<tid>/children`` from a root, in a worker thread.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")

STATS_MAX_AGE_S = 1.0
"""A sample younger than this is reused by ps, so ps with many processes does not walk /proc on every
call; stdout (one process) samples afresh."""

MAX_TREE = 10_000
"""Most processes a tree walk visits, so a fork bomb cannot make a ps call walk forever."""


@dataclass(frozen=True)
class TreeSample:
    """What a process tree uses at one moment."""

    processes: int
    threads: int
    cpu_seconds: float
    rss_bytes: int
    read_bytes: int | None
    written_bytes: int | None


def sample_tree(root: int, *, include_root: bool = True) -> TreeSample | None:
    """Add up ``root``'s tree (without ``root`` itself unless ``include_root``); None if it is gone."""
    pids = descendants(root)
    if include_root:
        pids.insert(0, root)
    if not pids:
        return None
    processes = threads = ticks = pages = 0
    read: int | None = 0
    written: int | None = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as file:
                fields = file.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        processes += 1
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
        threads += int(fields[17])
        pages += int(fields[21])
        io = _io(pid)
        if io is None:
            read = written = None
        elif read is not None and written is not None:
            read += io[0]
            written += io[1]
    if not processes:
        return None
    return TreeSample(processes, threads, ticks / CLOCK_TICKS, pages * PAGE_BYTES, read, written)


STOPPED_STATES = (b"T", b"t")
"""The states /proc/PID/stat gives a process stopped by a signal, or by its tracer."""


def is_stopped(pid: int) -> bool | None:
    """Whether ``pid`` is stopped (see ``StateReader``); None if it is gone."""
    return _stopped(pid, _state(pid))


class StateReader:
    """Tells whether one process is stopped, from its /proc/PID/stat held open: a read then costs only
    the kernel's formatting (a ps reads one for each process). Its descriptor stays the process's after
    the pid is reused. Read in worker threads; ``close`` from anywhere."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._fd = -1
        self._closed = False
        self._lock = threading.Lock()

    def stopped(self) -> bool | None:
        """Whether the process is stopped (by a signal, or by its tracer), or waits in vfork on a child
        that is (a shell starting a command when a stop reached its group: it goes on only once the
        child does); None once it is gone."""
        with self._lock:
            if self._closed:
                return None
            try:
                if self._fd < 0:
                    self._fd = os.open(f"/proc/{self._pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
                data = os.pread(self._fd, 1024, 0)
            except OSError:
                return None
        return _stopped(self._pid, _parse_state(data))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _stopped(pid: int, state: bytes | None) -> bool | None:
    if state == b"D":
        try:
            with open(f"/proc/{pid}/task/{pid}/children", "rb") as file:
                return any(_state(int(child)) in STOPPED_STATES for child in file.read().split())
        except (OSError, ValueError):
            return False
    return None if state is None else state in STOPPED_STATES


def _state(pid: int) -> bytes | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            return _parse_state(file.read())
    except OSError:
        return None


def _parse_state(stat: bytes) -> bytes | None:
    fields = stat.rsplit(b")", 1)
    return fields[1].split()[0] if len(fields) == 2 and fields[1].split() else None


def descendants(root: int) -> list[int]:
    """The pids below ``root`` (at most MAX_TREE), by the kernel's lists of each task's children."""
    found: list[int] = []
    stack = [root]
    while stack and len(found) < MAX_TREE:
        pid = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{pid}/task/{task}/children", "rb") as file:
                    children = [int(child) for child in file.read().split()]
            except OSError:
                continue
            found.extend(children)
            stack.extend(children)
    return found


def _io(pid: int) -> tuple[int, int] | None:
    try:
        with open(f"/proc/{pid}/io", "rb") as file:
            values = dict(line.split(b":", 1) for line in file.read().splitlines() if b":" in line)
        return int(values[b"rchar"]), int(values[b"wchar"])
    except (OSError, KeyError, ValueError):
        return None
