"""Floods, on every backend: a process that writes as fast as it can must not grow the server's memory
or stall it.

The server runs in a process of its own for each flood, and what is measured is that process's peak
resident memory (VmHWM) during the flood: the test process's memory holds whatever earlier tests left
in its allocator, which a leak can fill without the resident size moving.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio
import pytest

from ..helpers import backend_config

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
MEMORY_BOUND_BYTES = 64 * 1024 * 1024
"""Growth allowed while flooding: two 1 MiB stream buffers, the terminal and reads in flight fit many times over."""
FLOOD_BOUND_S = 120.0
"""Generous bound on one flood; it takes seconds here."""
PIPE_FLOOD_BYTES = 1_000_000_000
TTY_FLOOD_BYTES = 200_000_000

# The server in miniature: an executor that runs one flood while answering ps and stdout, and reports
# its own peak memory during it, and the end of what it held when the flood's exit was recorded (the
# record's contract: what the process wrote comes before its exit; a client that sees "terminated" reads
# its output at once). argv: the configuration (JSON), the flood's size, "tty" or "pipe".
SERVE_ONE_FLOOD = """
import json, sys, time
import anyio
from process_mcp import DockerExecutor, HostExecutor, ProcessMcpConfig, SpawnOptions
from process_mcp.core.registry import ManagedProcess

held_at_exit = {}
def finish(record, *args, _finish=ManagedProcess.finish, **kwargs):
    held_at_exit[record.pid] = record.stdout.tail(64).decode(errors="replace")
    _finish(record, *args, **kwargs)
ManagedProcess.finish = finish

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise SystemExit(f"no {field} in /proc/self/status")

async def main():
    config = ProcessMcpConfig.model_validate_json(sys.argv[1])
    size, tty = int(sys.argv[2]), sys.argv[3] == "tty"
    executor = HostExecutor(config) if config.mode == "host" else DockerExecutor(config)
    await executor.start()
    try:
        await executor.spawn(SpawnOptions(command="echo warm", tty=tty))  # what any spawn needs, before the baseline
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # the peak (VmHWM) starts again from what is resident now
        baseline = status("VmRSS")
        command = f"yes 0123456789abcdef | head -c {size}; echo; echo TAIL-OK"
        started = await executor.spawn(SpawnOptions(command=command, tty=tty, background=True))
        calls, slowest, listed = 0, 0.0, set()
        while (await executor.get_process(started.pid)).status == "running":
            began = time.perf_counter()
            listed.add(len(await executor.list_processes()))
            await executor.get_output(started.pid, lines=3)
            slowest = max(slowest, time.perf_counter() - began)
            calls += 1
            await anyio.sleep(0.05)
        output = await executor.get_output(started.pid, lines=2)
        print(json.dumps({
            "growth": status("VmHWM") - baseline, "calls": calls, "slowest": slowest, "listed": sorted(listed),
            "tail": output.stdout, "exit_code": output.exit_code, "cursor": output.cursor,
            "held_at_exit": held_at_exit[started.pid],
        }))
    finally:
        await executor.cleanup()

anyio.run(main)
"""


@pytest.mark.parametrize("tty", [False, True], ids=["pipe", "tty"])
async def test_a_flood_keeps_memory_bounded_the_server_answering_and_the_tail_right(
    request: pytest.FixtureRequest, backend: str, workdir: str, tty: bool
) -> None:
    size = TTY_FLOOD_BYTES if tty else PIPE_FLOOD_BYTES
    config = backend_config(request, backend, workdir)
    argv = [sys.executable, "-c", SERVE_ONE_FLOOD, config.model_dump_json(), str(size), "tty" if tty else "pipe"]
    with anyio.fail_after(FLOOD_BOUND_S):
        done = await anyio.run_process(argv, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    report = json.loads(done.stdout)
    assert report["held_at_exit"].rstrip().endswith("TAIL-OK"), (
        f"at its exit the server held {report['held_at_exit']!r}"
    )
    assert report["tail"].rstrip().endswith("TAIL-OK")
    assert report["exit_code"] == 0
    assert report["cursor"] >= size
    assert report["listed"] == [2]  # the warm-up and the flood: ps answered on every round
    assert report["growth"] < MEMORY_BOUND_BYTES, f"the server's memory grew by {report['growth'] >> 20} MiB"
    assert report["calls"] > 0
    # Figures for the README and issue notes (not asserted: timings belong in bench/).
    print(
        f"flood {size >> 20} MiB tty={tty}: {report['calls']} ps+stdout rounds, slowest "
        f"{report['slowest'] * 1000:.1f} ms, peak memory +{report['growth'] >> 20} MiB"
    )
