"""The five tools as an MCP client sees them, in memory, against a real host executor (and a Docker one for
the size of ps)."""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from process_mcp import ProcessMcpServer, create_process_mcp
from process_mcp.config import SandboxConfig, default_host_workspace

from ..helpers import (
    WAIT_S,
    backend_config,
    call,
    cannot_run_here,
    error,
    host_config,
    machine_can_sandbox,
    text_of,
)

pytestmark = pytest.mark.anyio

CONFINEMENT = "sandboxed" if machine_can_sandbox() else "not sandboxed"
"""How the replies describe a host process on this machine."""


@pytest.fixture
async def client(workdir: Path) -> AsyncIterator[Client]:
    mcp: ProcessMcpServer = await create_process_mcp(host_config(workdir))
    async with mcp, Client(mcp.server, read_timeout_seconds=WAIT_S) as connected:
        yield connected


async def test_the_five_tools_keep_the_original_parameters_and_only_add_optional_ones(client: Client) -> None:
    tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    assert set(tools) == {"spawn", "ps", "stdin", "stdout", "kill"}
    spawn = tools["spawn"].input_schema
    original = {"command", "cwd", "env", "tty", "background", "timeoutMs"}
    services = {"name", "group", "ready", "health", "restart"}
    assert set(spawn["properties"]) == original | {"waitFor", "idleMs", "limits"} | services
    assert spawn["required"] == ["command"]
    stdin = tools["stdin"].input_schema
    assert set(stdin["properties"]) == {"id", "input", "waitFor", "idleMs", "waitMs", "eof", "askUser"}
    assert stdin["required"] == ["id", "input"]
    stdout = tools["stdout"].input_schema
    waits = {"waitFor", "idleMs", "waitMs", "untilExit"}
    assert set(stdout["properties"]) == {"id", "lines", "since", "stderrSince", "raw", "maxBytes", "history"} | waits
    assert stdout["required"] == ["id"]
    assert set(tools["kill"].input_schema["properties"]) == {"id", "signal", "graceMs", "group"}
    assert tools["kill"].input_schema["properties"]["signal"]["default"] == "SIGTERM"
    assert set(tools["ps"].input_schema["properties"]) == {"stats", "group"}
    assert "required" not in tools["ps"].input_schema
    for tool in tools.values():
        assert tool.output_schema is not None
        assert tool.description
        assert len(tool.description) > 80
    spawn_schema = tools["spawn"].output_schema
    assert spawn_schema is not None
    assert "exitCode" in spawn_schema["properties"]


async def test_spawn_replies_with_structured_content_and_readable_text(client: Client) -> None:
    result = await client.call_tool("spawn", {"command": "echo out; echo err >&2; exit 3"})
    assert not result.is_error
    assert result.structured_content is not None
    kept = posixpath.dirname(result.structured_content["outputFile"])  # the agent's directory in the box
    assert re.fullmatch(r"/tmp/process-mcp-[0-9]+-[0-9]+", kept), kept
    assert result.structured_content == {
        "pid": "host-1",
        "status": "terminated",
        "exitCode": 3,
        "endedBy": "exit",
        "stdout": "out\n",
        "stderr": "err\n",
        "sandboxed": machine_can_sandbox(),
        "via": "host",
        "cursor": 4,
        "stderrCursor": 4,
        "outputFile": f"{kept}/host-1.out",
        "stderrFile": f"{kept}/host-1.err",
    }  # fields without a value (signal, limit, waitResult) are left out
    expected = (
        f"host-1: terminated (exit code 3), {CONFINEMENT}\ncursor: 4, stderrCursor: 4; whole output in the box: "
        f"outputFile {kept}/host-1.out, stderrFile {kept}/host-1.err\n"
        "--- stdout ---\nout\n\n--- stderr ---\nerr\n"
    )
    assert text_of(result) == expected


async def test_a_tty_session_driven_through_the_tools(client: Client) -> None:
    started = await call(client, "spawn", {"command": "python3 -q", "tty": True, "timeoutMs": 1000})
    assert started["status"] == "running"
    pid = started["pid"]
    await call(client, "stdin", {"id": pid, "input": "print(6*7)\\r"})
    output: dict[str, Any] = {}
    for _ in range(200):
        output = await call(client, "stdout", {"id": pid, "lines": 5})
        if "42" in output["stdout"].splitlines():
            break
    assert "42" in output["stdout"].splitlines()
    killed = await call(client, "kill", {"id": pid, "signal": "KILL"})
    assert killed == {
        "pid": pid,
        "sent": "SIGKILL",
        "status": "terminated",
        "exitCode": 137,
        "signal": "SIGKILL",
        "endedBy": "kill",
    }


