"""The five MCP tools: thin wrappers that validate, call the executor once, and render the result.

Each tool returns structured content (with an output schema) and a plain-text rendering, which is
what most clients show the model. Every failed call (a library error, arguments that fail the input
schema, an unknown tool) is an ``isError`` result whose text starts with the error code and says what
to do next; the code is also in its ``_meta`` under ERROR_META.
"""

# No `from __future__ import annotations`: the SDK evaluates the tool signatures, whose descriptions
# are built from the configuration at registration time.
import inspect
import logging
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp.server.stdio import stdio_server
from mcp_types import CallToolResult, InputRequiredResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field, ValidationError

from ..core.executor import ProcessExecutor
from ..core.models import (
    DEFAULT_LINES,
    MAX_COMMAND_BYTES,
    MAX_ENV_VARS,
    MAX_ID_CHARS,
    MAX_INPUT_CHARS,
    MAX_PATH_BYTES,
    ExitState,
    KillResult,
    ProcessInfo,
    ProcessLimits,
    ProcessList,
    ProcessOutput,
    ProcessStats,
    SpawnOptions,
    SpawnResult,
    StdinResult,
)
from ..core.registry import unknown_process
from ..core.waiting import MATCH_TIMEOUT_S, MAX_PATTERN_CHARS, Progress
from ..errors import InvalidInput, ProcessMcpError
from ..policy.audit import monotonic_ms
from ..policy.command import MAX_CHECKED_BYTES
from .arguments import check_arguments, close_schema
from .auth import principal_of
from .spaces import Spaces
from .stdio import loop_stdio

MAX_LINES = 10_000
"""Most lines one stdout call returns; more would not fit a model's context anyway."""

_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])

logger = logging.getLogger(__name__)

ERROR_META = "process-mcp/error"
"""Where a failed call's ``_meta`` holds its error, ``{"code": ...}``, for a client that acts on the code."""
TOOL_NAMES = ("spawn", "ps", "stdin", "stdout", "kill")
_CODED = re.compile(r"([a-z_]+): (.*)", re.DOTALL)
"""An error's text: its code, then what to do next."""


class ToolServer(MCPServer):
    """An MCP server whose failed tool calls read ``<code>: <what to do next>`` (the SDK would start
    them "Error executing tool <name>: "), with the code also in ``_meta``."""

    async def run_stdio_async(self) -> None:
        """Serve on stdin and stdout, read and written on the event loop where they are pipes (see
        ``stdio``), else through the SDK's transport alone."""
        async with loop_stdio() as streams:
            stdin, stdout = streams or (None, None)
            async with stdio_server(stdin, stdout) as (read_stream, write_stream):  # type: ignore[arg-type]
                await self._lowlevel_server.run(
                    read_stream, write_stream, self._lowlevel_server.create_initialization_options()
                )

    def close_schemas(self) -> None:
        """Publish every tool's input schema with ``additionalProperties: false`` (see ``arguments``)."""
        for tool in self._tool_manager.list_tools():
            close_schema(tool.parameters)

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[Any, Any] | None = None
    ) -> CallToolResult | InputRequiredResult:
        tool = self._tool_manager.get_tool(name)
        if tool is not None:
            try:
                check_arguments(name, tool.parameters, arguments or {})
            except InvalidInput as exc:
                logger.info("tool %r failed: %s", name, exc.code)
                return _failure(exc.code, exc.message)
        try:
            return await super().call_tool(name, arguments, context)
        except UnexpectedToolError:
            raise  # a crash: the SDK logs it and tells the caller nothing of it
        except ToolError as exc:
            code, message = _error_of(name, exc)
            logger.info("tool %r failed: %s", name, code)
            return _failure(code, message)


def _failure(code: str, message: str) -> CallToolResult:
    return CallToolResult(
        content=[TextContent(type="text", text=f"{code}: {message}")], is_error=True, _meta={ERROR_META: {"code": code}}
    )


