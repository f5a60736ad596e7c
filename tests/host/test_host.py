"""Host-only behaviour: process groups, pipes and limits, checked against the OS itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from process_mcp import HostExecutor, ProcessLimits, ProcessNotFound, SpawnOptions, StdinFailed, TooManyProcesses
from process_mcp.box import protocol
from process_mcp.config import SandboxConfig
from process_mcp.core.models import MAX_INPUT_CHARS
from process_mcp.host.executor import STATE_DIR_PREFIX

from ..helpers import (
    POLL_S,
    WAIT_S,
    cannot_run_here,
    host_config,
    kill_if_alive,
    pid_alive,
    sleep_argument,
    sleepers,
    started,
    wait_for_exit,
    wait_for_output,
    wait_until_gone,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(params=[True, False], ids=["sandboxed", "unsandboxed"])
async def host(request: pytest.FixtureRequest, workdir: Path) -> AsyncIterator[HostExecutor]:
    sandbox = SandboxConfig(enabled=request.param, required=True)
    executor = HostExecutor(host_config(workdir, sandbox=sandbox, keep_terminated=2))
    try:
        yield executor
    finally:
        await executor.cleanup()


@pytest.mark.parametrize("tty", [False, True])
async def test_kill_ends_the_children_with_their_parent(host: HostExecutor, tty: bool) -> None:
    arg = sleep_argument()
    started = await host.spawn(SpawnOptions(command=f"sleep {arg} & sleep {arg} & wait", tty=tty, background=True))
    children = await sleepers(arg, 2)
    try:
        assert all(pid_alive(child) for child in children)
        await host.kill(started.pid, "TERM")
        for child in children:
            await wait_until_gone(child)
    finally:
        for child in children:
            kill_if_alive(child)


# A background child, and ways a process leaves its parent's session, environment or tree; each runs
# `sleep $1` in the background.
ESCAPES = {
    "background": 'sleep "$1" &',
    "setsid": 'setsid sleep "$1" &',
    "env -i": 'env -i sleep "$1" &',
    "double fork": '(sleep "$1" &) &',
    "nohup in a new session": 'setsid nohup sleep "$1" >/dev/null 2>&1 </dev/null &',
}


@pytest.mark.parametrize("escape", list(ESCAPES))
async def test_kill_ends_descendants_that_left_the_process_group_or_tree(host: HostExecutor, escape: str) -> None:
    arg = sleep_argument()
    spawned = await host.spawn(
        SpawnOptions(command=f"set -- {arg}; {ESCAPES[escape]} {started(arg)}; sleep 600", background=True)
    )
    (child,) = await sleepers(arg, 1)
    try:
        killed = await host.kill(spawned.pid, "TERM")
        assert killed.status == "terminated"
        await wait_until_gone(child)
    finally:
        kill_if_alive(child)


@pytest.mark.parametrize("escape", list(ESCAPES))
async def test_cleanup_ends_descendants_that_left_a_parent_that_has_exited(host: HostExecutor, escape: str) -> None:
    arg = sleep_argument()
    # The parent waits for a line on its input, so the child is seen running on the host before it exits.
    spawned = await host.spawn(
        SpawnOptions(command=f"set -- {arg}; {ESCAPES[escape]} read go; echo parent-exits", background=True)
    )
    (child,) = await sleepers(arg, 1)
    try:
        await host.stdin(spawned.pid, "go\\n")
        await wait_for_exit(host, spawned.pid)
        assert (await host.get_output(spawned.pid)).stdout == "parent-exits\n"
        await host.cleanup()  # in the sandbox too: the box and its agent hold the child until then
        await wait_until_gone(child)
    finally:
        kill_if_alive(child)


async def test_cleanup_escalates_to_sigkill_for_processes_that_ignore_sigterm(host: HostExecutor) -> None:
    arg = sleep_argument()
    started = await host.spawn(
        SpawnOptions(command=f"trap '' TERM; sh -c \"trap '' TERM; sleep {arg}\" & wait", background=True)
    )
    (child,) = await sleepers(arg, 1)
    try:
        await host.cleanup()
        await wait_until_gone(child)
        info = await host.get_process(started.pid)
        assert (info.status, info.signal) == ("terminated", "SIGKILL")
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
    await _fill_until_refused(host, started.pid)
    assert (await host.get_process(started.pid)).status == "running"


async def _fill_until_refused(host: HostExecutor, pid: str) -> None:
    """Send the largest inputs one call may until the pipe is full: the call that finds it so must fail."""
    with pytest.raises(StdinFailed, match="is not reading its input"):  # noqa: PT012
        for _ in range(64):  # a pipe holds at most 1 MiB (Linux's default limit for a user)
            await host.stdin(pid, "x" * MAX_INPUT_CHARS)


async def test_a_missing_executable_is_an_exit_code_not_a_spawn_failure(host: HostExecutor) -> None:
    result = await host.spawn(SpawnOptions(command="definitely-not-a-command-xyz"))
    assert result.exit_code == 127
    assert "not found" in result.stderr


async def test_the_live_process_limit_is_a_clear_error_and_frees_up_as_processes_end(workdir: Path) -> None:
    executor = HostExecutor(host_config(workdir, max_live=3))
    try:

        async def spawn_sleeper(results: list[str]) -> None:
            try:
                results.append((await executor.spawn(SpawnOptions(command="sleep 30", background=True))).pid)
            except TooManyProcesses as exc:
                results.append(str(exc))

        results: list[str] = []
        async with anyio.create_task_group() as group:
            for _ in range(5):  # at once: the limit must hold for spawns still starting
                group.start_soon(spawn_sleeper, results)
        started = [r for r in results if r.startswith("host-")]
        refused = [r for r in results if not r.startswith("host-")]
        assert (len(started), len(refused)) == (3, 2)
        assert "too_many_processes: 3 processes are running" in refused[0]
        assert "PROCESS_MAX_LIVE" in refused[0]
        await executor.kill(started[0], "KILL")
        assert (await executor.spawn(SpawnOptions(command="echo room again"))).stdout == "room again\n"
    finally:
        await executor.cleanup()


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
@pytest.mark.parametrize("sandboxed", [True, False], ids=["sandboxed", "unsandboxed"])
async def test_processes_die_with_a_killed_server(tmp_path: Path, sandboxed: bool, how: signal.Signals) -> None:
    """Even those that left the tree: the server here has no shutdown handler, so SIGINT ends it as
    abruptly as SIGKILL."""
    arg = sleep_argument()
    command = f"set -- {arg}; {' '.join(ESCAPES.values())} sleep {arg}"
    server = subprocess.Popen(  # noqa: ASYNC220 - started once; its output is read off the loop
        [sys.executable, "-c", SERVE_ONE_SPAWN, str(tmp_path), command, str(sandboxed)],
        stdout=subprocess.PIPE,
    )
    tree: list[int] = []
    try:
        assert server.stdout is not None
        with anyio.fail_after(WAIT_S):
            line = await anyio.to_thread.run_sync(server.stdout.readline, abandon_on_cancel=True)
        assert line == b"spawned\n"
        tree = await sleepers(arg, len(ESCAPES) + 1)
        # No handler runs: the kernel must see to it (bwrap's parent-death signal, or the agent's input ending).
        server.send_signal(how)
        server.wait()
        for pid in tree:
            await wait_until_gone(pid)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        for pid in tree:
            kill_if_alive(pid)
        if server.stdout is not None:
            server.stdout.close()
    # What the dead server left in the temp dir goes at the next sandboxing server's start.
    left = [path async for path in anyio.Path(tempfile.gettempdir()).glob(f"{STATE_DIR_PREFIX}{server.pid}-*")]
    assert len(left) == (1 if sandboxed else 0)
    successor = HostExecutor(host_config(tmp_path, sandbox=SandboxConfig(required=True)))
    await successor.start()
    await successor.cleanup()
    assert not [path for path in left if await path.exists()]


# A server process in miniature: an executor that spawns one command and waits forever.
SERVE_ONE_SPAWN = """
import os, sys, anyio
from process_mcp import HostExecutor, ProcessMcpConfig, SpawnOptions
from process_mcp.config import Defaults, SandboxConfig

