"""The executor: the five operations, over any backend (``contract.Backend``).

A backend only knows how to start a process in its box and drive it (``ProcessHandle``); everything that
does not touch the OS or Docker (validation, ids, waiting, output tails, signal names, limits, shutdown
order) lives here, so host and Docker mode cannot drift apart.
"""

from __future__ import annotations

import asyncio
import logging
import posixpath
import re
import signal
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from signal import SIGCONT, SIGKILL, SIGSTOP, Signals
from typing import Any

import anyio

from ..config import ProcessMcpConfig
from ..errors import InvalidInput, ProcessMcpError, ProcessNotFound, ProcessTerminated, TooManyProcesses, excerpt
from ..policy import CommandPolicy
from .buffer import head_and_tail, tail_lines
from .contract import Backend, LaunchSpec
from .escapes import decode_input
from .handle import InputWanted, ProcessHandle
from .models import (
    BACKOFF_CAP_MS,
    DEFAULT_LINES,
    MAX_COMMAND_BYTES,
    MAX_ENV_BYTES,
    MAX_ENV_VARS,
    MAX_INPUT_CHARS,
    MAX_PATH_BYTES,
    OUTPUT_TRUNCATE,
    TERMINAL_COLS,
    TERMINAL_ROWS,
    HealthCheck,
    KillResult,
    LimitName,
    PortInfo,
    ProcessInfo,
    ProcessLimits,
    ProcessOutput,
    ProcessStats,
    ReadyCheck,
    RestartPolicy,
    SpawnOptions,
    SpawnResult,
    StatsSample,
    StdinResult,
    WaitResult,
)
from .registry import ManagedProcess, ProcessRegistry
from .shell import exec_form
from .signals import NON_TERMINATING, parse_signal
from .stats import STATS_MAX_AGE_S, TreeSample
from .terminal import clean, strip_escapes
from .waiting import (
    MATCH_THREADS,
    OUTPUT_SETTLE_S,
    InputProbe,
    Progress,
    Wait,
    page_look,
    page_since,
    text_since,
    wait_exit,
    wait_on,
)

logger = logging.getLogger(__name__)

PortLink = Callable[[str, int], str]
"""The URL of a process's port (by process id and port) where the server is not local."""

