"""Per-process limits: each hit for real, on the host (sandboxed and not) and in Docker through the agent."""

from __future__ import annotations

import anyio
import pytest
from docker.models.containers import Container

from process_mcp import (
    DockerExecutor,
    HostExecutor,
    InvalidInput,
    ProcessExecutor,
    ProcessLimits,
    SandboxConfig,
    SpawnOptions,
)

from ..helpers import backends, docker_config, host_config

pytestmark = pytest.mark.anyio

CPU_BURNER = "python3 -c 'while True: pass'"


@pytest.fixture(params=backends("limits"))
def backend(request: pytest.FixtureRequest) -> str:
    """The backends that can apply limits (the exec-per-process one refuses them: see the last test)."""
    return str(request.param)


async def test_a_process_past_its_output_limit_is_killed_and_says_so(executor: ProcessExecutor) -> None:
    limited = await executor.spawn(
        SpawnOptions(command="head -c 50000000 /dev/zero", limits=ProcessLimits(output_mb=1), timeout_ms=20000)
    )
    assert (limited.status, limited.signal, limited.ended_by, limited.limit) == (
        "terminated",
        "SIGKILL",
        "limit",
        "output",
    )
    free = await executor.spawn(SpawnOptions(command="head -c 500000 /dev/zero", limits=ProcessLimits(output_mb=1)))
    assert (free.exit_code, free.ended_by, free.limit) == (0, "exit", None)


async def test_a_process_past_its_cpu_limit_is_ended_by_sigxcpu_and_says_so(executor: ProcessExecutor) -> None:
    limited = await executor.spawn(
        SpawnOptions(command=CPU_BURNER, limits=ProcessLimits(cpu_seconds=1), timeout_ms=30000)
    )
    assert (limited.ended_by, limited.limit) == ("limit", "cpu")
    assert limited.signal == "SIGXCPU" or limited.exit_code == 128 + 24  # the shell reports its child's end
    quick = await executor.spawn(SpawnOptions(command="python3 -c 'print(1)'", limits=ProcessLimits(cpu_seconds=1)))
    assert (quick.exit_code, quick.ended_by) == (0, "exit")


async def test_memory_beyond_the_limit_cannot_be_had_and_within_it_can(executor: ProcessExecutor) -> None:
    grab = "python3 -c 'b = bytearray({mb} * 1024 * 1024); print(\"got\", len(b) >> 20)'"
    refused = await executor.spawn(SpawnOptions(command=grab.format(mb=200), limits=ProcessLimits(memory_mb=64)))
    assert refused.exit_code != 0
    assert "MemoryError" in refused.stderr
    allowed = await executor.spawn(SpawnOptions(command=grab.format(mb=16), limits=ProcessLimits(memory_mb=64)))
    assert allowed.stdout == "got 16\n"


async def test_a_tree_holding_more_memory_than_its_limit_is_ended_and_says_so(executor: ProcessExecutor) -> None:
    # Each process stays under the per-process bound; together they are over the tree's.
    hold = "python3 -c 'import time; b = bytearray(40 << 20); print(\"held\", flush=True); time.sleep(60)'"
    tree = await executor.spawn(
        SpawnOptions(command=f"{hold} & {hold} & {hold} & wait", limits=ProcessLimits(memory_mb=64), timeout_ms=30000)
    )
    assert (tree.status, tree.ended_by, tree.limit) == ("terminated", "limit", "memory"), tree
    one = await executor.spawn(
        SpawnOptions(command=hold.replace("60", "0.5"), limits=ProcessLimits(memory_mb=64), timeout_ms=30000)
    )
    assert (one.exit_code, one.ended_by, one.limit, one.stdout) == (0, "exit", None, "held\n")


async def test_a_tree_that_reaches_its_processes_limit_is_ended_and_says_so(executor: ProcessExecutor) -> None:
    # bash retries a fork that fails (dash gives up and exits): the kernel's bound alone would hold it there.
    sleepers = "bash -c 'for i in $(seq {n}); do sleep {s} & done 2>/dev/null; wait'"
    bomb = await executor.spawn(
        SpawnOptions(command=sleepers.format(n=40, s=60), limits=ProcessLimits(processes=10), timeout_ms=30000)
    )
    assert (bomb.status, bomb.ended_by, bomb.limit) == ("terminated", "limit", "processes"), bomb
    few = await executor.spawn(
        SpawnOptions(command=sleepers.format(n=3, s=0.5), limits=ProcessLimits(processes=10), timeout_ms=30000)
    )
    assert (few.exit_code, few.ended_by, few.limit) == (0, "exit", None)


async def test_a_small_processes_limit_counts_only_the_callers_processes(executor: ProcessExecutor) -> None:
    # The sandbox's launch chain (bwrap and its init) must not count: a limit of 1 runs one process.
    for processes in range(1, 6):
        small = await executor.spawn(
            SpawnOptions(command="echo ok", limits=ProcessLimits(processes=processes), timeout_ms=30000)
        )
        assert (small.exit_code, small.stdout, small.ended_by) == (0, "ok\n", "exit"), (processes, small)
    # A tree is ended when it reaches its limit (the kernel refuses the fork beyond): two fit under three.
    two = await executor.spawn(
        SpawnOptions(command="sleep 0.2 & wait", limits=ProcessLimits(processes=3), timeout_ms=30000)
    )
    assert (two.exit_code, two.ended_by) == (0, "exit"), two


async def test_limits_above_the_configured_maximum_are_refused(executor: ProcessExecutor) -> None:
    with pytest.raises(InvalidInput, match="PROCESS_MAX_CPU_SECONDS"):
        await executor.spawn(SpawnOptions(command="true", limits=ProcessLimits(cpu_seconds=10**6)))
    with pytest.raises(InvalidInput, match="SANDBOX_MAX_MEMORY_MB"):
        await executor.spawn(SpawnOptions(command="true", limits=ProcessLimits(memory_mb=10**7)))


async def test_the_sandbox_bounds_a_process_tree_to_its_processes_limit_between_measurements(workdir: str) -> None:
    # Forty forks take less than a measurement interval: only the kernel's bound keeps them to ten.
    ex = HostExecutor(host_config(workdir, sandbox=SandboxConfig(required=True)))
    await ex.start()
    try:
        forks = "for i in $(seq 40); do (echo >> started; exec sleep 60) & done 2>/dev/null; wait"
        await ex.spawn(SpawnOptions(command=forks, limits=ProcessLimits(processes=10), timeout_ms=30000))
        started = (await anyio.Path(workdir, "started").read_text()).count("\n")
        assert 1 <= started < 10  # the shell and the sandbox's init count too
    finally:
        await ex.cleanup()


@pytest.mark.docker
async def test_the_exec_per_process_path_refuses_limits_it_cannot_apply(shared_container: Container) -> None:
    ex = DockerExecutor(docker_config(str(shared_container.name), "/tmp", use_existing=True, agent=False))
    await ex.start()
    try:
        with pytest.raises(InvalidInput, match="limits need the agent"):
            await ex.spawn(SpawnOptions(command="true", limits=ProcessLimits(output_mb=1)))
        assert (await ex.spawn(SpawnOptions(command="echo ok"))).stdout == "ok\n"
    finally:
        await ex.cleanup()