async def test_ps_lists_processes_as_text_and_structure(client: Client, workdir: Path) -> None:
    assert text_of(await client.call_tool("ps", {})) == "No processes. Start one with spawn."
    await call(client, "spawn", {"command": "sleep 30", "background": True})
    result = await client.call_tool("ps", {})
    assert result.structured_content is not None
    processes = result.structured_content["processes"]
    assert [(p["pid"], p["status"], p["command"]) for p in processes] == [("host-1", "running", "sleep 30")]
    assert {"pid", "command", "status", "cwd", "tty", "createdAt"} <= set(processes[0])
    assert not {"exitCode", "signal", "endedBy", "limit"} & set(processes[0])  # none of them while it runs
    # What every row shares is said once, for the list.
    assert (result.structured_content["sandboxed"], result.structured_content["via"]) == (machine_can_sandbox(), "host")
    assert not {"sandboxed", "via"} & set(processes[0])
    lines = text_of(result).splitlines()
    day = processes[0]["createdAt"][:10]
    assert (
        lines[0]
        == f"1 process, {CONFINEMENT}; started on {day} (UTC) in {processes[0]['cwd']} unless a row says otherwise:"
    )
    assert lines[1] == f"host-1  running  pipe  {processes[0]['createdAt'][11:19]}  $ sleep 30"
    (Path(workdir) / "sub").mkdir()
    await call(client, "spawn", {"command": "sleep 30", "background": True, "cwd": "sub"})
    assert f"cwd={Path(workdir) / 'sub'}  $ sleep 30" in text_of(await client.call_tool("ps", {})).splitlines()[2]


async def test_a_stopped_process_reads_running_stopped_and_a_wait_on_it_says_to_continue_it(client: Client) -> None:
    # A job that stops itself: the wait for its output ends at its bound, saying why and what to do.
    spawned = await client.call_tool(
        "spawn", {"command": "echo started; kill -STOP $$; echo continued", "waitFor": "continued", "timeoutMs": 1000}
    )
    assert spawned.structured_content is not None
    pid = spawned.structured_content["pid"]
    assert (spawned.structured_content["status"], spawned.structured_content["waitResult"]) == ("running", "timeout")
    assert spawned.structured_content["stopped"] is True
    assert text_of(spawned).startswith(f"{pid}: running (stopped), ")
    assert "send SIGCONT to continue it" in text_of(spawned)
    assert "buffer" not in text_of(spawned)  # not the hint for a program that holds its output back
    listed = await client.call_tool("ps", {})
    assert listed.structured_content is not None
    assert listed.structured_content["processes"][0]["stopped"] is True
    assert f"{pid}  running (stopped)  pipe  " in text_of(listed)
    waited = await client.call_tool("stdout", {"id": pid, "untilExit": True, "waitMs": 300})
    assert waited.structured_content is not None
    assert (waited.structured_content["waitResult"], waited.structured_content["stopped"]) == ("timeout", True)
    assert "send SIGCONT to continue it" in text_of(waited)
    # Continued, it runs to its end.
    continued = await client.call_tool("kill", {"id": pid, "signal": "SIGCONT"})
    assert text_of(continued) in (
        f"Sent SIGCONT to {pid}: running.",
        f"Sent SIGCONT to {pid}: terminated (exit code 0).",
    )
    finished = await call(client, "stdout", {"id": pid, "untilExit": True})
    assert (finished["status"], finished["stdout"]) == ("terminated", "started\ncontinued\n")
    assert "stopped" not in finished
    # One stopped with kill reads so at once, and a plain one leaves the field out.
    sleeper = await call(client, "spawn", {"command": "sleep 30", "background": True})
    assert text_of(await client.call_tool("kill", {"id": sleeper["pid"], "signal": "STOP"})).endswith(
        "running (stopped)."
    )
    assert text_of(await client.call_tool("kill", {"id": sleeper["pid"], "signal": "CONT"})).endswith("running.")
    assert "stopped" not in (await call(client, "ps", {}))["processes"][1]


PS_PROCESSES = 50
PS_REPLY_MAX_BYTES = 11_980
"""Most bytes a plain ps of PS_PROCESSES processes may take as the client receives it: the original
server's ~11.7 KiB."""


