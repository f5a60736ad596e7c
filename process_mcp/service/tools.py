"""The five MCP tools: thin wrappers that validate, call the executor once, and render the result.

Each tool returns structured content (with an output schema) and a plain-text rendering (``render``),
which is what most clients show the model. What every call goes through (the caller's space, audit,
metrics, a client that went away) is in ``calls``; how a failed call reads, in ``toolserver``.
"""

# No `from __future__ import annotations`: the SDK evaluates the tool signatures, whose descriptions
# are built from the configuration at registration time.
import inspect
import logging
from collections.abc import Callable
from typing import Annotated, Any, NoReturn, TypeVar

from mcp.server import MCPServer
from mcp.server.mcpserver import AcceptedElicitation, Context, Elicit, ElicitationResult, Resolve
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, ToolAnnotations
from pydantic import BaseModel, Field

from ..core.models import (
    DEFAULT_LINES,
    MAX_COMMAND_BYTES,
    MAX_ENV_VARS,
    MAX_ID_CHARS,
    MAX_INPUT_CHARS,
    MAX_PATH_BYTES,
    NAME_PATTERN,
    SINCE_MAX_BYTES,
    HealthCheck,
    KillResult,
    ProcessLimits,
    ProcessList,
    ProcessOutput,
    ReadyCheck,
    RestartPolicy,
    SpawnOptions,
    SpawnResult,
    StdinResult,
)
from ..core.waiting import MATCH_TIMEOUT_S, MAX_PATTERN_CHARS, Progress
from ..errors import InvalidInput
from ..policy.command import MAX_CHECKED_BYTES
from . import render
from .calls import Call, Calls, port_link, progress, run
from .spaces import Spaces

MAX_LINES = 10_000
"""Most lines one stdout call returns; more would not fit a model's context anyway."""
MAX_QUESTION_CHARS = 500
"""Longest askUser question: one line a person reads."""
NO_ELICITATION = "the client cannot ask"
REDACTED_MIN = 4
"""Shortest answer cut out of output; a shorter one would be found by where the cuts fall."""


class UserAnswer(BaseModel):
    """The form askUser shows the user: one string."""

    answer: str = Field(
        title="Answer", max_length=MAX_INPUT_CHARS - 1, description="Typed into the process, then Enter."
    )


def ask_user(id: str, input: str, askUser: str | None, ctx: Context) -> Elicit[UserAnswer] | str | None:
    """The question for the user (a form through the client), when stdin asks one, sends nothing else,
    and the client can show it. The form says which process asks: the question is the model's words."""
    if askUser is None or input:
        return None  # the call is refused before anyone is asked
    declared = ctx.client_capabilities
    elicitation = declared.elicitation if declared is not None else None
    if elicitation is None or (elicitation.form is None and elicitation.url is not None):
        return NO_ELICITATION
    framed = f"Process {id} asks: {askUser}\n(Your answer is typed into {id} and is not shown to the AI model.)"
    return Elicit(framed, UserAnswer)


_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])

