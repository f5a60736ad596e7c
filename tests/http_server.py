"""A real process-mcp HTTP server on a loopback port, and MCP clients for it, for the tests."""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
import uvicorn
from anyio.abc import Process
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from .helpers import WAIT_S

SERVING = re.compile(r"serving on (http://[^\s\"]+/mcp)")


class HttpServer:
    """A server process and what it logged."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.url = ""
        self.log: list[str] = []

    @property
    def base(self) -> str:
        return self.url.removesuffix("/mcp")

    def logged(self, fragment: str) -> bool:
        return any(fragment in line for line in self.log)

    async def wait_logged(self, fragment: str) -> None:
        with anyio.move_on_after(WAIT_S):
            while not self.logged(fragment):
                await anyio.sleep(0.02)
            return
        pytest.fail(f"the server did not log {fragment!r} within {WAIT_S}s; its log:\n" + "\n".join(self.log))

    async def stop(self, signum: int = signal.SIGTERM) -> int:
        """Send ``signum`` and wait for the server to exit; its exit status."""
        if self.process.returncode is None:
            self.process.send_signal(signal.Signals(signum))
        with anyio.move_on_after(WAIT_S * 2):
            return await self.process.wait()
        self.process.kill()
        pytest.fail(f"the server did not exit within {WAIT_S * 2}s of {signal.Signals(signum).name}")


def write_tokens(path: Path, tokens: dict[str, str]) -> Path:
    path.write_text("".join(f"{principal} {token}\n" for principal, token in tokens.items()))
    path.chmod(0o600)
    return path


TEST_DOMAINS = "example.com"
"""The domain list test servers get unless a test sets one: several principals on the host need one (each
sandbox then has a network namespace of its own); the tests' processes reach no domain."""


def server_environment(workdir: Path, **settings: str) -> dict[str, str]:
    return {
        **os.environ,
        "DEFAULT_WORKDIR": str(workdir),
        "PROCESS_TRANSPORT": "http",
        "PROCESS_HTTP_PORT": "0",
        "SANDBOX_ALLOWED_DOMAINS": TEST_DOMAINS,
        **settings,
    }


@asynccontextmanager
async def http_server(workdir: Path, options: Sequence[str] = (), **settings: str) -> AsyncIterator[HttpServer]:
    """Start ``python -m process_mcp`` (with command-line ``options``) over HTTP on a free loopback port
    with ``settings`` in its environment; stop it with SIGTERM afterwards (and check it ended cleanly)."""
    process = await anyio.open_process(
        [sys.executable, "-m", "process_mcp", *options],
        env=server_environment(workdir, **settings),
        stdin=None,
        stdout=None,
        stderr=-1,
    )
    server = HttpServer(process)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(_collect_log, server)
        try:
            with anyio.move_on_after(WAIT_S * 2):
                while not server.url:
                    if process.returncode is not None:
                        pytest.fail("the server exited at start:\n" + "\n".join(server.log))
                    await anyio.sleep(0.02)
            if not server.url:
                pytest.fail("the server did not start serving:\n" + "\n".join(server.log))
            try:
                yield server
            except BaseException:
                print("the server's log:", *server.log, sep="\n", file=sys.stderr)  # shown with the failure
                raise
            assert await server.stop() == 0, "\n".join(server.log)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            tasks.cancel_scope.cancel()


@asynccontextmanager
async def serving_in_process(server: uvicorn.Server) -> AsyncIterator[str]:
    """Serve ``server`` (configured for a free loopback port) in this process while inside: its /mcp URL."""
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(server.serve)
        try:
            with anyio.fail_after(WAIT_S):
                while not server.started:
                    await anyio.sleep(0.02)
            yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/mcp"
        finally:
            server.should_exit = True


async def _collect_log(server: HttpServer) -> None:
    assert server.process.stderr is not None
    pending = b""
    async for chunk in server.process.stderr:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            text = line.decode(errors="replace")
            server.log.append(text)
            found = SERVING.search(text)
            if found and not server.url:
                server.url = found.group(1)


async def run_server_to_exit(workdir: Path, **settings: str) -> tuple[int, str]:
    """Run a server that is expected to refuse to start: its exit status and its log."""
    with anyio.fail_after(WAIT_S * 2):
        result = await anyio.run_process(
            [sys.executable, "-m", "process_mcp"], env=server_environment(workdir, **settings), check=False
        )
    return result.returncode, result.stderr.decode(errors="replace")


@asynccontextmanager
async def mcp_client(url: str, token: str | None, *, mode: str = "legacy", **options: Any) -> AsyncIterator[Client]:
    """An MCP Python SDK client on streamable HTTP; ``mode`` legacy (2025 handshake) or 2026-07-28."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    http = create_mcp_http_client(headers=headers)
    async with http, Client(streamable_http_client(url, http_client=http), mode=mode, **options) as client:
        yield client