def _error_of(tool: str, exc: ToolError) -> tuple[str, str]:
    """The code and the message of a failed call, from what the SDK raised (around what the tool raised)."""
    cause = exc.__cause__
    if isinstance(cause, ValidationError):
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'arguments'}: {error['msg']}" for error in cause.errors()
        )
        return "invalid_input", f"{problems}; see the {tool} tool's input schema"
    text = str(cause if isinstance(cause, ToolError) else exc)
    found = _CODED.match(text)
    if found:
        return found.group(1), found.group(2)
    if tool not in TOOL_NAMES:
        return "invalid_input", f"there is no tool {tool!r}; the tools are {', '.join(TOOL_NAMES)}"
    return "error", text


INSTRUCTIONS = """\
Run shell commands and drive interactive programs. spawn starts a command and waits for it (up to
timeoutMs); long-running ones keep running and are listed by ps. Use tty: true for programs that need a
terminal (REPLs, editors, anything with a prompt), then stdin to type and stdout to read the screen.
kill ends a process and everything it started.
Never sleep and poll: spawn with waitFor returns when a server is ready; stdin with waitFor (the
prompt) or idleMs returns the answer to what you typed in the same call; stdout with since (the
cursor of the previous reply) returns only new output, and with untilExit waits for the end."""

WaitFor = Annotated[
    str | None,
    Field(
        max_length=MAX_PATTERN_CHARS,
        description="Regular expression (Python syntax, multiline): return as soon as output produced during this "
        "call matches it (for a tty, the text without escape sequences). waitResult says matched, exited or timeout. "
        f"A search may take {MATCH_TIMEOUT_S:g} s: keep it plain (no nested quantifiers such as (a+)+).",
    ),
]
IdleMs = Annotated[
    int | None,
    Field(
        gt=0,
        description="Return once the process has printed nothing for this many ms (e.g. 500): it is waiting for input.",
    ),
]
WaitMs = Annotated[
    int | None,
    Field(
        ge=0,
        description="Bound on the wait in ms (default: the spawn timeout; capped by the maximum timeout); "
        "alone, return at the first new output (waitResult output).",
    ),
]