KILL_SETTLE_S = 1.0
"""How long kill waits for the process to exit (or, for SIGSTOP and SIGCONT, to stop or go on), so its
reply can say whether it did."""
STOP_POLL_S = 0.02
"""Interval of asking whether a process that was sent SIGSTOP or SIGCONT has stopped or gone on."""
SHUTDOWN_GRACE_S = 1.5
"""How long cleanup lets processes handle SIGTERM before SIGKILL; fits in the 2 s MCP clients give a
server to exit once they close its stdin."""
SHUTDOWN_KILL_WAIT_S = 2.0
"""How long cleanup waits for the kernel to report SIGKILLed processes gone."""
LIMIT_CHECK_S = 0.1
STOPPING = frozenset({signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGQUIT})
"""Signals by which the kill tool stops a service for good (a HUP or USR1 may be a reload: a crash after
it is still restarted)."""
PROBE_TIMEOUT_S = 2.0
"""Longest one check of a port (connect, and the status line of an HTTP answer) may take."""
READY_POLL_S = 0.1
"""Time between checks of a port for readiness."""
SERVICE_SAMPLE_S = 1.0
"""How often a named process's stats are sampled while it runs (its history)."""
"""How often the tree of a process with a memory or processes limit is measured against it: a tree
can be past a limit for about this long, within the kernel's per-process bounds (see ``ProcessLimits``)."""

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ProcessExecutor:
    """Runs processes through ``backend`` and keeps track of them; the five MCP tools map onto its methods.

    Every method raises only ``ProcessMcpError`` subclasses, whose ``code`` is stable. A non-zero
    exit code is a result, not an error.
    """

    def __init__(self, config: ProcessMcpConfig, backend: Backend) -> None:
        self.config = config
        self.backend = backend
        self._registry = ProcessRegistry(self.prefix, config.limits.keep_terminated)
        self._starting = 0  # spawns between the limit check and the registry, so concurrent ones count
        self._policy = CommandPolicy(config.policy.command_allow, config.policy.command_deny)
        self.on_launch: Callable[[float], None] | None = None
        """Called with the seconds each process took to start (e.g. for metrics)."""
        self.on_live: Callable[[int], None] | None = None
        """Called with 1 when a process is running once started, and with -1 when it exits (e.g. for a
        gauge of the processes running now)."""
        self.on_end: Callable[[ManagedProcess], None] | None = None
        """Called once for each process that has exited and whose output is closed (e.g. to audit it)."""
        self.on_reach: Callable[[ManagedProcess, int, str], None] | None = None
        """Called when a port of a process is first given a URL (a forward made): for the audit log."""
        self._naming: dict[str, anyio.Event] = {}  # names whose spawn is starting its process
        self._closing = False  # cleanup has begun
        self._lifetimes: dict[str, asyncio.TimerHandle] = {}  # ends each process at the maximum lifetime
        self._expiring: set[asyncio.Task[None]] = set()
        self._searches: anyio.CapacityLimiter | None = None  # made on the event loop, at the first wait

    @property
    def prefix(self) -> str:
        """Start of every process id this executor hands out, e.g. ``host`` for ``host-1``."""
        return self.backend.prefix

    @property
    def workdir(self) -> str:
        """Where processes run when a spawn gives no cwd, and what a relative cwd is taken from."""
        return self.backend.workdir

    async def start(self) -> None:
        """Prepare the backend (e.g. the container); called once before the first spawn."""
        await self.backend.start()

    async def ready(self) -> bool:
        """Whether a spawn could start now (for a readiness probe); never raises."""
        return await self.backend.ready()

    async def spawn(self, options: SpawnOptions, progress: Progress | None = None) -> SpawnResult:
        """Start ``options.command`` under /bin/sh and wait for it to exit, up to the timeout.

        With ``wait_for`` or ``idle_ms`` it returns earlier, once output matches or goes quiet
        (``wait_result`` says which); otherwise it returns at once with ``background``. At the
        timeout the process keeps running and the result says ``running``. Raises InvalidInput for
        a malformed request, SpawnFailed when the backend cannot start it.
        """
        command, cwd, env, timeout_s = self._check_spawn(options)
        self._policy.check(command)
        if options.health is not None and options.health.command is not None:
            self._policy.check(options.health.command)  # it runs in the box as often as every 100 ms
        self._check_limits(options.limits)
        wait = self._requested_wait(options.wait_for, options.idle_ms, timeout_s=timeout_s)
        checks = [check for check in (options.ready, options.health) if check is not None and check.by_port]
        if checks and not self.backend.probes_ports:
            raise InvalidInput(
                "ready and health by port need the agent in the box, and this Docker container runs each process as "
                "an exec of its own (DOCKER_AGENT=false, or its image has no python3): use ready {pattern}, health "
                "{command}"
            )
        name = options.name
        if name is not None:
            if self._registry.is_id(name):
                raise InvalidInput(f"name {name!r} has the form of a process id; choose another (e.g. 'web')")
            while name in self._naming:  # a spawn of the same name is starting: its process is the one
                await self._naming[name].wait()
            running = self._registry.named(name, running=True)
            if running is not None:
                return await self._spawn_result(running, None, None, existing=True)
        self._check_live_limit()
        record = ManagedProcess(
            self._registry.new_id(),
            command,
            cwd,
            tty=options.tty,
            buffer_bytes=self.config.limits.output_buffer_bytes,
            cols=TERMINAL_COLS,
            rows=TERMINAL_ROWS,
            on_done=self._finished,
        )
        record.limits = options.limits
        record.on_output_limit = self._end_for_output
        record.name, record.group, record.options = name, options.group, options
        if options.restart is not None:
            record.restarts = 0
        naming = anyio.Event()
        if name is not None:
            self._naming[name] = naming
        self._starting += 1
        # A caller that goes away (a cancelled request, a client that disconnected) must not leave a
        # process started but unrecorded, where no kill or shutdown can find it: launching is bounded.
        launched = time.monotonic()
        with anyio.CancelScope(shield=True):
            try:
                spec = LaunchSpec(
                    record.pid, exec_form(command), cwd, env, options.tty, options.limits, self._file_room(options)
                )
                record.spec = spec
                record.handle = await self.backend.launch(spec, record)
            finally:
                self._starting -= 1
                if name is not None:
                    del self._naming[name]
                naming.set()
            self._registry.add(record)
        if self.on_launch is not None:
            self.on_launch(time.monotonic() - launched)
        self._watch(record, options)
        wait_result: WaitResult | None = None
        probe = self._input_probe(record)
        if options.ready is not None:
            wait_result, ready, detail = await self._wait_ready(record, options.ready, timeout_s, progress)
            return await self._spawn_result(record, wait_result, None, ready=ready, ready_detail=detail)
        if wait is not None:
            wait_result = await wait_on(record, wait, (0, 0), progress, limiter=self._search_limiter(), probe=probe)
        elif not options.background:
            waited = await wait_exit(record, timeout_s, progress, probe)
            if waited == "exited":
                await record.wait(OUTPUT_SETTLE_S, output=True)
            elif waited == "input":
                wait_result = "input"  # a plain spawn says why it returned early
        return await self._spawn_result(record, wait_result, probe)

    def _watch(self, record: ManagedProcess, options: SpawnOptions) -> None:
        """Count a process just started (or started again) as live, and set what watches it: its lifetime,
        its limits, a service's samples and health checks."""
        on_live = self.on_live
        if on_live is not None and record.running:
            on_live(1)
            record.on_exit = lambda: on_live(-1)
        if not record.lingering:  # it ended before it was registered (the agent can say so in one read)
            self._drop_oldest()
            return
        if self.config.limits.max_lifetime_s is not None:
            self._limit_lifetime(record, self.config.limits.max_lifetime_s)
        if options.limits is not None and (options.limits.memory_mb or options.limits.processes):
            self._in_background(self._watch_limits(record, options.limits))
        elif options.name is not None or options.restart is not None or options.health is not None:
            self._in_background(self._sample_service(record))  # a service: its stats' history, a sample a second
        if options.health is not None:
            self._in_background(self._watch_health(record, options.health))

    async def _wait_ready(
        self, record: ManagedProcess, ready: ReadyCheck, timeout_s: float, progress: Progress | None
    ) -> tuple[WaitResult | None, bool, str]:
        """Wait up to ``timeout_s`` for ``record``'s process to be ready as ``ready`` says: (why the wait
        ended when it is not ready, whether it is, what the last check saw)."""
        if ready.pattern is not None:
            wait = self._requested_wait(ready.pattern, None, timeout_s=timeout_s)
            assert wait is not None
            ended = await wait_on(record, wait, (0, 0), progress, limiter=self._search_limiter())
            return (None, True, "its output showed the pattern") if ended == "matched" else (ended, False, ended)
        deadline = time.monotonic() + timeout_s
        detail = "not checked yet"
        while True:
            left = deadline - time.monotonic()
            handle = record.handle
            if not record.running or handle is None:
                return "exited", False, f"it exited first (last check: {detail})"
            if left <= 0:
                return "timeout", False, f"not ready within the timeout (last check: {detail})"
            seen = await _probe_check(handle, ready, PROBE_TIMEOUT_S, deadline)
            if seen is None:
                return None, False, "its ports cannot be checked here (no agent in the box): use ready {pattern}"
            ok, detail = seen
            if ok:
                return None, True, detail
            await record.wait(min(READY_POLL_S, max(0.0, deadline - time.monotonic())))

    async def _watch_health(self, record: ManagedProcess, check: HealthCheck) -> None:
        """Check a running service every ``interval_ms``: healthy at a passing check, unhealthy after
        ``failures`` failing ones in a row; then, with a restart policy, end it (it is started again)."""
        handle = record.handle
        record.health = "starting"
        failed = 0
        while True:
            await record.wait(check.interval_ms / 1000)
            if not record.running or record.handle is not handle or handle is None:
                return
            healthy = await self._healthy(record, check)
            if not record.running or record.handle is not handle:
                return  # it ended, or was started again, meanwhile: the check was of what is gone
            if healthy:
                failed, record.health = 0, "healthy"
                continue
            failed += 1
            if failed < check.failures:
                continue
            record.health = "unhealthy"
            options = record.options
            if options is not None and options.restart is not None and record.running:
                logger.info("%s failed %d health checks; ending it to start it again", record.pid, failed)
                record.ending("unhealthy")
                try:
                    await handle.signal(signal.SIGTERM)
                    await handle.signal(signal.SIGCONT)  # a stopped (hung) one acts on it only once resumed
                    if not await record.wait(SHUTDOWN_GRACE_S):
                        await handle.signal(signal.SIGKILL)
                except ProcessMcpError as exc:
                    logger.warning("could not end unhealthy %s: %s", record.pid, exc)
                return

    async def _healthy(self, record: ManagedProcess, check: HealthCheck) -> bool:
        handle = record.handle
        if handle is None:
            return False
        if check.by_port:
            seen = await _probe_check(handle, check, min(PROBE_TIMEOUT_S, check.interval_ms / 1000))
            return seen is not None and seen[0]
        assert check.command is not None
        assert record.spec is not None
        # Run in the box as a process is, but kept out of ps: its own record, dropped when it is done.
        pid = self._registry.new_id()
        checker = ManagedProcess(
            pid, check.command, record.cwd, tty=False, buffer_bytes=4096, cols=TERMINAL_COLS, rows=TERMINAL_ROWS
        )
        spec = LaunchSpec(pid, exec_form(check.command), record.spec.cwd, record.spec.env, False, None)
        try:
            with anyio.CancelScope(shield=True):
                launched = checker.handle = await self.backend.launch(spec, checker)
        except ProcessMcpError:
            return False
        try:
            if not await checker.wait(check.interval_ms / 1000, output=True):
                await launched.signal(signal.SIGKILL)
                await checker.wait(KILL_SETTLE_S, output=True)
                return False
            return checker.exit_code == 0
        finally:
            self.backend.finished(checker)
            launched.close()

    async def _spawn_result(
        self,
        record: ManagedProcess,
        wait_result: WaitResult | None,
        probe: InputProbe | None,
        *,
        existing: bool | None = None,
        ready: bool | None = None,
        ready_detail: str | None = None,
    ) -> SpawnResult:
        await _refresh_stopped([record])
        return SpawnResult(
            pid=record.pid,
            sandboxed=record.sandboxed,
            via=record.via,
            wait_result=wait_result,
            secret=_secret(wait_result, probe),
            existing=existing,
            ready=ready,
            ready_detail=ready_detail,
            **record.labels(),
            **_cursors(record),
            **record.state(),
            stdout=await self._screen_or_tail(record),
            stderr=head_and_tail(
                record.stderr,
                OUTPUT_TRUNCATE,
                complete=not record.lingering,
                clean=clean,
                since="stdout stderrSince",
                kept_in=_output_file(record, 2),
            ),
        )

    async def stdin(
        self,
        pid: str,
        input: str,
        *,
        wait_for: str | None = None,
        idle_ms: int | None = None,
        wait_ms: int | None = None,
        progress: Progress | None = None,
        eof: bool = False,
        literal: bool = False,
    ) -> StdinResult:
        """Send ``input`` (escapes decoded, see ``escapes``, unless ``literal``) to the process's terminal
        or stdin; with ``eof``, end its input after it (a pipe is closed; a terminal gets its end-of-file
        character).

        With a wait (``wait_for``, ``idle_ms``, or ``wait_ms`` alone for any output), wait after
        writing and return the output produced since the input was written. Raises ProcessNotFound,
        ProcessTerminated, InvalidInput for a bad escape or wait, StdinFailed.
        """
        record = self._registry.get(pid)
        if len(input) > MAX_INPUT_CHARS:
            raise InvalidInput(
                f"input is {len(input)} characters, more than the {MAX_INPUT_CHARS} one stdin call may send; "
                "send it in several calls"
            )
        data = input.encode() if literal else decode_input(input)
        wait = self._requested_wait(wait_for, idle_ms, wait_ms)
        self._require_running(record, "take input")
        start = (record.stdout.total, record.stderr.total)
        handle = await self._handle(record)
        record.typed_at = time.monotonic()
        if data:
            await handle.write(data)
        if eof:
            await handle.end_input()
        if wait is None:
            await _refresh_stopped([record])
            return StdinResult(pid=record.pid, bytes_sent=len(data), **_cursors(record), **record.state())
        probe = self._input_probe(record)
        wait_result = await wait_on(record, wait, start, progress, limiter=self._search_limiter(), probe=probe)
        await _refresh_stopped([record])
        complete = not record.lingering
        stdout, _ = text_since(record.stdout, start[0], record.tty, complete=complete)
        stderr, _ = text_since(record.stderr, start[1], False, complete=complete)
        return StdinResult(
            pid=record.pid,
            bytes_sent=len(data),
            stdout=stdout,
            stderr=stderr,
            wait_result=wait_result,
            secret=_secret(wait_result, probe),
            **_cursors(record),
            **record.state(),
        )

    async def wants_input(self, pid: str) -> InputWanted | None:
        """Whether process ``pid`` waits for input now ("secret" at a prompt without echo), where its
        backend can tell. Raises ProcessNotFound."""
        record = self._registry.get(pid)
        if record.handle is None or not record.running:
            return None
        return await record.handle.wants_input()

    def live_count(self) -> int:
        """How many of its processes run now."""
        return sum(1 for record in self._registry if record.running)

    async def get_process(self, pid: str, *, link: PortLink | None = None) -> ProcessInfo:
        """What ps says about one process (``link`` as for ``list_processes``). Raises ProcessNotFound."""
        record = self._registry.get(pid)
        await _refresh_stats([record], 0.0)
        await _refresh_stopped([record])
        ports = await self._ports([record], link)
        return record.info().model_copy(update={"ports": ports.get(record.pid)})

    async def list_processes(
        self, *, stats: bool = False, group: str | None = None, link: PortLink | None = None
    ) -> list[ProcessInfo]:
        """Every running process and the most recently finished ones, oldest first (with ``group``, those of
        that group); with ``stats``, each with the resources of its tree (sampled now where the last sample
        is older than STATS_MAX_AGE_S). ``link`` gives the URL of a process's port where the server is not
        local (over HTTP, the server's proxy)."""
        records = [record for record in self._registry if group is None or record.group == group]
        await _refresh_stopped(records)
        ports = await self._ports(records, link)
        if stats:
            await _refresh_stats(records, STATS_MAX_AGE_S)
        return [record.info(stats=stats).model_copy(update={"ports": ports.get(record.pid)}) for record in records]

    async def open_port(self, pid: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """A connection to ``port`` where process ``pid`` runs, made only while its tree listens there;
        None when it does not (or has ended, or its box cannot be reached from here). Raises
        ProcessNotFound, and OSError when the connection cannot be made."""
        record = self._registry.get(pid)
        handle = record.handle
        if not record.running or handle is None or port not in (await handle.ports() or ()):
            return None
        return await handle.connect_port(port)

    async def _ports(self, records: list[ManagedProcess], link: PortLink | None) -> dict[str, list[PortInfo]]:
        """The ports the running ``records``' trees listen on, asked where they run (one question a box),
        each with a URL that reaches it: from this machine for a local (stdio) server, else ``link``'s."""
        found: dict[str, list[PortInfo]] = {}
        local = self.config.service.transport == "stdio"

        async def url(record: ManagedProcess, handle: ProcessHandle, port: int) -> str | None:
            if local:
                return await handle.port_url(port)
            return None if link is None else link(record.pid, port)

        async def one(record: ManagedProcess, handle: ProcessHandle) -> None:
            ports = await handle.ports()
            if ports:
                found[record.pid] = [PortInfo(port=port, url=await url(record, handle, port)) for port in ports]
            for listed in found.get(record.pid, ()):
                where = None if listed.url is None else listed.url.partition("?")[0]  # not its credential
                if where is not None and record.reached.get(listed.port) != where:
                    record.reached[listed.port] = where
                    if self.on_reach is not None:
                        self.on_reach(record, listed.port, where)

        async with anyio.create_task_group() as tasks:
            for record in records:
                if record.running and record.handle is not None:
                    tasks.start_soon(one, record, record.handle)
        return found

    async def get_output(
        self,
        pid: str,
        lines: int = DEFAULT_LINES,
        *,
        since: int | None = None,
        stderr_since: int | None = None,
        raw: bool = False,
        wait_for: str | None = None,
        idle_ms: int | None = None,
        wait_ms: int | None = None,
        until_exit: bool = False,
        progress: Progress | None = None,
        max_bytes: int | None = None,
        history: bool = False,
    ) -> ProcessOutput:
        """The last ``lines`` lines of stdout and stderr (TTY: scrollback and screen; with ``raw``, the
        stream as text), or with ``since``/``stderr_since`` what followed those cursors; with
        ``max_bytes`` too, one page of at most that many bytes from the start of the cursor's line to a
        line boundary, the reply's cursor being where it stopped. A pipe's output is cleaned
        (``terminal.clean``) unless ``raw``.

        Waits first when asked: until output produced after the call matches ``wait_for``, goes
        quiet for ``idle_ms``, the process exits (``until_exit``), or, with ``wait_ms`` alone, any
        output arrives; ``wait_ms`` bounds it. Raises ProcessNotFound, InvalidInput.
        """
        if lines < 1:
            raise InvalidInput(f"lines must be at least 1, got {lines}")
        record = self._registry.get(pid)
        wait = self._requested_wait(wait_for, idle_ms, wait_ms, until_exit=until_exit)
        wait_result = None
        probe = self._input_probe(record)
        if wait is not None:
            start = (record.stdout.total, record.stderr.total)
            wait_result = await wait_on(record, wait, start, progress, limiter=self._search_limiter(), probe=probe)
        complete = not record.lingering
        dropped = 0
        cursors = _cursors(record)
        cleaned = not raw
        if max_bytes is not None and since is None and stderr_since is None:
            raise InvalidInput("maxBytes pages from a cursor: pass since (0 for the start) with it")
        if since is not None and max_bytes is not None:
            kept = await _kept(record, 1, since, max_bytes)
            stdout, cursors["cursor"], dropped = page_since(
                record.stdout, since, max_bytes, record.tty, complete=complete, cleaned=cleaned, kept=kept
            )
        elif since is not None:
            stdout, dropped = text_since(record.stdout, since, record.tty, complete=complete, cleaned=cleaned)
        elif record.terminal is not None and not raw:
            stdout = "\n".join((await record.terminal.lines(scrollback=True))[-lines:])
        elif record.tty:
            stdout = "\n".join(strip_escapes(tail_lines(record.stdout, lines, complete=complete)).splitlines()[-lines:])
        else:
            stdout = tail_lines(record.stdout, lines, complete=complete)
            stdout = clean(stdout) if cleaned else stdout
        if stderr_since is not None and max_bytes is not None:
            kept = await _kept(record, 2, stderr_since, max_bytes)
            stderr, cursors["stderr_cursor"], lost = page_since(
                record.stderr, stderr_since, max_bytes, False, complete=complete, cleaned=cleaned, kept=kept
            )
            dropped += lost
        elif stderr_since is not None:
            stderr, lost = text_since(record.stderr, stderr_since, False, complete=complete, cleaned=cleaned)
            dropped += lost
        else:
            stderr = tail_lines(record.stderr, lines, complete=complete)
            stderr = clean(stderr) if cleaned else stderr
        await _refresh_stats([record], 0.0)
        await _refresh_stopped([record])
        return ProcessOutput(
            pid=record.pid,
            stdout=stdout,
            stderr=stderr,
            dropped=dropped,
            stats=record.stats,
            **record.labels(),
            history=list(record.history) if history else None,
            wait_result=wait_result,
            secret=_secret(wait_result, probe),
            **cursors,
            **record.state(),
        )

    async def kill(self, pid: str, signal: str = "SIGTERM", *, grace_ms: int | None = None) -> KillResult:
        """Send ``signal`` to the process and its whole process group, then wait briefly for an exit; with
        ``grace_ms``, wait that long for the process and its output to end, then SIGKILL what is left.

        Raises ProcessNotFound, InvalidSignal, InvalidInput, ProcessTerminated, KillFailed.
        """
        signum = self._kill_signal(signal, grace_ms)
        record = self._registry.get(pid)
        if record.restart_pending and signum not in NON_TERMINATING:
            return self._cancel_restart(record, signum)
        if not record.running and record.lingering and record.handle is not None and record.restarts is not None:
            # A service whose process ended while what it started holds its output: that ends, and it is
            # not started again.
            return await self._kill(record, signum, grace_ms)
        self._require_running(record, "receive signals")
        return await self._kill(record, signum, grace_ms)

    def _cancel_restart(self, record: ManagedProcess, signum: Signals) -> KillResult:
        """A kill of a service waiting to be started again: it is not, and stays as it ended."""
        record.restart_pending = False
        self._drop_oldest()
        return KillResult(pid=record.pid, sent=signum.name, **record.state())

    async def kill_group(self, group: str, signal: str = "SIGTERM", *, grace_ms: int | None = None) -> KillResult:
        """``kill`` every running process of ``group``, all at once. Raises ProcessNotFound (no process of
        the group runs), InvalidSignal, InvalidInput, KillFailed."""
        signum = self._kill_signal(signal, grace_ms)
        waiting = [
            r for r in self._registry if r.group == group and r.restart_pending and signum not in NON_TERMINATING
        ]
        members = [record for record in self._registry if record.group == group and record.running]
        cancelled = [self._cancel_restart(record, signum) for record in waiting]
        if not members and cancelled:
            return KillResult(group=group, sent=signum.name, status="terminated", members=cancelled)
        if not members:
            known = any(record.group == group for record in self._registry)
            raise ProcessNotFound(
                f"no process of group {excerpt(group)} runs{' any more' if known else ''}; call ps to list the "
                "processes and their groups"
            )
        results: list[KillResult] = [KillResult(sent=signum.name, status="running")] * len(members)

        async def one(i: int, record: ManagedProcess) -> None:
            try:
                results[i] = await self._kill(record, signum, grace_ms)
            except ProcessMcpError as exc:  # one member's failure is its own: the others are signalled
                logger.warning("could not signal %s of group %s: %s", record.pid, group, exc)
                results[i] = KillResult(pid=record.pid, sent=signum.name, **record.state())

        async with anyio.create_task_group() as tasks:
            for i, record in enumerate(members):
                tasks.start_soon(one, i, record)
        results += cancelled
        running = any(result.status == "running" for result in results)
        forced = None if grace_ms is None else any(bool(result.forced) for result in results)
        return KillResult(
            group=group,
            sent=signum.name,
            status="running" if running else "terminated",
            forced=forced,
            members=results,
        )

    def _kill_signal(self, signal: str, grace_ms: int | None) -> Signals:
        signum = parse_signal(signal)
        if grace_ms is not None:
            if signum in NON_TERMINATING:
                raise InvalidInput(
                    f"graceMs follows a signal that ends a process with SIGKILL; {signum.name} does not end one "
                    "(leave graceMs out, or send SIGTERM)"
                )
            if not 0 <= grace_ms <= self.config.defaults.max_timeout_ms:
                raise InvalidInput(
                    f"graceMs must be 0 to {self.config.defaults.max_timeout_ms} (MAX_TIMEOUT_MS), got {grace_ms}"
                )
        return signum

    async def _kill(self, record: ManagedProcess, signum: Signals, grace_ms: int | None) -> KillResult:
        if signum not in NON_TERMINATING:
            record.ending("kill")
        if signum in STOPPING or grace_ms is not None:
            record.kill_requested = True  # a service stopped by the user is not started again
        handle = await self._handle(record)
        await handle.signal(signum)
        forced = None
        if grace_ms is not None:
            # Its tree holds its output until it has ended; what outlives the grace is killed.
            forced = not await record.wait(grace_ms / 1000, output=True)
            if forced:
                await handle.signal(SIGKILL)
                await record.wait(KILL_SETTLE_S, output=True)
        elif signum not in NON_TERMINATING:
            await record.wait(KILL_SETTLE_S)
        elif signum in (SIGSTOP, SIGCONT):  # `signal` is the parameter here
            await _settle_stopped(record, signum == SIGSTOP)
        else:
            await _refresh_stopped([record])
        return KillResult(pid=record.pid, sent=signum.name, forced=forced, **record.state())

    async def cleanup(self) -> None:
        """End every process this executor started (SIGTERM, a grace period, then SIGKILL) and release
        the backend. Safe to call more than once."""
        self._closing = True  # no service is started again from here on
        for record in self._registry:
            record.restart_pending = False
            record.kill_requested = True
        lingering = [r for r in self._registry if r.lingering and r.handle is not None]
        for record in lingering:
            record.ending("shutdown")
        await self._signal_all(lingering, signal.SIGTERM)
        # A stopped process acts on SIGTERM only once it is resumed.
        await self._signal_all(lingering, signal.SIGCONT)
        await _wait_all(lingering, SHUTDOWN_GRACE_S)
        survivors = [r for r in lingering if r.lingering]
        await self._signal_all(survivors, signal.SIGKILL)
        await _wait_all(survivors, SHUTDOWN_KILL_WAIT_S)
        for record in self._registry:
            if record.handle is not None:
                record.handle.close()
        await self.backend.close()

    # What the executor does for every backend.

    def _finished(self, record: ManagedProcess) -> None:
        """A process has exited and its output is closed: the backend releases what it held, it is started
        again if its restart policy says so, then the oldest finished records are forgotten."""
        self.backend.finished(record)
        timer = self._lifetimes.pop(record.pid, None)
        if timer is not None:
            timer.cancel()
        if self.on_end is not None:
            self.on_end(record)
        policy = record.options.restart if record.options is not None else None
        if policy is not None and not self._closing and _restarts(record, policy):
            record.restart_pending = True
            self._in_background(self._restart(record, policy))
        self._drop_oldest()

    async def _restart(self, record: ManagedProcess, policy: RestartPolicy) -> None:
        """Start ``record``'s command again in it, after the policy's backoff (doubled at each restart)."""
        delay_ms = min(policy.backoff_ms * 2 ** (record.restarts or 0), BACKOFF_CAP_MS)
        await anyio.sleep(delay_ms / 1000)
        if not record.restart_pending or self._closing or record.spec is None or record.options is None:
            return  # killed meanwhile, or the server is stopping
        limit = self.config.limits.max_live
        if sum(1 for other in self._registry if other.running) + self._starting >= limit:
            record.restart_pending = False
            record.stdout.append(
                f"\n[process-mcp: not started again: {limit} processes run (PROCESS_MAX_LIVE)]\n".encode()
            )
            logger.info("%s not started again: %d processes run (PROCESS_MAX_LIVE)", record.pid, limit)
            self._drop_oldest()
            return
        how = f"signal {record.signal}" if record.signal else f"exit code {record.exit_code}"
        if record.ended_by not in (None, "exit"):
            how += f", ended by {record.ended_by}"
        old = record.handle
        if old is not None:
            old.hand_over()
        relaunched = record.relaunched = anyio.Event()
        number = (record.restarts or 0) + 1
        newline = "\r\n" if record.tty else "\n"
        record.rearm(
            f"{newline}[process-mcp: restart {number} of at most {policy.max_restarts}, {delay_ms} ms after "
            f"{how}]{newline}"
        )
        logger.info("%s ended (%s); starting it again (%d of %d)", record.pid, how, number, policy.max_restarts)
        try:
            with anyio.CancelScope(shield=True):
                record.handle = await self.backend.launch(record.spec, record)
        except ProcessMcpError as exc:
            logger.warning("could not start %s again: %s", record.pid, exc)
            record.stdout.append(f"[process-mcp: it could not be started again: {exc}]{newline}".encode())
            record.close_streams()  # the failed start opened them; nothing will close them
            record.finish(None, cause="lost")
            return
        finally:
            relaunched.set()
        if self._closing:  # the server began to stop while it started: it ends with the rest
            record.ending("shutdown")
            await record.handle.signal(signal.SIGKILL)
            return
        record.on_output_limit = self._end_for_output
        self._watch(record, record.options)

    def _check_limits(self, limits: ProcessLimits | None) -> None:
        """Refuse limits above the configured maxima, or limits this backend cannot apply."""
        if limits is None:
            return
        maxima = {
            "memoryMb": (limits.memory_mb, self.config.sandbox.max_memory_mb, "SANDBOX_MAX_MEMORY_MB"),
            "cpuSeconds": (limits.cpu_seconds, self.config.limits.max_cpu_seconds, "PROCESS_MAX_CPU_SECONDS"),
            "processes": (limits.processes, self.config.sandbox.max_processes, "SANDBOX_MAX_PROCESSES"),
            "outputMb": (limits.output_mb, self.config.limits.max_output_mb, "PROCESS_MAX_OUTPUT_MB"),
        }
        for name, (asked, most, setting) in maxima.items():
            if asked is not None and asked > most:
                raise InvalidInput(f"limits.{name} {asked} is above the maximum {most} ({setting}); ask for less")

    def _end_for_output(self, record: ManagedProcess) -> None:
        """The process passed its output limit: SIGKILL to its group, from a task (output arrives in a callback)."""
        handle = record.handle
        if handle is None:
            return

        async def end() -> None:
            logger.info("%s passed its output limit; ending it", record.pid)
            try:
                await handle.signal(signal.SIGKILL)
            except ProcessMcpError as exc:
                logger.warning("could not end %s at its output limit: %s", record.pid, exc)

        self._in_background(end())

    async def _watch_limits(self, record: ManagedProcess, limits: ProcessLimits) -> None:
        """Measure the tree of a running process every LIMIT_CHECK_S and SIGKILL its group once it is
        over its memory or at its processes limit, so the result names the limit (the kernel's own
        bounds only make an allocation or a fork fail, which a process may ignore or retry forever)."""
        handle = record.handle
        while record.running and record.handle is handle:
            await anyio.sleep(LIMIT_CHECK_S)
            await _refresh_stats([record], 0.0)
            reached = self._limit_reached(record, limits)
            if reached is not None and record.running and record.handle is not None:
                record.hit(reached)
                logger.info("%s reached its %s limit; ending it", record.pid, reached)
                try:
                    await record.handle.signal(signal.SIGKILL)
                except ProcessMcpError as exc:
                    logger.warning("could not end %s at its %s limit: %s", record.pid, reached, exc)
                return

    @staticmethod
    async def _sample_service(record: ManagedProcess) -> None:
        """Sample a named process's tree every SERVICE_SAMPLE_S while it runs, for its history."""
        handle = record.handle
        while record.running and record.handle is handle:  # this run's: a restart starts its own
            await _refresh_stats([record], SERVICE_SAMPLE_S / 2)
            await anyio.sleep(SERVICE_SAMPLE_S)

    def _limit_reached(self, record: ManagedProcess, limits: ProcessLimits) -> LimitName | None:
        """The limit the box's kernel says the process hit, else the one its tree is over (memory) or at
        (processes) in its latest sample."""
        reached = self.backend.limit_reached(record, limits)
        if reached is not None:
            return reached
        stats = record.stats
        if stats is None:
            return None
        if limits.memory_mb is not None and stats.rss_bytes > limits.memory_mb * 1024 * 1024:
            return "memory"
        if limits.processes is not None and stats.threads >= limits.processes:
            return "processes"
        return None

    def _limit_lifetime(self, record: ManagedProcess, seconds: float) -> None:
        def expire() -> None:
            self._lifetimes.pop(record.pid, None)
            self._in_background(self._end_at_lifetime(record, seconds))

        self._lifetimes[record.pid] = asyncio.get_running_loop().call_later(seconds, expire)

    def _in_background(self, ending: Coroutine[Any, Any, None]) -> None:
        """Run ``ending`` (a signal to a process) as a task of its own, held until it is done."""
        task = asyncio.get_running_loop().create_task(ending)
        self._expiring.add(task)
        task.add_done_callback(self._expiring.discard)

    async def _end_at_lifetime(self, record: ManagedProcess, seconds: float) -> None:
        """SIGTERM, a grace period, then SIGKILL, to a process (and its group) still running at its lifetime."""
        if not record.running or record.handle is None:
            return
        record.ending("lifetime")
        logger.info("%s ran for its maximum lifetime (%g s); ending it", record.pid, seconds)
        try:
            await record.handle.signal(signal.SIGTERM)
            await record.handle.signal(signal.SIGCONT)
            if not await record.wait(SHUTDOWN_GRACE_S):
                await record.handle.signal(signal.SIGKILL)
        except ProcessMcpError as exc:
            logger.warning("could not end %s at its lifetime: %s", record.pid, exc)

    def _drop_oldest(self) -> None:
        for dropped in self._registry.prune():
            if dropped.handle is not None:
                dropped.handle.close()

    # Shared helpers.

    def _check_spawn(self, options: SpawnOptions) -> tuple[str, str, dict[str, str], float]:
        command = options.command
        if not command.strip():
            raise InvalidInput("command is empty; pass a shell command line such as 'ls -la'")
        _no_nul("command", command)
        _at_most(
            "command", command, MAX_COMMAND_BYTES, "the kernel's limit on one argument; put a long script in a file"
        )
        cwd = self.workdir
        if options.cwd is not None:
            _no_nul("cwd", options.cwd)
            if not options.cwd.strip():
                raise InvalidInput("cwd is empty; pass a directory path or omit cwd to use the default")
            _at_most("cwd", options.cwd, MAX_PATH_BYTES, "the kernel's limit on a path")
            cwd = posixpath.normpath(posixpath.join(cwd, options.cwd))
        env = dict(options.env or {})
        if len(env) > MAX_ENV_VARS:
            raise InvalidInput(f"env sets {len(env)} variables, more than the {MAX_ENV_VARS} a spawn may set")
        _at_most("env", "".join(env) + "".join(env.values()), MAX_ENV_BYTES, "names and values together")
        for name, value in env.items():
            if not _ENV_NAME.match(name):
                raise InvalidInput(
                    f"environment variable name {excerpt(name)} is invalid; use letters, digits and '_', "
                    "not starting with a digit"
                )
            _no_nul(f"the value of {name}", value)
        timeout_ms = self.config.defaults.timeout_ms if options.timeout_ms is None else options.timeout_ms
        if timeout_ms < 0:
            raise InvalidInput(f"timeoutMs must be 0 or more, got {timeout_ms}")
        return command, cwd, env, min(timeout_ms, self.config.defaults.max_timeout_ms) / 1000

    def _check_live_limit(self) -> None:
        limit = self.config.limits.max_live
        live = sum(1 for record in self._registry if record.running or record.restart_pending) + self._starting
        if live >= limit:
            raise TooManyProcesses(
                f"{live} processes are running, the limit (PROCESS_MAX_LIVE) is {limit}; kill some "
                "(ps lists them) or wait for them to exit, then spawn again"
            )

    def _requested_wait(
        self,
        wait_for: str | None,
        idle_ms: int | None,
        wait_ms: int | None = None,
        *,
        until_exit: bool = False,
        timeout_s: float | None = None,
    ) -> Wait | None:
        """The wait a call asks for, or None for none; raise InvalidInput for a malformed one.

        It is bounded by ``timeout_s`` if given, else by ``wait_ms`` (the default spawn timeout if not
        given), capped by the maximum. ``wait_ms`` alone waits for any new output.
        """
        pattern = Wait.compile(wait_for)
        idle_s = None
        if idle_ms is not None:
            if idle_ms <= 0:
                raise InvalidInput(f"idleMs must be more than 0, got {idle_ms}")
            idle_s = idle_ms / 1000
        if timeout_s is None:
            defaults = self.config.defaults
            bound = defaults.timeout_ms if wait_ms is None else wait_ms
            if bound < 0:
                raise InvalidInput(f"waitMs must be 0 or more, got {bound}")
            timeout_s = min(bound, defaults.max_timeout_ms) / 1000
        if pattern is None and idle_s is None and wait_ms is None and not until_exit:
            return None
        return Wait(timeout_s, pattern, idle_s, any_output=pattern is None and idle_s is None and not until_exit)

    def _file_room(self, options: SpawnOptions) -> int:
        """Bytes each of the process's output files may hold: PROCESS_OUTPUT_FILE_MB, or its outputMb when
        that is less (it ends there)."""
        mb = self.config.limits.output_file_mb
        if options.limits is not None and options.limits.output_mb is not None:
            mb = min(mb, options.limits.output_mb)
        return mb * 1024 * 1024

    def _search_limiter(self) -> anyio.CapacityLimiter:
        """Bounds the pattern searches this executor's waits run at once (see ``waiting``)."""
        if self._searches is None:
            self._searches = anyio.CapacityLimiter(MATCH_THREADS)
        return self._searches

    async def _screen_or_tail(self, record: ManagedProcess) -> str:
        if record.terminal is not None:
            screen = "\n".join(await record.terminal.lines())
            return screen[-OUTPUT_TRUNCATE:]
        return head_and_tail(
            record.stdout, OUTPUT_TRUNCATE, complete=not record.lingering, clean=clean, kept_in=_output_file(record, 1)
        )

    @staticmethod
    def _require_running(record: ManagedProcess, action: str) -> None:
        if not record.running:
            how = f"signal {record.signal}" if record.signal else f"exit code {record.exit_code}"
            raise ProcessTerminated(
                f"process {record.pid} has already exited ({how}) and cannot {action}; "
                "call stdout to read its output or spawn it again"
            )

    @staticmethod
    def _input_probe(record: ManagedProcess) -> InputProbe | None:
        """What asks whether ``record``'s process waits for input, while it runs."""
        if record.handle is None or not record.running:
            return None
        return InputProbe(record.handle.wants_input, record.typed_at)

    @staticmethod
    async def _handle(record: ManagedProcess) -> ProcessHandle:
        """The handle of a running process, once it has one: set before the record is registered, and while
        a service is started again in its record, once that start is done."""
        relaunched = record.relaunched
        if record.handle is None and relaunched is not None:
            await relaunched.wait()  # the launch is bounded by the backend
        if record.handle is None or not record.running:
            raise ProcessTerminated(f"process {record.pid} could not be started again; call stdout to see why")
        return record.handle

    @staticmethod
    async def _signal_all(records: list[ManagedProcess], signum: int) -> None:
        for record in records:
            try:
                if record.handle is not None:
                    await record.handle.signal(signum)
            except ProcessMcpError as exc:
                logger.warning("cleanup could not signal %s: %s", record.pid, exc)


async def _refresh_stats(records: list[ManagedProcess], max_age_s: float) -> None:
    """Sample the trees of running processes whose sample is older than ``max_age_s``: those this
    machine's /proc shows in one worker thread, the others by asking where they run, all at once. A
    finished process keeps its last sample (``ManagedProcess.finish`` sets its final wall time)."""
    now = time.monotonic()
    due = [
        (record, record.handle)
        for record in records
        if record.handle is not None and record.running and now - record.stats_at >= max_age_s
    ]
    if not due:
        return
    read = await anyio.to_thread.run_sync(lambda: [handle.read_sample() for _, handle in due])
    asked: list[TreeSample | None] = [None] * len(due)

    async def ask(i: int, handle: ProcessHandle) -> None:
        asked[i] = await handle.sample()

    async with anyio.create_task_group() as tasks:
        for i, ((_, handle), here) in enumerate(zip(due, read, strict=True)):
            if here is None:
                tasks.start_soon(ask, i, handle)
    taken = time.monotonic()
    pairs = [
        (record, here if here is not None else there) for (record, _), here, there in zip(due, read, asked, strict=True)
    ]
    for record, sample in pairs:
        if sample is None:
            continue
        previous_cpu = record.stats.cpu_seconds if record.stats is not None else 0.0
        elapsed = taken - (record.stats_at or record.started)
        busy = max(0.0, sample.cpu_seconds - previous_cpu)
        record.stats = ProcessStats(
            processes=sample.processes,
            threads=sample.threads,
            cpu_seconds=round(sample.cpu_seconds, 2),
            cpu_percent=round(100 * busy / elapsed, 1) if elapsed > 0 else 0.0,
            rss_bytes=sample.rss_bytes,
            read_bytes=sample.read_bytes,
            written_bytes=sample.written_bytes,
            wall_seconds=round((record.ended_at or taken) - record.started, 3),
        )
        record.stats_at = taken
        record.peak_rss = max(sample.rss_bytes, record.peak_rss or 0)
        record.history.append(StatsSample(**record.stats.model_dump(), at=_utc_now()))


async def _probe_check(
    handle: ProcessHandle, check: ReadyCheck | HealthCheck, timeout_s: float, deadline: float | None = None
) -> tuple[bool, str] | None:
    """Whether ``check``'s port answers where the process runs (without a port, a path is asked of each port
    its tree listens on, and none yet is a no): (yes or no, what was seen); None where ports cannot be
    checked. Each probe takes at most ``timeout_s``, and ends by ``deadline`` (monotonic) if given."""
    ports = [check.port] if check.port is not None else await handle.ports()
    if ports is None:
        return None
    detail = "it listens on no port yet"
    for port in ports:
        left = timeout_s if deadline is None else min(timeout_s, max(0.01, deadline - time.monotonic()))
        seen = await handle.probe(port, check.http, left)
        if seen is None:
            return None
        ok, detail = seen[0], f"port {port}: {seen[1]}"
        if ok:
            return True, detail
    return False, detail


def _restarts(record: ManagedProcess, policy: RestartPolicy) -> bool:
    """Whether ``record``'s process, which has just ended, is to be started again under ``policy``."""
    if record.kill_requested or record.ended_by == "shutdown" or (record.restarts or 0) >= policy.max_restarts:
        return False
    if policy.policy == "always":
        return True
    return record.ended_by != "exit" or record.signal is not None or record.exit_code != 0


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def _refresh_stopped(records: list[ManagedProcess]) -> None:
    """Note which running processes are stopped: those this machine's /proc shows read in one worker
    thread, the others asked where they run, all at once."""
    running = [(record, record.handle) for record in records if record.running and record.handle is not None]
    if not running:
        return
    read: list[bool | None] = [None] * len(running)
    if any(handle.tree_root() is not None for _, handle in running):  # else no trip to a thread for nothing
        read = await anyio.to_thread.run_sync(lambda: [handle.read_stopped() for _, handle in running])
    asked: list[bool | None] = [None] * len(running)
    remote = [(i, handle) for i, ((_, handle), here) in enumerate(zip(running, read, strict=True)) if here is None]

    async def ask(i: int, handle: ProcessHandle) -> None:
        asked[i] = await handle.stopped()

    for i, handle in remote:  # one after another: where they run, one answer serves them all (a box's agent)
        await ask(i, handle)
    for (record, _), here, there in zip(running, read, asked, strict=True):
        found = here if here is not None else there
        if found is not None:
            record.set_stopped(found)


async def _settle_stopped(record: ManagedProcess, stopped: bool) -> None:
    """After SIGSTOP (``stopped``) or SIGCONT, wait up to KILL_SETTLE_S for the process to have stopped
    or gone on (the kernel acts on the signal when the process next runs), so the reply says so."""
    with anyio.move_on_after(KILL_SETTLE_S):
        while True:
            changed = record.changed()
            await _refresh_stopped([record])
            if record.stopped == stopped or not record.running:
                return
            with anyio.move_on_after(STOP_POLL_S):
                await changed.wait()


async def _kept(record: ManagedProcess, stream: int, cursor: int, max_bytes: int) -> bytes | None:
    """For a page from ``cursor`` that the buffer of ``stream`` has dropped: the stream's bytes from
    ``page_look(cursor)``, read back from its output file, when the file holds the cursor; else None."""
    buffer = record.stdout if stream == 1 else record.stderr
    cursor = min(max(cursor, 0), buffer.total)
    look = page_look(cursor)
    if look >= buffer.dropped or record.handle is None:
        return None
    asked = cursor - look + max_bytes
    data = await record.handle.read_file(stream, look, asked)
    if data is not None and len(data) < asked:  # where the file ends: a line cut there goes on in the buffer
        data = data[: data.rfind(b"\n") + 1]
    return data if data is not None and len(data) > cursor - look else None


def _cursors(record: ManagedProcess) -> dict[str, Any]:
    """Where each stream stands, and where it is kept whole."""
    return {
        "cursor": record.stdout.total,
        "stderr_cursor": record.stderr.total,
        "output_file": _output_file(record, 1),
        "stderr_file": _output_file(record, 2),
    }


def _output_file(record: ManagedProcess, stream: int) -> str | None:
    """Where in the box ``stream`` of ``record``'s process is kept whole (its handle's output file)."""
    return record.handle.output_file(stream) if record.handle is not None else None


async def _wait_all(records: list[ManagedProcess], timeout_s: float) -> None:
    with anyio.move_on_after(timeout_s):
        for record in records:
            await record.wait(timeout_s, output=True)


def _at_most(what: str, value: str, limit: int, why: str) -> None:
    size = len(value.encode("utf-8", "surrogateescape"))
    if size > limit:
        raise InvalidInput(f"{what} is {size} bytes, more than the {limit} it may have ({why})")


def _no_nul(what: str, value: str) -> None:
    if "\0" in value:
        raise InvalidInput(f"{what} contains a NUL byte, which no process can receive; remove it")


def _secret(wait_result: WaitResult | None, probe: InputProbe | None) -> bool | None:
    """``secret`` for a reply: True when the wait ended because a terminal reads a line without echo."""
    return True if wait_result == "input" and probe is not None and probe.wanted == "secret" else None
