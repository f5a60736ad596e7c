"""Per-sandbox cgroups: a bound on the processes and the memory of each sandbox as a whole.

Where the server may create cgroups (cgroup v1 ``pids`` and ``memory`` hierarchies it can write, which
usually means it runs as root), each sandbox gets its own group in both, below the server's own group,
so limits set above the server still apply. Root needs this: the kernel does not apply RLIMIT_NPROC to
uid 0, namespaced or not. Elsewhere the sandbox falls back to rlimits (see ``sandbox``), and says so.

A process joins its groups before bwrap starts (``join_command``), so everything it forks is counted.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from pathlib import Path

from ..box.spares import SPARES

logger = logging.getLogger(__name__)

CGROUP_V1_ROOT = Path("/sys/fs/cgroup")
"""Where the cgroup v1 hierarchies are mounted, one directory per controller."""
CONTROLLERS = ("pids", "memory")
POOL_SIZE = 32
"""Empty groups kept for reuse; more are removed."""
PREFIX = "process-mcp-"
"""Start of each executor's parent group, followed by the server's pid and a random part."""
_UNLIMITED = 1 << 63
KEPT_SUPERVISORS = SPARES
"""Groups per box noted as holding a kept supervisor (``hold``), the last named: as many as the agent
keeps waiting. One it let go of is empty soon after; one no longer noted is taken again once empty."""
LEFT_BEHIND_BYTES = 1 << 20
"""Memory a tree's group may still hold and be taken again by the box's next tree."""
_JOIN = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'


class SandboxCgroups:
    """The server's parent group in each controller, and one child group per running sandbox.

    A group whose sandbox has ended is kept for the next one (up to POOL_SIZE) rather than removed:
    creating and removing memory groups costs the kernel work long after the rmdir.
    """

    def __init__(self, parents: dict[str, Path]) -> None:
        self._parents = parents
        self._lock = threading.Lock()  # groups are taken in the spawner thread, given back on the loop
        self._limits: dict[str, tuple[int, int]] = {}  # every group that exists, with its limits
        self._free: list[str] = []
        self._leaving: set[str] = set()  # released while their last processes were still exiting
        self._broken: set[str] = set()  # failed to take their limits: removed once empty, never reused
        self._count = 0
        self._before: dict[str, tuple[int, int]] = {}  # each group's counts of _events before its sandbox
        self._nested: set[str] = set()  # groups of single processes inside a box's group
        self._free_inside: dict[str, list[str]] = {}  # a box's group -> free groups below it, kept for it
        self._held: dict[str, list[str]] = {}  # a box's group -> groups below it its agent keeps a supervisor in

    @classmethod
    def create(cls, *, max_processes: int | None = None, max_memory_bytes: int | None = None) -> SandboxCgroups | None:
        """Make this executor's parent groups below this process's own; None where that is not allowed.
        ``max_processes`` and ``max_memory_bytes`` bound all sandboxes together (what the bounds the server
        lives in leave it, see ``bounds``).

        Groups left by servers that died (their pid is gone) are removed first.
        """
        own = _own_groups()
        name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        parents: dict[str, Path] = {}
        try:
            for controller in CONTROLLERS:
                if controller not in own:
                    raise OSError(f"no cgroup v1 {controller} hierarchy")
                base = CGROUP_V1_ROOT / controller / own[controller].lstrip("/")
                _remove_stale(base)
                parent = base / name
                parent.mkdir()
                parents[controller] = parent
                if controller == "memory":
                    # Charged to each child; enabling hierarchy makes a child's limit hold for its whole tree.
                    _write(parent / "memory.use_hierarchy", "1", optional=True)
                    if max_memory_bytes is not None:
                        _write(parent / "memory.limit_in_bytes", str(max_memory_bytes))
                elif max_processes is not None:
                    _write(parent / "pids.max", str(max_processes))
        except OSError as exc:
            logger.debug("no per-sandbox cgroups: %s", exc)
            for parent in parents.values():
                _rmdir(parent)
            return None
        return cls(parents)

    def acquire(self, *, max_processes: int, max_memory_bytes: int) -> tuple[str, list[str]]:
        """A group for one sandbox, with these limits: its name and the ``cgroup.procs`` files to join.

        Raises OSError when a group or limit cannot be set; the spawn then fails.
        """
        with self._lock:
            self._collect()
            if self._free:
                name = self._free.pop()
            else:
                self._count += 1
                name = f"sandbox-{self._count}"
                for parent in self._parents.values():
                    (parent / name).mkdir()
                self._limits[name] = (0, _UNLIMITED)  # what the kernel gives a new group
            try:
                if self._limits[name] != (max_processes, max_memory_bytes):
                    self._set_limits(name, max_processes, max_memory_bytes)
                # A reused group still holds its last sandbox's peak; this one's starts from nothing.
                _write(self._parents["memory"] / name / "memory.max_usage_in_bytes", "0", optional=True)
                self._before[name] = self._events(name)
            except OSError:
                # Never handed out again: its limits are in an unknown state (a later spawn's would differ).
                self._discard(name)
                raise
        return name, [str(parent / name / "cgroup.procs") for parent in self._parents.values()]

    def acquire_inside(self, box: str, *, max_processes: int, max_memory_bytes: int) -> str:
        """A group for one process of the box whose group is ``box``, below it, with these limits: its
        name there (the whole name is ``box/name``). One that an earlier process of the box left is taken
        again (making a memory group costs the kernel more than setting one), first one where the box's
        agent keeps that process's supervisor. Raises OSError when the group or a limit cannot be set."""
        with self._lock:
            checked = self._collect()
            free = self._free_inside.get(box) or []
            held = self._held.get(box) or []
            # One that holds a kept supervisor first (the most recently kept last): its process starts
            # without a move, which after a quiet moment costs milliseconds (see ``hold``).
            free.sort(key=lambda name: held.index(name) if name in held else -1)
            while free:
                name = free.pop()
                kept = name in held
                if kept:
                    held.remove(name)  # its supervisor is this process's, or has gone
                if name not in checked and not self._takeable(name, kept=kept):
                    # Since it was freed, the agent let its kept supervisor go (it exits) or the group
                    # stopped being noted as holding one: taken once that has left.
                    self._leaving.add(name)
                    continue
                try:
                    # Memory the last tree left that cannot be reclaimed (a file in the box's /tmp, shared
                    # memory) stays charged here: the group is removed, which leaves it to the box's.
                    if _unreclaimable(self._parents["memory"] / name):
                        raise OSError("memory of an earlier process tree is still charged to it")
                    if self._limits[name] != (max_processes, max_memory_bytes):
                        self._set_limits(name, max_processes, max_memory_bytes)
                    _write(self._parents["memory"] / name / "memory.max_usage_in_bytes", "0", optional=True)
                    self._before[name] = self._events(name)
                except OSError:
                    self._remove_inside(name)  # limits in an unknown state: never taken again
                    continue
                return name.rpartition("/")[2]
            self._count += 1
            inner = f"p{self._count}"
            name = f"{box}/{inner}"
            made = []
            try:
                for parent in self._parents.values():
                    (parent / name).mkdir()
                    made.append(parent / name)
                self._limits[name] = (0, _UNLIMITED)
                self._set_limits(name, max_processes, max_memory_bytes)
                self._before[name] = self._events(name)
            except OSError:
                for path in made:
                    _rmdir(path)
                self._limits.pop(name, None)
                raise
            self._nested.add(name)
        return inner

    def directories(self, name: str) -> list[str]:
        """The directory of group ``name`` in each hierarchy, in the order of ``CONTROLLERS``."""
        return [str(self._parents[controller] / name) for controller in CONTROLLERS]

    def peak_memory(self, name: str) -> int | None:
        """The most memory the group's sandbox used at once, or None where the kernel does not say."""
        try:
            return int((self._parents["memory"] / name / "memory.max_usage_in_bytes").read_text())
        except (OSError, ValueError):
            return None

    def limits_hit(self, name: str) -> tuple[int, int]:
        """How often the group's current sandbox hit its limits: processes the kernel killed for its
        memory limit, and forks it refused for its processes limit."""
        now, before = self._events(name), self._before.get(name, (0, 0))
        return now[0] - before[0], now[1] - before[1]

    def _events(self, name: str) -> tuple[int, int]:
        return (
            _count(self._parents["memory"] / name / "memory.oom_control", "oom_kill"),
            _count(self._parents["pids"] / name / "pids.events", "max"),
        )

    def hold(self, name: str) -> None:
        """The box's agent says it keeps, in the group ``name`` below its box's, the supervisor of the
        process tree that ran there, now gone, for a later process: once released, the group is taken
        again with that one process in it (counted by the limits: each tree's supervisor is), rather than
        once empty. Moving a process between groups waits for an RCU grace period after a quiet moment
        on cgroup v1 (about 6 ms), twice per spawn otherwise: in, and out again.

        What the agent says only chooses which group comes first. A group is taken again only with one
        process in it at most, the same in every hierarchy; and the agent, which puts processes in the
        box's groups, is the box's: trusted by nothing outside it (SECURITY.md). The last
        KEPT_SUPERVISORS named per box are noted; the agent keeps no more."""
        box, _, inner = name.rpartition("/")
        with self._lock:
            if name not in self._nested or not inner:
                return  # not (or no longer) a group of a process of a box
            held = self._held.setdefault(box, [])
            if name in held:
                held.remove(name)
            held.append(name)
            del held[:-KEPT_SUPERVISORS]

    def release(self, name: str) -> None:
        """Give back the group of a sandbox that has ended. A group of a single process of a box is only
        noted here (the next ``acquire_inside`` collects it, off the server's loop); a box's own group,
        with every group below it, is collected at once."""
        with self._lock:
            self._leaving.add(name)
            if name not in self._nested:
                self._collect()

    def _set_limits(self, name: str, max_processes: int, max_memory_bytes: int) -> None:
        _write(self._parents["pids"] / name / "pids.max", str(max_processes))
        memory = self._parents["memory"] / name
        # The kernel keeps memory.limit_in_bytes <= memory.memsw.limit_in_bytes at every step, so a
        # pooled group's limit is raised swap-first and lowered memory-first. Without swap accounting
        # configured the memsw file is missing; the memory limit still holds.
        order = ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]
        if max_memory_bytes > self._limits[name][1]:
            order.reverse()
        for file in order:
            _write(memory / file, str(max_memory_bytes), optional=file.startswith("memory.memsw"))
        self._limits[name] = (max_processes, max_memory_bytes)

    def _discard(self, name: str) -> None:
        if all(_rmdir(parent / name) for parent in self._parents.values()):
            self._limits.pop(name, None)
        else:
            self._broken.add(name)
            self._leaving.add(name)

    def _collect(self) -> set[str]:
        """Move released groups that are empty now (or hold only the supervisor the box's agent keeps
        there, see ``hold``) to the free lists, or remove them past POOL_SIZE; return the names of the
        groups below a box it freed."""
        freed: set[str] = set()
        # Groups below a box first: a box's group can be removed only once nothing is below it.
        for name in sorted(self._leaving, key=lambda name: -name.count("/")):
            box = name.rpartition("/")[0]
            if not self._takeable(name, kept=name in self._held.get(box, ()) and name not in self._broken):
                continue
            self._leaving.discard(name)
            if name in self._nested:
                if name not in self._broken and box not in self._leaving:
                    self._free_inside.setdefault(box, []).append(name)  # for the box's next process
                    freed.add(name)
                else:
                    self._remove_inside(name)
                continue
            self._held.pop(name, None)
            for inner in self._free_inside.pop(name, []):
                self._remove_inside(inner)
            if name not in self._broken and len(self._free) < POOL_SIZE:
                self._free.append(name)
            elif all(_rmdir(parent / name) for parent in self._parents.values()):
                del self._limits[name]
                self._broken.discard(name)
            else:
                self._leaving.add(name)
        return freed

    def _takeable(self, name: str, *, kept: bool) -> bool:
        """Whether group ``name`` may be given to a next tree: empty, or, where the box's agent keeps a
        supervisor there (``kept``), holding one process at most."""
        if kept:
            return self._holds_at_most_one(name)
        return not any(_has_processes(parent / name) for parent in self._parents.values())

    def _holds_at_most_one(self, name: str) -> bool:
        """Whether group ``name`` holds one process at most, the same one in every hierarchy, and the
        kernel counts no other (one that has left ``cgroup.procs`` but is not reaped yet)."""
        try:
            members = [(parent / name / "cgroup.procs").read_text().split() for parent in self._parents.values()]
            counted = (self._parents["pids"] / name / "pids.current").read_text().strip()
        except (OSError, KeyError):
            return False
        one = members[0]
        return len(one) <= 1 and all(each == one for each in members) and counted == str(len(one))

    def _remove_inside(self, name: str) -> None:
        """Remove a group below a box's; one that cannot be removed yet is marked broken (never taken
        again, by this box or another that gets its box's group) and removed once it can be."""
        held = self._held.get(name.rpartition("/")[0], [])
        if name in held:
            held.remove(name)
        if not all(_rmdir(parent / name) for parent in self._parents.values()):
            self._broken.add(name)
            self._leaving.add(name)
            return
        self._nested.discard(name)
        self._broken.discard(name)
        self._limits.pop(name, None)
        self._before.pop(name, None)

    def close(self) -> None:
        """Remove every group this server made (their processes are gone by now)."""
        for parent in self._parents.values():
            for child in parent.iterdir() if parent.is_dir() else ():
                if child.is_dir():
                    for inner in child.iterdir():  # a box's groups of single processes first
                        if inner.is_dir():
                            _rmdir(inner)
                    _rmdir(child)
            _rmdir(parent)