def register_tools(server: MCPServer, spaces: Spaces) -> None:
    """Add spawn, ps, stdin, stdout and kill to ``server``; each call runs in its caller's space."""
    config = spaces.config
    max_timeout = config.defaults.max_timeout_ms
    default_timeout = config.defaults.timeout_ms
    # Over HTTP each principal has a workspace of its own, so no single path can be named.
    default_cwd = spaces.local.executor.workdir if config.service.transport == "stdio" else "your workspace"

    audit = spaces.audit
    policy_note = (
        f"; with the operator's command policy, at most {MAX_CHECKED_BYTES} bytes"
        if config.policy.command_allow or config.policy.command_deny
        else ""
    )

    def tool(annotations: ToolAnnotations | None = None) -> Callable[[_F], _F]:
        """Register a tool whose description is its docstring without the code's indentation, which the
        model would otherwise read."""

        def register(function: _F) -> _F:
            description = inspect.cleandoc(function.__doc__ or "")
            return server.tool(description=description, annotations=annotations)(function)

        return register

    @asynccontextmanager
    async def space(ctx: Context | None, call: _Call, *, create: bool = True) -> AsyncIterator[ProcessExecutor | None]:
        """The caller's executor, for one call, which is audited; the call is cancelled if its HTTP client
        disconnects (its processes keep running), so a wait nobody will read costs nothing."""
        if audit is not None and audit.refusing:
            raise ToolError(
                "audit_unavailable: the audit log cannot be written and the operator requires it; try again later"
            )
        principal = _principal(ctx)
        began = time.monotonic()
        outcome = "ok"
        disconnect = _disconnect(ctx)
        try:
            with anyio.CancelScope() as scope:
                if disconnect is not None:
                    disconnect.watch(scope)
                try:
                    async with spaces.use(principal, create=create, spawning=call.tool == "spawn") as executor:
                        yield executor
                except ProcessMcpError as exc:
                    raise ToolError(str(exc)) from exc
                finally:
                    if disconnect is not None:
                        disconnect.unwatch(scope)
            if scope.cancelled_caught:
                raise ToolError("client_disconnected: the call was abandoned (its processes keep running)")
        except ToolError as exc:
            outcome = _code(exc)
            raise
        except anyio.get_cancelled_exc_class():
            outcome = "cancelled"
            raise
        finally:
            spaces.metrics.calls.labels(call.tool, outcome).inc()
            if audit is not None:
                audit.write(
                    {
                        "event": "call",
                        "principal": principal,
                        "tool": call.tool,
                        "arguments": _audited_arguments(call.arguments, config.audit.redact),
                        "outcome": outcome,
                        "pid": call.pid,
                        "durationMs": monotonic_ms(began),
                    }
                )

    @asynccontextmanager
    async def process_space(ctx: Context | None, call: _Call) -> AsyncIterator[ProcessExecutor]:
        """The caller's executor for a call on a process; a caller without a space has no processes, and
        another caller's id is unknown here exactly as one that never existed."""
        async with space(ctx, call, create=False) as executor:
            if executor is None:
                raise ToolError(str(unknown_process(call.pid or "", spaces.prefix)))
            yield executor

    @tool(ToolAnnotations(destructive_hint=True, open_world_hint=True))
    async def spawn(
        command: Annotated[
            str,
            Field(
                max_length=MAX_COMMAND_BYTES,
                description=f"Shell command line, run with /bin/sh -c; at most {MAX_COMMAND_BYTES} bytes (put longer "
                f"scripts in a file){policy_note}.",
            ),
        ],
        cwd: Annotated[
            str | None, Field(max_length=MAX_PATH_BYTES, description=f"Working directory (default {default_cwd}).")
        ] = None,
        env: Annotated[
            dict[str, str] | None,
            Field(max_length=MAX_ENV_VARS, description="Environment variables to set for this command."),
        ] = None,
        tty: Annotated[
            bool, Field(description="Run in a real 120x30 terminal: for REPLs, prompts, full-screen apps.")
        ] = False,
        background: Annotated[
            bool, Field(description="Return at once instead of waiting for exit (waitFor and idleMs still wait).")
        ] = False,
        timeoutMs: Annotated[
            int | None,
            Field(ge=0, description=f"Wait this long for exit (default {default_timeout}, max {max_timeout})."),
        ] = None,
        waitFor: WaitFor = None,
        idleMs: IdleMs = None,
        limits: Annotated[
            ProcessLimits | None,
            Field(
                description="Bounds on this process and what it starts: memoryMb (its tree's memory), cpuSeconds (CPU "
                "per process, then SIGXCPU), processes (its tree's processes and threads), outputMb; each at "
                "most the server's maximum. A result ended by one says endedBy 'limit' and which in limit."
            ),
        ] = None,
        ctx: Context | None = None,
    ) -> Annotated[CallToolResult, SpawnResult]:
        """Run a shell command and wait for it to finish, up to timeoutMs.

        Returns the process id (e.g. "host-1"), status "terminated" with exitCode (and signal, if a
        signal ended it), and the last 8196 characters of stdout and stderr. A command still running at
        the timeout keeps running in the background and the reply says status "running": read it later
        with stdout, type into it with stdin, stop it with kill. For a tty process, stdout is the
        rendered terminal screen. A non-zero exit code is a normal result, not an error. sandboxed
        says whether the command runs confined (host sandbox or container): there, writes outside
        the working directory and /tmp, and network access, may be refused by configuration.

        To start a server and continue once it is ready: {command: "npm run dev", waitFor:
        "Local:.*http"} returns the moment that line appears, with the server still running (waitFor
        and idleMs make spawn wait even with background).
        """
        options = SpawnOptions(
            command=command,
            cwd=cwd,
            env=env,
            tty=tty,
            background=background,
            timeout_ms=timeoutMs,
            wait_for=waitFor,
            idle_ms=idleMs,
            limits=limits,
        )
        call = _Call("spawn", options.model_dump(exclude_defaults=True))
        async with space(ctx, call) as executor:
            assert executor is not None
            result = await _call(executor.spawn(options, _progress(ctx, "spawn")))
            call.pid = result.pid
        label = "screen" if tty else "stdout"
        headline = f"{_headline(result.pid, result)}, {_confinement(result.sandboxed)}{_waited(result)}"
        text = f"{headline}\n{_cursor_line(result)}{_held_back(result, tty)}{_stopped_note(result)}\n"
        text += _section(label, result.stdout)
        if not tty:
            text += f"\n{_section('stderr', result.stderr)}"
        return _reply(result, text)

    @tool(ToolAnnotations(read_only_hint=True))
    async def ps(
        stats: Annotated[
            bool,
            Field(description="Also each process's resources (CPU, memory, processes of its tree), read from /proc."),
        ] = False,
        ctx: Context | None = None,
    ) -> Annotated[CallToolResult, ProcessList]:
        """List running processes and the most recently finished ones.

        Each entry has pid, command, status ("running" or "terminated"), exitCode and signal once
        finished, stopped: true while a signal keeps a running one stopped, cwd, tty, sandboxed, and
        createdAt; with stats: true also what each uses. Use it to find ids for stdout, stdin and kill.
        """
        arguments = {"stats": stats} if stats else {}
        async with space(ctx, _Call("ps", arguments), create=False) as executor:
            processes = [] if executor is None else await _call(executor.list_processes(stats=stats))
        # What every row shares is said once: a ps of many processes stays as small as the original's.
        shared = {name for name in ("sandboxed", "via") if len({getattr(p, name) for p in processes}) == 1}
        listing = ProcessList(processes=processes, **{name: getattr(processes[0], name) for name in shared})
        return _reply(listing, _ps_text(processes), exclude={"processes": {"__all__": shared}})

    @tool()
    async def stdin(
        id: Annotated[str, Field(max_length=MAX_ID_CHARS, description="Process id from spawn or ps, e.g. 'host-1'.")],
        input: Annotated[
            str,
            Field(
                max_length=MAX_INPUT_CHARS,
                description=f"Text to send, at most {MAX_INPUT_CHARS} characters (send more in several calls). "
                "Escapes: \\n newline, \\r carriage return (Enter in a tty), "
                "\\t tab, \\xHH a byte (\\x03 is Ctrl-C, \\x04 Ctrl-D, \\x1b Escape), \\uHHHH a "
                "character, \\\\ a backslash.",
            ),
        ],
        waitFor: WaitFor = None,
        idleMs: IdleMs = None,
        waitMs: WaitMs = None,
        ctx: Context | None = None,
    ) -> Annotated[CallToolResult, StdinResult]:
        """Type into a running process: its terminal (tty) or its stdin pipe.

        Nothing is added: end a line with \\n (or \\r in a tty) to submit it. Send \\x03 to a tty
        process to interrupt it like Ctrl-C. With waitFor or idleMs the reply also carries the output
        produced since your input (a tty echoes what you typed), so one call is one turn:
        {id, input: "1+1\\r", waitFor: ">>> $"} in a Python REPL returns "1+1\\n2\\n>>> ".
        Without a wait, call stdout to read the response.
        """
        arguments = {"id": id, "input": input, "waitFor": waitFor, "idleMs": idleMs, "waitMs": waitMs}
        async with process_space(ctx, _Call("stdin", arguments, id)) as executor:
            result = await _call(
                executor.stdin(id, input, wait_for=waitFor, idle_ms=idleMs, wait_ms=waitMs, progress=_progress(ctx, id))
            )
        text = f"Sent {result.bytes_sent} bytes to {result.pid} ({_state(result)}){_waited(result)}."
        if result.stdout is not None:
            text += f"\n{_section('output', result.stdout)}"
            if result.stderr:
                text += f"\n{_section('stderr', result.stderr)}"
            text += f"\n{_cursor_line(result)}"
        text += _stopped_note(result)
        return _reply(result, text)

    @tool(ToolAnnotations(read_only_hint=True))
    async def stdout(
        id: Annotated[str, Field(max_length=MAX_ID_CHARS, description="Process id from spawn or ps, e.g. 'host-1'.")],
        lines: Annotated[
            int, Field(ge=1, le=MAX_LINES, description="How many of the last lines to return.")
        ] = DEFAULT_LINES,
        since: Annotated[
            int | None,
            Field(ge=0, description="A cursor from an earlier reply: return only stdout printed after it."),
        ] = None,
        stderrSince: Annotated[
            int | None, Field(ge=0, description="A stderrCursor from an earlier reply: only stderr after it.")
        ] = None,
        raw: Annotated[
            bool, Field(description="For a tty: the output stream as text (escapes removed), not the screen.")
        ] = False,
        waitFor: WaitFor = None,
        idleMs: IdleMs = None,
        untilExit: Annotated[bool, Field(description="Wait until the process exits (bounded by waitMs).")] = False,
        waitMs: WaitMs = None,
        ctx: Context | None = None,
    ) -> Annotated[CallToolResult, ProcessOutput]:
        """Read the last lines a process printed, running or finished.

        Returns stdout and stderr (the last `lines` lines of each) with the process status. For a tty
        process, stdout is the terminal: lines that scrolled off, then the current screen.
        Every reply has a cursor (and stderrCursor): pass it back as since (stderrSince) to get only
        what came after, instead of rereading everything; dropped counts bytes no longer available.
        To wait instead of polling: waitFor a pattern, idleMs of quiet, or untilExit for the exit
        code and final output, all bounded by waitMs.
        """
        arguments = {"id": id, "lines": lines, "since": since, "stderrSince": stderrSince, "raw": raw,
                     "waitFor": waitFor, "idleMs": idleMs, "untilExit": untilExit, "waitMs": waitMs}  # fmt: skip
        async with process_space(ctx, _Call("stdout", arguments, id)) as executor:
            result = await _call(
                executor.get_output(
                    id,
                    lines,
                    since=since,
                    stderr_since=stderrSince,
                    raw=raw,
                    wait_for=waitFor,
                    idle_ms=idleMs,
                    wait_ms=waitMs,
                    until_exit=untilExit,
                    progress=_progress(ctx, id),
                )
            )
        usage = f" ({_usage(result.stats).strip()})" if result.stats is not None else ""
        text = f"{_headline(result.pid, result)}{usage}{_waited(result)}\n{_section('stdout', result.stdout)}"
        text += f"\n{_section('stderr', result.stderr)}\n{_cursor_line(result)}{_held_back(result, False)}"
        if result.dropped:
            text += f" ({result.dropped} bytes after the cursor are no longer available)"
        text += _stopped_note(result)
        return _reply(result, text)

    @tool(ToolAnnotations(destructive_hint=True))
    async def kill(
        id: Annotated[str, Field(max_length=MAX_ID_CHARS, description="Process id from spawn or ps, e.g. 'host-1'.")],
        signal: Annotated[
            str,
            Field(description="Signal name, SIG prefix optional: TERM, KILL, INT, HUP, QUIT, USR1, USR2, STOP, CONT"),
        ] = "SIGTERM",
        ctx: Context | None = None,
    ) -> Annotated[CallToolResult, KillResult]:
        """Send a signal to a process and everything it started (its whole process group).

        SIGTERM (default) asks it to stop; SIGKILL forces it; SIGINT is Ctrl-C. Waits up to a second
        for the process to exit and reports its status, so you know whether it is gone. SIGSTOP pauses
        it (it stays "running", with stopped: true) until SIGCONT.
        """
        async with process_space(ctx, _Call("kill", {"id": id, "signal": signal}, id)) as executor:
            result = await _call(executor.kill(id, signal))
        return _reply(result, f"Sent {result.sent} to {result.pid}: {_state(result)}.")


