"""Constants and the typed records that cross the library boundary.

Field names are snake_case in Python and camelCase on the wire (``exit_code`` is ``exitCode``), the
names the original TypeScript server uses, so its clients keep working.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

DEFAULT_TIMEOUT_MS = 10_000
"""How long ``spawn`` waits for a foreground process before replying that it is still running."""
MAX_TIMEOUT_MS = 60_000
"""Upper bound for any wait a caller asks for; larger values are clamped."""
OUTPUT_TRUNCATE = 8196
"""Characters of each stream a ``spawn`` reply keeps (the tail); the original's figure."""
TERMINAL_COLS = 120
TERMINAL_ROWS = 30
TTY_TERM = "xterm-256color"
"""TERM for TTY processes unless the caller sets one; what the rendering terminal understands."""
DEFAULT_LINES = 100
"""Lines the ``stdout`` tool returns when the caller does not say."""

ProcessStatus = Literal["running", "terminated"]
ProcessVia = Literal["host", "agent", "exec"]
"""How a process was started: on the host, through the agent in the container, or as a Docker exec."""
_VIA = "How it was started: 'host', 'agent' (the agent in the container) or 'exec' (one Docker exec each)."
WaitResult = Literal["matched", "output", "idle", "exited", "timeout", "input"]
"""Why a wait ended: the pattern matched, the output went quiet, the process exited, or time ran out."""
SINCE_MAX_BYTES = 64 * 1024
"""Most bytes of each stream a ``since`` read returns (the newest); what it skips is counted."""

# Bounds on what one request may carry; each is also in the tools' input schemas.
MAX_COMMAND_BYTES = 128 * 1024 - 1
"""Longest command line: the kernel's limit on one argument (MAX_ARG_STRLEN, less its NUL); a longer one
could never start."""
MAX_PATH_BYTES = 4095
"""Longest cwd: the kernel's PATH_MAX, less its NUL."""
MAX_ENV_VARS = 1024
"""Most environment variables one spawn may set."""
MAX_ENV_BYTES = 128 * 1024
"""Most bytes of environment (names and values) one spawn may set; they travel as arguments."""
MAX_INPUT_CHARS = 64 * 1024
"""Longest stdin input per call; longer text goes in several calls (a terminal takes 4 KiB at a time anyway)."""
MAX_ID_CHARS = 64
"""Longest process id a call may name (ids are like 'host-12'), or process name."""
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""A process's name or group: a letter or digit, then letters, digits, '.', '_' or '-', at most 64 in all."""
HISTORY_SAMPLES = 120
"""Samples of its stats a process keeps (``stdout {history: true}``)."""


CPU_GRACE_S = 5
"""CPU seconds between a cpuSeconds limit's SIGXCPU and the kernel's SIGKILL (for a process that catches it)."""

EndedBy = Literal["exit", "kill", "shutdown", "lifetime", "limit", "lost", "unhealthy"]
Health = Literal["starting", "healthy", "unhealthy"]
BACKOFF_CAP_MS = 60_000
"""Longest wait between a service's restarts, however many it had."""
LimitName = Literal["output", "cpu", "memory", "processes"]


class _Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, serialize_by_alias=True, frozen=True)


class ProcessLimits(_Wire):
    """Bounds on one process and everything it starts; each at most its configured maximum."""

    memory_mb: int | None = Field(
        None,
        ge=1,
        description="Memory in MiB: one process's allocation beyond fails, and a tree holding more is ended.",
    )
    cpu_seconds: int | None = Field(None, ge=1, description="CPU seconds per process; then SIGXCPU ends it.")
    processes: int | None = Field(
        None, ge=1, description="Processes and threads: forks beyond fail, and a tree that reaches it is ended."
    )
    output_mb: int | None = Field(None, ge=1, description="Output (stdout and stderr) in MiB; then SIGKILL ends it.")


