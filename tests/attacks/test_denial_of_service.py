"""One caller cannot freeze the server for everyone: nothing a call sends, or makes its processes print,
holds up the event loop. Each attack froze the server for 8 s or more before its fix; here ps keeps
answering while it runs, and the legitimate use next to it keeps working. Driven through the real tools,
in memory and over HTTP (another principal's ps)."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
from mcp import Client

from process_mcp import ProcessMcpServer, create_process_mcp
from process_mcp.config import PolicyConfig, ProcessMcpConfig
from process_mcp.core.models import (
    MAX_COMMAND_BYTES,
    MAX_ENV_BYTES,
    MAX_ENV_VARS,
    MAX_ID_CHARS,
    MAX_INPUT_CHARS,
    MAX_PATH_BYTES,
)
from process_mcp.policy.command import MAX_CHECKED_BYTES

from ..helpers import call, error, host_config
from ..http_server import http_server, mcp_client, write_tokens

pytestmark = pytest.mark.anyio

_T = TypeVar("_T")

LIVELY_S = 3.0
"""Longest a ps may be held up while an attack runs: generous, where each attack used to freeze it 8 s or more."""
PS_EVERY_S = 0.05
"""Pause between the ps calls made while an attack runs."""
ATTACK_BOUND_S = 60.0
"""Bound on one attack and the ps calls around it (a frozen loop shows up as a slow ps, not as this)."""

A_LINE = "a" * 28
"""The issue's line: ``^(a+)+b$`` backtracks over it for 8-17 s in Python's ``re``."""


async def slowest_ps_during(client: Client, attack: Callable[[], Awaitable[_T]]) -> tuple[float, _T]:
    """Run ``attack`` while calling ps every PS_EVERY_S; the longest a ps (or the pause before the next) was
    held up beyond its own time, and what the attack returned."""
    result: list[_T] = []
    slowest = 0.0
    done = anyio.Event()

    async def run_attack() -> None:
        result.append(await attack())
        done.set()

    with anyio.fail_after(ATTACK_BOUND_S):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(run_attack)
            while not done.is_set():
                began = time.monotonic()
                await call(client, "ps", {})
                await anyio.sleep(PS_EVERY_S)
                slowest = max(slowest, time.monotonic() - began - PS_EVERY_S)
    return slowest, result[0]


@asynccontextmanager
async def connected(config: ProcessMcpConfig) -> AsyncIterator[Client]:
    """An in-memory MCP client of a server made from ``config``."""
    mcp: ProcessMcpServer = await create_process_mcp(config)
    async with mcp, Client(mcp.server, read_timeout_seconds=ATTACK_BOUND_S) as client:
        yield client


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    async with connected(host_config(tmp_path)) as client:
        yield client


# waitFor patterns.


# Each backtracks for seconds in Python's ``re``; the second also in the ``regex`` module, where the
# first is answered at once.
@pytest.mark.parametrize(("pattern", "line"), [("^(a+)+b$", A_LINE), ("(a|aa)+$", "a" * 36)])
async def test_a_catastrophic_wait_for_pattern_leaves_ps_answering_and_its_process_running(
    client: Client, pattern: str, line: str
) -> None:
    command = f"echo {line}!; sleep 300"
    slowest, reply = await slowest_ps_during(
        client,
        lambda: client.call_tool("spawn", {"command": command, "waitFor": pattern, "timeoutMs": 2000}),
    )
    assert slowest < LIVELY_S, f"ps was held up {slowest:.1f} s while {pattern!r} was searched"
    text = reply.content[0].text  # type: ignore[union-attr]
    if reply.is_error:  # refused as too costly, the process left running
        assert text.startswith("invalid_input: "), text
        assert "too costly" in text, text
        assert "nested quantifiers" in text.lower(), text
        assert "host-1 keeps running" in text, text
    else:  # or searched quickly without a match, until the timeout
        assert reply.structured_content is not None
        assert reply.structured_content["waitResult"] == "timeout", text
    [process] = (await call(client, "ps", {}))["processes"]
    assert process["status"] == "running"
    await call(client, "kill", {"id": process["pid"], "signal": "KILL"})


async def test_an_ordinary_wait_for_pattern_still_matches_next_to_a_costly_line(client: Client) -> None:
    started = await call(
        client,
        "spawn",
        {"command": f"echo {A_LINE}!; echo 'Listening on port 8080'; sleep 300", "waitFor": r"port \d+$"},
    )
    assert started["waitResult"] == "matched"
    assert started["status"] == "running"
    await call(client, "kill", {"id": started["pid"], "signal": "KILL"})


async def test_a_pattern_longer_than_the_limit_is_refused_saying_the_limit(client: Client) -> None:
    refused = await error(client, "spawn", {"command": "true", "waitFor": "a" * 5000})
    assert refused.startswith("invalid_input: "), refused
    assert "1024" in refused, refused


# Terminal rendering.


async def spawn_and_read(client: Client, command: str, ready: str) -> tuple[float, dict[str, Any], dict[str, Any]]:
    """Spawn ``command`` in a terminal until it prints ``ready``, then read its screen: how long the two
    calls took, and their replies."""
    began = time.monotonic()
    started = await call(client, "spawn", {"command": command, "tty": True, "waitFor": ready})
    shown = await call(client, "stdout", {"id": started["pid"]})
    return time.monotonic() - began, started, shown


# 4 KiB of DECALN (ESC # 8) is the instance (8-10 s of pyte); 64 KiB runs past the render budget;
# reverse video on and off rewrote every cell of the (filled) screen in pyte.
@pytest.mark.parametrize(
    ("sequence", "count"),
    [("\\033#8", 1365), ("\\033#8", 21845), ("\\033[?5h\\033[?5l", 1600)],
    ids=["DECALN 4 KiB", "DECALN 64 KiB", "reverse video 16 KiB"],
)
async def test_a_terminal_flooded_with_screen_wide_sequences_is_answered_within_seconds(
    client: Client, sequence: str, count: int
) -> None:
    command = f"printf '\\033#8'; printf '{sequence}%.0s' $(seq {count}); echo; echo FLOODED; sleep 300"
    slowest, (took, started, shown) = await slowest_ps_during(
        client, lambda: spawn_and_read(client, command, "FLOODED")
    )
    assert slowest < LIVELY_S, f"ps was held up {slowest:.1f} s"
    assert took < LIVELY_S, f"spawn and stdout took {took:.1f} s"
    assert started["waitResult"] == "matched"
    assert "FLOODED" in shown["stdout"]
    screen = shown["stdout"].splitlines()
    if screen[0].startswith("[terminal not rendered"):  # past the budget: the text instead, saying so
        assert "took more than" in screen[0]
        assert screen[-1] == "FLOODED"
    await call(client, "kill", {"id": started["pid"], "signal": "KILL"})


async def test_a_full_screen_programs_frames_still_render(client: Client) -> None:
    frames = (
        "for i in $(seq 300); do printf '\\033[H\\033[2J\\033[1;32mframe %s\\033[0m\\r\\n\\033[5;10Hstatus: ok %s' "
        "$i $i; done; sleep 300"
    )
    _, started, shown = await spawn_and_read(client, frames, "ok 300")
    assert started["waitResult"] == "matched"
    assert shown["stdout"].splitlines() == ["frame 300", "", "", "", "         status: ok 300"]
    await call(client, "kill", {"id": started["pid"], "signal": "KILL"})


# The command policy, and the size of every request field.


@pytest.fixture
async def policed(tmp_path: Path) -> AsyncIterator[Client]:
    config = host_config(tmp_path)
    config.policy = PolicyConfig(command_allow=["echo", "sleep", "true"])
    async with connected(config) as client:
        yield client


async def test_a_normal_command_passes_the_policy_and_a_denied_one_is_refused(policed: Client) -> None:
    ran = await call(policed, "spawn", {"command": "echo ok | sleep 0; true && echo done"})
    assert ran["stdout"] == "done\n"
    longest = "echo " + "x" * (MAX_CHECKED_BYTES - 5)  # the longest line a policy checks still runs
    assert (await call(policed, "spawn", {"command": longest}))["stdout"] == longest[5:] + "\n"
    refused = await error(policed, "spawn", {"command": "echo ok | cat"})
    assert refused.startswith("policy_denied: 'cat' is not in PROCESS_COMMAND_ALLOW"), refused


# The instance: 2.9 MB froze the loop 14-15 s in the parser; 16 KiB of a malformed pipeline
# takes tree-sitter's error recovery seconds (with the GIL held).
@pytest.mark.parametrize(
    ("command", "refusal"),
    [
        ("echo " + "a " * 1_450_000, str(MAX_COMMAND_BYTES)),
        ("|true | " * 2047, f"may be at most {MAX_CHECKED_BYTES} bytes"),
    ],
    ids=["2.9 MB", "16 KiB of broken pipeline"],
)
async def test_a_command_costly_to_check_is_refused_and_ps_keeps_answering(
    policed: Client, command: str, refusal: str
) -> None:
    slowest, reply = await slowest_ps_during(policed, lambda: policed.call_tool("spawn", {"command": command}))
    assert slowest < LIVELY_S, f"ps was held up {slowest:.1f} s while a command was checked"
    assert reply.is_error
    text = reply.content[0].text  # type: ignore[union-attr]
    assert text.startswith("invalid_input: "), text[:300]
    assert refusal in text, text[:300]


@pytest.mark.parametrize(
    ("tool", "arguments", "limit"),
    [
        ("spawn", {"command": "true", "cwd": "d/" * 2100}, MAX_PATH_BYTES),
        ("spawn", {"command": "true", "env": {f"V{i}": "" for i in range(MAX_ENV_VARS + 1)}}, MAX_ENV_VARS),
        ("spawn", {"command": "true", "env": {"BIG": "x" * MAX_ENV_BYTES}}, MAX_ENV_BYTES),
        ("stdin", {"id": "host-1", "input": "\\n" * MAX_INPUT_CHARS}, MAX_INPUT_CHARS),
        ("stdout", {"id": "host-" + "1" * 100}, MAX_ID_CHARS),
        ("spawn", {"command": "echo " + "é" * (MAX_COMMAND_BYTES // 2)}, MAX_COMMAND_BYTES),
    ],
    ids=["cwd", "env count", "env size", "stdin input", "id", "command in bytes"],
)
async def test_every_request_field_has_a_maximum_that_the_refusal_names(
    client: Client, tool: str, arguments: dict[str, Any], limit: int
) -> None:
    await call(client, "spawn", {"command": "sleep 300", "background": True})
    refused = await error(client, tool, arguments)
    assert refused.startswith("invalid_input: "), refused[:300]
    assert str(limit) in refused, refused[:300]
    await call(client, "kill", {"id": "host-1", "signal": "KILL"})


# Over HTTP: one principal's attack, another principal's ps.

ALICE = "alice-" + secrets.token_hex(16)
BOB = "bob-" + secrets.token_hex(16)
ATTACKS = {
    "waitFor": {"command": f"echo {A_LINE}!; sleep 300", "waitFor": "^(a+)+b$", "timeoutMs": 2000},
    "terminal": {"command": "printf '\\033#8%.0s' $(seq 1365); echo; echo FLOODED; sleep 300", "tty": True,
                 "waitFor": "FLOODED"},
    "policy": {"command": "echo " + "a " * 1_450_000},
}  # fmt: skip


@pytest.mark.parametrize("attack", ATTACKS.values(), ids=ATTACKS.keys())
async def test_another_principals_ps_over_http_keeps_answering_during_an_attack(
    tmp_path: Path, attack: dict[str, Any]
) -> None:
    workspaces = tmp_path / "workspaces"
    workspaces.mkdir()
    tokens = write_tokens(tmp_path / "tokens", {"alice": ALICE, "bob": BOB})
    settings = {"PROCESS_AUTH_TOKENS_FILE": str(tokens), "PROCESS_COMMAND_ALLOW": "echo,sleep,printf,seq"}
    async with (
        http_server(workspaces, **settings) as server,
        mcp_client(server.url, ALICE) as alice,
        mcp_client(server.url, BOB) as bob,
    ):
        await call(bob, "spawn", {"command": "echo bob is here"})
        slowest, _ = await slowest_ps_during(bob, lambda: alice.call_tool("spawn", attack))
        assert slowest < LIVELY_S, f"bob's ps was held up {slowest:.1f} s"
        for process in (await call(alice, "ps", {}))["processes"]:
            if process["status"] == "running":
                await call(alice, "kill", {"id": process["pid"], "signal": "KILL"})