async def _call(operation: Awaitable[_T]) -> _T:
    try:
        return await operation
    except ProcessMcpError as exc:
        raise ToolError(str(exc)) from exc


@dataclass
class _Call:
    """One tool call, as the audit log records it."""

    tool: str
    arguments: dict[str, Any]
    pid: str | None = None


def _code(exc: ToolError) -> str:
    """The error code a tool's error text starts with."""
    found = _CODED.match(str(exc))
    return found.group(1) if found else "error"


def _audited_arguments(arguments: dict[str, Any], redact: bool) -> dict[str, Any]:
    """The arguments as recorded: without the unset ones and, when redacting, env values and stdin input
    replaced by their sizes."""
    kept = {name: value for name, value in arguments.items() if value is not None}
    if redact:
        if isinstance(kept.get("env"), dict):
            kept["env"] = {name: f"<{len(str(value))} chars>" for name, value in kept["env"].items()}
        if isinstance(kept.get("input"), str):
            kept["input"] = f"<{len(kept['input'])} chars>"
    return kept


DISCONNECTED = "process_mcp.disconnected"
"""Key of the ``Disconnect`` the HTTP transport puts in each request's scope."""


class Disconnect:
    """Whether an HTTP request's client went away; calls made for it watch it and are cancelled then."""

    def __init__(self) -> None:
        self.gone = False
        self._watching: set[anyio.CancelScope] = set()

    def watch(self, scope: anyio.CancelScope) -> None:
        self._watching.add(scope)
        if self.gone:
            scope.cancel()

    def unwatch(self, scope: anyio.CancelScope) -> None:
        self._watching.discard(scope)

    def set(self) -> None:
        self.gone = True
        for scope in list(self._watching):
            scope.cancel()


