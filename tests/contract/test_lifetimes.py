"""Why a process ended (endedBy), and the maximum lifetime, on every backend with real processes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from process_mcp import ProcessExecutor, SpawnOptions

from ..helpers import (
    backend_config,
    backends,
    executor_for,
    pid_alive,
    sleep_argument,
    sleepers,
    wait_for_exit,
    wait_for_output,
)

pytestmark = pytest.mark.anyio

LIFETIME_S = 1.0


@pytest.fixture(params=backends("exact_exits"))
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def make_executor(request: pytest.FixtureRequest, backend: str, workdir: str) -> ProcessExecutor:
    config = backend_config(request, backend, workdir)
    config.limits.max_lifetime_s = LIFETIME_S
    ex = executor_for(config)
    await ex.start()
    return ex


@pytest.fixture
async def limited(request: pytest.FixtureRequest, backend: str, workdir: str) -> AsyncIterator[ProcessExecutor]:
    ex = await make_executor(request, backend, workdir)
    try:
        yield ex
    finally:
        await ex.cleanup()


async def test_a_process_that_ends_on_its_own_says_exit(limited: ProcessExecutor) -> None:
    result = await limited.spawn(SpawnOptions(command="exit 3"))
    assert (result.exit_code, result.ended_by) == (3, "exit")


async def test_a_process_ended_with_kill_says_kill(limited: ProcessExecutor) -> None:
    started = await limited.spawn(SpawnOptions(command="sleep 30", background=True))
    assert started.ended_by is None
    killed = await limited.kill(started.pid, "SIGKILL")
    assert (killed.status, killed.signal, killed.ended_by) == ("terminated", "SIGKILL", "kill")


async def test_a_stop_or_continue_signal_does_not_count_as_ending_it(limited: ProcessExecutor) -> None:
    started = await limited.spawn(SpawnOptions(command="echo ready; sleep 0.5; echo done", background=True))
    await wait_for_output(limited, started.pid, "ready")
    await limited.kill(started.pid, "SIGSTOP")
    await limited.kill(started.pid, "SIGCONT")
    await wait_for_exit(limited, started.pid)
    assert (await limited.get_process(started.pid)).ended_by == "exit"


async def test_a_process_still_running_at_shutdown_says_shutdown(
    request: pytest.FixtureRequest, backend: str, workdir: str
) -> None:
    ex = await make_executor(request, backend, workdir)
    started = await ex.spawn(SpawnOptions(command="sleep 0.8", background=True))
    await ex.cleanup()
    assert (await ex.get_process(started.pid)).ended_by == "shutdown"


async def test_a_process_past_its_lifetime_is_ended_with_everything_it_started(
    limited: ProcessExecutor, backend: str
) -> None:
    argument = sleep_argument()
    started = await limited.spawn(SpawnOptions(command=f"sleep {argument} & sleep {argument}", background=True))
    children = await sleepers(argument, 2) if backend.startswith("host") else []
    await wait_for_exit(limited, started.pid)
    ended = await limited.get_process(started.pid)
    assert (ended.signal, ended.ended_by) == ("SIGTERM", "lifetime")
    assert not [pid for pid in children if pid_alive(pid)]


async def test_a_process_that_ignores_sigterm_gets_sigkill_after_the_grace(limited: ProcessExecutor) -> None:
    started = await limited.spawn(SpawnOptions(command="trap '' TERM; echo ready; sleep 30", background=True))
    await wait_for_output(limited, started.pid, "ready")
    await wait_for_exit(limited, started.pid)
    ended = await limited.get_process(started.pid)
    assert (ended.signal, ended.ended_by) == ("SIGKILL", "lifetime")


async def test_a_process_that_ends_in_time_is_left_alone(limited: ProcessExecutor) -> None:
    result = await limited.spawn(SpawnOptions(command="sleep 0.2; echo done"))
    assert (result.stdout, result.exit_code, result.ended_by) == ("done\n", 0, "exit")
