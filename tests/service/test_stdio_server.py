"""The installed server over a real stdio pipe, as an MCP client launches it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from mcp import Client, StdioServerParameters

from process_mcp.service.stdio import LINE_LIMIT

from ..helpers import WAIT_S, kill_if_alive, machine_can_sandbox, sleep_argument, sleepers, wait_until_gone

pytestmark = pytest.mark.anyio


def server_params(workdir: Path, **env: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "process_mcp"],
        env={"DEFAULT_WORKDIR": str(workdir), "SANDBOX_HOMES_DIR": os.environ["SANDBOX_HOMES_DIR"], **env},
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
        assert tree.structured_content["sandboxed"] is machine_can_sandbox()
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


def start_server(workdir: Path, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "process_mcp"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "DEFAULT_WORKDIR": str(workdir), **env},
    )


async def stop_server(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        server.terminate()
    with anyio.fail_after(WAIT_S):
        await anyio.to_thread.run_sync(server.wait, abandon_on_cancel=True)
    for stream in (server.stdin, server.stdout, server.stderr):
        if stream is not None:
            stream.close()


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


async def initialize(server: subprocess.Popen[bytes]) -> None:
    """The session's handshake, as a client makes it."""
    await send(server, INITIALIZE, INITIALIZED)
    await read_until(server, b'"id":1')


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
async def test_a_stop_signal_ends_the_server_and_every_process_group_it_started(
    workdir: Path, stop: signal.Signals
) -> None:
    server = start_server(workdir)
    arg = sleep_argument()
    tree_pids: list[int] = []
    try:
        await initialize(server)
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


async def test_a_cancelled_wait_stops_and_the_server_keeps_serving(workdir: Path) -> None:
    server = start_server(workdir)
    try:
        await initialize(server)
        await send(server, tool_call(2, "spawn", '{"command":"sleep 60","background":true}'))
        await read_until(server, b'"id":2')
        waiting = tool_call(3, "stdout", '{"id":"host-1","waitFor":"never","waitMs":30000}', progress="cancel-me")
        await send(server, waiting)
        assert b"cancel-me" in await read_until(server, b"notifications/progress")  # it is waiting
        await send(server, '{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":3}}')
        # A second wait, longer than the first one's progress interval: had the cancelled wait gone on,
        # its progress would show up before this reply.
        await send(server, tool_call(4, "stdout", '{"id":"host-1","waitFor":"never","waitMs":2500}'))
        seen = []
        while True:
            line = await read_until(server, b"")
            assert line, "the server closed its output"
            if b'"id":4' in line:
                break
            seen.append(line)
        assert b'"waitResult":"timeout"' in line
        assert b'"status":"running"' in line
        assert not [m for m in seen if b"cancel-me" in m or b'"id":3' in m]
    finally:
        await stop_server(server)


def tool_call(request_id: int, name: str, arguments: str, *, progress: str | None = None) -> str:
    meta = f',"_meta":{{"progressToken":"{progress}"}}' if progress else ""
    return (
        f'{{"jsonrpc":"2.0","id":{request_id},"method":"tools/call",'
        f'"params":{{"name":"{name}","arguments":{arguments}{meta}}}}}'
    )


async def test_a_bad_environment_stops_the_server_with_a_message_naming_the_variable(workdir: Path) -> None:
    with anyio.fail_after(WAIT_S * 3):
        result = await anyio.run_process(
            [sys.executable, "-m", "process_mcp"], env={**os.environ, "PROCESS_MODE": "vm"}, check=False
        )
    assert result.returncode == 2
    assert b"invalid_config" in result.stderr
    assert b"PROCESS_MODE" in result.stderr
    assert result.stdout == b""


async def test_while_serving_stdin_and_stdout_point_away_from_the_wire(workdir: Path) -> None:
    """A stray read of stdin or print to stdout, in the server or a library it uses, cannot take a
    request or corrupt a reply: fd 0 is the null device and fd 1 is stderr while it serves."""
    server = start_server(workdir)
    try:
        await initialize(server)
        fds = Path(f"/proc/{server.pid}/fd")
        assert os.readlink(fds / "0") == os.devnull
        assert os.readlink(fds / "1") == os.readlink(fds / "2")
        await send(server, tool_call(2, "spawn", '{"command":"echo still served"}'))
        assert b"still served" in await read_until(server, b'"id":2')
    finally:
        await stop_server(server)