async def main():
    homes = os.environ["SANDBOX_HOMES_DIR"]
    sandbox = SandboxConfig(enabled=sys.argv[3] == "True", required=True, homes_dir=homes)
    config = ProcessMcpConfig(defaults=Defaults(workdir=sys.argv[1]), sandbox=sandbox)
    executor = HostExecutor(config)
    await executor.start()
    await executor.spawn(SpawnOptions(command=sys.argv[2], background=True))
    print("spawned", flush=True)
    await anyio.sleep_forever()

anyio.run(main)
"""


async def test_a_local_agent_that_breaks_the_protocol_is_dropped_with_its_processes_and_replaced(
    workdir: Path,
) -> None:
    """Unsandboxed, the agent runs here: a frame it may not send (here a BYE the server did not ask for)
    loses it; the server closes its stream, so it ends every process it ran (one that left its tree too)
    at once, not at the next spawn; they read as lost, and the next spawn starts a new agent."""
    executor = HostExecutor(host_config(workdir, sandbox=SandboxConfig(enabled=False)))
    arg = sleep_argument()
    children: list[int] = []
    try:
        spawned = await executor.spawn(
            SpawnOptions(command=f"setsid sleep {arg} & {started(arg)}; sleep 600", background=True)
        )
        children = await sleepers(arg, 1)
        local = executor.backend._local
        assert local is not None
        local.connection.feed([protocol.frame(protocol.BYE, 0)])
        assert not local.connection.alive
        process = await executor.get_process(spawned.pid)
        assert (process.status, process.ended_by) == ("terminated", "lost")
        for child in children:
            await wait_until_gone(child)
        again = await executor.spawn(SpawnOptions(command="echo back"))
        assert (again.stdout, again.exit_code) == ("back\n", 0)
        assert executor.backend._local is not local
    finally:
        for child in children:
            kill_if_alive(child)
        await executor.cleanup()


AGENT_ARGV_MAX = 256
"""Most bytes of the command line `ps` may show for each of the local agent's processes (its bootstrap was
600 bytes, shown once for the agent, the zygote and every supervisor)."""


async def test_ps_shows_the_local_agents_processes_by_name_in_a_short_command_line(workdir: Path) -> None:
    """Unsandboxed, the agent and a supervisor per process run here: `ps` names each process-mcp-agent,
    without the code that loads it."""
    executor = HostExecutor(host_config(workdir, sandbox=SandboxConfig(enabled=False)))
    try:
        spawned = await executor.spawn(SpawnOptions(command="echo $$; sleep 600", wait_for=r"^\d+$"))
        assert spawned.wait_result == "matched"
        shell = int(spawned.stdout)
        local = executor.backend._local
        assert local is not None
        stat = await anyio.Path(f"/proc/{shell}/stat").read_bytes()
        supervisor = int(stat.rsplit(b")", 1)[1].split()[1])
        for pid in (local.process.pid, supervisor):
            argv = await anyio.Path(f"/proc/{pid}/cmdline").read_bytes()
            assert b"process-mcp-agent" in argv.split(b"\0"), argv
            assert len(argv) <= AGENT_ARGV_MAX, argv
    finally:
        await executor.cleanup()


async def test_an_idle_box_ends_and_the_next_spawn_starts_another_with_the_same_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("process_mcp.host.box.BOX_IDLE_S", 0.5)
    host = HostExecutor(host_config(tmp_path, sandbox=SandboxConfig(required=True)))
    try:
        await host.start()
        await host.spawn(SpawnOptions(command="echo kept > ~/note; echo gone > /tmp/note"))
        box = host.backend._box
        assert box is not None
        assert box._agent is not None
        started = box._agent.process.pid
        # A process that runs keeps its box, however long.
        running = await host.spawn(SpawnOptions(command="sleep 1.5", background=True))
        await anyio.sleep(1)
        assert box._agent is not None
        assert box._agent.process.pid == started
        await wait_for_exit(host, running.pid)
        with anyio.fail_after(WAIT_S):
            while box._agent is not None:
                await anyio.sleep(POLL_S)
        await wait_until_gone(started)
        reply = await host.spawn(SpawnOptions(command="cat ~/note; cat /tmp/note"))
        assert reply.stdout == "kept\n"  # a new box: its HOME is the workspace's, its /tmp is new
        assert "No such file" in reply.stderr
    finally:
        await host.cleanup()


async def test_exit_codes_are_the_programs_own_not_a_launch_chains(host: HostExecutor) -> None:
    """exit 130 is 130, not SIGINT; a TERM trap that exits 0 is 0, not SIGTERM (in the sandbox, the agent
    reports the program's own status as it does unsandboxed)."""
    exited = await host.spawn(SpawnOptions(command="exit 130"))
    assert (exited.exit_code, exited.signal) == (130, None)
    killed = await host.spawn(SpawnOptions(command="kill -INT $$"))
    assert (killed.exit_code, killed.signal) == (130, "SIGINT")
    trap = "trap 'exit 0' TERM; echo ready; while :; do sleep 0.05; done"
    trapped = await host.spawn(SpawnOptions(command=trap, background=True))
    await wait_for_output(host, trapped.pid, "ready")
    await host.kill(trapped.pid, "TERM")
    await wait_for_exit(host, trapped.pid)
    ended = await host.get_process(trapped.pid)
    assert (ended.exit_code, ended.signal) == (0, None)


async def test_a_process_that_stops_its_own_supervisor_still_ends_when_killed(host: HostExecutor) -> None:
    """In the sandbox a process shares its supervisor's Landlock domain and may stop it; kill must still
    end the process and have its end reported."""
    started = await host.spawn(
        SpawnOptions(command="read go; kill -STOP $PPID; echo stopped-it; sleep 300", background=True)
    )
    await host.stdin(started.pid, "go\n")  # once its start is reported
    await wait_for_output(host, started.pid, "stopped-it")
    await host.kill(started.pid, "KILL")
    await wait_for_exit(host, started.pid)
    assert (await host.get_process(started.pid)).signal == "SIGKILL"


def members(group: str) -> list[str]:
    """The pids in the cgroup directory ``group``."""
    return Path(group, "cgroup.procs").read_text().split()


def counted(group: str) -> int:
    """The processes the pids cgroup directory ``group`` counts."""
    return int(Path(group, "pids.current").read_text())


def bound(group: str) -> str:
    """The pids cgroup directory ``group``'s ``pids.max``."""
    return Path(group, "pids.max").read_text().strip()


def command_line(pid: str) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


async def test_the_group_a_finished_tree_left_is_the_next_trees_and_counts_from_nothing(workdir: Path) -> None:
    """As root each process tree of the box has a cgroup of its own, taken again by a later tree once its
    last process is gone: the kernel's counts of limits hit start again from nothing, and its supervisor,
    kept there, starts the next tree without a move and counts as it did."""
    if os.geteuid() != 0:
        cannot_run_here("only a root server makes a cgroup for each process tree of the box")
    host = HostExecutor(host_config(workdir, sandbox=SandboxConfig(required=True)))
    try:
        sleepers = "grep pids /proc/self/cgroup; bash -c 'for i in $(seq {n}); do sleep {s} & done 2>/dev/null; wait'"
        limits = ProcessLimits(processes=10)
        bomb = await host.spawn(SpawnOptions(command=sleepers.format(n=40, s=60), limits=limits, timeout_ms=30000))
        assert (bomb.status, bomb.ended_by, bomb.limit) == ("terminated", "limit", "processes"), bomb
        box = host.backend._box
        assert box is not None
        assert box._cgroup is not None
        cgroups = box.sandbox.cgroups
        assert cgroups is not None
        # Its last process reaped, the bomb's group holds only its supervisor, which the agent keeps there.
        group = f"{box._cgroup}/{bomb.stdout.strip().rpartition('/')[2]}"
        pids = cgroups.directories(group)[0]
        with anyio.fail_after(WAIT_S):
            while counted(pids) != 1 or group not in cgroups._held.get(box._cgroup, []):
                await anyio.sleep(POLL_S)
        few = await host.spawn(SpawnOptions(command=sleepers.format(n=3, s=0.1), limits=limits, timeout_ms=30000))
        assert (few.exit_code, few.ended_by, few.limit) == (0, "exit", None), few
        assert few.stdout == bomb.stdout, f"the group the bomb left ({bomb.stdout}) was not taken again: {few}"
        # One after another, each tree is started by the supervisor of the one before, in its group.
        where = "echo $PPID; grep pids /proc/self/cgroup"
        seen = [(await host.spawn(SpawnOptions(command=where, limits=limits))).stdout for _ in range(4)]
        assert len(set(seen)) == 1, f"not one supervisor in one group: {seen}"
        # Its supervisor is counted once, as when it joined: the kernel bounds the tree at its 10 processes.
        sleeper = await host.spawn(SpawnOptions(command="exec sleep 30", limits=limits, background=True))
        assert sleeper.status == "running", sleeper
        inner = seen[0].split()[-1].rpartition("/")[2]
        pids = cgroups.directories(f"{box._cgroup}/{inner}")[0]
        assert (bound(pids), counted(pids), len(members(pids))) == ("11", 2, 2)
        await host.kill(sleeper.pid, "KILL")
    finally:
        await host.cleanup()


async def test_a_group_the_agent_says_holds_a_kept_supervisor_is_taken_again_only_with_one_process_in_it(
    workdir: Path,
) -> None:
    """The box's agent is the box's: what it says of a kept supervisor only orders the groups. A group it
    names while the tree that ran there still runs (two sleeps its leader left) is not the next tree's
    until one process is left."""
    if os.geteuid() != 0:
        cannot_run_here("only a root server makes a cgroup for each process tree of the box")
    host = HostExecutor(host_config(workdir, sandbox=SandboxConfig(required=True)))
    try:
        where = "grep pids /proc/self/cgroup"
        left = await host.spawn(SpawnOptions(command=f"{where}; sleep 30 >/dev/null 2>&1 & sleep 30 >/dev/null 2>&1 &"))
        assert left.exit_code == 0, left
        group = left.stdout.strip().rpartition("/")[2]
        box = host.backend._box
        assert box is not None
        assert box._agent is not None
        connection = box._agent.connection
        connection.feed([protocol.message(protocol.KEPT, 0, cgroup=group)])  # a lie: its tree still runs
        for _ in range(3):
            other = await host.spawn(SpawnOptions(command=where))
            assert other.stdout.strip().rpartition("/")[2] != group, other
            connection.feed([protocol.message(protocol.KEPT, 0, cgroup=group)])
        # The tree's supervisor and its two sleeps: one process too many to be taken again.
        assert box.sandbox.cgroups is not None
        assert box._cgroup is not None
        pids = box.sandbox.cgroups.directories(f"{box._cgroup}/{group}")[0]
        sleeps = [pid for pid in members(pids) if command_line(pid).startswith(b"sleep")]
        assert len(sleeps) == 2, members(pids)
        os.kill(int(sleeps[0]), signal.SIGKILL)
        with anyio.fail_after(WAIT_S):
            while len(members(pids)) != 2:
                await anyio.sleep(POLL_S)
        connection.feed([protocol.message(protocol.KEPT, 0, cgroup=group)])
        again = await host.spawn(SpawnOptions(command=where))
        assert again.stdout.strip().rpartition("/")[2] != group, again
        # Its tree gone, the group holds its supervisor alone, which the agent keeps there: taken again.
        os.kill(int(sleeps[1]), signal.SIGKILL)
        held = box.sandbox.cgroups._held[box._cgroup]
        with anyio.fail_after(WAIT_S):
            while counted(pids) != 1 or held[-1:] != [f"{box._cgroup}/{group}"]:
                await anyio.sleep(POLL_S)
        taken = await host.spawn(SpawnOptions(command=where))
        assert taken.stdout.strip().rpartition("/")[2] == group, taken
        assert connection.alive
    finally:
        await host.cleanup()


async def test_a_free_group_is_looked_at_again_when_it_is_taken(workdir: Path) -> None:
    """A group freed with its kept supervisor in it may wait while other groups are taken; by the time
    it is taken, something else may be in it (a supervisor the agent let go of, still exiting; here a
    process the test puts there). It is then not the next tree's."""
    if os.geteuid() != 0:
        cannot_run_here("only a root server makes a cgroup for each process tree of the box")
    host = HostExecutor(host_config(workdir, sandbox=SandboxConfig(required=True)))
    stranger = await anyio.open_process(["sleep", "30"])
    try:
        where = "grep pids /proc/self/cgroup; exec sleep 30"

        async def group_of(pid: str) -> str:
            return (await wait_for_output(host, pid, "pids")).strip().rpartition("/")[2]

        first, second = [await host.spawn(SpawnOptions(command=where, background=True)) for _ in range(2)]
        box = host.backend._box
        assert box is not None
        assert box._cgroup is not None
        cgroups = box.sandbox.cgroups
        assert cgroups is not None
        waiting = [f"{box._cgroup}/{await group_of(started.pid)}" for started in (first, second)]
        for started in (first, second):
            await host.kill(started.pid, "KILL")
            await wait_for_exit(host, started.pid)
        with anyio.fail_after(WAIT_S):  # both supervisors kept, each in its tree's group
            while sorted(cgroups._held.get(box._cgroup, [])) != sorted(waiting):
                await anyio.sleep(POLL_S)
        third = await host.spawn(SpawnOptions(command=where, background=True))
        taken = await group_of(third.pid)
        left = next(name for name in waiting if not name.endswith(f"/{taken}"))
        for directory in cgroups.directories(left):
            await anyio.Path(directory, "cgroup.procs").write_text(str(stranger.pid))
        fourth = await host.spawn(SpawnOptions(command=where, background=True))
        got = await group_of(fourth.pid)
        assert not left.endswith(f"/{got}"), f"{left} was taken with a stranger in it"
    finally:
        stranger.kill()
        await stranger.wait()
        await host.cleanup()


async def test_memory_an_earlier_tree_left_in_the_box_never_counts_against_the_next_trees_limit(
    workdir: Path,
) -> None:
    """A file in the box's /tmp stays charged to the group of the tree that wrote it: that group is not
    the next tree's, whose limit is then all its own."""
    if os.geteuid() != 0:
        cannot_run_here("only a root server makes a cgroup for each process tree of the box")
    host = HostExecutor(host_config(workdir, sandbox=SandboxConfig(required=True)))
    try:
        limits = ProcessLimits(memory_mb=200)
        wrote = await host.spawn(SpawnOptions(command="head -c 150000000 /dev/zero > /tmp/kept", limits=limits))
        assert wrote.exit_code == 0, wrote
        grab = "python3 -c 'b = bytearray(120 << 20); print(\"got\", len(b) >> 20)'"
        for _ in range(3):
            got = await host.spawn(SpawnOptions(command=grab, limits=limits, timeout_ms=30000))
            assert (got.exit_code, got.ended_by, got.stdout) == (0, "exit", "got 120\n"), got
        smaller = await host.spawn(SpawnOptions(command="echo fits", limits=ProcessLimits(memory_mb=100)))
        assert smaller.stdout == "fits\n", smaller  # a limit below what an old group holds is a new group's
    finally:
        await host.cleanup()
