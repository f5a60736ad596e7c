"""Reading process trees from /proc: who is below a process, what the tree uses, whether it is stopped.

The one copy of this, for both ends: shipped into a box with the agent (so standard library only, and
Python 3.8 syntax), and used by the server for the trees it can see on this machine (the host's
sandboxes, the local agent's processes). Two walks: by one read of every process's parent (``children``,
shared by the samples of one ps in a box, and by kill rounds), or by the kernel's list of each task's
children (``task_descendants``: only the tree is read, which is what a busy host needs).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

MAX_TREE = 10_000
"""Most processes a walk by task children visits, so a fork bomb cannot make a ps call walk forever."""
STOPPED_STATES = (b"T", b"t")
"""The states /proc/PID/stat gives a process stopped by a signal, or by its tracer."""


def process_children() -> dict[int, list[int]]:
    """Every live (not zombie) process's children, from one read of every process's stat."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone mid-walk
        if fields[0] != b"Z":
            children.setdefault(int(fields[1]), []).append(int(name))
    return children


def descendants(root: int, children: dict[int, list[int]] | None = None) -> list[int]:
    """Live (not zombie) processes below ``root``, by parent links (``children``, read now if not given)."""
    if children is None:
        children = process_children()
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def task_descendants(root: int) -> list[int]:
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
                    below = [int(child) for child in file.read().split()]
            except OSError:
                continue
            found.extend(below)
            stack.extend(below)
    return found


def sample_tree(
    root: int, children: dict[int, list[int]] | None = None, include_root: bool = False
) -> dict[str, Any] | None:
    """What ``root``'s tree uses: processes, threads, CPU seconds, resident bytes, bytes read and written
    (None where /proc/PID/io cannot be read). The tree is below ``root`` (and ``root`` too with
    ``include_root``), found through ``children`` when given, else by task children. None if it is empty."""
    pids = descendants(root, children) if children is not None else task_descendants(root)
    if include_root:
        pids.insert(0, root)
    ticks = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")
    processes = threads = cpu_ticks = pages = read = written = 0
    io_known = True
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended meanwhile
        processes += 1
        cpu_ticks += int(fields[11]) + int(fields[12])  # utime, stime
        threads += int(fields[17])
        pages += int(fields[21])
        try:
            with open(f"/proc/{pid}/io", "rb") as io:
                values = dict(line.split(b":", 1) for line in io.read().splitlines() if b":" in line)
            read += int(values[b"rchar"])
            written += int(values[b"wchar"])
        except (OSError, KeyError, ValueError):
            io_known = False
    if not processes:
        return None
    return {
        "processes": processes,
        "threads": threads,
        "cpu_seconds": cpu_ticks / ticks,
        "rss_bytes": pages * page,
        "read_bytes": read if io_known else None,
        "written_bytes": written if io_known else None,
    }


def process_state(pid: int) -> bytes | None:
    """The state letter /proc/PID/stat gives ``pid`` (R, S, D, T, t, Z, ...); None if it is gone."""
    return process_state_at(f"/proc/{pid}/stat")


def process_state_at(path: str) -> bytes | None:
    """The state letter in the stat file at ``path`` (a process's or a task's); None if it is gone."""
    try:
        with open(path, "rb") as file:
            return parse_state(file.read())
    except OSError:
        return None


def parse_state(stat: bytes) -> bytes | None:
    """The state letter in the text of a /proc/PID/stat."""
    fields = stat.rsplit(b")", 1)
    return fields[1].split()[0] if len(fields) == 2 and fields[1].split() else None


def stopped_in(pid: int, state: bytes | None) -> bool | None:
    """Whether ``pid``, in ``state``, is stopped (by a signal, or by its tracer), or waits in vfork on a
    child that is (a shell starting a command when a stop reached its group: it goes on only once the
    child does); None once it is gone."""
    if state == b"D":
        try:
            with open(f"/proc/{pid}/task/{pid}/children", "rb") as file:
                return any(process_state(int(child)) in STOPPED_STATES for child in file.read().split())
        except (OSError, ValueError):
            return False
    return None if state is None else state in STOPPED_STATES