@pytest.fixture
def default_length_workspace() -> Iterator[str]:
    """A workspace whose path is as long as the host's default workspace (what each row's cwd repeats)."""
    base = tempfile.mkdtemp(prefix="process-mcp-test-")
    path = os.path.join(base, "w" * max(1, len(default_host_workspace()) - len(base) - 1))
    os.mkdir(path)
    try:
        yield path
    finally:
        shutil.rmtree(base)


@pytest.mark.parametrize("backend", ["host", "docker"], indirect=True)
async def test_a_plain_ps_of_fifty_processes_is_no_larger_than_the_originals(
    request: pytest.FixtureRequest, backend: str, workdir: str
) -> None:
    if backend == "host":
        config = host_config(request.getfixturevalue("default_length_workspace"))
    else:
        config = backend_config(request, backend, workdir)
    async with await create_process_mcp(config) as mcp, Client(mcp.server, read_timeout_seconds=WAIT_S) as client:
        for _ in range(PS_PROCESSES):
            await call(client, "spawn", {"command": "sleep 1000", "background": True})
        result = await client.call_tool("ps", {})
        assert result.structured_content is not None
        assert len(result.structured_content["processes"]) == PS_PROCESSES
        size = len(result.model_dump_json(by_alias=True, exclude_none=True).encode())
        assert size <= PS_REPLY_MAX_BYTES, text_of(result)


@pytest.mark.parametrize(
    ("tool", "arguments", "code", "fragments"),
    [
        ("stdout", {"id": "host-99"}, "process_not_found", ["call ps"]),
        ("kill", {"id": "host-99"}, "process_not_found", []),
        ("stdin", {"id": "host-99", "input": "x"}, "process_not_found", []),
        ("spawn", {"command": ""}, "invalid_input", ["command is empty"]),
        ("spawn", {"command": "pwd", "cwd": "/no/such/dir"}, "invalid_input", ["does not exist"]),
        ("spawn", {"command": "true", "env": {"A B": "1"}}, "invalid_input", ["environment variable name"]),
        ("spawn", {"command": "a\u0000b"}, "invalid_input", ["NUL"]),
        ("spawn", {}, "invalid_input", ["command: Field required", "spawn tool's input schema"]),
        ("spawn", {"command": 42}, "invalid_input", ["command must be a string"]),
        ("spawn", {"command": "true", "timeoutMs": -5}, "invalid_input", ["timeoutMs", "greater than or equal to 0"]),
        ("spawn", {"command": "true", "env": "X=1"}, "invalid_input", ["env must be an object"]),
        ("spawn", {"command": "true", "limits": {"memoryMb": 0}}, "invalid_input", ["limits.memoryMb"]),
        ("stdout", {"id": "host-1", "lines": -1}, "invalid_input", ["lines", "greater than or equal to 1"]),
        ("stdout", {"id": "host-1", "lines": "many"}, "invalid_input", ["lines must be an integer"]),
        ("kill", {"id": "host-1", "signal": "SIGFOO"}, "invalid_signal", ["TERM, KILL"]),
        ("stdin", {"id": "host-1"}, "invalid_input", ["input: Field required"]),
        ("run", {"command": "true"}, "invalid_input", ["no tool 'run'", "spawn, ps, stdin, stdout, kill"]),
    ],
)
async def test_bad_calls_get_errors_that_start_with_their_code_and_the_server_keeps_serving(
    client: Client, tool: str, arguments: dict[str, Any], code: str, fragments: list[str]
) -> None:
    result = await client.call_tool(tool, arguments)
    assert result.is_error
    message = text_of(result)
    assert message.startswith(f"{code}: ")
    for fragment in fragments:
        assert fragment in message
    assert result.meta is not None
    assert result.meta["process-mcp/error"] == {"code": code}
    assert (await call(client, "spawn", {"command": "echo still here"}))["stdout"] == "still here\n"


async def test_input_to_a_finished_process_is_an_error_naming_its_exit(client: Client) -> None:
    pid = (await call(client, "spawn", {"command": "exit 2"}))["pid"]
    message = await error(client, "stdin", {"id": pid, "input": "hi"})
    assert "process_terminated" in message
    assert "exit code 2" in message
    assert "process_terminated" in await error(client, "kill", {"id": pid})


async def test_a_bad_escape_is_an_error_and_the_process_survives(client: Client) -> None:
    pid = (await call(client, "spawn", {"command": "cat", "background": True}))["pid"]
    assert "not a valid escape" in await error(client, "stdin", {"id": pid, "input": "\\z"})
    sent = await call(client, "stdin", {"id": pid, "input": "fine\\n"})
    assert (sent["bytesSent"], sent["status"]) == (5, "running")


