"""Host mode's launch: a sandboxed process on three pipes or a pseudo-terminal, watched on the event loop.

Sandboxed processes get three pipes, or a real pseudo-terminal (ptyprocess), so programs see
``isatty()`` true and Ctrl-C typed as ``\\x03`` raises SIGINT. Output and exits are watched with
non-blocking descriptors on the event loop (a pidfd per process): no thread per process, no blocking
reads. The handles report into the process's record as ``core.handle`` describes.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import subprocess
import time
from dataclasses import dataclass

import anyio
from ptyprocess import PtyProcess

from ..box import proc
from ..core.buffer import OutputBuffer
from ..core.contract import ProcessSink
from ..core.handle import ProcessHandle, TreeRoot
from ..core.models import TERMINAL_COLS, TERMINAL_ROWS
from ..core.signals import signal_from_exit_code
from ..core.stats import TreeSample
from ..core.streams import READ_CHUNK, write_all
from ..errors import KillFailed, StdinFailed
from .sandbox import Launch

logger = logging.getLogger(__name__)

DRAIN_MAX_READS = 64
"""Reads made at exit to collect what is still buffered, bounded in case a child keeps writing."""
EXIT_POLL_S = 0.05
"""Exit polling interval, only where pidfds are unavailable (Linux < 5.3)."""
SIGNALS_RESET_S = 0.5
"""How long after its start a sandboxed process's first signal may wait for the launch chain to have
reset the signals bwrap ignores: sent before that, a group signal is discarded (see ``sandbox``)."""
SIGNALS_RESET_POLL_S = 0.002


def only_child(pid: int) -> int | None:
    """The one child of ``pid`` (bwrap's init below bwrap), or None while there is not exactly one."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children", "rb") as file:
            children = file.read().split()
    except OSError:
        return None
    return int(children[0]) if len(children) == 1 else None


class HostHandle(ProcessHandle):
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
        self._command: proc.StateReader | None = None  # the one child of bwrap's init, once seen
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
            self._init_pid = only_child(self._pid)
        return TreeRoot(self._init_pid or self._pid, included=False)

    def read_sample(self) -> TreeSample | None:
        root = self.tree_root()
        return None if root is None else TreeSample.of(proc.sample_tree(root.pid, include_root=root.included))

    def read_stopped(self) -> bool | None:
        # The launch chain below bwrap's init execs its way to the command's shell, keeping its pid. Until
        # that process is there, the deepest one that is tells: stopped, it starts nothing below it.
        if self._command is not None:
            return self._command.stopped()
        if self._init_pid is None:
            self._init_pid = only_child(self._pid)
        command = None if self._init_pid is None else only_child(self._init_pid)
        if command is None:
            return proc.is_stopped(self._init_pid or self._pid)
        self._command = proc.StateReader(command)
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
    for pid in proc.task_descendants(root):
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
class StartedPipe:
    popen: subprocess.Popen[bytes]
    stdin: int
    stdout: int
    stderr: int


def start_pipe(launch: Launch, cwd: str) -> StartedPipe:
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
    return StartedPipe(popen, stdin_w, out_r, err_r)


class PipeHandle(HostHandle):
    def __init__(self, record: ProcessSink, started: StartedPipe) -> None:
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


def start_pty(launch: Launch, cwd: str) -> PtyProcess:
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


class PtyHandle(HostHandle):
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
