"""Ending unsandboxed process groups when the server dies without cleaning up.

A sandboxed process dies with the server through bwrap's ``--die-with-parent``. An unsandboxed one has
nothing like it: a parent-death signal reaches only the direct child, not what that child started. So
the host executor starts one watchdog process, in its own session, and tells it through a pipe which
process groups are live. When the server dies, however it dies, the kernel closes the pipe, and the
watchdog kills every group still listed.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import anyio.to_thread

logger = logging.getLogger(__name__)

WATCHDOG_EXIT_S = 2.0
"""Bound on waiting for the watchdog to exit once told the server is done."""

# Lines on stdin: "+<pgid>" to watch a group, "-<pgid>" to forget it. At end of input, kill the rest.
_SCRIPT = r"""
import os, signal, sys
groups = set()
for line in sys.stdin:
    pgid = int(line[1:])
    (groups.add if line[0] == "+" else groups.discard)(pgid)
for pgid in groups:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
"""


class Watchdog:
    """One watchdog process per executor, started with the first group it is told about."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._broken = False

    def watch(self, pgid: int) -> None:
        """Kill process group ``pgid`` if the server dies before calling ``forget``."""
        self._send(f"+{pgid}\n")

    def forget(self, pgid: int) -> None:
        self._send(f"-{pgid}\n")

    def _send(self, line: str) -> None:
        if self._broken:
            return
        try:
            if self._process is None:
                self._process = subprocess.Popen(
                    [os.path.realpath(sys.executable), "-I", "-S", "-c", _SCRIPT],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,  # terminal signals and group kills aimed at the server miss it
                )
            assert self._process.stdin is not None
            # A few bytes per process; the watchdog reads at once, so the pipe never fills in practice.
            os.write(self._process.stdin.fileno(), line.encode())
        except OSError as exc:
            self._broken = True
            logger.warning("the process watchdog failed (%s); processes may outlive a crashed server", exc)

    async def close(self) -> None:
        """Tell the watchdog the server is done (it kills what is still listed) and reap it."""
        process, self._process = self._process, None
        if process is None:
            return
        assert process.stdin is not None
        process.stdin.close()
        try:
            await anyio.to_thread.run_sync(process.wait, WATCHDOG_EXIT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            await anyio.to_thread.run_sync(process.wait)