async def test_a_wait_sends_progress_notifications_when_the_client_asks(client: Client) -> None:
    started = await call(client, "spawn", {"command": "sleep 30", "background": True})
    reports: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        reports.append((progress, total, message))

    result = await client.call_tool(
        "stdout", {"id": started["pid"], "waitFor": "never", "waitMs": 2500}, progress_callback=on_progress
    )
    assert result.structured_content is not None
    assert result.structured_content["waitResult"] == "timeout"
    assert len(reports) >= 2
    assert all(total == 2.5 for _, total, _ in reports)
    assert [progress for progress, _, _ in reports] == sorted(progress for progress, _, _ in reports)
    assert "waiting on host-1" in (reports[0][2] or "")


async def test_progress_carries_the_newest_whole_lines_cleaned_while_a_spawn_waits(client: Client) -> None:
    messages: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        messages.append(message or "")

    build = (
        "for step in compiling linking; do printf '\\033[32m%s\\033[0m\\n' $step; sleep 1.2; done; "
        "printf 'half a line'; sleep 1.2"
    )
    result = await client.call_tool("spawn", {"command": build, "timeoutMs": 20000}, progress_callback=on_progress)
    assert result.structured_content is not None
    assert result.structured_content["status"] == "terminated"
    said = [message.partition(" s: ")[2] for message in messages]
    assert "compiling" in said, messages
    assert said[-1] == "compiling | linking", messages  # whole lines only, newest last, no escapes
    assert all("half" not in line and "\x1b" not in line for line in said), messages


async def test_one_call_per_step_of_a_repl_session_through_the_tools(client: Client) -> None:
    started = await call(client, "spawn", {"command": "python3 -q", "tty": True, "waitFor": ">>> $"})
    answer = await client.call_tool("stdin", {"id": started["pid"], "input": "2 ** 10\\r", "waitFor": ">>> $"})
    assert answer.structured_content is not None
    assert answer.structured_content["stdout"] == "2 ** 10\n1024\n>>> "
    text = text_of(answer)
    assert "wait ended: matched" in text
    assert "1024" in text
    assert f"cursor: {answer.structured_content['cursor']}" in text


async def test_tool_descriptions_read_as_prose_without_the_code_indentation(client: Client) -> None:
    for tool in (await client.list_tools()).tools:
        assert tool.description
        assert not [line for line in tool.description.splitlines() if line.startswith(" ")], tool.name
    spawn = next(tool for tool in (await client.list_tools()).tools if tool.name == "spawn")
    assert "waitFor" in spawn.input_schema["properties"]["background"]["description"]


async def test_pythons_output_in_a_pipe_reaches_wait_for_and_a_silent_wait_says_why(client: Client) -> None:
    # Python block-buffers a pipe: without PYTHONUNBUFFERED a server's "ready" line waits for a full buffer.
    server = "import time; print('Serving HTTP on port 8000', flush=False); time.sleep(30)"
    ready = await client.call_tool(
        "spawn", {"command": f'python3 -c "{server}"', "waitFor": "Serving HTTP", "timeoutMs": 5000}
    )
    assert ready.structured_content is not None
    assert ready.structured_content["waitResult"] == "matched", text_of(ready)
    text = text_of(ready)
    assert f"cursor: {ready.structured_content['cursor']}" in text  # the spawn reply's text can continue too
    await call(client, "kill", {"id": ready.structured_content["pid"], "signal": "KILL"})
    # A program that buffers anyway (here told to): the timed-out wait says why nothing came, and what to do.
    held = await client.call_tool(
        "spawn",
        {
            "command": f'python3 -c "{server}"',
            "env": {"PYTHONUNBUFFERED": ""},
            "waitFor": "Serving HTTP",
            "timeoutMs": 1000,
        },
    )
    assert held.structured_content is not None
    assert held.structured_content["waitResult"] == "timeout"
    assert "tty: true" in text_of(held)
    await call(client, "kill", {"id": held.structured_content["pid"], "signal": "KILL"})


