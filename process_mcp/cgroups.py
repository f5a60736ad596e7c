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
from pathlib import Path

logger = logging.getLogger(__name__)

CGROUP_V1_ROOT = Path("/sys/fs/cgroup")
"""Where the cgroup v1 hierarchies are mounted, one directory per controller."""
CONTROLLERS = ("pids", "memory")
PREFIX = "process-mcp-"
"""Start of each executor's parent group, followed by the server's pid and a random part."""
_JOIN = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'


class SandboxCgroups:
    """The server's parent group in each controller, and one child group per sandboxed process."""

    def __init__(self, parents: dict[str, Path]) -> None:
        self._parents = parents
        self._pending: set[str] = set()  # groups not yet removable (their last processes were exiting)

    @classmethod
    def create(cls) -> SandboxCgroups | None:
        """Make this executor's parent groups below this process's own; None where that is not allowed.

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
        except OSError as exc:
            logger.debug("no per-sandbox cgroups: %s", exc)
            for parent in parents.values():
                _rmdir(parent)
            return None
        return cls(parents)

    def add(self, name: str, *, max_processes: int, max_memory_bytes: int) -> list[str]:
        """Create the groups for one sandbox with its limits; return the ``cgroup.procs`` files to join.

        Raises OSError when a group or limit cannot be set; the spawn then fails.
        """
        self.sweep()
        pids = self._parents["pids"] / name
        memory = self._parents["memory"] / name
        pids.mkdir()
        memory.mkdir()
        _write(pids / "pids.max", str(max_processes))
        _write(memory / "memory.limit_in_bytes", str(max_memory_bytes))
        # Without swap accounting configured this file is missing; the memory limit still holds.
        _write(memory / "memory.memsw.limit_in_bytes", str(max_memory_bytes), optional=True)
        return [str(pids / "cgroup.procs"), str(memory / "cgroup.procs")]

    def remove(self, name: str) -> None:
        """Remove one sandbox's groups, now or, if its processes are still leaving, at a later sweep."""
        self._pending.add(name)
        self.sweep()

    def sweep(self) -> None:
        for name in list(self._pending):
            if all(_rmdir(parent / name) for parent in self._parents.values()):
                self._pending.discard(name)

    def close(self) -> None:
        """Remove every group this server made (their processes are gone by now)."""
        for parent in self._parents.values():
            for child in parent.iterdir() if parent.is_dir() else ():
                if child.is_dir():
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