async def test_a_request_over_the_limit_is_refused_with_its_id_and_the_server_keeps_serving(workdir: Path) -> None:
    server = start_server(workdir)
    try:
        await initialize(server)
        # Just over (its end comes in the read that crosses the limit) and far over (skipped to its end).
        for request_id, size in ((2, LINE_LIMIT + 1024), (3, LINE_LIMIT * 3 // 2)):
            oversized = tool_call(request_id, "stdin", '{"id":"host-1","input":"' + "x" * size + '"}')
            await send(server, oversized)
            refused = await read_until(server, f'"id": {request_id}'.encode())
            assert b"invalid_input: this request is over 16 MiB" in refused
            assert b"several stdin calls" in refused
        # One four times the limit is not held whole, only read through.
        peak = peak_rss_mib(server.pid)
        await send(server, tool_call(4, "stdin", '{"id":"host-1","input":"' + "x" * LINE_LIMIT * 4 + '"}'))
        await read_until(server, b'"id": 4')
        assert peak_rss_mib(server.pid) - peak < 2 * LINE_LIMIT / 2**20
        # One whose own id comes after its params gets no answer rather than one with a wrong id.
        params_first = '{"jsonrpc":"2.0","method":"tools/call","params":{"name":"stdin","arguments":'
        params_first += '{"id":"host-1","input":"' + "x" * (LINE_LIMIT + 1024) + '"}},"id":5}'
        await send(server, params_first, tool_call(6, "spawn", '{"command":"echo still served"}'))
        reply = await read_until(server, b'"id":')
        assert b'"id":6' in reply
        assert b"still served" in reply
    finally:
        await stop_server(server)


async def test_a_line_that_is_not_json_gets_a_parse_error_and_the_server_keeps_serving(workdir: Path) -> None:
    server = start_server(workdir)
    try:
        await initialize(server)
        await send(server, "this is not json", '{"jsonrpc": "2.0", "id": 2,', tool_call(3, "ps", "{}"))
        for _ in range(2):
            refused = json.loads(await read_until(server, b'"id": null'))
            assert refused["error"]["code"] == -32700, refused
            assert "not JSON" in refused["error"]["message"]
        assert b'"id":3' in await read_until(server, b'"id":3')
        assert server.stdin is not None
        server.stdin.close()  # the server ends; its log is then complete
        assert server.stderr is not None
        log = await anyio.to_thread.run_sync(server.stderr.read)
        assert b"a request line is not JSON" in log
    finally:
        await stop_server(server)


def peak_rss_mib(pid: int) -> float:
    """The most memory ``pid`` has held resident, in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


async def start_sleeper(server: subprocess.Popen[bytes], request_id: int = 2) -> int:
    """Initialize the session and start a background `sleep` through it; return the sleeper's pid."""
    arg = sleep_argument()
    await initialize(server)
    await send(server, tool_call(request_id, "spawn", f'{{"command":"sleep {arg}","background":true}}'))
    await read_until(server, f'"id":{request_id}'.encode())
    return (await sleepers(arg, 1))[0]


async def test_a_client_that_reads_no_replies_holds_up_its_replies_not_the_server(workdir: Path) -> None:
    """Replies the client does not read wait; the server meanwhile goes on enforcing a lifetime."""
    server = start_server(workdir, PROCESS_MAX_LIFETIME_S="1")
    tree_pids: list[int] = []
    try:
        tree_pids.append(await start_sleeper(server))
        # Replies of about 100 KiB each, far more than the pipe holds, and none of them read yet.
        big = '{"command":"head -c 200000 /dev/zero | tr \'\\\\0\' x"}'
        for request_id in range(3, 103):
            await send(server, tool_call(request_id, "spawn", big))
        await wait_until_gone(tree_pids[0])  # ended by its lifetime while the replies wait
        last = await read_until(server, b'"id":102')
        assert b'"exitCode":0' in last
    finally:
        await stop_server(server)
        for pid in tree_pids:
            kill_if_alive(pid)


async def test_a_client_that_closes_the_servers_stdout_is_gone_and_its_processes_end(workdir: Path) -> None:
    server = start_server(workdir)
    tree_pids: list[int] = []
    try:
        tree_pids.append(await start_sleeper(server))
        assert server.stdout is not None
        server.stdout.close()
        await send(server, tool_call(3, "ps", "{}"))  # its reply finds no reader
        with anyio.fail_after(WAIT_S):
            code = await anyio.to_thread.run_sync(server.wait, abandon_on_cancel=True)
        assert code == 0
        await wait_until_gone(tree_pids[0])
    finally:
        await stop_server(server)
        for pid in tree_pids:
            kill_if_alive(pid)


async def test_requests_from_a_file_are_served_through_the_sdks_own_reading(workdir: Path, tmp_path: Path) -> None:
    """Stdin that is not a pipe or socket (a file here, a terminal by hand) is read as the SDK reads it."""
    requests = tmp_path / "requests.jsonl"
    requests.write_text(f"{INITIALIZE}\n{INITIALIZED}\n{tool_call(2, 'ps', '{}')}\n")
    with requests.open("rb") as stdin, anyio.fail_after(WAIT_S * 3):
        result = await anyio.run_process(
            [sys.executable, "-m", "process_mcp"],
            stdin=stdin,
            env={**os.environ, "DEFAULT_WORKDIR": str(workdir)},
            check=False,
        )
    assert result.returncode == 0, result.stderr.decode()
    assert b'"id":1' in result.stdout
