"""Stats of a known workload for real processes: read from /proc on the host (sandboxed or not), and
by the agent in the container."""

from __future__ import annotations

import anyio
import pytest

from process_mcp import ProcessExecutor, SpawnOptions

from ..helpers import WAIT_S, backends, wait_for_output

pytestmark = pytest.mark.anyio

ALLOCATE_100_MB = (
    "python3 -c \"b = bytearray(100 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096]); "
    "print('ready', flush=True); import time; time.sleep(60)\""
)


@pytest.fixture(params=backends("limits"))
def backend(request: pytest.FixtureRequest) -> str:
    """The backends that report stats (the exec-per-process one cannot)."""
    return str(request.param)


async def test_a_process_that_allocates_100_mb_shows_that_much_resident(executor: ProcessExecutor) -> None:
    started = await executor.spawn(SpawnOptions(command=ALLOCATE_100_MB, background=True))
    await wait_for_output(executor, started.pid, "ready")
    stats = (await executor.get_output(started.pid)).stats
    assert stats is not None
    assert stats.rss_bytes >= 100 * 1024 * 1024
    assert stats.processes >= 1
    assert stats.threads >= 1
    listed = (await executor.get_process(started.pid)).stats
    assert listed is not None
    assert listed.rss_bytes >= 100 * 1024 * 1024


async def test_cpu_and_io_of_the_whole_tree_are_counted(executor: ProcessExecutor) -> None:
    burner = "sh -c 'i=0; while [ $i -lt 2000000 ]; do i=$((i+1)); done; echo burnt'"
    started = await executor.spawn(
        SpawnOptions(command=f"{burner} & head -c 5000000 /dev/zero > /dev/null; echo copied; wait", background=True)
    )
    await wait_for_output(executor, started.pid, "copied")
    with anyio.fail_after(WAIT_S):
        while True:
            stats = (await executor.get_output(started.pid)).stats
            assert stats is not None
            if stats.cpu_seconds > 0.2:
                break
            await anyio.sleep(0.2)
    assert stats.processes >= 2  # the shell and the burner below it
    assert stats.cpu_percent > 0
    await wait_for_output(executor, started.pid, "burnt")
    assert stats.wall_seconds > 0


async def test_a_finished_process_keeps_its_last_sample_with_its_final_wall_time(executor: ProcessExecutor) -> None:
    started = await executor.spawn(SpawnOptions(command="echo ready; sleep 1.5", background=True))
    await wait_for_output(executor, started.pid, "ready")
    running = (await executor.get_process(started.pid)).stats
    assert running is not None
    await executor.kill(started.pid)
    ended = (await executor.get_process(started.pid)).stats
    assert ended is not None
    assert ended.wall_seconds >= running.wall_seconds
    assert (await executor.get_process(started.pid)).stats == ended
