"""Services an agent starts: named processes, groups, a kill that escalates, and stats history."""

from __future__ import annotations

import anyio
import pytest
from pydantic import ValidationError

from process_mcp import InvalidInput, ProcessExecutor, ProcessNotFound, SpawnOptions

from ..helpers import BACKENDS, sleep_argument, wait_for_exit

pytestmark = pytest.mark.anyio


async def test_a_name_returns_the_process_that_runs_instead_of_starting_another(executor: ProcessExecutor) -> None:
    argument = sleep_argument()
    first = await executor.spawn(SpawnOptions(command=f"echo up; sleep {argument}", name="web", wait_for="up"))
    assert (first.name, first.existing, first.status) == ("web", None, "running")
    again = await executor.spawn(SpawnOptions(command="echo another", name="web"))
    assert (again.pid, again.existing, again.status) == (first.pid, True, "running")
    assert [p.pid for p in await executor.list_processes() if p.name == "web"] == [first.pid]
    # Every tool takes the name for the id.
    assert (await executor.get_output("web")).stdout == "up\n"
    assert (await executor.get_process("web")).name == "web"
    await executor.kill("web", "SIGKILL")
    await wait_for_exit(executor, first.pid)
    # Once it has ended, the name starts a new one; the name means the newest.
    second = await executor.spawn(SpawnOptions(command="echo second", name="web"))
    assert second.pid != first.pid
    assert second.existing is None
    assert (await executor.get_output("web")).pid == second.pid


async def test_spawns_of_one_name_at_once_start_one_process(executor: ProcessExecutor) -> None:
    argument = sleep_argument()
    results = []

    async def start() -> None:
        results.append(await executor.spawn(SpawnOptions(command=f"sleep {argument}", name="once", background=True)))

    async with anyio.create_task_group() as tasks:
        for _ in range(5):
            tasks.start_soon(start)
    assert len({result.pid for result in results}) == 1
    assert sorted(bool(result.existing) for result in results) == [False, True, True, True, True]
    await executor.kill("once", "SIGKILL")


async def test_a_name_is_checked(executor: ProcessExecutor) -> None:
    prefix = (await executor.spawn(SpawnOptions(command="true"))).pid.rsplit("-", 1)[0]
    with pytest.raises(InvalidInput, match="form of a process id"):
        await executor.spawn(SpawnOptions(command="true", name=f"{prefix}-99"))
    for bad in ("a b", "-x", "x" * 65, "../etc", ""):
        with pytest.raises(ValidationError):
            SpawnOptions(command="true", name=bad)
    with pytest.raises(ProcessNotFound, match="or are the name a spawn gave"):
        await executor.get_output("nothing-of-that-name")


async def test_a_group_is_listed_and_killed_together_and_nothing_else(executor: ProcessExecutor) -> None:
    argument = sleep_argument()
    members = [
        await executor.spawn(SpawnOptions(command=f"sleep {argument}", group="pipeline", background=True))
        for _ in range(3)
    ]
    other = await executor.spawn(SpawnOptions(command=f"sleep {argument}", group="other", background=True))
    listed = await executor.list_processes(group="pipeline")
    assert [p.pid for p in listed] == [m.pid for m in members]
    assert {p.group for p in listed} == {"pipeline"}
    killed = await executor.kill_group("pipeline", "SIGTERM")
    assert (killed.group, killed.sent, killed.status) == ("pipeline", "SIGTERM", "terminated")
    assert killed.members is not None
    assert sorted(m.pid or "" for m in killed.members) == sorted(m.pid for m in members)
    assert {m.signal for m in killed.members} == {"SIGTERM"}
    assert (await executor.get_process(other.pid)).status == "running"
    with pytest.raises(ProcessNotFound, match="no process of group 'pipeline' runs any more"):
        await executor.kill_group("pipeline")
    await executor.kill(other.pid, "SIGKILL")


async def test_a_kill_with_grace_forces_a_tree_that_ignores_the_signal_and_not_one_that_obeys(
    executor: ProcessExecutor, backend: str
) -> None:
    argument = sleep_argument()
    # The background sleep inherits the ignored TERM: the whole tree outlives the grace.
    stubborn = await executor.spawn(
        SpawnOptions(command=f"trap '' TERM; sleep {argument} & echo ready; wait", wait_for="ready")
    )
    forced = await executor.kill(stubborn.pid, "SIGTERM", grace_ms=300)
    assert (forced.forced, forced.status) == (True, "terminated")
    if BACKENDS[backend].exact_exits:
        assert forced.signal == "SIGKILL"
    obeying = await executor.spawn(SpawnOptions(command=f"sleep {argument}", background=True))
    ended = await executor.kill(obeying.pid, "SIGTERM", grace_ms=5000)
    assert (ended.forced, ended.status) == (False, "terminated")
    with pytest.raises(InvalidInput, match="SIGSTOP does not end one"):
        await executor.kill(obeying.pid, "SIGSTOP", grace_ms=100)
    plain = await executor.spawn(SpawnOptions(command=f"sleep {argument}", background=True))
    assert (await executor.kill(plain.pid, "SIGKILL")).forced is None


@pytest.mark.parametrize("backend", [name for name, b in BACKENDS.items() if b.limits])
async def test_a_named_process_keeps_a_history_of_its_stats(executor: ProcessExecutor) -> None:
    service = await executor.spawn(SpawnOptions(command=f"sleep {sleep_argument()}", name="svc", background=True))
    await anyio.sleep(2.5)
    output = await executor.get_output("svc", history=True)
    assert output.history is not None
    assert len(output.history) >= 2, output.history
    assert [sample.at for sample in output.history] == sorted(sample.at for sample in output.history)
    assert all(sample.processes >= 1 for sample in output.history)
    assert (await executor.get_output("svc")).history is None
    await executor.kill(service.pid, "SIGKILL")