def is_stopped(pid: int) -> bool | None:
    """Whether ``pid`` is stopped (see ``stopped_in``); None if it is gone."""
    return stopped_in(pid, process_state(pid))


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
        """Whether the process is stopped (see ``stopped_in``); None once it is gone."""
        with self._lock:
            if self._closed:
                return None
            try:
                if self._fd < 0:
                    self._fd = os.open(f"/proc/{self._pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
                data = os.pread(self._fd, 1024, 0)
            except OSError:
                return None
        return stopped_in(self._pid, parse_state(data))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


# What a process waits on: the system call it sleeps in, from /proc/PID/task/TID/syscall.

_READS = {
    "x86_64": (0, 17, 19, 295, 327),  # read, pread64, readv, preadv, preadv2
    "aarch64": (63, 67, 65, 69, 286),
}
_POLLS = {"x86_64": (7, 271), "aarch64": (73,)}  # poll, ppoll
_SELECTS = {"x86_64": (23, 270), "aarch64": (72,)}  # select, pselect6
_EPOLLS = {"x86_64": (232, 281, 441), "aarch64": (22, 441)}  # epoll_wait, epoll_pwait, epoll_pwait2
MAX_WATCHED_FDS = 1024
"""Most descriptors of a poll or select that are looked at."""
FDINFO_BYTES = 64 * 1024
"""Most of an epoll's fdinfo read (about a thousand watched descriptors)."""
INPUT_LOOKS = 2048
"""Most threads and descriptors one question about input looks at, however many a tree has: a tree of
thousands of threads each polling a thousand descriptors must not hold the agent's loop."""


class Unreadable(Exception):
    """What a process waits on cannot be read here (another user's, or not dumpable: a set-user-ID program)."""


def reads_from(pid: int, is_input: Any, budget: list[int]) -> bool:
    """Whether a thread of ``pid`` sleeps waiting to read a descriptor ``is_input`` accepts (called with
    the os.stat_result of what the descriptor is): in read, or in a poll, select or epoll that watches
    it for reading. Each thread and each descriptor looked at takes one from ``budget`` ([looks left]):
    once it is spent, what is left is not looked at. Raises Unreadable where the kernel will not say."""
    machine = os.uname().machine
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for task in tasks:
        budget[0] -= 1
        if budget[0] < 0:
            return False
        if process_state_at(f"/proc/{pid}/task/{task}/stat") != b"S":
            continue  # running, stopped (a stopped reader reads nothing), or gone
        try:
            with open(f"/proc/{pid}/task/{task}/syscall", "rb") as file:
                fields = file.read().split()
        except PermissionError:
            raise Unreadable(pid) from None
        except OSError:
            continue
        if len(fields) < 7 or fields[0] in (b"running", b"-1"):
            continue
        number, args = int(fields[0]), [int(field, 16) for field in fields[1:7]]
        most = min(MAX_WATCHED_FDS, max(0, budget[0]))  # entries parsed are charged, watched or not
        if number in _READS.get(machine, ()):
            watched, cost = [args[0]], 1
        elif number in _POLLS.get(machine, ()):
            watched, cost = _poll_fds(pid, args[0], min(args[1], most)), min(args[1], most)
        elif number in _SELECTS.get(machine, ()):
            watched, cost = _select_fds(pid, args[1], min(args[0], most)), min(args[0], most)
        elif number in _EPOLLS.get(machine, ()):
            watched = _epoll_fds(pid, args[0], most)
            cost = len(watched) + 1
        else:
            continue
        budget[0] -= cost
        for fd in watched:
            try:
                if is_input(os.stat(f"/proc/{pid}/fd/{fd}")):
                    return True
            except PermissionError:
                raise Unreadable(pid) from None
            except OSError:
                continue
    return False


def _memory(pid: int, address: int, size: int) -> bytes:
    try:
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as memory:
            memory.seek(address)
            return memory.read(size) or b""
    except PermissionError:
        raise Unreadable(pid) from None
    except (OSError, OverflowError, ValueError):
        return b""


def _poll_fds(pid: int, address: int, count: int) -> list[int]:
    """The descriptors a poll at ``address`` (``count`` struct pollfd) watches for reading."""
    data = _memory(pid, address, min(count, MAX_WATCHED_FDS) * 8)
    found = []
    for offset in range(0, len(data) - 7, 8):
        fd = int.from_bytes(data[offset : offset + 4], sys.byteorder, signed=True)
        events = int.from_bytes(data[offset + 4 : offset + 6], sys.byteorder)
        if fd >= 0 and events & 0x1:  # POLLIN
            found.append(fd)
    return found


def _select_fds(pid: int, address: int, count: int) -> list[int]:
    """The descriptors a select's read set at ``address`` (of ``count`` descriptors) holds."""
    if not address:
        return []
    count = min(count, MAX_WATCHED_FDS)
    data = _memory(pid, address, (count + 63) // 64 * 8)
    return [fd for fd in range(min(count, len(data) * 8)) if data[fd // 8] >> (fd % 8) & 1]


def _epoll_fds(pid: int, epoll: int, most: int) -> list[int]:
    """The descriptors (at most ``most``, and MAX_WATCHED_FDS) the epoll instance ``epoll`` of ``pid``
    watches for reading, from a bounded read of its fdinfo."""
    found: list[int] = []
    most = min(most, MAX_WATCHED_FDS)
    try:
        with open(f"/proc/{pid}/fdinfo/{epoll}", "rb", buffering=0) as file:
            data = file.read(FDINFO_BYTES)
    except PermissionError:
        raise Unreadable(pid) from None
    except OSError:
        return found
    for line in data.split(b"\n"):
        fields = line.split()
        try:
            if fields[:1] == [b"tfd:"] and len(fields) >= 4 and int(fields[3], 16) & 0x1:  # EPOLLIN
                found.append(int(fields[1]))
        except ValueError:
            continue
        if len(found) >= most:
            break
    return found


def process_group(pid: int) -> int | None:
    """The process group of ``pid``; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            return int(file.read().rsplit(b")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None


LISTEN = "0A"
"""A TCP socket's state in /proc/net/tcp when it listens."""
MAX_LISTED_PORTS = 64
"""Most listening ports told for one process's tree."""


def listening_sockets() -> dict[int, int]:
    """The TCP sockets that listen in this network namespace: socket inode -> port."""
    found: dict[int, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as file:
                next(file, None)  # the heading
                for line in file:
                    fields = line.split()
                    if len(fields) > 9 and fields[3] == LISTEN:
                        found[int(fields[9])] = int(fields[1].rsplit(":", 1)[1], 16)
        except (OSError, ValueError):
            continue
    return found


def listening_ports(pids: list[int], sockets: dict[int, int]) -> list[int]:
    """The ports of ``sockets`` that a process of ``pids`` holds, in order, each once."""
    ports: set[int] = set()
    for pid in pids:
        try:
            descriptors = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for descriptor in descriptors:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{descriptor}")
            except OSError:
                continue
            if target.startswith("socket:["):
                port = sockets.get(int(target[8:-1]))
                if port is not None:
                    ports.add(port)
        if len(ports) >= MAX_LISTED_PORTS:
            break
    return sorted(ports)[:MAX_LISTED_PORTS]
