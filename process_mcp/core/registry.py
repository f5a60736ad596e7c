"""The processes a server started: their records, ids, and how long finished ones are kept."""

from __future__ import annotations

import collections
import itertools
import signal
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio

from ..errors import ProcessNotFound, excerpt
from .buffer import OutputBuffer
from .models import (
    HISTORY_SAMPLES,
    EndedBy,
    Health,
    LimitName,
    ProcessInfo,
    ProcessLimits,
    ProcessStats,
    ProcessStatus,
    ProcessVia,
    StatsSample,
)
from .signals import signal_name
from .terminal import Terminal

if TYPE_CHECKING:
    from .contract import LaunchSpec
    from .handle import ProcessHandle
    from .models import SpawnOptions


class ManagedProcess:
    """Everything the server knows about one process: identity, output, and how it ended.

    Backends keep it current as ``handle`` describes (output, streams, exit), on the event loop. Once
    the process has exited and its streams are closed, ``on_done`` is called.
    """

    def __init__(
        self,
        pid: str,
        command: str,
        cwd: str,
        *,
        tty: bool,
        buffer_bytes: int,
        cols: int,
        rows: int,
        on_done: Callable[[ManagedProcess], None] | None = None,
    ) -> None:
        self.pid = pid
        self.command = command
        self.cwd = cwd
        self.tty = tty
        self.created_at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        self.stdout = OutputBuffer(buffer_bytes)
        self.stderr = OutputBuffer(buffer_bytes)
        self.terminal = Terminal(self.stdout, cols, rows) if tty else None
        self.exit_code: int | None = None
        self.signal: str | None = None
        self.ended_by: EndedBy | None = None
        self.limit: LimitName | None = None
        self.limits: ProcessLimits | None = None
        self.on_output_limit: Callable[[ManagedProcess], None] | None = None  # called once, past output_mb
        self.on_exit: Callable[[], None] | None = None  # called once, when it exits
        self._cause: EndedBy | None = None  # who moved to end it, if anyone did before it exited
        self.sandboxed = False  # set by the backend when it confines the process
        self.via: ProcessVia = "host"  # set by the backend: how the process was started
        self.handle: ProcessHandle | None = None
        self.typed_at: float | None = None  # when input was last written to it (monotonic)
        self._on_done = on_done
        self._open_streams = 0
        self._exited = anyio.Event()
        self._done = anyio.Event()
        self.last_output = time.monotonic()
        """When output last arrived (monotonic clock), for waits on a quiet process."""
        self.started = time.monotonic()
        self.ended_at: float | None = None
        self.stats: ProcessStats | None = None
        """The latest sample of what its tree uses (kept once it has ended)."""
        self.peak_rss: int | None = None
        """Most memory its tree was seen using: its sandbox's cgroup peak where there is one, else the
        highest sample taken."""
        self.stats_at = 0.0
        self.stopped = False
        """Whether the process itself is stopped by a signal, as last seen (see ``ProcessHandle.stopped``)."""
        self.name: str | None = None
        self.group: str | None = None
        self.restarts: int | None = None
        """With a restart policy: how often it was started again (0 until the first)."""
        self.health: Health | None = None
        self.restart_pending = False
        """It ended, and is to be started again in this record: it is kept meanwhile."""
        self.kill_requested = False
        """The kill tool (or a shutdown) moved to end it: it is not started again."""
        self.output_base = 0
        """Output bytes of its earlier runs (restarts), which its outputMb does not count."""
        self.options: SpawnOptions | None = None
        """What its spawn asked for (its restart policy and checks)."""
        self.spec: LaunchSpec | None = None
        """How it was launched, to launch it again the same way."""
        self.reached: dict[int, str] = {}
        """The URLs its ports were given by (a port -> its URL), as told to callers."""
        self.relaunched: anyio.Event | None = None
        """While it is started again: set once it has a handle (or could not be started)."""
        self.history: collections.deque[StatsSample] = collections.deque(maxlen=HISTORY_SAMPLES)
        """The samples of its stats taken so far, the newest HISTORY_SAMPLES."""
        self._changed: anyio.Event | None = None  # created only while someone waits for a change
        self.stdout.on_append = self.stderr.on_append = self._output_arrived

    @property
    def status(self) -> ProcessStatus:
        return "terminated" if self._exited.is_set() else "running"

    @property
    def running(self) -> bool:
        return not self._exited.is_set()

    @property
    def lingering(self) -> bool:
        """Still running, or exited while something it started still holds its output open."""
        return not self._done.is_set()

    def changed(self) -> anyio.Event:
        """An event set at the next output, exit, stop or continue."""
        if self._changed is None:
            self._changed = anyio.Event()
        return self._changed

    def _output_arrived(self) -> None:
        self.last_output = time.monotonic()
        if self._past_output_limit():
            callback, self.on_output_limit = self.on_output_limit, None
            assert callback is not None
            self.hit("output")
            callback(self)
        self._wake()

    def _past_output_limit(self) -> bool:
        limits = self.limits
        if limits is None or limits.output_mb is None or self.on_output_limit is None or self.handle is None:
            return False
        written = self.stdout.total + self.stderr.total - self.output_base
        return self.running and written > limits.output_mb * 1024 * 1024

    def hit(self, limit: LimitName) -> None:
        """Note that the process is being ended for a limit."""
        if self.running and self._cause is None:
            self._cause = "limit"
            self.limit = limit

    def ended_for(self, limit: LimitName) -> None:
        """Note, after the fact, that the process ended because the kernel enforced ``limit`` on its
        tree (it killed the process, or a part of its tree, so that it ended)."""
        if self.ended_by == "exit":
            self.ended_by, self.limit = "limit", limit

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def stream_opened(self) -> None:
        self._open_streams += 1

    def stream_closed(self) -> None:
        self._open_streams -= 1
        self._check_done()

    def close_streams(self) -> None:
        """Its backend will report no more of its output (a start that failed after opening it)."""
        self._open_streams = 0

    def ending(self, cause: EndedBy) -> None:
        """Note who is ending the process (the first to try), for ``ended_by`` once it exits."""
        if self.running and self._cause is None:
            self._cause = cause

    def finish(self, exit_code: int | None, signum: int | None = None, *, cause: EndedBy | None = None) -> None:
        """Record the end of the process: its exit code, or the signal that ended it. ``cause``, when
        given, is why it ended whoever had moved to end it (its box's agent was lost, and it with it)."""
        cpu = self.limits is not None and self.limits.cpu_seconds is not None
        # SIGXCPU ends the leader, or, when the shell did not exec its command, the shell reports 128+24.
        if cpu and self._cause is None and signal.SIGXCPU in (signum, (exit_code or 0) - 128):
            self._cause, self.limit = "limit", "cpu"
        if cause is not None:
            self._cause, self.limit = cause, None
        self.ended_by = self._cause or "exit"
        self.ended_at = time.monotonic()
        if self.stats is not None:  # the last sample stands, with the time the process ran in all
            self.stats = self.stats.model_copy(update={"wall_seconds": round(self.ended_at - self.started, 3)})
        if signum is not None:
            self.signal = signal_name(signum)
            exit_code = 128 + signum
        self.exit_code = exit_code
        self.stopped = False
        self._exited.set()
        self._wake()
        on_exit, self.on_exit = self.on_exit, None
        if on_exit is not None:
            on_exit()
        self._check_done()

    def _check_done(self) -> None:
        if self._exited.is_set() and self._open_streams == 0 and not self._done.is_set():
            self._done.set()
            if self._on_done is not None:
                self._on_done(self)

    async def wait(self, timeout_s: float, *, output: bool = False) -> bool:
        """Wait up to ``timeout_s`` for the process to exit (and, with ``output``, for its output to
        close); say whether it did."""
        event = self._done if output else self._exited
        with anyio.move_on_after(timeout_s):
            await event.wait()
        return event.is_set()

    def set_stopped(self, stopped: bool) -> None:
        """Note that the process itself was stopped by a signal, or continued."""
        if stopped != self.stopped and self.running:
            self.stopped = stopped
            self._wake()

    def state(self) -> dict[str, Any]:
        """The fields every reply shares: status, exit_code, signal, ended_by, limit, and stopped (only
        while it is)."""
        return {
            "status": self.status,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "ended_by": self.ended_by,
            "limit": self.limit,
            "stopped": True if self.running and self.stopped else None,
        }

    def info(self, *, stats: bool = True) -> ProcessInfo:
        return ProcessInfo(
            pid=self.pid,
            command=self.command,
            cwd=self.cwd,
            tty=self.tty,
            created_at=self.created_at,
            sandboxed=self.sandboxed,
            via=self.via,
            stats=self.stats if stats else None,
            **self.labels(),
            **self.state(),
        )

    def labels(self) -> dict[str, Any]:
        """Its name and group, and as a service its restarts and health."""
        return {"name": self.name, "group": self.group, "restarts": self.restarts, "health": self.health}

    def rearm(self, marker: str) -> None:
        """Make the record that of the process started again in it: running, no exit, the same output
        buffers (``marker`` first, saying so), the same id, name and history."""
        self._exited = anyio.Event()
        self._done = anyio.Event()
        self._open_streams = 0
        self._cause = None
        self.exit_code = self.signal = self.ended_by = self.limit = None
        self.ended_at = None
        self.stopped = False
        self.handle = None
        self.restart_pending = False
        self.output_base = self.stdout.total + self.stderr.total
        self.restarts = (self.restarts or 0) + 1
        self.started = time.monotonic()
        self.stats, self.stats_at = None, 0.0
        (self.stdout).append(marker.encode())
        self._wake()