logger = logging.getLogger(__name__)


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

    calls = Calls(spaces)

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
            Field(
                max_length=MAX_ENV_VARS,
                description="Environment variables to set for this command. By default nothing waits for a "
                "human: PAGER=cat, GIT_PAGER=cat, MANPAGER=cat, SYSTEMD_PAGER=, GIT_TERMINAL_PROMPT=0, "
                "DEBIAN_FRONTEND=noninteractive, PYTHONUNBUFFERED=1, and without tty TERM=dumb, NO_COLOR=1; set "
                "one here to change it.",
            ),
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
        name: Annotated[
            str | None,
            Field(
                pattern=NAME_PATTERN,
                description="Name it (e.g. 'web'): while a process of this name runs, spawn returns that one "
                "(existing: true) instead of starting another, so 'make sure the dev server runs' is one call. "
                "Every tool's id accepts the name.",
            ),
        ] = None,
        group: Annotated[
            str | None,
            Field(pattern=NAME_PATTERN, description="Label it with a group: ps and kill take a group."),
        ] = None,
        ready: Annotated[
            ReadyCheck | None,
            Field(
                description="Return once it is ready (within timeoutMs): {port: 8000} accepts connections in the "
                "box, {port: 8000, http: '/health'} answers 2xx/3xx, or {pattern: 'listening'} shows in its "
                "output; the reply says ready: true, or why not."
            ),
        ] = None,
        health: Annotated[
            HealthCheck | None,
            Field(
                description="Check it while it runs: {port[, http], intervalMs, failures} or {command, ...} (exit 0 "
                "is healthy); ps shows health starting, healthy or unhealthy."
            ),
        ] = None,
        restart: Annotated[
            RestartPolicy | None,
            Field(
                description="Start it again when it ends: {policy: 'on-failure' | 'always', maxRestarts, backoffMs}; "
                "same id, output continuing; an unhealthy one counts as failed; kill stops it for good."
            ),
        ] = None,
        ctx: Context | None = None,
    ) -> Annotated[CallToolResult, SpawnResult]:
        """Run a shell command and wait for it to finish, up to timeoutMs.

        Returns the process id (e.g. "host-1"), status "terminated" with exitCode (and signal, if a
        signal ended it), and stdout and stderr (past 8196 characters: the first lines, a marker, the
        last lines; outputFile and stderrFile hold the whole output, for grep or sed -n). A command
        still running at the timeout keeps running in the background and the reply says status
        "running"; waitResult "input" says it waits for input. Read it later
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
            name=name,
            group=group,
            ready=ready,
            health=health,
            restart=restart,
        )
        call = Call("spawn", options.model_dump(exclude_defaults=True))
        async with calls.space(ctx, call) as executor:
            assert executor is not None
            result = await run(executor.spawn(options, progress(ctx, "spawn")))
            call.pid = result.pid
        label = "screen" if tty else "stdout"
        named = f" ({result.name})" if result.name else ""
        already = "; already running: this is that process, nothing new was started" if result.existing else ""
        if result.ready is not None:
            already += f"; {'ready' if result.ready else 'NOT ready'}: {result.ready_detail}"
        headline = (
            f"{render.headline(result.pid + named, result)}, {render.confinement(result.sandboxed)}"
            f"{render.waited(result)}{already}"
        )
        notes = f"{render.held_back(result, tty)}{render.read_only_note(result, result.sandboxed)}"
        text = f"{headline}\n{render.cursor_line(result)}{notes}{render.stopped_note(result)}\n"
        text += render.section(label, result.stdout)
        if not tty:
            text += f"\n{render.section('stderr', result.stderr)}"
        return render.reply(result, text)

    @tool(ToolAnnotations(read_only_hint=True))
    async def ps(
        stats: Annotated[
            bool,
            Field(description="Also each process's resources (CPU, memory, processes of its tree), read from /proc."),
        ] = False,
        group: Annotated[
            str | None, Field(max_length=MAX_ID_CHARS, description="Only the processes of this group.")
        ] = None,
        ctx: Context | None = None,
    ) -> Annotated[CallToolResult, ProcessList]:
        """List running processes and the most recently finished ones.

        Each entry has pid, command, status ("running" or "terminated"), exitCode and signal once
        finished, stopped: true while a signal keeps a running one stopped, cwd, tty, sandboxed, and
        createdAt, and name and group when given; with stats: true also what each uses. Use it to find
        ids for stdout, stdin and kill.
        """
        arguments = {key: value for key, value in (("stats", stats), ("group", group)) if value}
        async with calls.space(ctx, Call("ps", arguments), create=False) as executor:
            link = port_link(ctx, spaces)
            processes = (
                [] if executor is None else await run(executor.list_processes(stats=stats, group=group, link=link))
            )
        # What every row shares is said once: a ps of many processes stays as small as the original's.
        shared = {name for name in ("sandboxed", "via") if len({getattr(p, name) for p in processes}) == 1}
        listing = ProcessList(processes=processes, **{name: getattr(processes[0], name) for name in shared})
        return render.reply(listing, render.ps_text(processes), exclude={"processes": {"__all__": shared}})

    @tool()
    async def stdin(
        id: Annotated[
            str, Field(max_length=MAX_ID_CHARS, description="Process id (or name) from spawn or ps, e.g. 'host-1'.")
        ],
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
        eof: Annotated[
            bool,
            Field(
                description="End its input after this text, so wc, sort or cat > file finish: a pipe is closed, a "
                "tty gets its end-of-file character (Ctrl-D)."
            ),
        ] = False,
        askUser: Annotated[
            str | None,
            Field(
                max_length=MAX_QUESTION_CHARS,
                description="Ask the user this question (a form in their client) and type the answer, then Enter, "
                "into the process; the answer never reaches you. For passwords and other secrets (a reply with "
                "secret: true). Send input apart, in a call of its own.",
            ),
        ] = None,
        answered: Annotated[ElicitationResult[UserAnswer], Resolve(ask_user)] = None,  # type: ignore[assignment]
        ctx: Context | None = None,
    ) -> Annotated[CallToolResult, StdinResult]:
        """Type into a running process: its terminal (tty) or its stdin pipe.

        Nothing is added: end a line with \\n (or \\r in a tty) to submit it. Send \\x03 to a tty
        process to interrupt it like Ctrl-C. With waitFor or idleMs the reply also carries the output
        produced since your input (a tty echoes what you typed), so one call is one turn:
        {id, input: "1+1\\r", waitFor: ">>> $"} in a Python REPL returns "1+1\\n2\\n>>> ".
        Without a wait, call stdout to read the response.
        """
        arguments = {"id": id, "input": input, "waitFor": waitFor, "idleMs": idleMs, "waitMs": waitMs, "eof": eof}
        if askUser is not None:
            arguments["askUser"] = askUser
        async with calls.process_space(ctx, Call("stdin", arguments, id)) as executor:
            secret = None
            if askUser is not None:
                if input:
                    _refuse("askUser types the user's answer: send input in a call of its own")
                if isinstance(answered, AcceptedElicitation) and isinstance(answered.data, str):  # NO_ELICITATION
                    _refuse(
                        "askUser needs a client that can ask the user (MCP elicitation), and this one did not declare "
                        "it; ask the user in the conversation instead, or have them type into the process themselves"
                    )
                if isinstance(answered, AcceptedElicitation) and isinstance(answered.data, UserAnswer):
                    # Only into a prompt that does not echo: an echo would show the answer in later output.
                    if await run(executor.wants_input(id)) != "secret":
                        _refuse(
                            f"askUser types only into a prompt that does not echo (a password prompt, which a reply "
                            f"marks secret: true), and {id} is not waiting at one now; nothing was typed"
                        )
                    secret = answered.data.answer
                    try:
                        secret.encode()
                    except UnicodeEncodeError:
                        _refuse("the user's answer is not text that can be typed; nothing was typed")
                    input = secret + "\r"
            if askUser is not None and secret is None:  # declined or cancelled: nothing is typed
                result = await run(executor.stdin(id, ""))
                asked = "declined" if getattr(answered, "action", None) == "decline" else "cancelled"
                result = result.model_copy(update={"asked": asked})
            else:
                result = await run(
                    executor.stdin(
                        id,
                        input,
                        wait_for=waitFor,
                        idle_ms=idleMs,
                        wait_ms=waitMs,
                        progress=_redacted(progress(ctx, id), secret),
                        eof=eof,
                        literal=secret is not None,
                    )
                )
                if secret is not None:
                    result = _without(result, secret).model_copy(update={"asked": "answered"})
        ended = ", then ended its input" if eof else ""
        status = render.status_text(result)
        if result.asked in ("declined", "cancelled"):
            text = f"The user {result.asked} the question; nothing was sent to {result.pid} ({status})."
        else:
            typed = " (the user's answer, not shown)" if result.asked == "answered" else ""
            text = f"Sent {result.bytes_sent} bytes{typed} to {result.pid}{ended} ({status}){render.waited(result)}."
        if result.stdout is not None:
            text += f"\n{render.section('output', result.stdout)}"
            if result.stderr:
                text += f"\n{render.section('stderr', result.stderr)}"
            text += f"\n{render.cursor_line(result)}"
        text += render.stopped_note(result)
        return render.reply(result, text)

    @tool(ToolAnnotations(read_only_hint=True))
    async def stdout(
        id: Annotated[
            str, Field(max_length=MAX_ID_CHARS, description="Process id (or name) from spawn or ps, e.g. 'host-1'.")
        ],
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
            bool,
            Field(
                description="For a tty: the output stream as text (escapes removed), not the screen. For a pipe: "
                "the output as printed, escape sequences and \\r redraws included (by default they are cleaned)."
            ),
        ] = False,
        waitFor: WaitFor = None,
        idleMs: IdleMs = None,
        untilExit: Annotated[bool, Field(description="Wait until the process exits (bounded by waitMs).")] = False,
        waitMs: WaitMs = None,
        maxBytes: Annotated[
            int | None,
            Field(
                ge=1,
                le=SINCE_MAX_BYTES,
                description="With since: one page of at most this many bytes, from the start of the cursor's line "
                "to a line end; the reply's cursor is where it stopped: pass it as since for the next page.",
            ),
        ] = None,
        history: Annotated[
            bool,
            Field(
                description="Also the samples of its stats taken so far (CPU, memory, processes; a named process "
                "is sampled every second while it runs)."
            ),
        ] = False,
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
                     "waitFor": waitFor, "idleMs": idleMs, "untilExit": untilExit, "waitMs": waitMs,
                     "maxBytes": maxBytes, "history": history}  # fmt: skip
        async with calls.process_space(ctx, Call("stdout", arguments, id)) as executor:
            result = await run(
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
                    progress=progress(ctx, id),
                    max_bytes=maxBytes,
                    history=history,
                )
            )
        usage = f" ({render.usage(result.stats).strip()})" if result.stats is not None else ""
        text = f"{render.headline(result.pid, result)}{usage}{render.waited(result)}\n"
        text += f"{render.section('stdout', result.stdout)}\n{render.section('stderr', result.stderr)}\n"
        text += f"{render.cursor_line(result)}{render.held_back(result, False)}"
        if result.dropped:
            text += f" ({result.dropped} bytes after the cursor are no longer available)"
        text += render.stopped_note(result)
        return render.reply(result, text)

    @tool(ToolAnnotations(destructive_hint=True))
    async def kill(
        id: Annotated[
            str | None,
            Field(max_length=MAX_ID_CHARS, description="Process id (or name) from spawn or ps, e.g. 'host-1'."),
        ] = None,
        signal: Annotated[
            str,
            Field(description="Signal name, SIG prefix optional: TERM, KILL, INT, HUP, QUIT, USR1, USR2, STOP, CONT"),
        ] = "SIGTERM",
        graceMs: Annotated[
            int | None,
            Field(
                ge=0,
                le=max_timeout,
                description="Wait this long (ms) for it and all it started to end, then send SIGKILL; the reply "
                "says forced: true if it had to.",
            ),
        ] = None,
        group: Annotated[
            str | None,
            Field(max_length=MAX_ID_CHARS, description="Instead of id: signal every running process of this group."),
        ] = None,
        ctx: Context | None = None,
    ) -> Annotated[CallToolResult, KillResult]:
        """Send a signal to a process and everything it started (its whole process group).

        SIGTERM (default) asks it to stop; SIGKILL forces it; SIGINT is Ctrl-C. Waits up to a second
        for the process to exit and reports its status, so you know whether it is gone; with graceMs,
        up to that long, then SIGKILL (forced: true). SIGSTOP pauses it (it stays "running", with
        stopped: true) until SIGCONT. With group instead of id, every running process of the group.
        """
        if (id is None) == (group is None):
            _refuse("kill takes an id (a process id or name) or a group, one of them")
        arguments = {"id": id, "group": group, "signal": signal, "graceMs": graceMs}
        arguments = {key: value for key, value in arguments.items() if value is not None}
        async with calls.process_space(ctx, Call("kill", arguments, id)) as executor:
            if group is not None:
                result = await run(executor.kill_group(group, signal, grace_ms=graceMs))
            else:
                assert id is not None
                result = await run(executor.kill(id, signal, grace_ms=graceMs))
        forced = "" if result.forced is None else f" ({'forced with SIGKILL' if result.forced else 'ended in time'})"
        if result.members is not None:
            rows = "\n".join(f"{member.pid}: {render.status_text(member)}" for member in result.members)
            return render.reply(result, f"Sent {result.sent} to group {result.group}{forced}:\n{rows}")
        return render.reply(result, f"Sent {result.sent} to {result.pid}: {render.status_text(result)}{forced}.")


def _refuse(message: str) -> NoReturn:
    """End the call with an invalid_input error saying ``message``."""
    raise ToolError(str(InvalidInput(message)))


def _redacted(report: Progress | None, secret: str | None) -> Progress | None:
    """``report`` with ``secret`` cut out of the output lines it carries."""
    if report is None or not secret or len(secret) < REDACTED_MIN:
        return report
    reporting = report

    async def redacted(elapsed_s: float, total_s: float, latest: str) -> None:
        await reporting(elapsed_s, total_s, latest.replace(secret, "[the user's answer]"))

    return redacted


def _without(result: StdinResult, secret: str) -> StdinResult:
    """``result`` with ``secret`` cut out of the output it carries (the program might print it); one of
    fewer than REDACTED_MIN characters is left (cutting it out would say where it occurs)."""
    if len(secret) < REDACTED_MIN:
        return result
    changes = {
        name: value.replace(secret, "[the user's answer]")
        for name in ("stdout", "stderr")
        if isinstance(value := getattr(result, name), str) and secret in value
    }
    return result.model_copy(update=changes)
