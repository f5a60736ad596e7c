"""Using process-mcp as a library: commands, a Python REPL over a real terminal, background work,
kill, and serving the same executor over MCP.

Run it with ``python examples/library_usage.py``; pass ``--serve`` to also serve the tools on stdio.
"""

import sys

import anyio

from process_mcp import ProcessMcpConfig, SpawnOptions, create_process_mcp
from process_mcp.config import Defaults

WAIT_MS = 10_000
"""Bound on each wait below: every wait returns as soon as its condition holds, never by sleeping."""


def say(line: str) -> None:
    # With --serve, stdout carries the MCP protocol, so the demo's own lines go to stderr.
    print(line, file=sys.stderr if SERVING else sys.stdout, flush=True)


SERVING = "--serve" in sys.argv


async def main() -> None:
    config = ProcessMcpConfig(mode="host", defaults=Defaults(timeout_ms=5000))  # works in the default workspace
    async with await create_process_mcp(config) as mcp:
        executor = mcp.executor

        # 1. A command that finishes: stdout, stderr and the exit code come back in one reply.
        result = await executor.spawn(SpawnOptions(command="echo hello; echo oops >&2; exit 3"))
        say(f"[echo] {result.pid} exit={result.exit_code} stdout={result.stdout!r} stderr={result.stderr!r}")

        # 2. A Python REPL in a real terminal: spawn returns once the prompt shows (waitFor), and stdin
        #    returns the answer to what was typed in the same call.
        repl = await executor.spawn(SpawnOptions(command="python3 -q", tty=True, wait_for=">>> $", timeout_ms=WAIT_MS))
        answer = await executor.stdin(
            repl.pid, "import sys; print('tty:', sys.stdin.isatty(), 6 * 7)\\r", wait_for=">>> $", wait_ms=WAIT_MS
        )
        say(f"[repl] {repl.pid} answered:\n{answer.stdout}")
        await executor.stdin(repl.pid, "exit()\\r")
        ended = await executor.get_output(repl.pid, until_exit=True, wait_ms=WAIT_MS)
        say(f"[repl] {repl.pid} {ended.status} exit={ended.exit_code}")

        # 3. A background process, listed by ps, then killed with its whole process group. idleMs would
        #    return once a program goes quiet (waiting for input); here the first tick is enough.
        worker = await executor.spawn(
            SpawnOptions(command="while true; do echo tick; sleep 0.1; done", wait_for="tick", timeout_ms=WAIT_MS)
        )
        for info in await executor.list_processes():
            say(f"[ps] {info.pid} {info.status} {info.command}")
        killed = await executor.kill(worker.pid, "SIGTERM")
        say(f"[kill] {killed.pid} {killed.status} by {killed.signal}")

        # 4. The same executor behind the five MCP tools, on stdio, for a client to drive.
        if SERVING:
            await mcp.server.run_stdio_async()
    # Leaving the block ended every process the executor started.


if __name__ == "__main__":
    anyio.run(main)