@pytest.mark.parametrize(
    ("tool", "arguments", "fragment"),
    [
        ("kill", {"id": "host-1", "sig": "KILL"}, "kill has no argument 'sig'; did you mean signal?"),
        ("spawn", {"command": "true", "wait_for": "x"}, "spawn has no argument 'wait_for'; did you mean waitFor?"),
        ("spawn", {"command": "true", "timeout": 2000}, "spawn has no argument 'timeout'; did you mean timeoutMs?"),
        (
            "spawn",
            {"command": "true", "limits": {"memoryMB": 64}},
            "spawn has no argument limits.'memoryMB'; did you mean limits.memoryMb?",
        ),
        ("spawn", {"command": "true", "tty": "yes"}, "spawn: tty must be true or false, not a string 'yes'"),
        ("spawn", {"command": "true", "timeoutMs": "1000"}, "timeoutMs must be an integer or null, not a string"),
        ("spawn", {"command": "true", "env": {"A": 1}}, "spawn: env.A must be a string, not an integer 1"),
        ("stdout", {"id": "host-1", "lines": 1.5}, "stdout: lines must be an integer, not a number 1.5"),
        ("ps", {"all": True}, "ps has no argument 'all'"),
    ],
)
async def test_unknown_arguments_and_wrong_json_types_are_refused_naming_the_closest(
    client: Client, tool: str, arguments: dict[str, Any], fragment: str
) -> None:
    result = await client.call_tool(tool, arguments)
    assert result.is_error
    text = text_of(result)
    assert text.startswith("invalid_input: "), text
    assert fragment in text, text
    assert result.meta is not None
    assert result.meta["process-mcp/error"] == {"code": "invalid_input"}
    assert (await call(client, "ps", {}))["processes"] == []  # nothing was started


async def test_every_tool_schema_forbids_arguments_it_does_not_name(client: Client) -> None:
    for tool in (await client.list_tools()).tools:
        assert tool.input_schema.get("additionalProperties") is False, tool.name
        for definition in tool.input_schema.get("$defs", {}).values():
            assert definition.get("additionalProperties") is False, (tool.name, definition)


async def test_errors_quote_a_short_marked_excerpt_of_what_they_were_given(client: Client) -> None:
    long_cwd = "/nonexistent/" + "d" * 3000
    text = await error(client, "spawn", {"command": "true", "cwd": long_cwd})
    assert "d" * 200 not in text
    assert f"({len(long_cwd)} characters)" in text
    missing = await error(client, "stdout", {"id": "host-1"})
    assert missing.count("host-1") == 1, missing  # named once, not also offered as the example


async def test_ps_reports_resources_only_when_asked(client: Client) -> None:
    started = await call(client, "spawn", {"command": "echo ready; exec sleep 30", "waitFor": "ready"})
    plain = await call(client, "ps", {})
    assert [set(p) & {"stats"} for p in plain["processes"]] == [set()]
    detailed = await call(client, "ps", {"stats": True})
    (row,) = detailed["processes"]
    assert row["stats"]["processes"] >= 1, row
    await call(client, "kill", {"id": started["pid"], "signal": "KILL"})


def test_an_end_that_could_not_be_observed_never_reads_exit_code_none() -> None:
    from process_mcp.core.models import ExitState
    from process_mcp.service.render import status_text as _state

    unobserved = _state(ExitState(status="terminated", exit_code=None, ended_by="exit"))
    assert "None" not in unobserved
    assert "could not be observed" in unobserved
    assert _state(ExitState(status="terminated", exit_code=3, ended_by="exit")) == "terminated (exit code 3)"


async def test_git_across_calls_in_the_sandbox_and_a_refused_commit_names_the_protection_and_its_setting(
    workdir: Path,
) -> None:
    """The box's HOME keeps the identity one call sets for the next; a commit that .git's protection
    refuses says which protection that was and which setting opens it; with that setting, commits work
    across calls."""
    if not machine_can_sandbox():
        cannot_run_here("bwrap cannot make its namespaces on this machine")
    for allowed, committed in ((None, False), (".git", True)):
        sandbox = SandboxConfig(allow_protected=[] if allowed is None else [allowed])
        space = Path(workdir) / str(allowed)
        space.mkdir()
        mcp: ProcessMcpServer = await create_process_mcp(host_config(space, sandbox=sandbox))
        async with mcp, Client(mcp.server, read_timeout_seconds=WAIT_S) as client:
            setup = "git config --global user.name Agent && git config --global user.email agent@example.com"
            await call(client, "spawn", {"command": f"{setup} && git init -q repo && echo one > repo/file"})
            commit = "git add file && git commit -qm first && git log --format=%an"
            result = await client.call_tool("spawn", {"command": commit, "cwd": "repo"})
            reply = text_of(result)
            assert result.structured_content is not None
            assert ("Agent" in str(result.structured_content["stdout"])) is committed, reply
            assert ("SANDBOX_ALLOW_PROTECTED=.git" in reply) is (not committed), reply