def _request_scope(ctx: Context | None) -> dict[str, object] | None:
    if ctx is None:
        return None
    try:
        request = ctx.request_context.request
    except ValueError:  # not within a request
        return None
    scope = getattr(request, "scope", None)
    return scope if isinstance(scope, dict) else None


def _disconnect(ctx: Context | None) -> Disconnect | None:
    scope = _request_scope(ctx)
    found = scope.get(DISCONNECTED) if scope is not None else None
    return found if isinstance(found, Disconnect) else None


def _principal(ctx: Context | None) -> str | None:
    """Who is calling (``principal_of`` the request); None for the local caller (stdio, in-process)."""
    scope = _request_scope(ctx)
    return principal_of(scope) if scope is not None else None


def _reply(result: BaseModel, text: str, *, exclude: dict[str, Any] | None = None) -> CallToolResult:
    return CallToolResult(
        content=[TextContent(type="text", text=text)],
        # Fields without a value (exitCode while running, signal, limit, ...) are left out, as the
        # original left them out, rather than sent as null on every row of every reply.
        structured_content=result.model_dump(mode="json", by_alias=True, exclude_none=True, exclude=exclude),
    )


def _state(state: ExitState) -> str:
    if state.status == "running":
        return "running (stopped)" if state.stopped else "running"
    if state.ended_by == "lost":
        return "terminated (ended with the agent in its box, which was lost)"
    cause = f", ended by {state.ended_by}" if state.ended_by not in (None, "exit") else ""
    if state.limit is not None:
        cause += f" ({state.limit})"
    code = "unknown: the process's end could not be observed" if state.exit_code is None else state.exit_code
    if state.signal:
        return f"terminated by {state.signal} (exit code {code}{cause})"
    return f"terminated (exit code {code}{cause})"


