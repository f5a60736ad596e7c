"""What every tool call goes through besides its tool: the caller's space, the audit record, the call
counter, and cancellation when its HTTP client goes away."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError

from ..core.executor import PortLink, ProcessExecutor
from ..core.registry import unknown_process
from ..core.waiting import Progress
from ..errors import ProcessMcpError
from ..policy.audit import monotonic_ms
from .auth import principal_of
from .spaces import Spaces, space_name
from .toolserver import error_code

_T = TypeVar("_T")


class Calls:
    """How a tool reaches its caller's executor (``space``, ``process_space``), one call at a time."""

    def __init__(self, spaces: Spaces) -> None:
        self._spaces = spaces

    @asynccontextmanager
    async def space(
        self, ctx: Context[Any, Any] | None, call: Call, *, create: bool = True
    ) -> AsyncIterator[ProcessExecutor | None]:
        """The caller's executor, for one call, which is audited; the call is cancelled if its HTTP client
        disconnects (its processes keep running), so a wait nobody will read costs nothing."""
        audit = self._spaces.audit
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
                    async with self._spaces.use(principal, create=create, spawning=call.tool == "spawn") as executor:
                        yield executor
                except ProcessMcpError as exc:
                    raise ToolError(str(exc)) from exc
                finally:
                    if disconnect is not None:
                        disconnect.unwatch(scope)
            if scope.cancelled_caught:
                raise ToolError("client_disconnected: the call was abandoned (its processes keep running)")
        except ToolError as exc:
            outcome = error_code(exc)
            raise
        except anyio.get_cancelled_exc_class():
            outcome = "cancelled"
            raise
        finally:
            self._spaces.metrics.calls.labels(call.tool, outcome).inc()
            if audit is not None:
                audit.write(
                    {
                        "event": "call",
                        "principal": principal,
                        "tool": call.tool,
                        "arguments": audited_arguments(call.arguments, self._spaces.config.audit.redact),
                        "outcome": outcome,
                        "pid": call.pid,
                        "durationMs": monotonic_ms(began),
                    }
                )

    @asynccontextmanager
    async def process_space(self, ctx: Context[Any, Any] | None, call: Call) -> AsyncIterator[ProcessExecutor]:
        """The caller's executor for a call on a process; a caller without a space has no processes, and
        another caller's id is unknown here exactly as one that never existed."""
        async with self.space(ctx, call, create=False) as executor:
            if executor is None:
                raise ToolError(str(unknown_process(call.pid or "", self._spaces.prefix)))
            yield executor


async def run(operation: Awaitable[_T]) -> _T:
    """``operation``'s result; a library error becomes the tool's error, its code first."""
    try:
        return await operation
    except ProcessMcpError as exc:
        raise ToolError(str(exc)) from exc


@dataclass
class Call:
    """One tool call, as the audit log records it."""

    tool: str
    arguments: dict[str, Any]
    pid: str | None = None


def audited_arguments(arguments: dict[str, Any], redact: bool) -> dict[str, Any]:
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


def _request_scope(ctx: Context[Any, Any] | None) -> dict[str, object] | None:
    if ctx is None:
        return None
    try:
        request = ctx.request_context.request
    except ValueError:  # not within a request
        return None
    scope = getattr(request, "scope", None)
    return scope if isinstance(scope, dict) else None


def _disconnect(ctx: Context[Any, Any] | None) -> Disconnect | None:
    scope = _request_scope(ctx)
    found = scope.get(DISCONNECTED) if scope is not None else None
    return found if isinstance(found, Disconnect) else None


def _principal(ctx: Context[Any, Any] | None) -> str | None:
    """Who is calling (``principal_of`` the request); None for the local caller (stdio, in-process)."""
    scope = _request_scope(ctx)
    return principal_of(scope) if scope is not None else None


def port_link(ctx: Context[Any, Any] | None, spaces: Spaces) -> PortLink | None:
    """Where an HTTP caller reaches its processes' ports: URLs of the server's proxy (``ports``), under the
    address its request came to; None for a local caller (stdio, in-process)."""
    scope = _request_scope(ctx)
    if scope is None:
        return None
    principal = principal_of(scope)
    return spaces.links.link(scope, None if principal is None else space_name(principal))


def progress(ctx: Context[Any, Any] | None, what: str) -> Progress | None:
    """Progress notifications for a wait, when the client asked for them (the SDK drops them otherwise)."""
    if ctx is None:
        return None
    context = ctx

    async def report(elapsed_s: float, total_s: float, latest: str) -> None:
        said = f": {latest}" if latest else ""
        await context.report_progress(elapsed_s, total_s, f"waiting on {what}: {elapsed_s:.0f} of {total_s:g} s{said}")

    return report