class _PortCheck(_Wire):
    """A check of a port in the box: it accepts connections, or a path on it answers."""

    port: int | None = Field(
        None, ge=1, le=65535, description="A loopback port in the box that must accept connections."
    )
    http: str | None = Field(
        None,
        pattern=r"^/[!-~]*$",
        max_length=2048,
        description="A path (e.g. '/health') that must answer an HTTP GET with 2xx or 3xx: on port, or without "
        "it on any port its tree listens on.",
    )

    @property
    def by_port(self) -> bool:
        """Whether the check is of a port (given, or any its tree listens on)."""
        return self.port is not None or self.http is not None


class ReadyCheck(_PortCheck):
    """When a service counts as ready: its port accepts connections, a path on it answers, or its output
    shows a pattern."""

    pattern: str | None = Field(None, max_length=4096, description="A regular expression its output must show.")

    @model_validator(mode="after")
    def _one_check(self) -> ReadyCheck:
        if self.by_port == (self.pattern is not None):
            raise ValueError(
                "ready takes a port, an http path (on its port, or on any port it listens on) or a pattern, one of them"
            )
        return self


class HealthCheck(_PortCheck):
    """How a running service is checked, and when it counts as unhealthy."""

    command: str | None = Field(
        None, max_length=4096, description="A shell command run in the box (as a process is) that must exit 0."
    )
    interval_ms: int = Field(5000, ge=100, le=3_600_000, description="Time between checks.")
    failures: int = Field(3, ge=1, le=100, description="Consecutive failed checks that make it unhealthy.")

    @model_validator(mode="after")
    def _one_check(self) -> HealthCheck:
        if self.by_port == (self.command is not None):
            raise ValueError(
                "health takes a port, an http path (on its port, or on any port it listens on) or a command, "
                "one of them"
            )
        return self


class RestartPolicy(_Wire):
    """Whether and how a service is started again after it ends, in the same record."""

    policy: Literal["on-failure", "always"] = Field(
        description="on-failure: after a non-zero exit, a signal, a limit, its lifetime or failed health checks; "
        "always: after any end but kill and shutdown."
    )
    max_restarts: int = Field(5, ge=0, le=1000, description="Restarts at most; then it stays terminated.")
    backoff_ms: int = Field(
        1000,
        ge=10,
        le=BACKOFF_CAP_MS,
        description=f"Wait before the first restart, doubled each time (at most {BACKOFF_CAP_MS}).",
    )


class SpawnOptions(_Wire):
    """What to run and how."""

    command: str = Field(description=f"Shell command line, run with /bin/sh -c; at most {MAX_COMMAND_BYTES} bytes.")
    cwd: str | None = Field(
        None, description=f"Working directory; defaults to the configured workdir; at most {MAX_PATH_BYTES} bytes."
    )
    env: dict[str, str] | None = Field(
        None,
        description=f"Variables set over the server's environment; at most {MAX_ENV_VARS}, of {MAX_ENV_BYTES} "
        "bytes in all.",
    )
    tty: bool = Field(False, description="Run in a real pseudo-terminal (120x30).")
    background: bool = Field(False, description="Return at once instead of waiting for exit.")
    timeout_ms: int | None = Field(
        None, description="How long to wait for exit before replying 'running'; clamped to the maximum."
    )
    wait_for: str | None = Field(
        None, description="Regular expression: return as soon as new output matches it (or at exit/timeout)."
    )
    idle_ms: int | None = Field(None, description="Return once the process has printed nothing for this long.")
    limits: ProcessLimits | None = Field(None, description="Bounds on this process, within the configured maxima.")
    name: str | None = Field(
        None,
        pattern=NAME_PATTERN,
        description="A name for the process, unique among the running ones: while one of that name runs, spawn "
        "returns it (existing: true) instead of starting another. Every tool's id accepts the name (the newest "
        "process of that name).",
    )
    group: str | None = Field(
        None, pattern=NAME_PATTERN, description="A label shared by related processes: ps and kill take a group."
    )
    ready: ReadyCheck | None = Field(
        None, description="Wait (within the timeout) until it is ready; the reply says ready: true, or why not."
    )
    health: HealthCheck | None = Field(None, description="Check it while it runs; ps shows health.")
    restart: RestartPolicy | None = Field(None, description="Start it again when it ends (see policy).")


