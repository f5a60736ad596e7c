"""The bounds the server itself lives in, and how much of them its sandboxes may take.

A server often runs inside a bound of its own: a container's or a systemd unit's cgroup (``pids.max``,
a memory limit), or an RLIMIT_NPROC. A sandbox's own bounds (SANDBOX_MAX_PROCESSES, 1024 by default)
may be larger than what is left there, and a fork bomb in one sandbox then takes every process the
server may have, so the next spawn, or even the kill that would end the bomb, fails. So the server
reads its enclosing bounds (cgroup v1 and v2, each level up to the root, RLIMIT_NPROC, and the machine's
own: kernel.pid_max, kernel.threads-max, its memory), keeps
HEADROOM_PROCESSES and HEADROOM_MEMORY_BYTES of them for itself, and gives each sandbox at most half of
what is left at its spawn (so one bomb leaves room for the next spawn, and for the kill that ends it).
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
"""Where cgroups are mounted: v1 has a directory per controller, v2 one unified tree (or ``unified``)."""
HEADROOM_PROCESSES = 64
"""Processes of an enclosing bound kept for the server: to start the next sandbox, signal and reap."""
HEADROOM_MEMORY_BYTES = 256 * 1024 * 1024
"""Memory of an enclosing bound kept for the server and its buffers."""
MIN_SANDBOX_PROCESSES = 8
"""Fewest processes a box can start with (its agent, zygote and supervisors take several at once)."""
_UNLIMITED = 1 << 62  # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1


@dataclass(frozen=True)
class Bound:
    """One enclosing bound: a limit, what currently counts against it, and where it was found."""

    where: str
    limit: int
    current: Path | None  # the file that says what is in use, or None: counted in /proc (see ``machine``)
    machine: bool = False  # counts every task on the machine (kernel.pid_max), not this user's

    def in_use(self, *, exact: bool = True) -> int:
        """What counts against the limit now. For RLIMIT_NPROC, unless ``exact``, every thread on the
        machine (one read, an upper bound) rather than this user's (a walk of /proc)."""
        if self.machine:
            return _threads_on_machine()
        if self.current is None:
            return _processes_of(os.getuid()) if exact else _threads_on_machine()
        try:
            return int(self.current.read_text())
        except (OSError, ValueError):
            return 0


@dataclass(frozen=True)
class ServerBounds:
    """The process and memory bounds that enclose the server (empty where none is set)."""

    processes: tuple[Bound, ...] = ()
    memory: tuple[Bound, ...] = ()

    @classmethod
    def read(cls) -> ServerBounds:
        """The bounds of this process: its cgroups' at every level, and its RLIMIT_NPROC (not root's: the
        kernel does not apply it to root)."""
        processes = [*_cgroup_bounds("pids", "pids.max", "pids.current")]
        memory = [
            *_cgroup_bounds("memory", "memory.limit_in_bytes", "memory.usage_in_bytes"),
            *_cgroup_bounds("memory", "memory.max", "memory.current", v2=True),
        ]
        processes += _cgroup_bounds("pids", "pids.max", "pids.current", v2=True)
        soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
        if os.getuid() != 0 and soft != resource.RLIM_INFINITY:
            processes.append(Bound("RLIMIT_NPROC (processes of this user)", soft, None))
        # The machine's own: without a cgroup around it, the server and every other program share these.
        for setting in ("pid_max", "threads-max"):
            if (value := _number(Path("/proc/sys/kernel", setting))) is not None:
                processes.append(Bound(f"kernel.{setting} (tasks on this machine)", value, None, machine=True))
        if (total := _mem_total()) is not None:
            memory.append(Bound("MemTotal (this machine's memory)", total, None, machine=True))
        return cls(tuple(processes), tuple(memory))

    def processes_left(self, enough: int | None = None) -> tuple[int, Bound] | None:
        """Processes left under the bounds now, less the server's headroom, and the bound that decides it;
        None when unbounded. Past ``enough`` the count need not be exact (RLIMIT_NPROC is then estimated
        from above in one read, not counted in /proc)."""
        tightest: tuple[int, Bound] | None = None
        for bound in self.processes:
            left = bound.limit - bound.in_use(exact=False) - HEADROOM_PROCESSES
            if bound.current is None and (enough is None or left < enough):
                left = bound.limit - bound.in_use() - HEADROOM_PROCESSES
            if tightest is None or left < tightest[0]:
                tightest = (left, bound)
        return tightest

    def processes_total(self) -> int | None:
        """Processes all sandboxes together may hold, measured now (at start): None when unbounded."""
        found = self.processes_left()
        return None if found is None else max(found[0], MIN_SANDBOX_PROCESSES)

    def memory_total(self) -> int | None:
        """Memory all sandboxes together may use: the tightest limit less the server's headroom."""
        limits = [bound.limit for bound in self.memory]
        if not limits:
            return None
        return max(min(limits) - HEADROOM_MEMORY_BYTES, HEADROOM_MEMORY_BYTES)

    def describe(self) -> str:
        parts = [f"{b.where}: {b.limit} processes" for b in self.processes]
        parts += [f"{b.where}: {b.limit // (1024 * 1024)} MiB" for b in self.memory]
        return "; ".join(parts) or "none"


def _cgroup_bounds(controller: str, limit_file: str, current_file: str, *, v2: bool = False) -> list[Bound]:
    """The limits set on this process's cgroup and its ancestors, for one controller (v1) or the v2 tree."""
    own = _own_cgroups()
    if v2:
        if "" not in own:
            return []
        top = CGROUP_ROOT if (CGROUP_ROOT / "cgroup.controllers").exists() else CGROUP_ROOT / "unified"
        path = own[""]
    else:
        if controller not in own:
            return []
        top, path = CGROUP_ROOT / controller, own[controller]
    bounds = []
    relative = Path(path.lstrip("/"))
    while True:
        directory = top / relative
        try:
            text = (directory / limit_file).read_text().strip()
        except OSError:
            text = "max"
        if text != "max" and text.isdigit() and int(text) < _UNLIMITED:
            version = "v2" if v2 else "v1"
            where = f"cgroup {version} {'/' + str(relative) if str(relative) != '.' else '/'} {limit_file}"
            bounds.append(Bound(where, int(text), directory / current_file))
        if str(relative) in (".", ""):
            return bounds
        relative = relative.parent


def _own_cgroups() -> dict[str, str]:
    groups = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            groups[controller] = path
    return groups


def _number(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _mem_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _threads_on_machine() -> int:
    try:
        return int(Path("/proc/loadavg").read_text().split()[3].partition("/")[2])
    except (OSError, ValueError, IndexError):
        return _processes_of(os.getuid())


def _processes_of(uid: int) -> int:
    """Threads of every process of ``uid``: what RLIMIT_NPROC counts."""
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid == uid:
                count += len(os.listdir(f"/proc/{entry.name}/task"))
        except OSError:
            continue
    return count