class ProcessRegistry:
    """Processes by id (``<prefix>-<n>``): all live ones, and the newest ``keep_terminated`` that ended."""

    def __init__(self, prefix: str, keep_terminated: int) -> None:
        self.prefix = prefix
        self.keep_terminated = keep_terminated
        self._counter = itertools.count(1)
        self._issued = 0
        self._records: dict[str, ManagedProcess] = {}

    def new_id(self) -> str:
        self._issued = next(self._counter)
        return f"{self.prefix}-{self._issued}"

    def add(self, record: ManagedProcess) -> None:
        self._records[record.pid] = record

    def get(self, pid: str) -> ManagedProcess:
        """The record for ``pid``, or the newest of that name; raise ProcessNotFound with a hint if there is none."""
        record = self._records.get(pid) or self.named(pid)
        if record is not None:
            return record
        prefix, _, number = pid.rpartition("-")
        if prefix == self.prefix and number.isdigit() and 0 < int(number) <= self._issued:
            raise ProcessNotFound(
                f"process {excerpt(pid)} ended and was dropped (the newest {self.keep_terminated} finished "
                "processes are kept); call ps to list processes"
            )
        raise unknown_process(pid, self.prefix)

    def named(self, name: str, *, running: bool = False) -> ManagedProcess | None:
        """The newest process named ``name`` (with ``running``, the one that runs or is to be started again),
        if there is one."""
        for record in reversed(self._records.values()):
            if record.name == name and (record.running or record.restart_pending or not running):
                return record
        return None

    def is_id(self, name: str) -> bool:
        """Whether ``name`` has the form of this registry's ids (so it cannot be a process's name)."""
        prefix, _, number = name.rpartition("-")
        return prefix == self.prefix and number.isdigit()

    def __iter__(self) -> Iterator[ManagedProcess]:
        return iter(list(self._records.values()))

    def prune(self) -> list[ManagedProcess]:
        """Drop the oldest finished processes beyond ``keep_terminated``; return them for closing."""
        finished = [r for r in self._records.values() if not r.lingering and not r.restart_pending]
        dropped = finished[: max(0, len(finished) - self.keep_terminated)]
        for record in dropped:
            del self._records[record.pid]
        return dropped


def unknown_process(pid: str, prefix: str) -> ProcessNotFound:
    """The error for an id that was never handed out (by a registry whose ids start with ``prefix``)."""
    return ProcessNotFound(
        f"no process {excerpt(pid)}; call ps to list the processes there are (ids look like '{prefix}-<n>', "
        "as spawn returns them, or are the name a spawn gave)"
    )
