"""The installed server over a real stdio pipe, as an MCP client launches it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from mcp import Client, StdioServerParameters

from .helpers import WAIT_S, kill_if_alive, sleep_argument, sleepers, wait_until_gone

pytestmark = pytest.mark.anyio


def server_params(workdir: Path, **env: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable, args=["-m", "process_mcp"], env={"DEFAULT_WORKDIR": str(workdir), **env}
    )


async def test_a_client_drives_the_server_over_stdio_and_disconnecting_ends_its_processes(workdir: Path) -> None:
    async with Client(server_params(workdir), read_timeout_seconds=WAIT_S) as client:
        assert client.server_info is not None
        assert client.server_info.name == "process-mcp"
        echo = await client.call_tool("spawn", {"command": "echo over stdio; pwd"})
        assert echo.structured_content is not None
        assert echo.structured_content["stdout"] == f"over stdio\n{workdir}\n"
        arg = sleep_argument()
        tree = await client.call_tool(
            "spawn", {"command": f"sleep {arg} & trap '' TERM; sleep {arg}", "timeoutMs": 500}
        )
        assert tree.structured_content is not None
        assert tree.structured_content["status"] == "running"
        assert tree.structured_content["sandboxed"] is True
        tree_pids = await sleepers(arg, 2)
        listed = await client.call_tool("ps", {})
        assert listed.structured_content is not None
        assert len(listed.structured_content["processes"]) == 2
    try:
        for pid in tree_pids:
            await wait_until_gone(pid)
    finally:
        for pid in tree_pids:
            kill_if_alive(pid)


def start_server(workdir: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "process_mcp"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "DEFAULT_WORKDIR": str(workdir)},
    )


async def send(server: subprocess.Popen[bytes], *messages: str) -> None:
    assert server.stdin is not None
    server.stdin.write(b"".join(m.encode() + b"\n" for m in messages))
    server.stdin.flush()


async def read_until(server: subprocess.Popen[bytes], fragment: bytes) -> bytes:
    assert server.stdout is not None
    stream = server.stdout
    with anyio.fail_after(WAIT_S):
        while True:
            line = await anyio.to_thread.run_sync(stream.readline, abandon_on_cancel=True)
            if fragment in line or not line:
                return line


INITIALIZE = (
    '{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18",'
    '"capabilities":{},"clientInfo":{"name":"raw","version":"0"}}}'
)
INITIALIZED = '{"jsonrpc":"2.0","method":"notifications/initialized"}'


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
async def test_a_stop_signal_ends_the_server_and_every_process_group_it_started(
    workdir: Path, stop: signal.Signals
) -> None:
    server = start_server(workdir)
    arg = sleep_argument()
    tree_pids: list[int] = []
    try:
        await send(server, INITIALIZE, INITIALIZED)
        await read_until(server, b'"id":1')
        spawn = (
            '{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"spawn","arguments":'
            f'{{"command":"sleep {arg} & sleep {arg}","timeoutMs":300}}}}}}'
        )
        await send(server, spawn)
        await read_until(server, b'"id":2')
        tree_pids = await sleepers(arg, 2)
        server.send_signal(stop)
        with anyio.fail_after(WAIT_S):
            code = await anyio.to_thread.run_sync(server.wait, abandon_on_cancel=True)
        assert code == 0
        for pid in tree_pids:
            await wait_until_gone(pid)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        for pid in tree_pids:
            kill_if_alive(pid)
        for stream in (server.stdin, server.stdout, server.stderr):
            if stream is not None:
                stream.close()


async def test_a_bad_environment_stops_the_server_with_a_message_naming_the_variable(workdir: Path) -> None:
    with anyio.fail_after(WAIT_S * 3):
        result = await anyio.run_process(
            [sys.executable, "-m", "process_mcp"], env={**os.environ, "PROCESS_MODE": "vm"}, check=False
        )
    assert result.returncode == 2
    assert b"invalid_config" in result.stderr
    assert b"PROCESS_MODE" in result.stderr
    assert result.stdout == b""