def _ps_text(processes: list[ProcessInfo]) -> str:
    """One short line per process (what the structured rows say in full): a first line says what the rows
    share (confinement, and the day and working directory of most of them), which a row repeats only
    where it differs."""
    if not processes:
        return "No processes. Start one with spawn."
    cwd = _most_common(p.cwd for p in processes)
    day = _most_common(p.created_at[:10] for p in processes)
    confined = {p.sandboxed for p in processes}
    shared = f", {_confinement(confined.pop())}" if len(confined) == 1 else ""
    count = f"{len(processes)} process{'es' if len(processes) > 1 else ''}"
    lines = [f"{count}{shared}; started on {day} (UTC) in {cwd} unless a row says otherwise:"]
    for p in processes:
        started = p.created_at[11:19] if p.created_at.startswith(day) else p.created_at[:19]
        row = f"{p.pid}  {_state(p)}  {'tty' if p.tty else 'pipe'}  {started}  {_usage(p.stats)}"
        if not shared:
            row += f"{_confinement(p.sandboxed)}  "
        if p.cwd != cwd:
            row += f"cwd={p.cwd}  "
        lines.append(f"{row}$ {p.command}")
    return "\n".join(lines)


def _most_common(values: Iterable[str]) -> str:
    return Counter(values).most_common(1)[0][0]


