"""Docker mode through the agent in the container: what the kernel reports, and a kill nothing escapes.

Runs against the session's shared container (made as the server makes its own, as its unprivileged
user); every process found here is looked for with ``docker top`` by a sleep duration unique to the test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
import pytest

from process_mcp import DockerExecutor, SpawnOptions

from .conftest import docker_config
from .helpers import POLL_S, WAIT_S, sleep_argument, wait_for_output

if TYPE_CHECKING:
    from docker.models.containers import Container

pytestmark = pytest.mark.anyio

# Ways a process leaves its parent's environment, session or tree; each sleeps for $1.
ESCAPES = {
    "env -i": 'env -i sleep "$1" &',
    "setsid": 'setsid sleep "$1" &',
    "double fork": '(sleep "$1" &) &',
    "nohup, new group, no output": 'setsid nohup sleep "$1" >/dev/null 2>&1 </dev/null &',
}


@pytest.fixture
async def agent(shared_container: Container) -> AsyncIterator[DockerExecutor]:
    executor = DockerExecutor(docker_config(str(shared_container.name), use_existing=True))
    await executor.start()
    assert executor.via == "agent"
    try:
        yield executor
    finally:
        await executor.cleanup()


async def top(container: Container, argument: str) -> list[str]:
    """Pids of `sleep <argument>` processes in the container, as the engine's `docker top` lists them."""
    listing = await anyio.to_thread.run_sync(container.top)
    columns = listing["Titles"]
    pid, command = columns.index("PID"), columns.index("CMD")
    return [row[pid] for row in listing["Processes"] or [] if row[command] == f"sleep {argument}"]


async def wait_for_top(container: Container, argument: str, count: int) -> None:
    with anyio.move_on_after(WAIT_S):
        while len(await top(container, argument)) != count:
            await anyio.sleep(POLL_S)
        return
    pytest.fail(f"docker top never showed {count} `sleep {argument}` (last: {await top(container, argument)})")


async def test_an_exit_code_above_128_is_an_exit_code_not_a_signal(agent: DockerExecutor) -> None:
    result = await agent.spawn(SpawnOptions(command="exit 130"))
    assert (result.status, result.exit_code, result.signal, result.via) == ("terminated", 130, None, "agent")
    killed = await agent.spawn(SpawnOptions(command="kill -INT $$"))
    assert (killed.exit_code, killed.signal) == (130, "SIGINT")


async def test_a_process_that_traps_sigterm_and_exits_0_reports_0(agent: DockerExecutor) -> None:
    started = await agent.spawn(
        SpawnOptions(command="trap 'echo bye; exit 0' TERM; echo ready; while :; do sleep 0.05; done", background=True)
    )
    await wait_for_output(agent, started.pid, "ready")
    killed = await agent.kill(started.pid)
    assert (killed.status, killed.exit_code, killed.signal) == ("terminated", 0, None)


@pytest.mark.parametrize("escape", list(ESCAPES), ids=list(ESCAPES))
async def test_kill_ends_a_process_that_left_its_tree(
    agent: DockerExecutor, shared_container: Container, escape: str
) -> None:
    argument = sleep_argument()
    started = await agent.spawn(
        SpawnOptions(command=f"set -- {argument}; {ESCAPES[escape]} echo started; sleep 600", background=True)
    )
    await wait_for_output(agent, started.pid, "started")
    await wait_for_top(shared_container, argument, 1)
    killed = await agent.kill(started.pid, "KILL")
    assert (killed.status, killed.signal) == ("terminated", "SIGKILL")
    await wait_for_top(shared_container, argument, 0)


@pytest.mark.parametrize("escape", list(ESCAPES), ids=list(ESCAPES))
async def test_shutdown_ends_a_process_that_left_its_tree_after_its_parent_exited(
    shared_container: Container, escape: str
) -> None:
    """The parent is gone (its record terminated, nothing left to kill by id); its escapee is not."""
    executor = DockerExecutor(docker_config(str(shared_container.name), use_existing=True))
    await executor.start()
    argument = sleep_argument()
    try:
        parent = await executor.spawn(SpawnOptions(command=f"set -- {argument}; {ESCAPES[escape]} echo started"))
        assert (parent.status, parent.exit_code) == ("terminated", 0)
        await wait_for_top(shared_container, argument, 1)
    finally:
        await executor.cleanup()
    await wait_for_top(shared_container, argument, 0)


