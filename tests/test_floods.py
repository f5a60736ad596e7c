"""Floods, on every backend: a process that writes as fast as it can must not grow the server's memory
or stall it."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from process_mcp import ProcessExecutor, SpawnOptions

pytestmark = pytest.mark.anyio

MEMORY_BOUND_BYTES = 64 * 1024 * 1024
"""Growth allowed while flooding: two 1 MiB stream buffers, the terminal and reads in flight fit many times over."""
FLOOD_BOUND_S = 120.0
"""Generous bound on one flood; it takes seconds here."""
PIPE_FLOOD_BYTES = 1_000_000_000
TTY_FLOOD_BYTES = 200_000_000


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.parametrize("tty", [False, True], ids=["pipe", "tty"])
async def test_a_flood_keeps_memory_bounded_the_server_answering_and_the_tail_right(
    executor: ProcessExecutor, tty: bool
) -> None:
    host = executor
    size = TTY_FLOOD_BYTES if tty else PIPE_FLOOD_BYTES
    baseline = rss_bytes()
    started = await host.spawn(
        SpawnOptions(command=f"yes 0123456789abcdef | head -c {size}; echo; echo TAIL-OK", tty=tty, background=True)
    )
    peak, calls, slowest = baseline, 0, 0.0
    with anyio.fail_after(FLOOD_BOUND_S):
        while (await host.get_process(started.pid)).status == "running":
            began = time.perf_counter()
            assert len(await host.list_processes()) == 1
            await host.get_output(started.pid, lines=3)
            slowest = max(slowest, time.perf_counter() - began)
            calls += 1
            peak = max(peak, rss_bytes())
            await anyio.sleep(0.05)
    output = await host.get_output(started.pid, lines=2)
    assert output.stdout.rstrip().endswith("TAIL-OK")
    assert output.exit_code == 0
    assert output.cursor >= size
    assert peak - baseline < MEMORY_BOUND_BYTES, f"memory grew by {(peak - baseline) >> 20} MiB"
    assert calls > 0
    # Figures for the README and issue notes (not asserted: timings belong in bench/).
    print(
        f"flood {size >> 20} MiB tty={tty}: {calls} ps+stdout rounds, slowest {slowest * 1000:.1f} ms, "
        f"memory +{(peak - baseline) >> 20} MiB"
    )