def _usage(stats: ProcessStats | None) -> str:
    if stats is None:
        return ""
    return f"cpu={stats.cpu_seconds:g}s ({stats.cpu_percent:g}%) rss={stats.rss_bytes / 1048576:.1f}MiB  "


def _headline(pid: str, state: ExitState) -> str:
    return f"{pid}: {_state(state)}"


def _progress(ctx: Context | None, what: str) -> Progress | None:
    """Progress notifications for a wait, when the client asked for them (the SDK drops them otherwise)."""
    if ctx is None:
        return None
    context = ctx

    async def report(elapsed_s: float, total_s: float) -> None:
        await context.report_progress(elapsed_s, total_s, f"waiting on {what}: {elapsed_s:.0f} of {total_s:g} s")

    return report


def _waited(result: SpawnResult | StdinResult | ProcessOutput) -> str:
    return "" if result.wait_result is None else f"; wait ended: {result.wait_result}"


def _held_back(result: SpawnResult | ProcessOutput, tty: bool) -> str:
    """Why a wait on a pipe may have seen nothing: programs buffer output that is not a terminal."""
    quiet = result.wait_result == "timeout" and result.status == "running" and not result.stopped
    if tty or not quiet or result.cursor or result.stderr_cursor:
        return ""
    return (
        "\nno output yet: a program writing to a pipe may hold its output in a buffer until it has a few KiB or "
        "exits (C stdio, Python without PYTHONUNBUFFERED, Node's pipes); spawn it with tty: true, or use its own "
        "flag to flush (python3 -u, stdbuf -oL, grep --line-buffered)"
    )


def _stopped_note(state: SpawnResult | StdinResult | ProcessOutput) -> str:
    """What a stopped process needs, said where a wait on it would otherwise just time out."""
    if not state.stopped:
        return ""
    return (
        f"\n{state.pid} is stopped (by SIGSTOP, or SIGTSTP, SIGTTIN, SIGTTOU): it does nothing, and prints nothing, "
        "until it is continued; send SIGCONT to continue it (kill with signal SIGCONT)"
    )


def _cursor_line(result: SpawnResult | StdinResult | ProcessOutput) -> str:
    return f"cursor: {result.cursor}, stderrCursor: {result.stderr_cursor}"


def _confinement(sandboxed: bool) -> str:
    return "sandboxed" if sandboxed else "not sandboxed"


def _section(label: str, body: str) -> str:
    return f"--- {label} ---\n{body}" if body else f"--- {label} (empty) ---"
