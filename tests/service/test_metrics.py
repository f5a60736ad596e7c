"""The gauge of running processes follows starts and exits as they happen, per principal."""

from __future__ import annotations

from pathlib import Path

import pytest

from process_mcp.core.models import SpawnOptions
from process_mcp.service.spaces import Spaces

from ..helpers import executor_for, host_config, wait_for_exit

pytestmark = pytest.mark.anyio


def live(spaces: Spaces, principal: str) -> float | None:
    return spaces.metrics.registry.get_sample_value("process_mcp_live_processes", {"principal": principal})


async def test_live_processes_rise_at_each_start_fall_at_each_exit_and_leave_with_their_space(tmp_path: Path) -> None:
    config = host_config(tmp_path)
    config.service.idle_timeout_s = 0.0
    spaces = Spaces(config, executor_for)
    try:
        assert live(spaces, "") == 0  # the local caller is counted from the start
        assert live(spaces, "alice") is None
        async with spaces.use("alice") as alice:
            assert alice is not None
            assert live(spaces, "alice") == 0
            sleeper = await alice.spawn(SpawnOptions(command="sleep 60", background=True))
            await alice.spawn(SpawnOptions(command="sleep 60", background=True, tty=True))
            assert live(spaces, "alice") == 2
            # Exited, while a child it left still holds its output: no longer running, so not counted.
            held = await alice.spawn(SpawnOptions(command="sleep 3 & echo started", wait_for="started"))
            await wait_for_exit(alice, held.pid)
            assert live(spaces, "alice") == 2
            # Waited for until it exited: no longer counted, whether or not it was running once started.
            await alice.spawn(SpawnOptions(command="true"))
            assert live(spaces, "alice") == 2
            await alice.kill(sleeper.pid)
            await wait_for_exit(alice, sleeper.pid)
            assert live(spaces, "alice") == 1
            await alice.cleanup()
            assert live(spaces, "alice") == 0
        assert live(spaces, "") == 0  # one principal's processes are not another's
        assert await spaces.reclaim_idle() == ["alice"]
        assert live(spaces, "alice") is None
    finally:
        await spaces.cleanup()