async def test_git_log_in_a_terminal_prints_the_log_and_exits_instead_of_waiting_in_a_pager(
    client: Client, workdir: Path
) -> None:
    # More than a screen of log: less (git's pager, with -F) would wait for a key.
    repo = Path(workdir) / "logged"
    identity = ["-c", "user.name=T", "-c", "user.email=t@example.com"]
    await anyio.run_process(["git", "init", "-q", str(repo)])
    for number in range(20):
        await anyio.run_process(["git", *identity, "commit", "-q", "--allow-empty", "-m", f"commit-{number}"], cwd=repo)
    reply = await call(client, "spawn", {"command": "git log", "cwd": "logged", "tty": True, "timeoutMs": 10000})
    assert (reply["status"], reply["exitCode"]) == ("terminated", 0), reply
    assert "commit-0" in reply["stdout"]


async def test_stdin_with_eof_ends_the_input_and_sort_answers_in_the_same_call(client: Client) -> None:
    started = await call(client, "spawn", {"command": "sort", "background": True})
    result = await client.call_tool(
        "stdin", {"id": started["pid"], "input": "pear\\napple\\n", "eof": True, "waitFor": "pear"}
    )
    assert result.structured_content is not None
    assert result.structured_content["stdout"] == "apple\npear\n"
    assert "then ended its input" in text_of(result)


async def test_a_prompt_ends_the_spawn_at_once_and_the_reply_says_it_waits_for_input(client: Client) -> None:
    result = await client.call_tool("spawn", {"command": "echo 'Proceed? [y/N]'; read answer", "timeoutMs": 60000})
    assert result.structured_content is not None
    assert (result.structured_content["waitResult"], result.structured_content["status"]) == ("input", "running")
    assert "waits to read its input; answer with stdin" in text_of(result)
    asked = "python3 -c 'import getpass; getpass.getpass()'"
    secret = await client.call_tool("spawn", {"command": asked, "tty": True, "timeoutMs": 60000})
    assert secret.structured_content is not None
    assert secret.structured_content["secret"] is True
    assert "password prompt" in text_of(secret)


async def test_a_service_through_the_tools_named_ready_listed_restarted_and_stopped(client: Client) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    web = {
        "command": f"exec python3 -m http.server {port} --bind 127.0.0.1",
        "name": "web",
        "group": "dev",
        "ready": {"port": port, "http": "/"},
        "health": {"port": port, "intervalMs": 200},
        "restart": {"policy": "always", "maxRestarts": 3, "backoffMs": 50},
        "timeoutMs": 30000,
    }
    started = await client.call_tool("spawn", web)
    first = started.structured_content
    assert first is not None
    assert (first["name"], first["ready"], first["status"], first["restarts"]) == ("web", True, "running", 0)
    assert f"host-1 (web): running, {CONFINEMENT}; ready: port {port}: HTTP 200" in text_of(started)
    again = await call(client, "spawn", web)
    assert (again["pid"], again["existing"]) == (first["pid"], True)
    listed = await client.call_tool("ps", {"group": "dev"})
    assert [row["name"] for row in (listed.structured_content or {})["processes"]] == ["web"]
    assert "name=web  group=dev" in text_of(listed)
    # Hung (stopped): its health checks fail, it is ended and started again in its record.
    await call(client, "kill", {"id": "web", "signal": "SIGSTOP"})
    for _ in range(400):
        row = (await call(client, "ps", {"group": "dev"}))["processes"][0]
        if row.get("restarts") == 1 and row["status"] == "running":
            break
        await anyio.sleep(0.05)
    assert (row["pid"], row["restarts"]) == (first["pid"], 1)
    history = await call(client, "stdout", {"id": "web", "history": True})
    assert history["restarts"] == 1
    assert "[process-mcp: restart 1 of at most 3" in history["stdout"]
    stopped = await client.call_tool("kill", {"group": "dev", "graceMs": 2000})
    content = stopped.structured_content or {}
    assert (content["group"], content["forced"], content["status"]) == ("dev", False, "terminated")
    assert f"Sent SIGTERM to group dev (ended in time):\n{first['pid']}: terminated" in text_of(stopped)
    assert "kill takes an id" in await error(client, "kill", {})
