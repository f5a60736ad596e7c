"""Docker mode without the agent (an image with no Python): every process is an exec of its own.

Each exec is attached over a hijacked socket, read and written without blocking on the event loop.
Every exec carries ``PROCESS_MCP_ID=<executor token>:<docker-N>`` in its environment, which its
children inherit; signals go to every process in the container whose environment holds that exact
line (a small /bin/sh script walking /proc, run as its own exec). The engine reports only an exit
code, so 128+N reads as signal N.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from typing import TYPE_CHECKING, Any, Literal

import anyio
import anyio.to_thread

from ..core.contract import LaunchSpec, ProcessSink
from ..core.handle import ProcessHandle, SharedAnswer
from ..core.models import TERMINAL_COLS, TERMINAL_ROWS, TTY_TERM
from ..core.signals import NON_TERMINATING, signal_from_exit_code
from ..core.streams import READ_CHUNK, write_all
from ..errors import InvalidInput, KillFailed, SpawnFailed, StdinFailed
from . import engine
from .engine import LAUNCH_TIMEOUT_S, MARKER_VAR, Demuxer

if TYPE_CHECKING:
    from .session import ContainerSession

logger = logging.getLogger(__name__)

EXIT_POLL_S = 0.02
"""Interval for asking the engine for an exit code it has not recorded yet (it lags the stream's EOF)."""
EXIT_SETTLE_S = 5.0
"""Bound on that polling; past it the exit code is reported as unknown."""
SIGNAL_TIMEOUT_S = 10.0
"""Bound on one signal delivery (an exec walking /proc); a busy engine may be slow to start it."""

# $1 cwd, $2 handshake, $3 the command. Printing the handshake only once `cd` succeeded lets
# spawn tell "no such directory" from "started" before it returns, without a second exec.
_LAUNCH_SCRIPT = 'cd -- "$1" 2>/dev/null || { printf %s "$2:no"; exit 1; }; printf %s "$2:ok"; exec /bin/sh -c "$3"'
# A TTY exec starts at 0x0 on engines before API 1.42, and exec_resize races the program: size the
# terminal before the program starts.
_TTY_LAUNCH_SCRIPT = f"stty rows {TERMINAL_ROWS} cols {TERMINAL_COLS} 2>/dev/null; {_LAUNCH_SCRIPT}"
# $1 a regular expression for the marker line, $2 a signal number. Needs only /proc, tr, grep and
# kill (busybox has them). Processes that vanish mid-walk are skipped.
_SIGNAL_SCRIPT = (
    'm=; for d in /proc/[0-9]*; do p=${d#/proc/}; [ "$p" = $$ ] && continue; '
    'tr \'\\0\' \'\\n\' < "$d/environ" 2>/dev/null | grep -q -e "$1" && m="$p $m"; '
    'done; [ -z "$m" ] || kill -"$2" $m 2>/dev/null; exit 0'
)
# $1 the start of a marker line (PROCESS_MCP_ID=<token>:). Prints "pid ppid state id" (the id is the rest
# of the marker, e.g. docker-3) for every marked process that is stopped (T, t) or in uninterruptible
# sleep (D: a shell in vfork waits so on its child). See ``stopped_ids``.
_STOPPED_SCRIPT = (
    'for d in /proc/[0-9]*; do s=$(cat "$d/stat" 2>/dev/null) || continue; set -- "$1" ${s##*)}; '
    'case "$2" in T|t|D) ;; *) continue;; esac; '
    'm=$(tr \'\\0\' \'\\n\' < "$d/environ" 2>/dev/null | grep -e "^$1") && echo "${d#/proc/} $3 $2 ${m#"$1"}"; '
    "done; exit 0"
)
STOPPED_TIMEOUT_S = 10.0
"""Bound on asking which processes are stopped (an exec walking /proc); past it they read as before."""


class ExecLauncher:
    """Starts and signals processes as execs of their own, in ``session``'s container."""

    def __init__(self, session: ContainerSession) -> None:
        self._session = session
        self._stopped = SharedAnswer(self._exec_stopped)

    async def launch(self, spec: LaunchSpec, sink: ProcessSink, workdir: str) -> ProcessHandle:
        """Start ``spec``'s process as an exec, reporting into ``sink``; a missing cwd's error names
        ``workdir``."""
        ex = self._session
        assert ex.client is not None
        api = ex.client.api
        handshake = f"process-mcp-{secrets.token_hex(6)}"
        environment = {**ex.env_defaults(spec.tty), **spec.env, MARKER_VAR: ex.marker(spec.pid).partition("=")[2]}
        if spec.tty and "TERM" not in spec.env:
            environment["TERM"] = TTY_TERM
        script = _TTY_LAUNCH_SCRIPT if spec.tty else _LAUNCH_SCRIPT
        command = ["/bin/sh", "-c", script, "sh", spec.cwd, handshake, spec.command]

        def create_and_start() -> tuple[str, Any]:
            assert ex.container is not None
            exec_id: str = api.exec_create(
                ex.container.id, command, stdin=True, tty=spec.tty, environment=environment, user=ex.exec_user
            )["Id"]
            # docker-py's stubs type this as bytes; with socket=True it is the hijacked socket's wrapper.
            sock: Any = api.exec_start(exec_id, socket=True, tty=spec.tty)
            return exec_id, sock

        try:
            exec_id, sock = await anyio.to_thread.run_sync(create_and_start)
        except engine.docker_errors() as exc:
            reason = engine.reason(exc)
            if not await ex.recover():
                raise SpawnFailed(f"could not start {spec.command!r} in the container: {reason}") from None
            try:
                exec_id, sock = await anyio.to_thread.run_sync(create_and_start)
            except engine.docker_errors() as retry:
                raise SpawnFailed(
                    f"could not start {spec.command!r} in the container: {engine.reason(retry)}"
                ) from None
        # The SocketIO wrapper owns the raw socket (`_sock`); unix and plain TCP engines give one.
        raw: socket.socket = getattr(sock, "_sock", sock)
        handle = _ExecHandle(self, sink, exec_id, sock, raw, handshake)
        sink.sandboxed = True  # confined by the container
        outcome = await handle.launched()
        if outcome == "ok":
            if spec.tty:
                await self._resize(exec_id)
            return handle
        await handle.wait_exited()
        handle.close()
        if outcome == "nocwd":
            raise InvalidInput(
                f"cwd {spec.cwd!r} does not exist or is not a directory in the container; pass an existing "
                f"directory or omit cwd to use {workdir}"
            )
        detail = handle.launch_output.strip() or f"exit code {handle.exit_code}"
        raise SpawnFailed(f"could not start {spec.command!r} in the container (it needs /bin/sh): {detail}")

    async def _resize(self, exec_id: str) -> None:
        # stty already sized the terminal; this tells the engine too, so later attaches agree.
        assert self._session.client is not None
        api = self._session.client.api
        try:
            await anyio.to_thread.run_sync(lambda: api.exec_resize(exec_id, height=TERMINAL_ROWS, width=TERMINAL_COLS))
        except engine.docker_errors() as exc:
            logger.debug("exec_resize of %s failed (it may have exited): %s", exec_id, exc)

    async def inspect(self, exec_id: str) -> dict[str, Any]:
        assert self._session.client is not None
        return await anyio.to_thread.run_sync(self._session.client.api.exec_inspect, exec_id)

    async def signal_matching(self, pattern: str, signum: int) -> None:
        """Send ``signum`` to every process in the container whose environment matches ``pattern``."""
        container = self._session.container
        if container is None:
            return
        command = ["/bin/sh", "-c", _SIGNAL_SCRIPT, "sh", pattern, str(int(signum))]
        reason = f"no answer within {SIGNAL_TIMEOUT_S:g} s"
        with anyio.move_on_after(SIGNAL_TIMEOUT_S):
            try:
                result = await anyio.to_thread.run_sync(
                    lambda: container.exec_run(command, stdin=False, tty=False, user=self._session.exec_user),
                    abandon_on_cancel=True,
                )
            except engine.docker_errors() as exc:
                reason = engine.reason(exc)
            else:
                if result.exit_code == 0:
                    return
                output = result.output if isinstance(result.output, bytes) else b""  # bytes unless streaming
                reason = f"exit code {result.exit_code}: {output.decode(errors='replace').strip()}"
        raise KillFailed(f"could not deliver signal {signum} in the container ({reason})")

    async def stopped(self) -> frozenset[str] | None:
        """The ids of this executor's processes that are stopped, by one exec walking /proc in the
        container (shared by the callers that ask while it runs and for STOPPED_FRESH_S after, e.g. the
        rows of one ps); None when it cannot be told."""
        return await self._stopped.get()

    async def _exec_stopped(self) -> frozenset[str] | None:
        container = self._session.container
        if container is None:
            return None
        command = ["/bin/sh", "-c", _STOPPED_SCRIPT, "sh", self._session.marker()]
        with anyio.move_on_after(STOPPED_TIMEOUT_S):
            try:
                result = await anyio.to_thread.run_sync(
                    lambda: container.exec_run(command, stdin=False, tty=False, user=self._session.exec_user),
                    abandon_on_cancel=True,
                )
            except engine.docker_errors() as exc:
                logger.debug("could not ask which processes are stopped: %s", engine.reason(exc))
                return None
            if result.exit_code != 0 or not isinstance(result.output, bytes):
                return None
            return stopped_ids(result.output.decode(errors="replace"))
        return None

    def marker_pattern(self, pid: str | None) -> str:
        """A regular expression for the marker line of process ``pid``, or of every process with None."""
        # Token and ids are [0-9a-z:-]: no regular-expression metacharacters to escape.
        return f"^{self._session.marker()}" + ("" if pid is None else f"{pid}$")


def stopped_ids(listing: str) -> frozenset[str]:
    """The ids of the processes that are stopped, from _STOPPED_SCRIPT's lines. A process is what its exec
    started (the launch script execs it): the marked process whose parent is outside the container (ppid
    0). It is stopped when it is, or when it waits in vfork (D) on a child that is."""
    rows = [line.split() for line in listing.splitlines()]
    rows = [row for row in rows if len(row) == 4 and row[0].isdigit() and row[1].isdigit()]
    stopped_children = {(row[1], row[3]) for row in rows if row[2] in ("T", "t")}
    return frozenset(
        pid
        for process, parent, state, pid in rows
        if parent == "0" and (state in ("T", "t") or (state == "D" and (process, pid) in stopped_children))
    )


class _ExecHandle(ProcessHandle):
    """One exec: its socket read on the event loop, its exit code fetched from the engine at EOF."""

    def __init__(
        self,
        launcher: ExecLauncher,
        record: ProcessSink,
        exec_id: str,
        wrapper: Any,
        sock: socket.socket,
        handshake: str,
    ) -> None:
        self._launcher = launcher
        self._record = record
        self._exec_id = exec_id
        self._wrapper = wrapper  # keeps the HTTP response (and so the socket) alive
        self._sock = sock
        self._fd = sock.fileno()
        self._loop = asyncio.get_running_loop()
        self._demux = None if record.tty else Demuxer()
        self._handshake = handshake.encode()
        self._before: bytearray | None = bytearray()  # stdout until the handshake is settled
        self._outcome: Literal["ok", "nocwd", "failed"] | None = None
        self._launched = anyio.Event()
        self._exited = anyio.Event()
        self._exit_task: asyncio.Task[None] | None = None
        self._reading = True
        self._closed = False
        self._input_ended = False  # a pipe's: its write side was shut
        self._last_input = b""  # a terminal's end of file ends a partial line first
        self.exit_code: int | None = None
        self.launch_output = ""
        self._delivered: int | None = None  # the last terminating signal we sent
        sock.setblocking(False)
        record.stream_opened()
        self._loop.add_reader(self._fd, self._on_readable)

    async def launched(self) -> Literal["ok", "nocwd", "failed"]:
        """Wait (bounded) for the launch script to say whether the command is starting."""
        with anyio.move_on_after(LAUNCH_TIMEOUT_S):
            await self._launched.wait()
        if self._outcome is None:
            self._outcome = "failed"
            self.launch_output = f"no sign of life within {LAUNCH_TIMEOUT_S:g} s"
        return self._outcome

    async def wait_exited(self) -> None:
        with anyio.move_on_after(EXIT_SETTLE_S + LAUNCH_TIMEOUT_S):
            await self._exited.wait()

    def _on_readable(self) -> None:
        try:
            data = self._sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            logger.warning("reading output of %s failed: %s", self._record.pid, exc)
            data = b""
        if not data:
            self._on_eof()
            return
        if self._demux is None:
            self._deliver(1, data)
        else:
            for stream, payload in self._demux.feed(data):
                self._deliver(stream, payload)

    def _deliver(self, stream: int, data: bytes | memoryview) -> None:
        if stream == 2:
            self._record.stderr.append(data)
            return
        if self._before is not None:
            self._before += data
            need = len(self._handshake) + 3  # ":ok" or ":no"
            if len(self._before) < need:
                return
            head, data = bytes(self._before[:need]), bytes(self._before[need:])
            if head == self._handshake + b":ok":
                self._settle("ok")
            else:
                self._settle("nocwd" if head == self._handshake + b":no" else "failed")
                return
            if not data:
                return
        self._record.stdout.append(data)

    def _settle(self, outcome: Literal["ok", "nocwd", "failed"]) -> None:
        if outcome == "failed" and self._before is not None:
            self.launch_output = self._before.decode(errors="replace")
        self._before = None
        self._outcome = outcome
        self._launched.set()

    def _on_eof(self) -> None:
        self._stop_reading()
        if self._before is not None:
            self._settle("failed")
        self._record.stream_closed()
        self._exit_task = self._loop.create_task(self._collect_exit())

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    async def _collect_exit(self) -> None:
        code: int | None = None
        try:
            with anyio.move_on_after(EXIT_SETTLE_S):
                while True:
                    info = await self._launcher.inspect(self._exec_id)
                    if not info.get("Running"):
                        code = info.get("ExitCode")
                        break
                    await anyio.sleep(EXIT_POLL_S)  # the engine records the exit a moment after EOF
        except engine.docker_errors() as exc:
            logger.warning("could not read the exit code of %s: %s", self._record.pid, exc)
        self.exit_code = code
        self._exited.set()
        signum = signal_from_exit_code(code)
        if code == 0 and self._delivered is not None:
            # The engine occasionally loses the status of an exec whose whole tree dies at once and
            # reports 0 (measured: about 1 in 30 tree kills on API 1.41). After our own terminating
            # signal, that 0 is almost surely the signal; a process that traps it and exits 0 is
            # misreported, the lesser error.
            signum = self._delivered
        if signum is not None:
            self._record.finish(None, signum)
        else:
            self._record.finish(code)

    async def write(self, data: bytes) -> None:
        if self._closed or self._input_ended:
            raise StdinFailed(f"{self._record.pid}'s input is closed")
        await write_all(self._fd, self._sock.send, data, self._record.pid)
        if data:
            self._last_input = data[-1:]

    async def end_input(self) -> None:
        if self._record.tty:  # the engine's terminal: its end-of-file character, the default one
            await self.write(b"\x04" * (1 if self._last_input in (b"", b"\n", b"\r") else 2))
            self._last_input = b""
            return
        if self._closed or self._input_ended:
            raise StdinFailed(f"{self._record.pid}'s input is closed already")
        try:
            self._sock.shutdown(socket.SHUT_WR)  # the engine closes the exec's stdin
        except OSError as exc:
            raise StdinFailed(f"{self._record.pid}'s input could not be closed: {exc.strerror or exc}") from None
        self._input_ended = True

    async def stopped(self) -> bool | None:
        stopped = await self._launcher.stopped()
        return None if stopped is None else self._record.pid in stopped

    async def signal(self, signum: int) -> None:
        if signum not in NON_TERMINATING:
            self._delivered = signum
        await self._launcher.signal_matching(self._launcher.marker_pattern(self._record.pid), signum)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_reading()
        if self._exit_task is not None and not self._exit_task.done():
            self._exit_task.cancel()
        self._wrapper.close()
        self._sock.close()