class ExitState(_Wire):
    """Whether a process runs, and how it ended."""

    status: ProcessStatus
    exit_code: int | None = Field(
        None, description="Exit code once terminated; 128+N when signal N ended it (the shell convention)."
    )
    signal: str | None = Field(None, description="Name of the signal that ended the process, if one did.")
    ended_by: EndedBy | None = Field(
        None,
        description="Once terminated, why: exit (on its own), kill (the kill tool), shutdown (the server stopped), "
        "lifetime (it ran past the maximum lifetime), limit (it hit one of its limits: see limit), lost (the agent "
        "running it in its box was lost, and the process was ended with it; spawn again to start anew).",
    )
    limit: LimitName | None = Field(None, description="The limit that ended it: memory, processes, cpu or output.")
    stopped: bool | None = Field(
        None,
        description="True while the process runs but is stopped by a signal (SIGSTOP, or SIGTSTP, SIGTTIN, "
        "SIGTTOU): it does nothing, and prints nothing, until it gets SIGCONT (kill with signal SIGCONT). "
        "Absent otherwise.",
    )


class _Progress(_Wire):
    """Where each output stream stands, and why a wait ended."""

    cursor: int = Field(0, description="Bytes of stdout so far; pass it as `since` to read only what follows.")
    stderr_cursor: int = Field(0, description="Bytes of stderr so far; pass it as `stderrSince`.")
    output_file: str | None = Field(
        None,
        description="A file in the box holding the whole stdout (TTY: the terminal's output) as it was written, "
        "up to its size limit: read it with your own commands (grep, tail, sed -n). Removed with the process's "
        "record. Absent where it is not kept.",
    )
    stderr_file: str | None = Field(None, description="The same for stderr.")
    wait_result: WaitResult | None = Field(
        None,
        description="Why the wait ended: matched (waitFor), output (new output, for waitMs alone), idle, exited, "
        "timeout, or input (it is waiting to read its terminal or stdin: answer with stdin); absent when nothing "
        "was awaited.",
    )
    secret: bool | None = Field(
        None,
        description="True when it waits for input on a terminal that does not echo (a password prompt): ask the "
        "user with stdin askUser rather than typing a secret yourself. Absent otherwise.",
    )


class _Labels(_Wire):
    name: str | None = Field(None, description="Its name, if it was given one.")
    group: str | None = Field(None, description="Its group, if it was given one.")
    restarts: int | None = Field(None, description="With a restart policy: how often it was started again.")
    health: Health | None = Field(
        None, description="With a health check: starting (no check passed yet), healthy or unhealthy."
    )


class SpawnResult(ExitState, _Progress, _Labels):
    """The reply to spawn: the process id, its state, and the tail of its output."""

    pid: str = Field(description="Process id for the other tools, e.g. 'host-1'.")
    existing: bool | None = Field(
        None,
        description="True when a process of this name was already running: this is that process (its state and "
        "output so far), and nothing new was started. Absent otherwise.",
    )
    ready: bool | None = Field(
        None, description="With ready: whether it became ready before the reply; waitResult says why not."
    )
    ready_detail: str | None = Field(None, description="With ready: what the last check saw.")
    stdout: str = Field(description="Tail of stdout; for a TTY process, the rendered screen.")
    stderr: str = Field(description="Tail of stderr; empty for a TTY process (the terminal merges them).")
    sandboxed: bool = Field(
        False,
        description="True when the process runs confined: in the host sandbox (bubblewrap) or in the container.",
    )
    via: ProcessVia = Field("host", description=_VIA)