async def test_exit_is_reported_at_once_while_a_background_child_holds_the_output(agent: DockerExecutor) -> None:
    result = await agent.spawn(SpawnOptions(command="sleep 30 & echo parent done; exit 3", timeout_ms=1500))
    assert (result.status, result.exit_code, result.stdout) == ("terminated", 3, "parent done\n")
    assert result.wait_result is None


async def test_resize_changes_the_terminal_and_sends_sigwinch(agent: DockerExecutor) -> None:
    started = await agent.spawn(
        SpawnOptions(
            command="trap 'stty size' WINCH; stty size; echo ready; while :; do sleep 0.05; done",
            tty=True,
            background=True,
        )
    )
    await wait_for_output(agent, started.pid, "ready")
    handle = agent._registry.get(started.pid).handle
    from process_mcp.box.client import AgentProcess

    assert isinstance(handle, AgentProcess)
    await handle.resize(80, 24)
    await wait_for_output(agent, started.pid, "24 80")


async def test_the_agent_killed_from_outside_ends_its_processes_and_the_next_spawn_brings_it_back(
    agent: DockerExecutor, shared_container: Container
) -> None:
    argument = sleep_argument()
    flood = await agent.spawn(SpawnOptions(command="yes flood", background=True))
    sleeper = await agent.spawn(SpawnOptions(command=f"setsid sleep {argument} & sleep 600", background=True))
    await wait_for_top(shared_container, argument, 1)
    connection = agent._agent
    assert connection is not None
    kill = ["kill", "-9", str(connection.hello["pid"])]
    result = await anyio.to_thread.run_sync(lambda: shared_container.exec_run(kill))
    assert result.exit_code == 0, result.output
    with anyio.fail_after(WAIT_S):
        while (await agent.get_process(flood.pid)).status == "running":
            await anyio.sleep(POLL_S)
    assert (await agent.get_process(sleeper.pid)).status == "terminated"
    await wait_for_top(shared_container, argument, 0)  # each supervisor ended its tree
    again = await agent.spawn(SpawnOptions(command="echo back"))
    assert (again.stdout, again.via, again.exit_code) == ("back\n", "agent", 0)
    assert agent._agent is not None
    assert agent._agent is not connection


async def test_input_and_ps_stay_prompt_while_another_process_floods(agent: DockerExecutor) -> None:
    flood = await agent.spawn(SpawnOptions(command="yes 0123456789abcdef", background=True))
    echo = await agent.spawn(SpawnOptions(command="while read x; do echo got:$x; done", background=True))
    for n in range(20):
        answered = await agent.stdin(echo.pid, f"line {n}\n", wait_for=f"got:line {n}", wait_ms=int(WAIT_S * 1000))
        assert answered.wait_result == "matched"
        assert {p.pid for p in await agent.list_processes()} >= {flood.pid, echo.pid}
    assert (await agent.get_process(flood.pid)).status == "running"


async def test_output_is_whole_when_a_process_exits_in_the_middle_of_a_flood(agent: DockerExecutor) -> None:
    """A process that ends while its output is still being moved to the server: every byte arrives, in
    order, and the stream to the agent stays intact for the next one."""
    connection = agent._agent
    for n in range(12):
        size = 2_000_000 + n * 250_000
        result = await agent.spawn(SpawnOptions(command=f"head -c {size} /dev/zero | tr '\\0' x; echo; echo END-{n}"))
        record = agent._registry.get(result.pid)
        assert await record.wait(WAIT_S, output=True)
        assert (result.exit_code, record.stdout.total) == (0, size + len(f"\nEND-{n}\n"))
        assert record.stdout.tail(8).endswith(f"END-{n}\n".encode())
    assert agent._agent is connection
