"""Many calls at once, on every backend: ids stay unique, output never crosses, ps stays consistent."""

from __future__ import annotations

import contextlib

import anyio
import pytest

from process_mcp import ProcessExecutor, ProcessNotFound, SpawnOptions

pytestmark = pytest.mark.anyio

LONG_MS = 20_000  # a bound that is never reached when the behaviour is right


async def test_a_hundred_spawns_at_once_get_unique_ids_and_their_own_output(executor: ProcessExecutor) -> None:
    results: dict[int, tuple[str, str, int | None]] = {}

    async def spawn(n: int) -> None:
        result = await executor.spawn(SpawnOptions(command=f"echo out-{n}; echo err-{n} >&2", timeout_ms=LONG_MS))
        results[n] = (result.pid, result.stdout + result.stderr, result.exit_code)

    async with anyio.create_task_group() as group:
        for n in range(100):
            group.start_soon(spawn, n)
    assert len({pid for pid, _, _ in results.values()}) == 100
    for n, (_, output, code) in results.items():
        assert (output, code) == (f"out-{n}\nerr-{n}\n", 0)


async def test_fifty_live_processes_with_interleaved_calls_keep_their_output_apart(executor: ProcessExecutor) -> None:
    pids: dict[int, str] = {}

    async def start(n: int) -> None:
        command = f"while read line; do echo {n}:$line; done"
        pids[n] = (await executor.spawn(SpawnOptions(command=command, background=True))).pid

    async with anyio.create_task_group() as group:
        for n in range(50):
            group.start_soon(start, n)

    async def converse(n: int, turn: int) -> None:
        reply = await executor.stdin(pids[n], f"turn{turn}\\n", wait_for=f"{n}:turn{turn}", wait_ms=LONG_MS)
        assert reply.wait_result == "matched"
        assert reply.stdout == f"{n}:turn{turn}\n"

    for turn in range(3):
        async with anyio.create_task_group() as group:
            for n in range(50):
                group.start_soon(converse, n, turn)
            group.start_soon(executor.list_processes)

    for n, pid in pids.items():
        output = await executor.get_output(pid)
        assert output.stdout == "".join(f"{n}:turn{turn}\n" for turn in range(3))

    async def stop(n: int) -> None:
        # kill reports the state after at most a second; under 25 kills at once the engine can be slower.
        if (await executor.kill(pids[n], "KILL")).status == "running":
            with contextlib.suppress(ProcessNotFound):  # ended, and already dropped from the finished ones
                await executor.get_output(pids[n], until_exit=True, wait_ms=LONG_MS)

    async with anyio.create_task_group() as group:
        for n in range(0, 50, 2):
            group.start_soon(stop, n)
    listed = {p.pid: p.status for p in await executor.list_processes()}
    for n, pid in pids.items():
        # Killed ones are terminated, or already dropped (only the newest 20 finished are kept).
        assert listed.get(pid, "terminated") == ("terminated" if n % 2 == 0 else "running"), (n, pid)