def join_command(procs_files: list[str], argv: list[str]) -> list[str]:
    """``argv`` preceded by a shell that moves itself into ``procs_files`` and then execs it; a group it
    cannot join ends the process with exit code 125 before anything runs."""
    return ["/bin/sh", "-c", _JOIN, "sh", *procs_files, "--", *argv]


def _remove_stale(base: Path) -> None:
    for parent in base.glob(f"{PREFIX}*"):
        pid = parent.name.removeprefix(PREFIX).partition("-")[0]
        if not pid.isdigit() or Path(f"/proc/{pid}").exists():
            continue
        for child in parent.iterdir():
            if child.is_dir():
                _rmdir(child)
        _rmdir(parent)


def _own_groups() -> dict[str, str]:
    groups = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            groups[controller] = path
    return groups


def _count(path: Path, key: str) -> int:
    """The number after ``key`` in a cgroup file of ``key value`` pairs; 0 where the kernel has none
    (``oom_kill`` is Linux 4.13 and later)."""
    try:
        found = path.read_text().split()
        return int(found[found.index(key) + 1])
    except (OSError, ValueError, IndexError):
        return 0


def _unreclaimable(group: Path) -> bool:
    """Whether a memory group with no process but the supervisor its box's agent keeps there holds
    memory that reclaim cannot free: files in a tmpfs, shared memory, locked pages or swap beyond
    LEFT_BEHIND_BYTES. Anonymous memory is only the pages that supervisor touched while in it (charges
    stay where a page was first touched), a few hundred KiB at most."""
    try:
        fields = dict(line.split() for line in (group / "memory.stat").read_text().splitlines() if " " in line)
        held = sum(int(fields.get(name, 0)) for name in ("total_shmem", "total_unevictable", "total_swap"))
    except (OSError, ValueError):
        return False
    return held > LEFT_BEHIND_BYTES


def _has_processes(group: Path) -> bool:
    """Whether anything is still in ``group``, or charged to it: a process that has left ``cgroup.procs``
    keeps counting in ``pids.current`` until it is reaped, and a group reused before then would start its
    next sandbox with fewer processes than its limit."""
    try:
        if (group / "cgroup.procs").read_text().strip():
            return True
        current = group / "pids.current"
        return current.exists() and current.read_text().strip() not in ("", "0")
    except FileNotFoundError:
        return False


def _write(path: Path, value: str, *, optional: bool = False) -> None:
    try:
        path.write_text(value)
    except FileNotFoundError:
        if not optional:
            raise


def _rmdir(path: Path) -> bool:
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True