class ProcessStats(_Wire):
    """What a process and everything it started use, sampled from /proc (at most a second old)."""

    processes: int = Field(description="Processes in its tree.")
    threads: int = Field(description="Threads in its tree.")
    cpu_seconds: float = Field(description="CPU time used so far (user and system) by the processes alive now.")
    cpu_percent: float = Field(description="CPU used since the previous sample (or its start), 100 = one core.")
    rss_bytes: int = Field(description="Resident memory of its tree.")
    read_bytes: int | None = Field(None, description="Bytes read through system calls (files, pipes, sockets).")
    written_bytes: int | None = Field(None, description="Bytes written through system calls.")
    wall_seconds: float = Field(description="Time since it started (until it ended).")


class PortInfo(_Wire):
    """A TCP port a process's tree listens on in its box."""

    port: int = Field(description="The port, in the box.")
    url: str | None = Field(
        None,
        description="Where the client reaches it while the process runs: over stdio the port itself where the box "
        "shares this machine's loopback, else a forward on this machine's loopback; over HTTP the server's proxy "
        "into the box, a URL with a credential that expires (list again for a new one).",
    )


class ProcessInfo(ExitState, _Labels):
    """One row of ps."""

    pid: str
    command: str
    cwd: str
    tty: bool
    created_at: str = Field(description="When the process was started, ISO 8601 in UTC.")
    sandboxed: bool = Field(
        False,
        description="True when the process runs confined: in the host sandbox (bubblewrap) or in the container.",
    )
    via: ProcessVia = Field("host", description=_VIA)
    stats: ProcessStats | None = Field(
        None, description="Resources of the process and its descendants; absent where they cannot be read."
    )
    ports: list[PortInfo] | None = Field(
        None, description="The TCP ports its tree listens on in the box, while it runs (where they can be told)."
    )


class StatsSample(ProcessStats):
    """One sample of what a process's tree used, and when it was taken."""

    at: str = Field(description="When it was taken, ISO 8601 in UTC.")


class ProcessOutput(ExitState, _Progress, _Labels):
    """The reply to stdout: the last lines of each stream, or what followed a cursor."""

    pid: str
    stdout: str = Field(description="Last lines of stdout; for a TTY process, scrollback plus screen.")
    stderr: str = Field(description="Last lines of stderr; empty for a TTY process.")
    dropped: int = Field(
        0, description="With since: bytes after the cursor that are not shown (no longer held, or beyond the limit)."
    )
    stats: ProcessStats | None = Field(
        None, description="Resources of the process and its descendants; absent where they cannot be read."
    )
    history: list[StatsSample] | None = Field(
        None,
        description=f"With history: the samples of its stats taken so far, oldest first (the newest "
        f"{HISTORY_SAMPLES}; a named process is sampled every second while it runs, others when asked).",
    )


class KillResult(ExitState):
    """The reply to kill: which signal went out and the state right after."""

    pid: str | None = Field(None, description="The process signalled; absent for a group.")
    group: str | None = Field(None, description="The group whose running processes were signalled.")
    sent: str = Field(description="The signal delivered to the process group, e.g. 'SIGTERM'.")
    forced: bool | None = Field(
        None,
        description="With graceMs: true when the process (or a group member) outlived the grace and was sent "
        "SIGKILL, false when the signal ended it in time.",
    )
    members: list[KillResult] | None = Field(
        None, description="For a group: each process signalled, with its state right after."
    )


class ProcessList(_Wire):
    """The reply to ps."""

    processes: list[ProcessInfo]
    sandboxed: bool | None = Field(
        None, description="Whether the processes run confined, when they all do alike (the rows then leave it out)."
    )
    via: ProcessVia | None = Field(
        None, description="How the processes were started, when they all were alike (the rows then leave it out)."
    )


class StdinResult(ExitState, _Progress):
    """The reply to stdin: how much was delivered, the process state, and with a wait, the answer."""

    pid: str
    bytes_sent: int = Field(description="Bytes written after decoding escapes.")
    stdout: str | None = Field(None, description="With a wait: the output produced since the input was written.")
    stderr: str | None = Field(None, description="With a wait: stderr produced since the input was written.")
    asked: Literal["answered", "declined", "cancelled"] | None = Field(
        None,
        description="With askUser: the user answered (the answer was typed, and is never shown), or declined or "
        "cancelled (nothing was typed).",
    )
