"""The text of each tool's reply: what most clients show the model, beside the structured content."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from mcp_types import CallToolResult, TextContent
from pydantic import BaseModel

from ..core.models import ExitState, ProcessInfo, ProcessOutput, ProcessStats, SpawnResult, StdinResult


def reply(result: BaseModel, text: str, *, exclude: dict[str, Any] | None = None) -> CallToolResult:
    return CallToolResult(
        content=[TextContent(type="text", text=text)],
        # Fields without a value (exitCode while running, signal, limit, ...) are left out, as the
        # original left them out, rather than sent as null on every row of every reply.
        structured_content=result.model_dump(mode="json", by_alias=True, exclude_none=True, exclude=exclude),
    )


def status_text(state: ExitState) -> str:
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


def ps_text(processes: list[ProcessInfo]) -> str:
    """One short line per process (what the structured rows say in full): a first line says what the rows
    share (confinement, and the day and working directory of most of them), which a row repeats only
    where it differs."""
    if not processes:
        return "No processes. Start one with spawn."
    cwd = _most_common(p.cwd for p in processes)
    day = _most_common(p.created_at[:10] for p in processes)
    confined = {p.sandboxed for p in processes}
    shared = f", {confinement(confined.pop())}" if len(confined) == 1 else ""
    count = f"{len(processes)} process{'es' if len(processes) > 1 else ''}"
    lines = [f"{count}{shared}; started on {day} (UTC) in {cwd} unless a row says otherwise:"]
    for p in processes:
        started = p.created_at[11:19] if p.created_at.startswith(day) else p.created_at[:19]
        shown = (("name", p.name), ("group", p.group), ("health", p.health), ("restarts", p.restarts))
        labels = "".join(f"{key}={value}  " for key, value in shown if value is not None)
        row = f"{p.pid}  {labels}{status_text(p)}  {'tty' if p.tty else 'pipe'}  {started}  {usage(p.stats)}"
        if not shared:
            row += f"{confinement(p.sandboxed)}  "
        if p.cwd != cwd:
            row += f"cwd={p.cwd}  "
        for listened in p.ports or ():
            row += f"port {listened.port}{f' at {listened.url}' if listened.url else ''}  "
        lines.append(f"{row}$ {p.command}")
    return "\n".join(lines)


def _most_common(values: Iterable[str]) -> str:
    return Counter(values).most_common(1)[0][0]


def usage(stats: ProcessStats | None) -> str:
    if stats is None:
        return ""
    return f"cpu={stats.cpu_seconds:g}s ({stats.cpu_percent:g}%) rss={stats.rss_bytes / 1048576:.1f}MiB  "


def headline(pid: str, state: ExitState) -> str:
    return f"{pid}: {status_text(state)}"


def waited(result: SpawnResult | StdinResult | ProcessOutput) -> str:
    if result.wait_result == "input":
        if result.secret:
            return (
                "; wait ended: input: it waits for a secret typed without echo (a password prompt); ask the user "
                "with stdin askUser rather than typing one yourself"
            )
        return "; wait ended: input: it waits to read its input; answer with stdin"
    return "" if result.wait_result is None else f"; wait ended: {result.wait_result}"


def held_back(result: SpawnResult | ProcessOutput, tty: bool) -> str:
    """Why a wait on a pipe may have seen nothing: programs buffer output that is not a terminal."""
    quiet = result.wait_result == "timeout" and result.status == "running" and not result.stopped
    if tty or not quiet or result.cursor or result.stderr_cursor:
        return ""
    return (
        "\nno output yet: a program writing to a pipe may hold its output in a buffer until it has a few KiB or "
        "exits (C stdio, Python without PYTHONUNBUFFERED, Node's pipes); spawn it with tty: true, or use its own "
        "flag to flush (python3 -u, stdbuf -oL, grep --line-buffered)"
    )


def read_only_note(result: SpawnResult, sandboxed: bool) -> str:
    """Which protection a "Read-only file system" in a sandboxed process's output most likely met, and
    which setting opens it: the model otherwise guesses (and often retries the same write)."""
    output = result.stdout + result.stderr
    if not sandboxed or "Read-only file system" not in output:
        return ""
    if ".git/" in output or ".git:" in output or "lock config file" in output:
        return (
            "\nread-only: the sandbox holds each repository's .git read-only (a protected path: git runs hooks "
            "and settings from it later, outside the sandbox), so git can read but not commit; "
            "SANDBOX_ALLOW_PROTECTED=.git lets processes commit, with .git/hooks and .git/config still read-only"
        )
    return (
        "\nread-only: the sandbox writes only in the workspace (DEFAULT_WORKDIR), SANDBOX_ALLOW_WRITE, /tmp and "
        "HOME; inside them, paths that make other programs run code later (.git, shell rc files, .vscode, "
        ".ssh, .local/bin...) and SANDBOX_DENY_WRITE are read-only; SANDBOX_ALLOW_PROTECTED names a "
        "protected name to open"
    )


def stopped_note(state: SpawnResult | StdinResult | ProcessOutput) -> str:
    """What a stopped process needs, said where a wait on it would otherwise just time out."""
    if not state.stopped:
        return ""
    return (
        f"\n{state.pid} is stopped (by SIGSTOP, or SIGTSTP, SIGTTIN, SIGTTOU): it does nothing, and prints nothing, "
        "until it is continued; send SIGCONT to continue it (kill with signal SIGCONT)"
    )


def cursor_line(result: SpawnResult | StdinResult | ProcessOutput) -> str:
    """The cursors, and where the whole output is kept in the box."""
    line = f"cursor: {result.cursor}, stderrCursor: {result.stderr_cursor}"
    files = (("outputFile", result.output_file), ("stderrFile", result.stderr_file))
    kept = [f"{name} {path}" for name, path in files if path]
    return f"{line}; whole output in the box: {', '.join(kept)}" if kept else line


def confinement(sandboxed: bool) -> str:
    return "sandboxed" if sandboxed else "not sandboxed"


def section(label: str, body: str) -> str:
    return f"--- {label} ---\n{body}" if body else f"--- {label} (empty) ---"
