"""Thousands of random and malformed calls through the MCP layer: every reply is a result or a clear
error, the server keeps serving, and nothing leaks (processes, descriptors, threads)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import Client
from mcp_types import CallToolResult, TextContent

from process_mcp import ProcessMcpServer, create_process_mcp
from process_mcp.config import Defaults, Limits, ProcessMcpConfig, SandboxConfig

from ..helpers import WAIT_S

TOOLS = ["spawn", "ps", "stdin", "stdout", "kill"]
PARAMETERS = [
    "command", "cwd", "env", "tty", "background", "timeoutMs", "waitFor", "idleMs", "id", "input", "lines",
    "since", "stderrSince", "raw", "untilExit", "waitMs", "signal",
]  # fmt: skip
ERROR_CODES = (
    "invalid_input", "invalid_signal", "process_not_found", "process_terminated", "spawn_failed",
    "stdin_failed", "kill_failed", "too_many_processes", "backend_unavailable",
)  # fmt: skip
# Commands are not what is fuzzed (the sandbox bounds them anyway): a few that exit, read, or linger.
COMMANDS = ["true", "echo hi", "cat", "sleep 2", "printf 'a\\033[31mb\\n'", "exit 3", "head -c 100000 /dev/zero"]
ESCAPES = ["\\n", "\\r", "\\t", "\\x03", "\\x04", "\\x1b", "\\xZZ", "\\u00e9", "\\uXYZ", "\\\\", "\\", "\\q", "\\x0"]

texts = st.text(max_size=50) | st.sampled_from(["", " ", "\x00", "host-1", "host-0", "docker-1", "x" * 100_000])
numbers = st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=True, allow_infinity=True)
scalars = texts | numbers | st.booleans() | st.none()
values = scalars | st.lists(scalars, max_size=3) | st.dictionaries(texts, scalars, max_size=3)
ids = st.sampled_from(["host-1", "host-2", "host-3", "host-50", "host-x", "", "1"]) | values
inputs = st.lists(st.sampled_from(ESCAPES) | st.text(max_size=10), max_size=8).map("".join) | values


@st.composite
def calls(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    tool = draw(st.sampled_from([*TOOLS, "nope"]))
    arguments: dict[str, Any] = {}
    if tool == "spawn" and draw(st.booleans()):
        arguments["command"] = draw(st.sampled_from(COMMANDS))
    if tool in ("stdin", "stdout", "kill"):
        arguments["id"] = draw(ids)
    if tool == "stdin":
        arguments["input"] = draw(inputs)
    for name in draw(st.lists(st.sampled_from(PARAMETERS), max_size=4)):
        arguments[name] = draw(inputs if name in ("input", "waitFor") else values)
    return tool, arguments


class Session:
    """One server and client for every example, on an event loop in a background thread."""

    def __init__(self, portal: BlockingPortal, workdir: Path) -> None:
        self.portal = portal
        config = ProcessMcpConfig(
            defaults=Defaults(workdir=str(workdir), timeout_ms=300, max_timeout_ms=300),
            limits=Limits(max_live=20, keep_terminated=5),
            sandbox=SandboxConfig(homes_dir=str(workdir.parent / f"{workdir.name}-homes")),
        )
        self.mcp: ProcessMcpServer = portal.call(create_process_mcp, config)
        self._mcp_context = portal.wrap_async_context_manager(self.mcp)
        self._mcp_context.__enter__()
        self._client_context = portal.wrap_async_context_manager(Client(self.mcp.server, read_timeout_seconds=WAIT_S))
        self.client: Client = self._client_context.__enter__()

    def call(self, tool: str, arguments: dict[str, Any]) -> CallToolResult:
        result: CallToolResult = self.portal.call(self.client.call_tool, tool, arguments)
        return result

    def close(self) -> None:
        self._client_context.__exit__(None, None, None)
        self._mcp_context.__exit__(None, None, None)


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def children() -> list[str]:
    found = []
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            found += Path(f"/proc/self/task/{task}/children").read_text().split()
    return sorted(found)


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    before = (open_descriptors(), threading.active_count(), children())
    with start_blocking_portal("asyncio") as portal:
        fuzzed = Session(portal, tmp_path_factory.mktemp("fuzz"))
        try:
            yield fuzzed
        finally:
            fuzzed.close()
    # Everything the calls started is gone, and nothing accumulated.
    assert children() == before[2]
    # A worker thread may still be on its way out (its last task done, not yet joined): give it a moment.
    deadline = time.monotonic() + WAIT_S
    while threading.active_count() > before[1] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= before[1], [thread.name for thread in threading.enumerate()]
    assert open_descriptors() <= before[0]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(call=calls())
def test_random_and_malformed_calls_get_a_result_or_a_clear_error(
    session: Session, call: tuple[str, dict[str, Any]]
) -> None:
    tool, arguments = call
    result = session.call(tool, arguments)
    text = "".join(c.text for c in result.content if isinstance(c, TextContent))
    if result.is_error:
        assert text, "an error must say something"
        code = text.split(": ", 1)[0]
        assert code in ERROR_CODES, text[:300]
        assert result.meta is not None
        assert result.meta["process-mcp/error"] == {"code": code}
    else:
        assert result.structured_content is not None
    assert not session.call("ps", {}).is_error  # the server keeps serving
