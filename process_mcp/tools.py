"""The five MCP tools: thin wrappers that validate, call the executor once, and render the result.

Each tool returns structured content (with an output schema) and a plain-text rendering, which is
what most clients show the model. Library errors become ``isError`` results whose text starts with
the error code and says what to do next.
"""

# No `from __future__ import annotations`: the SDK evaluates the tool signatures, whose descriptions
# are built from the configuration at registration time.
from collections.abc import Awaitable
from typing import Annotated, TypeVar

from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field

from .errors import ProcessMcpError
from .executor import ProcessExecutor
from .models import (
    DEFAULT_LINES,
    ExitState,
    KillResult,
    ProcessList,
    ProcessOutput,
    SpawnOptions,
    SpawnResult,
    StdinResult,
)

MAX_LINES = 10_000
"""Most lines one stdout call returns; more would not fit a model's context anyway."""

_T = TypeVar("_T")

INSTRUCTIONS = """\
Run shell commands and drive interactive programs. spawn starts a command and waits for it (up to
timeoutMs); long-running ones keep running and are listed by ps. Use tty: true for programs that need a
terminal (REPLs, editors, anything with a prompt), then stdin to type and stdout to read the screen.
kill ends a process and everything it started."""


def register_tools(server: MCPServer, executor: ProcessExecutor) -> None:
    """Add spawn, ps, stdin, stdout and kill, backed by ``executor``, to ``server``."""
    max_timeout = executor.config.defaults.max_timeout_ms
    default_timeout = executor.config.defaults.timeout_ms

    @server.tool(annotations=ToolAnnotations(destructive_hint=True, open_world_hint=True))
    async def spawn(
        command: Annotated[str, Field(description="Shell command line, run with /bin/sh -c.")],
        cwd: Annotated[str | None, Field(description=f"Working directory (default {executor.config.workdir}).")] = None,
        env: Annotated[
            dict[str, str] | None, Field(description="Environment variables to set for this command.")
        ] = None,
        tty: Annotated[
            bool, Field(description="Run in a real 120x30 terminal: for REPLs, prompts, full-screen apps.")
        ] = False,
        background: Annotated[bool, Field(description="Return immediately, without waiting at all.")] = False,
        timeoutMs: Annotated[
            int | None,
            Field(ge=0, description=f"Wait this long for exit (default {default_timeout}, max {max_timeout})."),
        ] = None,
    ) -> Annotated[CallToolResult, SpawnResult]:
        """Run a shell command and wait for it to finish, up to timeoutMs.

        Returns the process id (e.g. "host-1"), status "terminated" with exitCode (and signal, if a
        signal ended it), and the last 8196 characters of stdout and stderr. A command still running at
        the timeout keeps running in the background and the reply says status "running": read it later
        with stdout, type into it with stdin, stop it with kill. For a tty process, stdout is the
        rendered terminal screen. A non-zero exit code is a normal result, not an error. sandboxed
        says whether the command runs confined (host sandbox or container): there, writes outside
        the working directory and /tmp, and network access, may be refused by configuration.
        """
        options = SpawnOptions(command=command, cwd=cwd, env=env, tty=tty, background=background, timeout_ms=timeoutMs)
        result = await _call(executor.spawn(options))
        label = "screen" if tty else "stdout"
        text = f"{_headline(result.pid, result)}, {_confinement(result.sandboxed)}\n{_section(label, result.stdout)}"
        if not tty:
            text += f"\n{_section('stderr', result.stderr)}"
        return _reply(result, text)

    @server.tool(annotations=ToolAnnotations(read_only_hint=True))
    async def ps() -> Annotated[CallToolResult, ProcessList]:
        """List running processes and the most recently finished ones.

        Each entry has pid, command, status ("running" or "terminated"), exitCode and signal once
        finished, cwd, tty, sandboxed, and createdAt. Use it to find ids for stdout, stdin and kill.
        """
        processes = await _call(executor.list_processes())
        lines = [
            f"{p.pid}  {_state(p)}  {'tty' if p.tty else 'pipe'}  {_confinement(p.sandboxed)}  {p.created_at}  "
            f"cwd={p.cwd}  $ {p.command}"
            for p in processes
        ]
        text = "\n".join(lines) if lines else "No processes. Start one with spawn."
        return _reply(ProcessList(processes=processes), text)

    @server.tool()
    async def stdin(
        id: Annotated[str, Field(description="Process id from spawn or ps, e.g. 'host-1'.")],
        input: Annotated[
            str,
            Field(
                description="Text to send. Escapes: \\n newline, \\r carriage return (Enter in a tty), "
                "\\t tab, \\xHH a byte (\\x03 is Ctrl-C, \\x04 Ctrl-D, \\x1b Escape), \\uHHHH a "
                "character, \\\\ a backslash."
            ),
        ],
    ) -> Annotated[CallToolResult, StdinResult]:
        """Type into a running process: its terminal (tty) or its stdin pipe.

        Nothing is added: end a line with \\n (or \\r in a tty) to submit it. Send \\x03 to a tty
        process to interrupt it like Ctrl-C. Then call stdout to read the response.
        """
        result = await _call(executor.stdin(id, input))
        return _reply(result, f"Sent {result.bytes_sent} bytes to {result.pid} ({_state(result)}).")

    @server.tool(annotations=ToolAnnotations(read_only_hint=True))
    async def stdout(
        id: Annotated[str, Field(description="Process id from spawn or ps, e.g. 'host-1'.")],
        lines: Annotated[
            int, Field(ge=1, le=MAX_LINES, description="How many of the last lines to return.")
        ] = DEFAULT_LINES,
    ) -> Annotated[CallToolResult, ProcessOutput]:
        """Read the last lines a process printed, running or finished.

        Returns stdout and stderr (the last `lines` lines of each) with the process status. For a tty
        process, stdout is the terminal: lines that scrolled off, then the current screen.
        """
        result = await _call(executor.get_output(id, lines))
        text = f"{_headline(result.pid, result)}\n{_section('stdout', result.stdout)}"
        text += f"\n{_section('stderr', result.stderr)}"
        return _reply(result, text)

    @server.tool(annotations=ToolAnnotations(destructive_hint=True))
    async def kill(
        id: Annotated[str, Field(description="Process id from spawn or ps, e.g. 'host-1'.")],
        signal: Annotated[
            str,
            Field(description="Signal name, SIG prefix optional: TERM, KILL, INT, HUP, QUIT, USR1, USR2, STOP, CONT"),
        ] = "SIGTERM",
    ) -> Annotated[CallToolResult, KillResult]:
        """Send a signal to a process and everything it started (its whole process group).

        SIGTERM (default) asks it to stop; SIGKILL forces it; SIGINT is Ctrl-C. Waits up to a second
        for the process to exit and reports its status, so you know whether it is gone.
        """
        result = await _call(executor.kill(id, signal))
        return _reply(result, f"Sent {result.sent} to {result.pid}: {_state(result)}.")


async def _call(operation: Awaitable[_T]) -> _T:
    try:
        return await operation
    except ProcessMcpError as exc:
        raise ToolError(str(exc)) from exc


def _reply(result: BaseModel, text: str) -> CallToolResult:
    return CallToolResult(
        content=[TextContent(type="text", text=text)],
        structured_content=result.model_dump(mode="json", by_alias=True),
    )


def _state(state: ExitState) -> str:
    if state.status == "running":
        return "running"
    if state.signal:
        return f"terminated by {state.signal} (exit code {state.exit_code})"
    return f"terminated (exit code {state.exit_code})"


def _headline(pid: str, state: ExitState) -> str:
    return f"{pid}: {_state(state)}"


def _confinement(sandboxed: bool) -> str:
    return "sandboxed" if sandboxed else "not sandboxed"


def _section(label: str, body: str) -> str:
    return f"--- {label} ---\n{body}" if body else f"--- {label} (empty) ---"
