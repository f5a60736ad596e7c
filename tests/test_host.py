"""Host-only behaviour: process groups, pipes and limits, checked against the OS itself."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from process_mcp import HostExecutor, ProcessNotFound, SpawnOptions, StdinFailed

from .conftest import host_config
from .helpers import kill_if_alive, pid_alive, wait_for_output, wait_until_gone

pytestmark = pytest.mark.anyio


@pytest.fixture
async def host(workdir: Path) -> AsyncIterator[HostExecutor]:
    executor = HostExecutor(host_config(workdir, keep_terminated=2))
    try:
        yield executor
    finally:
        await executor.cleanup()


async def children_of(host: HostExecutor, pid: str, count: int) -> list[int]:
    output = await wait_for_output(host, pid, rf"(?s)(child=\d+.*){{{count}}}")
    return [int(word.split("=")[1]) for word in output.split() if word.startswith("child=")]


@pytest.mark.parametrize("tty", [False, True])
async def test_kill_ends_the_children_with_their_parent(host: HostExecutor, tty: bool) -> None:
    started = await host.spawn(
        SpawnOptions(command="sleep 300 & echo child=$!; sleep 300 & echo child=$!; wait", tty=tty, background=True)
    )
    children = await children_of(host, started.pid, 2)
    try:
        assert all(pid_alive(child) for child in children)
        await host.kill(started.pid, "TERM")
        for child in children:
            await wait_until_gone(child)
    finally:
        for child in children:
            kill_if_alive(child)


async def test_cleanup_escalates_to_sigkill_for_processes_that_ignore_sigterm(host: HostExecutor) -> None:
    started = await host.spawn(
        SpawnOptions(command="trap '' TERM; sh -c \"trap '' TERM; sleep 300\" & echo child=$!; wait", background=True)
    )
    (child,) = await children_of(host, started.pid, 1)
    try:
        await host.cleanup()
        await wait_until_gone(child)
        info = await host.get_process(started.pid)
        assert (info.status, info.signal) == ("terminated", "SIGKILL")
    finally:
        kill_if_alive(child)


async def test_cleanup_ends_children_left_behind_by_a_finished_parent(host: HostExecutor) -> None:
    started = await host.spawn(SpawnOptions(command="sleep 300 & echo child=$!", timeout_ms=2000))
    assert started.status == "terminated"
    (child,) = await children_of(host, started.pid, 1)
    try:
        assert pid_alive(child)
        await host.cleanup()
        await wait_until_gone(child)
    finally:
        kill_if_alive(child)


async def test_finished_processes_beyond_the_retention_are_dropped_with_a_clear_error(host: HostExecutor) -> None:
    pids = [(await host.spawn(SpawnOptions(command=f"echo {n}"))).pid for n in range(4)]
    assert [p.pid for p in await host.list_processes()] == pids[-2:]
    with pytest.raises(ProcessNotFound, match="ended and was dropped"):
        await host.get_output(pids[0])
    assert (await host.get_output(pids[-1])).stdout == "3\n"


async def test_stdin_to_a_process_that_closed_its_input_fails_clearly(host: HostExecutor) -> None:
    started = await host.spawn(SpawnOptions(command="exec 0<&-; echo closed; sleep 30", background=True))
    await wait_for_output(host, started.pid, "closed")
    with pytest.raises(StdinFailed, match="no longer accepts input"):
        await host.stdin(started.pid, "hello\\n")


async def test_stdin_to_a_process_that_never_reads_fails_after_a_bounded_wait(host: HostExecutor) -> None:
    started = await host.spawn(SpawnOptions(command="sleep 30", background=True))
    with pytest.raises(StdinFailed, match="is not reading its input"):
        await host.stdin(started.pid, "x" * (1 << 20))
    assert (await host.get_process(started.pid)).status == "running"


async def test_a_missing_executable_is_an_exit_code_not_a_spawn_failure(host: HostExecutor) -> None:
    result = await host.spawn(SpawnOptions(command="definitely-not-a-command-xyz"))
    assert result.exit_code == 127
    assert "not found" in result.stderr
