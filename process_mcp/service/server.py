"""Assembling a server: the callers' spaces for the configured mode, behind the five MCP tools."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import TracebackType
from typing import TYPE_CHECKING

import anyio
from mcp.server import MCPServer

from ..backends import create_executor
from ..config import ProcessMcpConfig, load_config
from ..core.executor import ProcessExecutor
from ..policy.audit import AuditLog
from ..version import version_string
from .metrics import Metrics
from .spaces import Spaces
from .tools import INSTRUCTIONS, register_tools
from .toolserver import ToolServer

if TYPE_CHECKING:
    from starlette.types import ASGIApp


class ProcessMcpServer:
    """An MCP server and the spaces behind it. ``cleanup`` ends every process it started.

    Serve it on stdio with ``server.run_stdio_async()``, over HTTP with ``serve_http``, or mount
    ``http_app()`` in an ASGI application.
    """

    def __init__(self, server: MCPServer, spaces: Spaces) -> None:
        self.server = server
        self.spaces = spaces

    @property
    def metrics(self) -> Metrics:
        """What the server counts (Prometheus), served at /metrics over HTTP."""
        return self.spaces.metrics

    @property
    def config(self) -> ProcessMcpConfig:
        return self.spaces.config

    @property
    def executor(self) -> ProcessExecutor:
        """The local caller's executor: the one every call uses over stdio and HTTP without authentication."""
        return self.spaces.local.executor

    def http_app(self, *, authenticate: bool = True) -> ASGIApp:
        """The streamable HTTP application, at ``/mcp``.

        With ``authenticate`` (the default) it checks bearer tokens as configured (``ServiceConfig``) and
        answers 401 without one. Without it, the application that mounts it authenticates: each
        authenticated ``request.user`` (its ``display_name``) gets its own space, and a request its
        middleware did not authenticate gets 401. Run ``serving()`` in the mounting application's lifespan.
        Raises InvalidConfig when the authentication settings are incomplete or unsafe, or
        when several principals would share a network (on the host, without a domain list).
        """
        from .http import build_app

        return build_app(self, authenticate=authenticate)

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        """What the HTTP application needs while it runs: the SDK's session manager and the reclaiming of
        idle principals' spaces. It is ``http_app()``'s lifespan; an application that mounts that app
        runs it in its own lifespan (Starlette does not run a mounted app's lifespan)."""
        async with self.server.session_manager.run(), anyio.create_task_group() as tasks:
            tasks.start_soon(self.spaces.reclaim_forever)
            try:
                yield
            finally:
                tasks.cancel_scope.cancel()

    async def serve_http(
        self, host: str | None = None, port: int | None = None, *, stop: anyio.Event | None = None
    ) -> None:
        """Serve over HTTP (default: the configured host and port) until ``stop`` is set or the task is
        cancelled. Raises InvalidConfig for an unsafe setup, e.g. no authentication off loopback."""
        from .http import prepare, serve

        await serve(self, prepare(self, host, port), stop=stop)

    async def cleanup(self) -> None:
        """End every process of every caller, then write out the audit log (which records those ends)."""
        await self.spaces.cleanup()
        if self.spaces.audit is not None:
            await self.spaces.audit.close()

    async def __aenter__(self) -> ProcessMcpServer:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.cleanup()


async def create_process_mcp(config: ProcessMcpConfig | None = None) -> ProcessMcpServer:
    """Build a server for ``config`` (by default, read from the environment) with its backend ready.

    Over stdio the backend is started now, so a broken setup stops the server at once; over HTTP each
    principal's space starts on its first call. Raises BackendUnavailable if the backend cannot be
    prepared, InvalidConfig for a bad environment.
    """
    config = config or load_config()
    audit = None
    if config.audit.path is not None:
        audit = AuditLog(config.audit)
        audit.start()
    spaces = Spaces(config, create_executor, audit)
    if config.service.transport == "stdio":
        try:
            await spaces.start_local()
        except BaseException:
            if audit is not None:
                await audit.close()
            raise
    server = ToolServer("process-mcp", version=version_string(), instructions=INSTRUCTIONS)
    register_tools(server, spaces)
    server.close_schemas()
    return ProcessMcpServer(server, spaces)
